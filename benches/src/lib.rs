//! Proxy benchmark harness: our ingress-controller (fed by a real apiserver), nginx, haproxy,
//! a minimal pingora proxy and direct-to-backend, side by side in one run on one machine.
//! `cargo run -p xtask -- bench proxy` installs the peers and runs [`run`]; the smoke test runs
//! every scenario for about a second. benches/README.md explains every setting.

pub mod backend;
pub mod cluster;
pub mod load;
pub mod peers;
pub mod probe;
pub mod procfs;
pub mod report;
pub mod security;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::kube::{Cluster, ClusterOptions};
use thiserror::Error;

use crate::load::{LoadResult, Tools, WrkRun};
use crate::peers::{Backend, HOST, Peer, PeerKind, Shared};
use crate::report::{
    Machine, Method, PeerFigures, PropagationSummary, Resources, Results, Scenario, Stat,
};

#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Harness(#[from] integration_tests::HarnessError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("{tool}: {message}")]
    Tool { tool: String, message: String },
    #[error("{peer}: {message}")]
    Peer { peer: String, message: String },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("task: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// The programs the run uses.
#[derive(Clone, Debug)]
pub struct Programs {
    pub ingress_controller: PathBuf,
    pub backend: PathBuf,
    /// `Err(reason)` when the pingora peer could not be built: it is then reported as skipped.
    pub pingora: Result<PathBuf, String>,
    pub nginx: PathBuf,
    pub haproxy: PathBuf,
    pub wrk: PathBuf,
    pub h2load: PathBuf,
    pub oha: PathBuf,
}

/// How long and how hard to measure.
#[derive(Clone, Debug)]
pub struct Options {
    pub rounds: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub wrk_connections: u32,
    pub h2_clients: u32,
    pub h2_streams: u32,
    pub latency_connections: u32,
    /// Proxies on one half of the CPUs, load generators and backend on the other.
    pub pin: bool,
    /// Filler Ingress counts for the propagation series (ascending).
    pub fillers: Vec<usize>,
    /// Timed edits per filler count.
    pub edits: usize,
    /// Edits during the failed-requests measurement.
    pub edits_under_load: usize,
    /// Measure only these peers (by name), e.g. for a quick A/B while profiling.
    pub only_peers: Option<Vec<String>>,
    /// Run only these throughput scenarios (by id).
    pub only_scenarios: Option<Vec<String>>,
    pub programs: Programs,
}

impl Options {
    /// The full run's settings.
    pub fn full(programs: Programs) -> Self {
        Options {
            rounds: 3,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            wrk_connections: 64,
            h2_clients: 4,
            h2_streams: 16,
            latency_connections: 32,
            pin: true,
            fillers: vec![0, 100, 1000],
            edits: 100,
            edits_under_load: 100,
            only_peers: None,
            only_scenarios: None,
            programs,
        }
    }

    /// About a second per scenario and peer, one round: only shows that everything still runs.
    pub fn smoke(programs: Programs) -> Self {
        Options {
            rounds: 1,
            duration: Duration::from_secs(1),
            warmup: Duration::ZERO,
            fillers: vec![0, 5, 10],
            edits: 3,
            edits_under_load: 5,
            ..Options::full(programs)
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Wrk { tls: bool, close: bool },
    H2,
}

struct Def {
    id: &'static str,
    description: &'static str,
    path: &'static str,
    kind: Kind,
}

const SCENARIOS: &[Def] = &[
    Def {
        id: "h1-1k",
        description: "HTTP/1.1 plaintext, keep-alive, 1 KiB body (wrk)",
        path: "/1k",
        kind: Kind::Wrk {
            tls: false,
            close: false,
        },
    },
    Def {
        id: "h1-64k",
        description: "HTTP/1.1 plaintext, keep-alive, 64 KiB body (wrk)",
        path: "/64k",
        kind: Kind::Wrk {
            tls: false,
            close: false,
        },
    },
    Def {
        id: "tls-1k",
        description: "HTTPS (TLS 1.3), keep-alive, 1 KiB body (wrk)",
        path: "/1k",
        kind: Kind::Wrk {
            tls: true,
            close: false,
        },
    },
    Def {
        id: "tls-64k",
        description: "HTTPS (TLS 1.3), keep-alive, 64 KiB body (wrk)",
        path: "/64k",
        kind: Kind::Wrk {
            tls: true,
            close: false,
        },
    },
    Def {
        id: "tls-new-conn-1k",
        description: "HTTPS (TLS 1.3), a new connection and full handshake per request, 1 KiB body (wrk, `Connection: close`)",
        path: "/1k",
        kind: Kind::Wrk {
            tls: true,
            close: true,
        },
    },
    Def {
        id: "h2-1k",
        description: "HTTP/2 over TLS 1.3, several streams per connection, 1 KiB body (h2load)",
        path: "/1k",
        kind: Kind::H2,
    },
    Def {
        id: "h2-64k",
        description: "HTTP/2 over TLS 1.3, several streams per connection, 64 KiB body (h2load)",
        path: "/64k",
        kind: Kind::H2,
    },
];

/// CPU lists for (proxies, load generators) when pinning: the upper half of the CPUs for the
/// proxies, the rest for everything else.
fn cpu_split(cores: usize) -> Option<(String, String, usize)> {
    if cores < 2 {
        return None;
    }
    let first_proxy = cores / 2;
    let list = |a: usize, b: usize| {
        if a == b {
            a.to_string()
        } else {
            format!("{a}-{b}")
        }
    };
    Some((
        list(first_proxy, cores - 1),
        list(0, first_proxy - 1),
        cores - first_proxy,
    ))
}

/// One measurement's raw outcome.
#[derive(Default)]
struct Sample {
    load: LoadResult,
    cpu_seconds: f64,
    user_seconds: f64,
    wall_seconds: f64,
}

struct Runner<'a> {
    opts: &'a Options,
    tools: Tools,
    backend: Backend,
    split: Option<(String, String, usize)>,
}

impl Runner<'_> {
    fn url(peer: &Peer, tls: bool, path: &str) -> String {
        if tls {
            format!("https://{}{path}", peer.https)
        } else {
            format!("http://{}{path}", peer.http)
        }
    }

    /// Runs one load of `def` against `peer` for `duration`.
    async fn load(&self, def: &Def, peer: &Peer, duration: Duration) -> Result<LoadResult, Error> {
        let tools = self.tools.clone();
        let o = self.opts;
        let (kind, path) = (def.kind, def.path);
        let (http, https) = (Self::url(peer, false, path), Self::url(peer, true, path));
        let h2_url = format!("https://{HOST}:{}{path}", peer.https.port());
        let connect = peer.https;
        let (conns, clients, streams) = (o.wrk_connections, o.h2_clients, o.h2_streams);
        tokio::task::spawn_blocking(move || match kind {
            Kind::Wrk { tls, close } => tools.wrk(&WrkRun {
                url: if tls { &https } else { &http },
                host: HOST,
                connections: conns,
                duration,
                close,
            }),
            Kind::H2 => tools.h2load(&h2_url, connect, clients, streams, duration),
        })
        .await?
    }

    /// Gives the backend the proxies' CPUs while it is itself the system under test.
    fn place_backend(&self, as_peer: bool) -> Result<(), Error> {
        if let Some((proxy, loadgen, _)) = &self.split {
            self.backend.pin(if as_peer { proxy } else { loadgen })?;
        }
        Ok(())
    }

    async fn measure<F, Fut>(&self, peer: &Peer, run: F) -> Result<Sample, Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<LoadResult, Error>>,
    {
        let direct = peer.kind == PeerKind::Direct;
        self.place_backend(direct)?;
        let before = procfs::stats(peer.pid);
        let started = std::time::Instant::now();
        let result = run().await;
        let wall = started.elapsed().as_secs_f64();
        let after = procfs::stats(peer.pid);
        self.place_backend(false)?;
        let load = result.map_err(|e| Error::Peer {
            peer: peer.kind.name().into(),
            message: format!("{e}; peer log: {}", peer.log_tail()),
        })?;
        Ok(Sample {
            load,
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            user_seconds: after.user_seconds - before.user_seconds,
            wall_seconds: wall,
        })
    }
}

fn figures(peer: &Peer, samples: &[Sample], value: impl Fn(&Sample) -> f64) -> PeerFigures {
    let values: Vec<f64> = samples.iter().map(&value).collect();
    let per_req: Vec<f64> = samples
        .iter()
        .filter(|s| s.load.requests > 0)
        .map(|s| s.cpu_seconds * 1e6 / s.load.requests as f64)
        .collect();
    let user_per_req: Vec<f64> = samples
        .iter()
        .filter(|s| s.load.requests > 0)
        .map(|s| s.user_seconds * 1e6 / s.load.requests as f64)
        .collect();
    let cores: Vec<f64> = samples
        .iter()
        .filter(|s| s.wall_seconds > 0.0)
        .map(|s| s.cpu_seconds / s.wall_seconds)
        .collect();
    PeerFigures {
        peer: peer.kind.name().into(),
        value: Stat::of(&values),
        vs_nginx: None,
        vs_haproxy: None,
        cpu_us_per_request: Stat::of(&per_req),
        user_us_per_request: Stat::of(&user_per_req),
        cpu_cores: Stat::of(&cores),
        errors: samples.iter().map(|s| s.load.errors).sum(),
        non_2xx: samples.iter().map(|s| s.load.non_2xx).sum(),
    }
}

fn machine(versions: BTreeMap<String, String>) -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let meminfo = read("/proc/meminfo");
    let os = read("/etc/os-release");
    Machine {
        cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .max(
                cpuinfo
                    .lines()
                    .filter(|l| l.starts_with("processor"))
                    .count(),
            ),
        cpu_model: cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_else(|| "unknown CPU".into()),
        memory_gib: meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map(|kib| kib / 1024.0 / 1024.0)
            .unwrap_or(0.0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        os: os
            .lines()
            .find_map(|l| l.strip_prefix("PRETTY_NAME="))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default(),
        versions,
        loadavg_before: String::new(),
        loadavg_after: String::new(),
    }
}

fn rustc_version() -> String {
    std::process::Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Runs every scenario against every peer and returns the figures (not yet written).
pub async fn run(opts: &Options) -> Result<Results, Error> {
    integration_tests::install_crypto_provider();
    let loadavg_before = procfs::loadavg();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let split = if opts.pin { cpu_split(cores) } else { None };
    let workers = split.as_ref().map(|s| s.2).unwrap_or(cores);
    if let Some((_, loadgen, _)) = &split {
        // The harness (and the apiserver and etcd it starts) stay off the proxies' CPUs.
        let me = std::process::id().to_string();
        integration_tests::process::run("taskset", &["-a", "-p", "-c", loadgen, &me])?;
    }
    let dir = tempfile::Builder::new()
        .prefix("homecluster-bench-")
        .tempdir()?;
    // nginx's workers drop root and still need to reach their temp paths under here.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let shared = Shared::new(dir.path(), split.as_ref().map(|s| s.0.clone()), workers)?;
    let p = &opts.programs;
    let backend = Backend::start(
        &shared,
        &p.backend,
        split.as_ref().map(|s| s.1.as_str()),
        workers,
    )?;
    probe::wait_status(
        backend.plain,
        HOST,
        "/1k",
        200,
        Duration::from_millis(50),
        Duration::from_secs(10),
    )
    .await?;

    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut env = cluster::start(&cluster, &shared, &p.ingress_controller, backend.plain).await?;
    let mut others = vec![
        peers::nginx(&shared, &p.nginx, &backend)?,
        peers::haproxy(&shared, &p.haproxy, &backend)?,
    ];
    let mut skipped = Vec::new();
    match &p.pingora {
        Ok(path) => others.push(peers::pingora(&shared, path, &backend)?),
        Err(why) => skipped.push(("pingora".to_string(), why.clone())),
    }
    others.push(Peer::direct(&backend));
    for peer in &mut others {
        if let Err(e) = probe::wait_status(
            peer.http,
            HOST,
            "/1k",
            200,
            Duration::from_millis(50),
            Duration::from_secs(20),
        )
        .await
        {
            return Err(Error::Peer {
                peer: peer.kind.name().into(),
                message: format!("{e}; log: {}", peer.log_tail()),
            });
        }
    }

    let tools = Tools {
        wrk: p.wrk.clone(),
        h2load: p.h2load.clone(),
        oha: p.oha.clone(),
        cpus: split.as_ref().map(|s| s.1.clone()),
    };
    let mut versions: BTreeMap<String, String> = tools.versions().into_iter().collect();
    versions.insert("rustc".into(), rustc_version());
    versions.insert(
        "kube-apiserver".into(),
        integration_tests::paths::K8S_VERSION.into(),
    );
    let runner = Runner {
        opts,
        tools,
        backend,
        split: split.clone(),
    };

    // Our peer first, then the others, in the same order in every round.
    let mut all: Vec<&mut Peer> = std::iter::once(&mut env.peer)
        .chain(others.iter_mut())
        .collect();
    if let Some(only) = &opts.only_peers {
        all.retain(|p| only.iter().any(|o| o == p.kind.name()));
    }
    for peer in &all {
        versions.insert(peer.kind.name().into(), peer.version.clone());
    }
    let scenarios: Vec<&Def> = SCENARIOS
        .iter()
        .filter(|d| {
            opts.only_scenarios
                .as_ref()
                .is_none_or(|o| o.iter().any(|id| id == d.id))
        })
        .collect();
    let start_stats: Vec<procfs::ProcStats> = all.iter().map(|p| procfs::stats(p.pid)).collect();
    let mut requests = vec![0u64; all.len()];

    // Throughput: rounds × scenarios × peers.
    let mut samples: Vec<Vec<Vec<Sample>>> = (0..scenarios.len())
        .map(|_| (0..all.len()).map(|_| Vec::new()).collect())
        .collect();
    for round in 0..opts.rounds {
        for (si, def) in scenarios.iter().enumerate() {
            for (pi, peer) in all.iter_mut().enumerate() {
                eprintln!(
                    "    round {}/{} {:<16} {}",
                    round + 1,
                    opts.rounds,
                    def.id,
                    peer.kind.name()
                );
                if !opts.warmup.is_zero() {
                    runner.load(def, peer, opts.warmup).await?;
                }
                peer.check_running()?;
                let peer: &Peer = peer;
                let s = runner
                    .measure(peer, || runner.load(def, peer, opts.duration))
                    .await?;
                requests[pi] += s.load.requests;
                samples[si][pi].push(s);
            }
        }
    }
    let throughput: Vec<Scenario> = scenarios
        .iter()
        .enumerate()
        .map(|(si, def)| {
            let mut s = Scenario {
                id: def.id.into(),
                description: def.description.into(),
                unit: "req/s".into(),
                higher_is_better: true,
                peers: all
                    .iter()
                    .enumerate()
                    .map(|(pi, peer)| figures(peer, &samples[si][pi], |s| s.load.rps))
                    .collect(),
            };
            s.compute_ratios();
            s
        })
        .collect();

    // Fixed-rate latency at half of nginx's saturation rate (HTTP/1.1, 1 KiB).
    let saturation = throughput
        .iter()
        .find(|s| s.id == "h1-1k")
        .and_then(|s| s.get(PeerKind::Nginx))
        .map(|p| p.value.median)
        .unwrap_or(0.0);
    let rate = (saturation * 0.5).max(1.0);
    let mut lat: Vec<Vec<Sample>> = (0..all.len()).map(|_| Vec::new()).collect();
    for round in 0..opts.rounds {
        for (pi, peer) in all.iter_mut().enumerate() {
            eprintln!(
                "    round {}/{} latency@{rate:.0}/s  {}",
                round + 1,
                opts.rounds,
                peer.kind.name()
            );
            let url = Runner::url(peer, false, "/1k");
            let tools = runner.tools.clone();
            let (conns, duration, warmup) = (opts.latency_connections, opts.duration, opts.warmup);
            if !warmup.is_zero() {
                let (tools, url) = (tools.clone(), url.clone());
                tokio::task::spawn_blocking(move || {
                    tools.oha_rate(&url, HOST, rate, conns, warmup)
                })
                .await??;
            }
            peer.check_running()?;
            let s = runner
                .measure(peer, || {
                    let (tools, url) = (tools.clone(), url.clone());
                    async move {
                        tokio::task::spawn_blocking(move || {
                            tools.oha_rate(&url, HOST, rate, conns, duration)
                        })
                        .await?
                    }
                })
                .await?;
            requests[pi] += s.load.requests;
            lat[pi].push(s);
        }
    }
    let latency: Vec<Scenario> = [
        ("latency-p50", "p50 ms"),
        ("latency-p99", "p99 ms"),
        ("latency-p99.9", "p99.9 ms"),
    ]
    .iter()
    .map(|(id, unit)| {
        let pick = |s: &Sample| {
            s.load
                .latency_ms
                .map(|l| match *id {
                    "latency-p50" => l.p50,
                    "latency-p99" => l.p99,
                    _ => l.p999,
                })
                .unwrap_or(f64::NAN)
        };
        let mut s = Scenario {
            id: (*id).into(),
            description: format!("oha -q {rate:.0} --latency-correction, {unit}"),
            unit: (*unit).into(),
            higher_is_better: false,
            peers: all
                .iter()
                .enumerate()
                .map(|(pi, peer)| figures(peer, &lat[pi], pick))
                .collect(),
        };
        s.compute_ratios();
        s
    })
    .collect();

    // Memory and CPU over both phases.
    let mut resources: Vec<Resources> = all
        .iter()
        .enumerate()
        .map(|(pi, peer)| {
            let end = procfs::stats(peer.pid);
            Resources {
                peer: peer.kind.name().into(),
                peak_rss_mib: end.peak_rss_bytes as f64 / (1024.0 * 1024.0),
                cpu_seconds: end.cpu_seconds - start_stats[pi].cpu_seconds,
                requests: requests[pi],
                vs_nginx_rss: None,
                vs_haproxy_rss: None,
            }
        })
        .collect();
    let rss_of = |name: &str, r: &[Resources]| {
        r.iter()
            .find(|r| r.peer == name)
            .map(|r| r.peak_rss_mib)
            .filter(|v| *v > 0.0)
    };
    let (nginx_rss, haproxy_rss) = (
        rss_of(PeerKind::Nginx.name(), &resources),
        rss_of(PeerKind::Haproxy.name(), &resources),
    );
    for r in &mut resources {
        r.vs_nginx_rss = nginx_rss.map(|n| r.peak_rss_mib / n);
        r.vs_haproxy_rss = haproxy_rss.map(|h| r.peak_rss_mib / h);
    }
    let peer_versions: Vec<(String, String)> = all
        .iter()
        .map(|p| (p.kind.name().to_string(), p.version.clone()))
        .collect();
    drop(all);
    // The other proxies are done: stop them so the edit measurements have the machine.
    drop(others);

    // Ingress edits (our controller only: the others have no Ingress API).
    let mut propagation = Vec::new();
    for &n in &opts.fillers {
        eprintln!("    edit propagation with {n} other Ingresses");
        let p = env.propagation(n, opts.edits).await?;
        propagation.push(PropagationSummary::of(&p));
    }
    eprintln!("    {} edits under load", opts.edits_under_load);
    let edits_under_load = Some(env.edits_under_load(opts.edits_under_load).await?);

    let mut m = machine(versions);
    m.loadavg_before = loadavg_before;
    m.loadavg_after = procfs::loadavg();
    let mut results = Results {
        started_unix,
        machine: m,
        method: Method {
            rounds: opts.rounds,
            seconds_per_run: opts.duration.as_secs_f64(),
            warmup_seconds: opts.warmup.as_secs_f64(),
            proxy_cpus: split.as_ref().map(|s| s.0.clone()),
            loadgen_cpus: split.as_ref().map(|s| s.1.clone()),
            workers_per_proxy: workers,
            wrk_connections: opts.wrk_connections,
            h2_clients: opts.h2_clients,
            h2_streams: opts.h2_streams,
            latency_rate: rate,
            latency_connections: opts.latency_connections,
            notes: Vec::new(),
        },
        peers: peer_versions,
        skipped,
        throughput,
        latency,
        resources,
        propagation,
        edits_under_load,
        targets: Vec::new(),
    };
    results.evaluate_targets();
    drop(env);
    drop(cluster);
    Ok(results)
}

/// Where set-up installs oha (`cargo install --root`), outside the repository.
pub fn oha_path() -> PathBuf {
    integration_tests::paths::cache_dir()
        .join("oha")
        .join("bin")
        .join("oha")
}

/// Builds the pingora peer (its own workspace and lockfile) into a target dir cached outside the
/// repository, so later runs only check freshness. `Err` carries why it could not be built.
pub fn build_pingora(workspace_root: &std::path::Path) -> Result<PathBuf, String> {
    let manifest = workspace_root.join("benches/pingora-peer/Cargo.toml");
    let target = integration_tests::paths::cache_dir().join("pingora-peer-target");
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
