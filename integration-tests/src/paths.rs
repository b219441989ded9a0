//! Where the set-up command puts what it builds: outside the repository, so a clean clone
//! reuses it.

use std::path::PathBuf;

/// Kubernetes version of the test control plane.
pub const K8S_VERSION: &str = "v1.20.2";

/// `$HOMECLUSTER_CACHE`, else `$XDG_CACHE_HOME/homecluster`, else `~/.cache/homecluster`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("HOMECLUSTER_CACHE") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("homecluster")
}

/// Directory of the [`K8S_BINARIES`].
pub fn k8s_bin_dir() -> PathBuf {
    // "-2": rebuilt with reflect2 1.0.2 (see xtask's setup); older caches crash on CRDs.
    cache_dir().join(format!("k8s-{K8S_VERSION}-2")).join("bin")
}

/// The Kubernetes binaries the harness runs: the control plane, kubectl, and what a node runs
/// (the seed cluster's nodes, issue 11).
pub const K8S_BINARIES: [&str; 6] = [
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubectl",
    "kubelet",
    "kube-proxy",
];

/// Where `cargo run -p xtask -- images` writes the OCI archives (`<name>.oci.tar`).
pub fn images_dir() -> PathBuf {
    // `xtask test` points the tests at its own build's images.
    if let Some(dir) = std::env::var_os("HOMECLUSTER_IMAGES") {
        return PathBuf::from(dir);
    }
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("images")
}

/// The command that builds the images the real-node tests import.
pub const IMAGES_COMMAND: &str = "cargo run -p xtask -- images --arch amd64";
