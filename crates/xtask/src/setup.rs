//! Set-up on a fresh Debian bookworm machine: Debian packages, then the Kubernetes v1.20.2
//! binaries built from Debian's `kubernetes` source package and cached outside the repository.

use std::path::Path;
use std::process::Command;

use crate::paths::{K8S_BINARIES, K8S_VERSION, cache_dir, k8s_bin_dir};
use anyhow::{Context, Result, bail};

use crate::step;

/// Debian packages the suite and `up` need.
const PACKAGES: &[&str] = &[
    "etcd-server",
    "pebble",
    "golang-go",
    "rsync",
    "jq",
    "make",
    "dpkg-dev",
    "iproute2",
    "iptables",
    "nftables",
    "iputils-ping",
    "curl",
    "ca-certificates",
    // The real CNI delegates (bridge, host-local, portmap in /usr/lib/cni) the flannel plugin calls.
    "containernetworking-plugins",
    "ethtool",
    // Real nodes (issue 11): a containerd per node, kube-proxy's conntrack, the images' tools.
    "containerd",
    "runc",
    "conntrack",
    "util-linux",
    // reflect2 1.0.2: the Kubernetes 1.20 tree vendors 1.0.1, which crashes under Go ≥ 1.18.
    "golang-github-modern-go-reflect2-dev",
    // Proxy benchmark peers and load generators (benches/, its smoke test runs in the suite).
    "nginx",
    "haproxy",
    "wrk",
    "nghttp2-client",
    // perf: the proxy benchmark profiles our controller and nginx (cpu-clock).
    "linux-perf",
    // Security benchmark tools (benches/src/security; its quick variant runs in the suite).
    "testssl.sh",
    "slowhttptest",
    // The pingora benchmark peer's zlib-ng build.
    "cmake",
];

/// The deb-src entry this project adds when the machine has none.
const DEB_SRC_FILE: &str = "/etc/apt/sources.list.d/homecluster-deb-src.sources";

pub fn all() -> Result<()> {
    step("Debian packages", packages)?;
    step("oha (benchmark load generator)", oha)?;
    step(&format!("Kubernetes {K8S_VERSION} binaries"), k8s_binaries)
}

/// The oha version the benchmarks use, installed once into the cache dir.
const OHA_VERSION: &str = "1.16.0";

fn oha() -> Result<()> {
    let root = cache_dir().join("oha");
    let bin = root.join("bin/oha");
    let current = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(OHA_VERSION))
        .unwrap_or(false);
    if current {
        eprintln!("    cached in {}", bin.display());
        return Ok(());
    }
    eprintln!("    cargo install oha {OHA_VERSION} (about 6 minutes on 2 cores, once)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "install",
            "--locked",
            "oha",
            "--version",
            OHA_VERSION,
            "--root",
        ])
        .arg(&root)
        .env_remove("CARGO_TARGET_DIR")
        .status()
        .context("cargo install oha")?;
    if !status.success() {
        bail!("cargo install oha failed");
    }
    Ok(())
}

fn packages() -> Result<()> {
    ensure_packages(PACKAGES)
}

/// Installs those of `packages` that are missing (apt, as root or through sudo).
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("    all {} packages present", packages.len());
        return Ok(());
    }
    eprintln!("    installing {}", missing.join(" "));
    run_root("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    run_root("apt-get", &args)
}

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn k8s_binaries() -> Result<()> {
    let bin = k8s_bin_dir();
    // Only what is missing is built: a cache from before kubelet and kube-proxy were added
    // keeps its control plane.
    let missing: Vec<&str> = K8S_BINARIES
        .iter()
        .copied()
        .filter(|b| !bin.join(b).is_file())
        .collect();
    if missing.is_empty() {
        eprintln!("    cached in {}", bin.display());
        return Ok(());
    }
    ensure_deb_src()?;
    let src_root = cache_dir().join("k8s-src");
    std::fs::create_dir_all(&src_root)?;
    let tree = match find_tree(&src_root)? {
        Some(tree) => tree,
        None => {
            let status = Command::new("apt-get")
                .args(["source", "-q", "kubernetes"])
                .current_dir(&src_root)
                .status()
                .context("apt-get source kubernetes")?;
            if !status.success() {
                bail!("apt-get source kubernetes failed");
            }
            find_tree(&src_root)?.context("apt-get source left no kubernetes-* tree")?
        }
    };
    eprintln!(
        "    building {} in {} (about 5 minutes on 2 cores)",
        missing.join(" "),
        tree.display()
    );
    patch_reflect2(&tree)?;
    let gopath = tree.join(".go");
    let what: Vec<String> = missing.iter().map(|b| format!("cmd/{b}")).collect();
    let status = Command::new("make")
        .arg(format!("WHAT={}", what.join(" ")))
        .env("GOPATH", &gopath)
        .env("CGO_ENABLED", "0")
        .current_dir(&tree)
        .status()
        .context("make (Kubernetes)")?;
    if !status.success() {
        bail!("building Kubernetes failed; see the output above");
    }
    std::fs::create_dir_all(&bin)?;
    for b in &missing {
        let from = tree.join("_output/bin").join(b);
        std::fs::copy(&from, bin.join(b)).with_context(|| format!("copying {}", from.display()))?;
    }
    let version = Command::new(bin.join("kube-apiserver"))
        .arg("--version")
        .output()
        .context("kube-apiserver --version")?;
    let version = String::from_utf8_lossy(&version.stdout);
    if !version.contains(K8S_VERSION) {
        bail!("built kube-apiserver reports {version:?}, expected {K8S_VERSION}");
    }
    // The tree and Go caches take ~2.5 GB; the binaries are all we keep.
    let _ = std::fs::remove_dir_all(&src_root);
    eprintln!("    cached in {}", bin.display());
    Ok(())
}

/// Replaces the vendored github.com/modern-go/reflect2 v1.0.1 with Debian's 1.0.2. With Go ≥ 1.18
/// (bookworm has 1.19), 1.0.1's `mapiterinit` link has the wrong signature and kube-apiserver
/// segfaults when it encodes a map, e.g. on the first custom resource it decodes. 1.0.2 is the
/// upstream fix (the same API), so nothing else in the tree changes.
fn patch_reflect2(tree: &Path) -> Result<()> {
    let debian = Path::new("/usr/share/gocode/src/github.com/modern-go/reflect2");
    let vendored = tree.join("vendor/github.com/modern-go/reflect2");
    if !debian.join("go_above_118.go").is_file() {
        bail!(
            "{} lacks go_above_118.go (package golang-github-modern-go-reflect2-dev)",
            debian.display()
        );
    }
    let is_source = |p: &Path| matches!(p.extension().and_then(|e| e.to_str()), Some("go" | "s"));
    for entry in std::fs::read_dir(&vendored)? {
        let path = entry?.path();
        if is_source(&path) {
            std::fs::remove_file(&path)?;
        }
    }
    for entry in std::fs::read_dir(debian)? {
        let path = entry?.path();
        if is_source(&path)
            && let Some(name) = path.file_name()
        {
            std::fs::copy(&path, vendored.join(name))?;
        }
    }
    eprintln!("    vendored reflect2 replaced with Debian's 1.0.2");
    Ok(())
}

/// The unpacked `kubernetes-<version>` directory, if present.
fn find_tree(src_root: &Path) -> Result<Option<std::path::PathBuf>> {
    for entry in std::fs::read_dir(src_root)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if path.is_dir() && name.starts_with("kubernetes-") && path.join("Makefile").is_file() {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Adds a deb-src entry for the machine's own Debian mirror (taken from its deb entries) when
/// none exists, so `apt-get source` works.
fn ensure_deb_src() -> Result<()> {
    let mut sources = String::new();
    let mut files = vec![std::path::PathBuf::from("/etc/apt/sources.list")];
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        files.extend(dir.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for f in &files {
        if let Ok(text) = std::fs::read_to_string(f) {
            sources.push_str(&text);
            sources.push('\n');
        }
    }
    if sources
        .lines()
        .any(|l| l.trim_start().starts_with("deb-src ") || l.trim() == "Types: deb-src")
    {
        return Ok(());
    }
    let entry = deb_src_entry(&sources)
        .context("no Debian bookworm deb entry found in /etc/apt to derive a deb-src entry from")?;
    eprintln!("    adding {DEB_SRC_FILE}");
    std::fs::write(DEB_SRC_FILE, entry).with_context(|| format!("writing {DEB_SRC_FILE}"))?;
    run_root("apt-get", &["update", "-q"])
}

/// A deb822 deb-src stanza for bookworm main, using the first mirror of a bookworm deb entry.
fn deb_src_entry(sources: &str) -> Option<String> {
    let mut uri = None;
    // deb822 stanzas: find one with Suites containing bookworm.
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim).map(str::to_string))
        };
        if field("Types:").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"))
            && field("Suites:").is_some_and(|s| s.split_whitespace().any(|s| s == "bookworm"))
        {
            uri = field("URIs:").and_then(|u| u.split_whitespace().next().map(str::to_string));
            if uri.is_some() {
                let keyring = field("Signed-By:");
                return Some(stanza_text(uri.as_deref()?, keyring.as_deref()));
            }
        }
    }
    // One-line format: `deb [opts] URI bookworm main`.
    for line in sources.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.first() == Some(&"deb") && words.contains(&"bookworm") {
            uri = words
                .iter()
                .skip(1)
                .find(|w| w.contains("://"))
                .map(|s| s.to_string());
            if uri.is_some() {
                break;
            }
        }
    }
    uri.map(|u| stanza_text(&u, None))
}

fn stanza_text(uri: &str, keyring: Option<&str>) -> String {
    let mut s = format!("Types: deb-src\nURIs: {uri}\nSuites: bookworm\nComponents: main\n");
    if let Some(k) = keyring {
        s.push_str(&format!("Signed-By: {k}\n"));
    }
    s
}

/// Runs a command as root: directly when we are root, else through sudo.
pub fn run_root(program: &str, args: &[&str]) -> Result<()> {
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false);
    let mut cmd = if is_root {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg(program);
        c
    };
    let status = cmd
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deb_src_from_deb822() {
        let sources = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        let entry = deb_src_entry(sources).expect("entry");
        assert!(
            entry.starts_with(
                "Types: deb-src\nURIs: http://mirror.example/debian\nSuites: bookworm\n"
            )
        );
        assert!(entry.contains("Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg"));
    }

    #[test]
    fn deb_src_from_one_line() {
        let sources = "deb [arch=amd64] http://mirror.example/debian bookworm main\n";
        let entry = deb_src_entry(sources).expect("entry");
        assert!(entry.contains("URIs: http://mirror.example/debian\n"));
        assert!(deb_src_entry("deb http://x/debian bullseye main\n").is_none());
    }
}
