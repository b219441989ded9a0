//! `bench-proxy`: runs the proxy benchmark and writes `proxy.md` and `proxy.json`. Normally
//! started by `cargo run -p xtask -- bench proxy`, which installs and builds what it names.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use benches::{Options, Programs};
use clap::Parser;
use integration_tests::process::which;

#[derive(Parser)]
#[command(about = "Proxy benchmark: ingress-controller vs nginx, haproxy, pingora, direct")]
struct Args {
    /// Where proxy.md and proxy.json go.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// The ingress-controller binary (`xtask bench` passes the image's build, symbols kept).
    #[arg(long)]
    ingress_controller: PathBuf,
    /// The pingora peer binary (default: build benches/pingora-peer, cached).
    #[arg(long)]
    pingora: Option<PathBuf>,
    /// The workspace root (for building the pingora peer).
    #[arg(long, default_value = ".")]
    root: PathBuf,
    /// The oha binary (default: where set-up installs it).
    #[arg(long)]
    oha: Option<PathBuf>,
    /// Rounds (peers alternate within each).
    #[arg(long)]
    rounds: Option<usize>,
    /// Seconds per measured run.
    #[arg(long)]
    seconds: Option<u64>,
    /// Do not pin proxies and load generators to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// The one-second smoke settings.
    #[arg(long)]
    smoke: bool,
    /// Measure only these peers (comma-separated names), e.g. while profiling.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Run only these scenarios and phases (comma-separated ids: idle, h1-1k, h1-64k, tls-1k,
    /// tls-64k, tls-new-conn-1k, h2-1k, h2-64k, latency, propagation, edits-under-load, scale).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// Idle keep-alive connections per proxy in the `idle` scenario.
    #[arg(long)]
    idle_connections: Option<usize>,
    /// Other Ingresses in the `scale` scenario (plain and TLS together).
    #[arg(long)]
    scale_ingresses: Option<usize>,
    /// Of those, Ingresses with their own TLS Secret.
    #[arg(long)]
    scale_certificates: Option<usize>,
    /// No `perf record` runs (full runs profile our controller and nginx once per scenario
    /// and during the scale edits; the smoke settings do not).
    #[arg(long)]
    no_profile: bool,
    /// Profile even with the smoke settings.
    #[arg(long, conflicts_with = "no_profile")]
    profile: bool,
    /// A note recorded with the results (e.g. what else the machine was doing).
    #[arg(long)]
    note: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let exe = std::env::current_exe().context("own path")?;
    let backend = exe
        .parent()
        .map(|d| d.join("bench-backend"))
        .context("bench-backend path")?;
    let bare = exe
        .parent()
        .map(|d| d.join("bare-proxy"))
        .context("bare-proxy path")?;
    let programs = Programs {
        ingress_controller: args.ingress_controller.clone(),
        backend,
        bare,
        pingora: match &args.pingora {
            Some(p) => Ok(p.clone()),
            None => {
                eprintln!("==> building the pingora peer (cached)");
                benches::build_pingora(&args.root)
            }
        },
        nginx: which("nginx")?,
        haproxy: which("haproxy")?,
        wrk: which("wrk")?,
        h2load: which("h2load")?,
        oha: args.oha.clone().unwrap_or_else(benches::oha_path),
    };
    let mut opts = if args.smoke {
        Options::smoke(programs)
    } else {
        Options::full(programs)
    };
    if let Some(r) = args.rounds {
        opts.rounds = r.max(1);
    }
    if let Some(s) = args.seconds {
        opts.duration = Duration::from_secs(s.max(1));
    }
    if !args.only.is_empty() {
        opts.only_peers = Some(args.only.clone());
    }
    if !args.scenarios.is_empty() {
        opts.only_scenarios = Some(args.scenarios.clone());
    }
    if args.no_profile {
        opts.profile = false;
    }
    if args.profile {
        opts.profile = true;
    }
    if args.no_pin {
        opts.pin = false;
    }
    if let Some(n) = args.idle_connections {
        opts.idle_connections = n;
    }
    if let Some(n) = args.scale_ingresses {
        opts.scale_ingresses = n;
    }
    if let Some(n) = args.scale_certificates {
        opts.scale_certificates = n;
    }
    let rt = tokio::runtime::Runtime::new()?;
    let mut results = rt.block_on(benches::run(&opts))?;
    results.method.notes.extend(args.note);
    let (md, json) = results.write(&args.out)?;
    println!("{}", results.markdown());
    eprintln!("wrote {} and {}", md.display(), json.display());
    Ok(())
}
