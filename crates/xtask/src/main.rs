//! `cargo run -p xtask -- test`: installs every Debian package the suite needs, builds and caches
//! the Kubernetes v1.20.2 binaries from Debian's source package, checks formatting and lints, and
//! runs the whole workspace test suite.
//!
//! `cargo run -p xtask -- up`: the same set-up and this machine's images, then the seed cluster
//! (`integration_tests::seed`): a control plane, the seed's three nodes as real nodes
//! (containerd, kubelet, kube-proxy in their own namespaces), `deploy/` applied with
//! `kubectl apply -k`, pebble behind `letsencrypt-prod`; in the foreground until Ctrl-C.
//!
//! `cargo run -p xtask -- images`: the components' container images (see `images`).
//!
//! `cargo run -p xtask -- code-order --kubeconfig <up's>`: the order the images' code is linked
//! in, from the functions the running cluster executes (see `code_order`).

mod bench;
mod code_order;
// The harness's own path and peer-building code, compiled in here from its sources: xtask
// must not depend on the harness crate, whose dependencies (kube, tokio, rustls, ...) would be
// built twice in CI, once for xtask alone and once with the test suite's features.
#[path = "../../../integration-tests/src/bench_peers.rs"]
mod bench_peers;
mod images;
mod lanes;
// Not its `images_dir()`, which only the tests use (its CARGO_MANIFEST_DIR would be xtask's):
// xtask has `images::images_dir`.
#[path = "../../../integration-tests/src/paths.rs"]
#[allow(dead_code)]
mod paths;
mod setup;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the test peers, build the Kubernetes binaries (cached), lint, run every test.
    Test {
        /// Skip `cargo fmt --check` and `cargo clippy`.
        #[arg(long)]
        no_lint: bool,
        /// Extra arguments for `cargo test` (after `--`), e.g. `-p kube-common -- --nocapture`.
        #[arg(last = true)]
        cargo_args: Vec<String>,
    },
    /// Install and build only (what `test` and `up` do first).
    Setup,
    /// Start a local control plane with deploy/ applied; stays up until Ctrl-C.
    Up,
    /// Container images of the components (OCI archives with a multi-arch index) in
    /// target/images/.
    Images {
        /// Platforms, comma-separated.
        #[arg(long, default_value = "amd64,arm64", value_delimiter = ',')]
        arch: Vec<String>,
    },
    /// Profile the components in the cluster `up` runs (valgrind) and write the order their
    /// code is linked in (crates/xtask/src/images/code-order/).
    CodeOrder {
        /// The kubeconfig `up` printed.
        #[arg(long, required_unless_present = "carry")]
        kubeconfig: Option<std::path::PathBuf>,
        /// How long the components run under valgrind.
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        /// Only put back the workloads an interrupted run left under valgrind.
        #[arg(long)]
        restore: bool,
        /// Only carry this machine's list over to the other architecture (builds its binaries).
        #[arg(long, conflicts_with = "restore")]
        carry: bool,
    },
    /// Benchmarks (`bench proxy|security|flannel|local-path [-- flags]`): writes benches/results/.
    Bench {
        /// What to benchmark: `proxy`, `security`, `flannel` or `local-path`.
        what: String,
        /// Extra flags for the harness, e.g. `--rounds 5 --seconds 10 --no-pin`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Task::Setup => setup::all(),
        Task::Test {
            no_lint,
            cargo_args,
        } => {
            setup::all()?;
            if !no_lint {
                step("cargo fmt --check", || cargo(&["fmt", "--all", "--check"]))?;
                step("cargo clippy", || {
                    cargo(&[
                        "clippy",
                        "--workspace",
                        "--all-targets",
                        "--",
                        "-D",
                        "warnings",
                    ])
                })?;
            }
            // The real-node tests import this machine's images: static as they ship, built
            // for build time (CI builds them from clean; `images` and `up` build the shipped).
            // On amd64 the arm64 binaries are cross-built too and each run under qemu.
            let native = images::Arch::native()?;
            let mut arches = vec![native];
            if native == images::AMD64 {
                arches.push(images::ARM64);
            }
            images::run(&arches, images::SUITE_PROFILE)?;
            let suite_images = std::path::absolute(images::images_dir(images::SUITE_PROFILE))?;
            let env = [("HOMECLUSTER_IMAGES", suite_images.as_os_str())];
            if cargo_args.is_empty() {
                // The proxy smoke test's pingora peer, built now rather than inside a test
                // that runs beside timing-sensitive ones.
                step("pingora benchmark peer", || {
                    bench_peers::build_pingora(&root)
                        .map(drop)
                        .map_err(anyhow::Error::msg)
                })?;
                return lanes::run(&env);
            }
            let mut args = vec!["test".to_string()];
            if !cargo_args
                .iter()
                .any(|a| a == "-p" || a.starts_with("--package"))
            {
                args.push("--workspace".into());
            }
            args.extend(cargo_args);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            step("cargo test", || cargo_with_env(&args, &env))
        }
        Task::Images { arch } => {
            let arches = arch
                .iter()
                .map(|a| images::Arch::parse(a))
                .collect::<Result<Vec<_>>>()?;
            images::run(&arches, images::SHIP_PROFILE).map(drop)
        }
        Task::Bench { what, args } => match what.as_str() {
            "proxy" => bench::harness("bench-proxy", &args),
            "security" => bench::harness("bench-security", &args),
            "flannel" | "local-path" => bench::crate_benches(&what, &args),
            other => {
                bail!("unknown benchmark {other:?} (known: proxy, security, flannel, local-path)")
            }
        },
        Task::CodeOrder {
            kubeconfig,
            seconds,
            restore,
            carry,
        } => code_order::run(match (kubeconfig.as_deref(), carry, restore) {
            (_, true, _) => code_order::Mode::Carry,
            (Some(kubeconfig), _, true) => code_order::Mode::Restore(kubeconfig),
            (Some(kubeconfig), _, false) => code_order::Mode::Profile(kubeconfig, seconds),
            (None, false, _) => bail!("--kubeconfig is required"),
        }),
        Task::Up => {
            setup::all()?;
            images::run(&[images::Arch::native()?], images::SHIP_PROFILE)?;
            up()
        }
    }
}

/// Runs `f`, printing how long it took.
pub fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    eprintln!("==> {name}");
    let started = Instant::now();
    let result = f();
    eprintln!(
        "==> {name}: {} in {:.1}s",
        if result.is_ok() { "done" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    result
}

fn cargo(args: &[&str]) -> Result<()> {
    cargo_with_env(args, &[])
}

/// A `cargo` command without the variables `cargo run` set for xtask itself: ring's build
/// script, for one, reruns when CARGO_MANIFEST_DIR changes, so a build from here and one from
/// the shell would keep rebuilding each other's dependencies.
pub fn cargo_command() -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    for (key, _) in std::env::vars_os() {
        if let Some(k) = key.to_str()
            && (k.starts_with("CARGO_PKG_")
                || matches!(
                    k,
                    "CARGO_MANIFEST_DIR"
                        | "CARGO_MANIFEST_PATH"
                        | "CARGO_CRATE_NAME"
                        | "CARGO_BIN_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                ))
        {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn cargo_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let status = cargo_command()
        .args(args)
        .envs(env.iter().copied())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn workspace_root() -> Result<std::path::PathBuf> {
    let manifest_dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .ancestors()
        .nth(2)
        .map(std::path::Path::to_path_buf)
        .context("xtask must live at crates/xtask")
}

/// The seed cluster on this machine: `seed-up` (integration-tests) in this process's place,
/// so Ctrl-C reaches it alone and the prompt returns once it has cleaned up.
fn up() -> Result<()> {
    use std::os::unix::process::CommandExt;
    eprintln!("==> cargo run -p integration-tests --bin seed-up");
    let err = cargo_command()
        .args(["run", "-p", "integration-tests", "--bin", "seed-up"])
        .exec();
    Err(err).context("running cargo run -p integration-tests --bin seed-up")
}
