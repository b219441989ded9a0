//! Benchmark peers built from source: the benchmarks and their smoke test use them, and
//! `xtask test` builds them before the tests run side by side (a cold build is minutes of
//! both cores).

use std::path::PathBuf;

/// Builds the pingora peer (its own workspace and lockfile) into a target dir cached outside the
/// repository, so later runs only check freshness. `Err` carries why it could not be built.
pub fn build_pingora(workspace_root: &std::path::Path) -> Result<PathBuf, String> {
    let manifest = workspace_root.join("benches/pingora-peer/Cargo.toml");
    let target = crate::paths::cache_dir().join("pingora-peer-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "--release", "--locked", "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("RUSTFLAGS");
    // Its own target dir, and none of the variables cargo sets for the program that calls
    // this (a test, `cargo run`): ring's build script tracks CARGO_MANIFEST_DIR, so a leaked
    // value rebuilt the whole peer (about 45 s) whenever the caller changed.
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && k.starts_with("CARGO_")
            && k != "CARGO_HOME"
        {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(format!(
            "building benches/pingora-peer failed:\n{}",
            tail.join("\n")
        ));
    }
    Ok(target.join("release").join("pingora-peer"))
}
