//! Files from Debian packages of either architecture, for the one image that needs programs we
//! do not write: flanneld runs `iptables` and `nft` (as upstream's image carries them) and
//! upstream's init containers run `cp`. The packages are downloaded for the image's
//! architecture (`apt-get download pkg:arch`, arm64 added as a foreign architecture once) and
//! unpacked into the cache; a program is taken with exactly the shared libraries it needs
//! (`DT_NEEDED`, followed transitively) and its ELF interpreter.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::paths::cache_dir;
use anyhow::{Context, Result, bail};

use super::oci::{File, FileContents};
use crate::setup::run_root;

/// An unpacked set of Debian packages for one architecture.
pub struct Root {
    dir: PathBuf,
    /// Debian's multiarch triple, e.g. `aarch64-linux-gnu`.
    triple: &'static str,
}

/// Downloads and unpacks `packages` for `arch` (Debian's name: `amd64`, `arm64`) as the set
/// `set`; cached.
pub fn unpack(set: &str, arch: &str, triple: &'static str, packages: &[&str]) -> Result<Root> {
    let dir = cache_dir().join("debs").join(arch).join(set);
    let debs = dir.join("debs");
    let root = dir.join("root");
    std::fs::create_dir_all(&debs)?;
    let stamp = dir.join("packages");
    let wanted = packages.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
        return Ok(Root { dir: root, triple });
    }
    ensure_architecture(arch)?;
    let qualified: Vec<String> = packages.iter().map(|p| format!("{p}:{arch}")).collect();
    let status = Command::new("apt-get")
        .arg("download")
        .args(&qualified)
        .current_dir(&debs)
        .status()
        .context("apt-get download")?;
    if !status.success() {
        bail!("apt-get download {} failed", qualified.join(" "));
    }
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&debs)? {
        let path = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("deb") {
            continue;
        }
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&path)
            .arg(&root)
            .status()
            .context("dpkg-deb -x")?;
        if !status.success() {
            bail!("dpkg-deb -x {} failed", path.display());
        }
    }
    std::fs::write(&stamp, wanted)?;
    Ok(Root { dir: root, triple })
}

/// Adds `arch` to dpkg's foreign architectures (and refreshes the lists) when missing.
fn ensure_architecture(arch: &str) -> Result<()> {
    let native = Command::new("dpkg").arg("--print-architecture").output()?;
    if String::from_utf8_lossy(&native.stdout).trim() == arch {
        return Ok(());
    }
    let foreign = Command::new("dpkg")
        .arg("--print-foreign-architectures")
        .output()?;
    if String::from_utf8_lossy(&foreign.stdout)
        .split_whitespace()
        .any(|a| a == arch)
    {
        return Ok(());
    }
    eprintln!("    adding {arch} to dpkg's architectures (for apt-get download)");
    run_root("dpkg", &["--add-architecture", arch])?;
    run_root("apt-get", &["update", "-q"])
}

impl Root {
    /// `path` (absolute inside the packages) as an image file, symlinks kept as symlinks.
    pub fn file(&self, path: &str) -> Result<File> {
        let on_disk = self.dir.join(path.trim_start_matches('/'));
        let meta = std::fs::symlink_metadata(&on_disk)
            .with_context(|| format!("{path} is in none of the downloaded packages"))?;
        let contents = if meta.file_type().is_symlink() {
            FileContents::Symlink(std::fs::read_link(&on_disk)?.display().to_string())
        } else {
            FileContents::Bytes(std::fs::read(&on_disk)?)
        };
        use std::os::unix::fs::PermissionsExt;
        Ok(File {
            path: path.into(),
            mode: meta.permissions().mode() & 0o7777,
            contents,
        })
    }

    /// Every regular file and symlink under `dir` (absolute inside the packages), recursively.
    pub fn tree(&self, dir: &str) -> Result<Vec<File>> {
        let mut out = Vec::new();
        let on_disk = self.dir.join(dir.trim_start_matches('/'));
        for entry in
            std::fs::read_dir(&on_disk).with_context(|| format!("reading {}", on_disk.display()))?
        {
            let entry = entry?;
            let path = format!("{dir}/{}", entry.file_name().to_string_lossy());
            if entry.file_type()?.is_dir() {
                out.extend(self.tree(&path)?);
            } else {
                out.push(self.file(&path)?);
            }
        }
        Ok(out)
    }

    /// The shared libraries and interpreter `programs` (and the libraries themselves) need, as
    /// regular files at the paths the loader looks in.
    pub fn libraries_for(&self, programs: &[&File]) -> Result<Vec<File>> {
        let mut pending: Vec<Vec<u8>> = programs
            .iter()
            .filter_map(|f| match &f.contents {
                FileContents::Bytes(b) => Some(b.clone()),
                _ => None,
            })
            .collect();
        let mut libs: BTreeMap<String, File> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        while let Some(elf) = pending.pop() {
            let (interpreter, needed) = dynamic_info(&elf)?;
            if let Some(interp) = interpreter
                && !libs.contains_key(&interp)
            {
                let name = interp.rsplit('/').next().unwrap_or(&interp).to_string();
                let bytes = self.find_library(&name)?;
                libs.insert(
                    interp.clone(),
                    File {
                        path: interp,
                        mode: 0o755,
                        contents: FileContents::Bytes(bytes),
                    },
                );
            }
            for soname in needed {
                if !seen.insert(soname.clone()) {
                    continue;
                }
                let bytes = self.find_library(&soname)?;
                pending.push(bytes.clone());
                let path = format!("/lib/{}/{soname}", self.triple);
                libs.insert(
                    path.clone(),
                    File {
                        path,
                        mode: 0o644,
                        contents: FileContents::Bytes(bytes),
                    },
                );
            }
        }
        Ok(libs.into_values().collect())
    }

    /// The library named `soname`, symlinks followed, from the multiarch library directories.
    fn find_library(&self, soname: &str) -> Result<Vec<u8>> {
        for dir in ["lib", "usr/lib"] {
            let path = self.dir.join(dir).join(self.triple).join(soname);
            if path.exists() {
                return Ok(std::fs::read(&path)?);
            }
        }
        bail!(
            "{soname} ({}) is in none of the downloaded packages: add its package to the image's list",
            self.triple
        )
    }
}

/// The ELF interpreter and `DT_NEEDED` entries of `elf` (read with binutils' readelf, which
/// reads any architecture).
fn dynamic_info(elf: &[u8]) -> Result<(Option<String>, Vec<String>)> {
    let tmp = tempfile::NamedTempFile::new()?;
    std::fs::write(tmp.path(), elf)?;
    let out = readelf(tmp.path(), &["-d", "-l", "-W"])?;
    let interpreter = out.lines().find_map(|l| {
        l.split_once("[Requesting program interpreter: ")
            .and_then(|(_, rest)| rest.strip_suffix(']'))
            .map(String::from)
    });
    let needed = out
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .filter_map(|l| {
            l.split_once("Shared library: [")
                .and_then(|(_, rest)| rest.strip_suffix(']'))
                .map(String::from)
        })
        .collect();
    Ok((interpreter, needed))
}

fn readelf(path: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("readelf")
        .args(args)
        .arg(path)
        .output()
        .context("running readelf (binutils)")?;
    // A static program has no dynamic section: readelf says so and exits 0.
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
