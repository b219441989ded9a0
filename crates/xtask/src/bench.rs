//! `cargo run -p xtask -- bench flannel|local-path`: the crate's own `cargo bench` targets
//! (release, real peers), which write `benches/results/<crate>.md`.
//!
//! `cargo run -p xtask -- bench proxy`: installs the peers (set-up does: Debian nginx, haproxy,
//! wrk, nghttp2-client; oha), builds the ingress controller as its image carries it (static,
//! `--profile proxy`, linked in the images' code order, symbols kept) and the harness in
//! release mode, then runs `bench-proxy`, which builds the pingora peer (cached) and writes
//! `benches/results/proxy.{md,json}`.
//!
//! `cargo run -p xtask -- bench security`: the same build, then `bench-security` (nginx,
//! testssl.sh, slowhttptest from set-up), which writes `benches/results/security.md`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cargo_with_env, images, setup, step};

/// Builds the ingress controller as shipped and the harness binaries (release), then runs
/// `harness`.
pub fn harness(harness: &str, extra: &[String]) -> Result<()> {
    setup::all()?;
    // The shipped build itself (its symbols kept, so that the profiles name functions; the
    // image carries a stripped copy).
    let dir = static_binaries(&[("ingress", images::PROXY_BINARY)], images::SHIP_PROFILE)?;
    let controller = dir.join(images::PROXY_BINARY);
    step("cargo build --release (benches)", || {
        cargo(&["build", "--release", "-p", "benches", "--bins"])
    })?;
    let target = images::target_dir().join("release");
    let root = std::env::current_dir()?;
    step(harness, || {
        let mut cmd = Command::new(target.join(harness));
        cmd.arg(format!("--ingress-controller={}", controller.display()))
            .arg(format!("--out={}", root.join("benches/results").display()));
        if harness == "bench-proxy" {
            // It builds the pingora peer from the workspace.
            cmd.arg(format!("--root={}", root.display()));
        }
        let status = cmd
            .args(extra)
            .status()
            .with_context(|| format!("running {harness}"))?;
        if !status.success() {
            bail!("{harness} failed ({status})");
        }
        Ok(())
    })
}

/// `cargo bench -p <package> --profile small`: the benchmark targets of one component crate,
/// measuring the component's binaries as they ship: `--profile small`, linked statically
/// against musl (what the images carry), handed to the bench in `SHIPPED_BIN_DIR`.
pub fn crate_benches(package: &str, extra: &[String]) -> Result<()> {
    setup::all()?;
    let shipped = shipped_binaries(package)?;
    let mut args = vec!["bench", "-p", package, "--profile", "small"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    step(&format!("cargo bench -p {package} --profile small"), || {
        cargo_with_env(&args, &[("SHIPPED_BIN_DIR", shipped.as_os_str())])
    })
}

/// Builds `package`'s shipped binaries as the images carry them (static, `--profile small`, the
/// proxy `--profile proxy`; this machine's architecture); returns the directory holding them.
fn shipped_binaries(package: &str) -> Result<PathBuf> {
    let binaries: Vec<(&str, &str)> = images::BINARIES
        .iter()
        .copied()
        .filter(|(p, _)| *p == package)
        .collect();
    static_binaries(&binaries, images::SHIP_PROFILE)
}

/// Builds `binaries` static for this machine's architecture with `profile`; returns the
/// directory holding them, as an absolute path.
fn static_binaries(binaries: &[(&str, &str)], profile: &str) -> Result<PathBuf> {
    step("Debian packages for static builds", || {
        setup::ensure_packages(&["musl-tools"])
    })?;
    let dirs = images::build_static(&[images::Arch::native()?], binaries, profile)?;
    let dir = dirs
        .into_iter()
        .next()
        .context("build_static returns one directory per arch")?;
    Ok(std::path::absolute(dir)?)
}
