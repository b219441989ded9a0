//! How the images' binaries are linked and stripped.
//!
//! A binary's code is mapped from the image's file, and the kernel maps 64 KiB around every
//! page a process touches (fault-around), so an idle controller's RSS grows to nearly all of its
//! `.text` although it runs a third of it. The images are therefore linked by LLVM's lld (the
//! toolchain's `rust-lld`) with `--symbol-ordering-file`: the functions the running cluster
//! was seen to execute (`code-order.txt.gz`, written by `xtask code-order`) are placed together
//! at the start of `.text`, and the code an idle process never runs stays unmapped. A stale
//! list costs only layout (names it lacks are placed as before; names no longer built are
//! ignored), never correctness.
//!
//! The list names symbols as the shipped profile builds them (their hashes depend on the cargo
//! profile, not on flags or the checkout's path), so the profiles keep their symbols and the
//! images get a copy stripped here.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The functions to place first, one mangled symbol name per line, gzip-compressed.
const ORDER: &str = "src/images/code-order.txt.gz";

/// Where `xtask code-order` writes the list it gathered.
pub fn order_source() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(ORDER)
}

/// The rustflags that link a musl binary with `rust-lld` and the symbol order: the list is
/// unpacked into the target directory, where the linker reads it.
pub fn rustflags() -> Result<String> {
    let gcc_ld = host_tools()?.join("gcc-ld");
    if !gcc_ld.join("ld.lld").is_file() {
        bail!(
            "{} has no ld.lld: the images are linked with the toolchain's rust-lld \
             (reinstall the toolchain with rustup)",
            gcc_ld.display()
        );
    }
    let order = unpack_order()?;
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

/// Unpacks the list into the target directory under a name carrying its digest, and returns
/// that path. cargo does not watch files the linker reads, but it rebuilds when the flags
/// change: a new list is a new name, so the binaries are linked again with it.
fn unpack_order() -> Result<PathBuf> {
    use sha2::Digest;
    let packed = std::fs::read(order_source())
        .with_context(|| format!("reading {}", order_source().display()))?;
    let mut names = Vec::new();
    flate2::read::GzDecoder::new(packed.as_slice())
        .read_to_end(&mut names)
        .with_context(|| format!("unpacking {}", order_source().display()))?;
    let digest = sha2::Sha256::digest(&names);
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    let to = std::path::absolute(super::target_dir().join(format!("code-order-{hex}.txt")))?;
    if !to.is_file() {
        std::fs::create_dir_all(super::target_dir())?;
        std::fs::write(&to, names).with_context(|| format!("writing {}", to.display()))?;
    }
    Ok(to)
}

/// The contents of `path` without its symbol table (what the image carries: the symbols are a
/// third of the file and are not loaded).
pub fn stripped(path: &Path) -> Result<Vec<u8>> {
    let out = path.with_file_name(format!(
        ".{}.stripped",
        path.file_name()
            .and_then(|n| n.to_str())
            .context("binary without a file name")?
    ));
    let objcopy = host_tools()?.join("rust-objcopy");
    let status = Command::new(&objcopy)
        .arg("--strip-all")
        .arg(path)
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !status.success() {
        bail!(
            "rust-objcopy --strip-all {} failed ({status})",
            path.display()
        );
    }
    let bytes = std::fs::read(&out).with_context(|| format!("reading {}", out.display()))?;
    std::fs::remove_file(&out)?;
    Ok(bytes)
}

/// The toolchain's own tools for this host (`rust-lld`, `gcc-ld/`, `rust-objcopy`).
fn host_tools() -> Result<PathBuf> {
    let rustc = |arg: &str| -> Result<String> {
        let out = Command::new("rustc")
            .arg(arg)
            .output()
            .context("running rustc")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sysroot = rustc("--print=sysroot")?;
    let version = rustc("-vV")?;
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("rustc -vV names no host")?;
    Ok(Path::new(sysroot.trim())
        .join("lib/rustlib")
        .join(host.trim())
        .join("bin"))
}
