//! `cargo run -p xtask -- test`: installs every Debian package the suite needs, builds and caches
//! the Kubernetes v1.20.2 binaries from Debian's source package, checks formatting and lints, and
//! runs the whole workspace test suite.
//!
//! `cargo run -p xtask -- up`: the same set-up, then a local control plane (etcd, apiserver,
//! controller-manager with node IPAM, scheduler), the seed's three nodes as network namespaces
//! running our flanneld, `deploy/*.yaml` applied, our local-path provisioner, ingress controller
//! and cert-manager, in the foreground until Ctrl-C.

mod bench;
mod images;
mod seed;
mod setup;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use integration_tests::overlay::{CLUSTER_CIDR, Lab, LabOptions};
use integration_tests::paths::k8s_bin_dir;

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
            // The real-node tests import this machine's images (static, as they ship).
            images::run(&[images::Arch::native()?])?;
            let mut args = vec!["test".to_string()];
            if !cargo_args
                .iter()
                .any(|a| a == "-p" || a.starts_with("--package"))
            {
                args.push("--workspace".into());
            }
            args.extend(cargo_args);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            step("cargo test", || cargo(&args))
        }
        Task::Images { arch } => {
            let arches = arch
                .iter()
                .map(|a| images::Arch::parse(a))
                .collect::<Result<Vec<_>>>()?;
            images::run(&arches).map(drop)
        }
        Task::Bench { what, args } => match what.as_str() {
            "proxy" => bench::harness("bench-proxy", &args),
            "security" => bench::harness("bench-security", &args),
            "flannel" | "local-path" => bench::crate_benches(&what, &args),
            other => {
                bail!("unknown benchmark {other:?} (known: proxy, security, flannel, local-path)")
            }
        },
        Task::Up => {
            setup::all()?;
            let bin_dir = seed::build_binaries()?;
            up(&bin_dir)
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

fn cargo_with_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
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

fn up(bin_dir: &std::path::Path) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        eprintln!(
            "==> starting the control plane (node IPAM {CLUSTER_CIDR}) and the nodes {} as network namespaces, each running flanneld",
            seed::NODES.join(", ")
        );
        let mut opts = LabOptions::new(bin_dir.join("flanneld"), bin_dir.join("flannel"))
            .node_names(&seed::NODES)
            .scheduler(true);
        opts.flanneld_args.clear(); // upstream's intervals, not the tests' 1 s
        let lab = Lab::start(opts)
        .await
        .context("starting the control plane and the flannel overlay")?;
        let cluster = &lab.cluster;
        eprintln!(
            "==> control plane ready in {:.1}s; overlay converged",
            cluster.startup.as_secs_f64()
        );
        let kubectl = k8s_bin_dir().join("kubectl");
        let kubeconfig = cluster.kubeconfig_path().display().to_string();
        apply_deploy(&kubectl, &kubeconfig)?;
        let client = cluster.client().await?;
        let storage = start_local_path(&client, cluster.dir());
        seed::frontend(&client).await.context("starting the frontend replicas")?;
        let ingress = seed::start_ingress(cluster, bin_dir)?;
        let pebble = integration_tests::acme::Pebble::start(integration_tests::acme::PebbleOptions {
            http_port: seed::HTTP_PORT,
            ..Default::default()
        })
        .await
        .context("starting pebble")?;
        let admission = seed::start_webhook_and_cainjector(cluster, &client, bin_dir).await?;
        let cert_manager = seed::start_cert_manager(cluster, &client, bin_dir, &pebble).await?;
        if let Err(e) = seed::wait_served().await {
            let slices = Command::new(&kubectl)
                .args(["--kubeconfig", &kubeconfig, "get", "endpointslices,pods", "-A", "-o", "wide"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            bail!("{e}\n{slices}\ningress-controller log:\n{}", ingress.log_tail(4000));
        }
        let root = pebble.issuing_root_pem().await?;
        let root_path = cluster.dir().join("pebble-root.pem");
        std::fs::write(&root_path, &root)?;
        if let Err(e) = seed::wait_issued(&root).await {
            bail!("{e}\ncert-manager log:\n{}", cert_manager.log_tail(4000));
        }
        let volume = seed::wait_postgres_bound(&client).await?;
        // Two pods on different nodes, wired by our CNI plugin as a runtime would.
        let pod_a = lab.pod(0).context("a pod on the first node")?;
        let pod_b = lab.pod(1).context("a pod on the second node")?;
        let (host, http, https) = (seed::HOST, seed::HTTP_PORT, seed::HTTPS_PORT);
        println!();
        println!(
            "Control plane is up (Kubernetes v1.20.2 on {}).",
            cluster.server_url()
        );
        println!("  kubeconfig: {kubeconfig}");
        println!(
            "  try:        {} --kubeconfig {kubeconfig} get nodes,ns",
            kubectl.display()
        );
        println!("  logs:       {}", cluster.dir().display());
        println!();
        println!("household-task-manager through the ingress controller (two frontend replicas):");
        println!("  curl -i --resolve {host}:{http}:127.0.0.1 http://{host}:{http}/      # 308 to HTTPS");
        println!(
            "  curl --cacert {} --resolve {host}:{https}:127.0.0.1 https://{host}:{https}/   # certificate issued by pebble via cert-manager",
            root_path.display()
        );
        println!("  kubectl --kubeconfig {kubeconfig} get certificate,certificaterequest,order,challenge -A");
        println!("  cert-manager metrics: curl http://{}/metrics", seed::CERT_MANAGER_METRICS);
        println!("  metrics: curl http://127.0.0.1:10254/metrics");
        println!();
        println!("flannel overlay ({CLUSTER_CIDR}, VXLAN) across {}:", seed::NODES.join(", "));
        println!(
            "  {}   # pod {} on {} -> pod {} on {}",
            pod_a.ping_command(pod_b.ip),
            pod_a.ip,
            lab.nodes[0].name,
            pod_b.ip,
            lab.nodes[1].name
        );
        println!(
            "  sudo ip netns exec {} ip route   # flannel.1 routes to the other nodes' /24s",
            lab.nodes[0].ns.name()
        );
        println!();
        println!("local-path: postgres's 10Gi claim is Bound to {volume}:");
        println!("  kubectl --kubeconfig {kubeconfig} get pvc,pv -A");
        println!("  volumes on disk: {}", cluster.dir().join("local-path").display());
        println!("Press Ctrl-C to stop and clean up.");
        tokio::signal::ctrl_c().await?;
        eprintln!("==> stopping");
        storage.cancel();
        drop((pod_a, pod_b));
        drop(cert_manager);
        drop(admission);
        drop(pebble);
        drop(lab);
        Ok(())
    })
}

/// Runs the local-path provisioner and one node agent per seed node in this process, each
/// node's disk a directory under the control plane's temp dir.
fn start_local_path(
    client: &kube::Client,
    dir: &std::path::Path,
) -> tokio_util::sync::CancellationToken {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let opts = local_path::local::LocalOptions {
        namespace: "local-path-storage".into(),
        nodes: seed::NODES.iter().map(|n| n.to_string()).collect(),
        data_dir: dir.join("local-path"),
    };
    let (client, token) = (client.clone(), shutdown.clone());
    tokio::spawn(async move {
        if let Err(e) = local_path::local::run(client, opts, token).await {
            eprintln!("local-path provisioner stopped: {e:#}");
        }
    });
    shutdown
}

/// Applies cert-manager's CRDs, then `deploy/` (`kubectl apply -k`).
fn apply_deploy(kubectl: &std::path::Path, kubeconfig: &str) -> Result<()> {
    for args in [
        // CRDs first, so the custom resources under deploy/ find their kinds.
        vec!["apply", "-f", "deploy/cert-manager/crds.yaml"],
        vec![
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            "deploy/cert-manager/crds.yaml",
        ],
        vec!["apply", "-k", "deploy/"],
    ] {
        let status = Command::new(kubectl)
            .args(["--kubeconfig", kubeconfig])
            .args(&args)
            .status()
            .with_context(|| format!("kubectl {}", args.join(" ")))?;
        if !status.success() {
            bail!("kubectl {} failed", args.join(" "));
        }
    }
    Ok(())
}
