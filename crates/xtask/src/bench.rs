//! `cargo run -p xtask -- bench flannel|local-path`: the crate's own `cargo bench` targets
//! (release, real peers), which write `benches/results/<crate>.md`.
//!
//! `cargo run -p xtask -- bench proxy`: installs the peers (set-up does: Debian nginx, haproxy,
//! wrk, nghttp2-client; oha), builds the ingress controller and the harness in release mode,
//! then runs `bench-proxy`, which builds the pingora peer (cached) and writes
//! `benches/results/proxy.{md,json}`.
//!
//! `cargo run -p xtask -- bench security`: the same build, then `bench-security` (nginx,
//! testssl.sh, slowhttptest from set-up), which writes `benches/results/security.md`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo, cargo_with_env, setup, step};

/// Builds the ingress controller and the harness binaries (release), then runs `harness`.
pub fn harness(harness: &str, extra: &[String]) -> Result<()> {
    setup::all()?;
    step(
        "cargo build --release (ingress-controller, benches)",
        || {
            cargo(&[
                "build",
                "--release",
                "-p",
                "ingress",
                "--bin",
                "ingress-controller",
                "-p",
                "benches",
                "--bins",
            ])
        },
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join("release");
    let root = std::env::current_dir()?;
    step(harness, || {
        let mut cmd = Command::new(target.join(harness));
        cmd.arg(format!(
            "--ingress-controller={}",
            target.join("ingress-controller").display()
        ))
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
    let dir = shipped_binaries(package)?;
    let mut args = vec!["bench", "-p", package, "--profile", "small"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    let shipped = std::env::current_dir()?.join(dir);
    step(&format!("cargo bench -p {package} --profile small"), || {
        cargo_with_env(&args, &[("SHIPPED_BIN_DIR", shipped.as_os_str())])
    })
}

/// Builds `package`'s binaries for `<arch>-unknown-linux-musl` with `--profile small`; returns
/// the directory holding them. Only the benchmarks need this (not `test` or `up`): musl-gcc
/// from Debian's musl-tools for ring's C parts, and the target's standard library.
fn shipped_binaries(package: &str) -> Result<PathBuf> {
    let triple = format!("{}-unknown-linux-musl", std::env::consts::ARCH);
    step("Debian packages for static builds", || {
        setup::ensure_packages(&["musl-tools"])
    })?;
    step(&format!("{triple} standard library"), || {
        musl_target(&triple)
    })?;
    // cc-rs looks for `<arch>-linux-musl-gcc` when cross-compiling to musl on arm64; Debian
    // ships only `musl-gcc`.
    let cc_var = format!("CC_{}", triple.replace('-', "_"));
    step(
        &format!("cargo build -p {package} --bins (static, {triple})"),
        || {
            cargo_with_env(
                &[
                    "build",
                    "-p",
                    package,
                    "--bins",
                    "--profile",
                    "small",
                    "--target",
                    &triple,
                ],
                &[(cc_var.as_str(), std::ffi::OsStr::new("musl-gcc"))],
            )
        },
    )?;
    Ok(std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
        .join(&triple)
        .join("small"))
}

/// The target's standard library: already in the toolchain's sysroot, or added with rustup.
fn musl_target(triple: &str) -> Result<()> {
    let sysroot = Command::new("rustc")
        .args(["--print", "sysroot"])
        .output()
        .context("running rustc --print sysroot")?;
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if sysroot.join("lib/rustlib").join(triple).is_dir() {
        eprintln!("    present in {}", sysroot.display());
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", triple])
        .status()
        .context("running rustup (the musl target links the shipped binaries statically)")?;
    if !status.success() {
        bail!("rustup target add {triple} failed ({status})");
    }
    Ok(())
}
