//! How the images' binaries are linked and stripped.
//!
//! A binary's code is mapped from the image's file, and the kernel maps 64 KiB around every
//! page a process touches (fault-around), so an idle controller's RSS grows to nearly all of its
//! `.text` although it runs a third of it. The images are therefore linked by LLVM's lld (the
//! toolchain's `rust-lld`) with `--symbol-ordering-file`: the functions the running cluster
//! was seen to execute (`code-order/<arch>.txt.gz`, written by `xtask code-order`) are placed
//! together at the start of `.text`, and the code an idle process never runs stays unmapped. A
//! stale list costs only layout (names it lacks are placed as before; names no longer built are
//! ignored), never correctness.
//!
//! Symbol names carry hashes of the cargo profile and the target (not of flags or the
//! checkout's path), so there is one list per architecture, and the profiles keep their symbols:
//! `code-order` reads them from the build, and the images get a copy stripped here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, Result, bail};

use super::Arch;

/// Where `arch`'s list is kept: the functions to place first, one mangled symbol name per
/// line, gzip-compressed.
pub fn order_source(arch: &Arch) -> PathBuf {
    let cpu = arch.triple.split('-').next().unwrap_or(arch.triple);
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("src/images/code-order/{cpu}.txt.gz"))
}

/// The rustflags that link `arch`'s musl binaries with `rust-lld` and its symbol order: the
/// list is unpacked into the target directory, where the linker reads it.
pub fn rustflags(arch: &Arch) -> Result<String> {
    let gcc_ld = host_tools()?.join("gcc-ld");
    if !gcc_ld.join("ld.lld").is_file() {
        bail!(
            "{} has no ld.lld: the images are linked with the toolchain's rust-lld \
             (reinstall the toolchain with rustup)",
            gcc_ld.display()
        );
    }
    let order = unpack_order(arch)?;
    for path in [&gcc_ld, &order] {
        if path.to_string_lossy().contains(char::is_whitespace) {
            bail!(
                "{} contains whitespace, which a target's RUSTFLAGS cannot carry",
                path.display()
            );
        }
    }
    Ok(format!(
        "-C link-arg=-fuse-ld=lld -C link-arg=-B{} \
         -C link-arg=-Wl,--symbol-ordering-file={} -C link-arg=-Wl,--no-warn-symbol-ordering",
        gcc_ld.display(),
        order.display()
    ))
}

/// Unpacks `arch`'s list into the target directory under a name carrying its digest, and
/// returns that path. cargo does not watch files the linker reads, but it rebuilds when the
/// flags change: a new list is a new name, so the binaries are linked again with it.
fn unpack_order(arch: &Arch) -> Result<PathBuf> {
    use sha2::Digest;
    let names = unpacked(arch)?;
    let digest = sha2::Sha256::digest(&names);
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let dir = std::path::absolute(super::target_dir())?;
    let to = dir.join(format!("code-order-{}-{hex}.txt", arch.name));
    if !to.is_file() {
        std::fs::create_dir_all(&dir)?;
        // Through a temporary file and a rename: a build never reads half a list.
        let mut partial = tempfile::NamedTempFile::new_in(&dir)?;
        partial.write_all(&names)?;
        partial
            .persist(&to)
            .with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(to)
}

/// `arch`'s list, unpacked.
fn unpacked(arch: &Arch) -> Result<Vec<u8>> {
    let source = order_source(arch);
    let packed = std::fs::read(&source).with_context(|| format!("reading {}", source.display()))?;
    let mut names = Vec::new();
    flate2::read::GzDecoder::new(packed.as_slice())
        .read_to_end(&mut names)
        .with_context(|| format!("unpacking {}", source.display()))?;
    Ok(names)
}

/// `arch`'s list as a set of names.
pub fn read_order(arch: &Arch) -> Result<std::collections::BTreeSet<String>> {
    Ok(String::from_utf8_lossy(&unpacked(arch)?)
        .lines()
        .map(str::to_owned)
        .collect())
}

/// Writes `names` as `arch`'s list.
pub fn write_order(arch: &Arch, names: &str) -> Result<()> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(names.as_bytes())?;
    let path = order_source(arch);
    std::fs::write(&path, gz.finish()?).with_context(|| format!("writing {}", path.display()))
}

/// The contents of `path` without its symbol table (what the image carries: the symbols are a
/// third of the file and are not loaded).
pub fn stripped(path: &Path) -> Result<Vec<u8>> {
    let dir = path.parent().context("binary without a directory")?;
    let out = tempfile::NamedTempFile::new_in(dir)?;
    let objcopy = host_tools()?.join("rust-objcopy");
    let status = Command::new(&objcopy)
        .arg("--strip-all")
        .arg(path)
        .arg(out.path())
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !status.success() {
        bail!(
            "rust-objcopy --strip-all {} failed ({status})",
            path.display()
        );
    }
    std::fs::read(out.path()).with_context(|| format!("reading {}", out.path().display()))
}

/// The toolchain's own tools for this host (`gcc-ld/ld.lld`, `rust-objcopy`).
fn host_tools() -> Result<PathBuf> {
    static TOOLS: OnceLock<PathBuf> = OnceLock::new();
    if let Some(tools) = TOOLS.get() {
        return Ok(tools.clone());
    }
    let version = super::rustc(&["-vV"])?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host")?;
    let tools = super::sysroot()?
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin");
    Ok(TOOLS.get_or_init(|| tools).clone())
}
