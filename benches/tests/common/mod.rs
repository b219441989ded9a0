//! What the benchmark tests share: where the workspace is, and the ingress-controller binary.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .expect("benches lives in the workspace root")
}

/// The debug ingress-controller next to this test's own target dir; `cargo test --workspace`
/// has built it already, a narrower run builds it here.
pub fn ingress_controller() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("ingress-controller");
    if !bin.is_file() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "ingress", "--bin", "ingress-controller"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build");
        assert!(status.success(), "building ingress-controller failed");
    }
    bin
}
