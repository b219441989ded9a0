//! Proxy benchmark harness: our ingress-controller (fed by a real apiserver), nginx, haproxy,
//! a minimal pingora proxy and direct-to-backend, side by side in one run on one machine.
//! `cargo run -p xtask -- bench proxy` installs the peers and runs [`run`]; the smoke test runs
//! every scenario for about a second. benches/README.md explains every setting.

pub mod backend;
pub mod cluster;
pub mod http1;
pub mod idle;
pub mod load;
pub mod peers;
pub mod probe;
pub mod procfs;
pub mod profile;
pub mod report;
pub mod security;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use integration_tests::kube::{Cluster, ClusterOptions};
use thiserror::Error;

use crate::cluster::IngressEnv;
use crate::load::{LoadResult, Tools, WrkRun};
use crate::peers::{Backend, HOST, Peer, PeerKind, Shared};
use crate::report::{
    IdlePeer, Machine, Method, PeerFigures, PropagationSummary, Resources, Results, ScaleSummary,
    Scenario, Stat,
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
    #[error("options: {0}")]
    Options(String),
}

/// The programs the run uses.
#[derive(Clone, Debug)]
pub struct Programs {
    pub ingress_controller: PathBuf,
    pub backend: PathBuf,
    /// `Err(reason)` when the pingora peer could not be built: it is then reported as skipped.
    pub pingora: Result<PathBuf, String>,
    /// `bare-proxy`, the bare peers' binary (built with the harness).
    pub bare: PathBuf,
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
    /// Idle keep-alive connections held against each proxy.
    pub idle_connections: usize,
    /// Other Ingresses in the cluster in the scale scenario (plain and TLS together).
    pub scale_ingresses: usize,
    /// Of those, Ingresses with a `tls` section naming their own Secret.
    pub scale_certificates: usize,
    /// Profile our controller and nginx (`perf record`) in one extra run per throughput
    /// scenario and during the scale scenario's edits; the report quotes the profiles next to
    /// missed goals.
    pub profile: bool,
    /// Measure only these peers (by name), e.g. for a quick A/B while profiling.
    pub only_peers: Option<Vec<String>>,
    /// Run only these scenarios and phases (ids from [`scenario_ids`]).
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
            idle_connections: 10_000,
            scale_ingresses: 10_000,
            scale_certificates: 1_000,
            profile: true,
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
            idle_connections: 200,
            scale_ingresses: 100,
            scale_certificates: 10,
            profile: false,
            ..Options::full(programs)
        }
    }

    /// Whether the scenario or phase `id` runs.
    pub fn selected(&self, id: &str) -> bool {
        self.only_scenarios
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == id))
    }

    /// Whether the peer `kind` takes part (`--only`).
    pub fn chosen(&self, kind: PeerKind) -> bool {
        self.only_peers
            .as_ref()
            .is_none_or(|o| o.iter().any(|p| p == kind.name()))
    }

    /// Fails on a scenario id or peer name that names nothing (a typo would otherwise run
    /// nothing quietly).
    fn check(&self) -> Result<(), Error> {
        let unknown = |given: &Option<Vec<String>>, known: &[&str], what: &str| match given
            .iter()
            .flatten()
            .find(|g| !known.contains(&g.as_str()))
        {
            Some(g) => Err(Error::Options(format!(
                "unknown {what} {g:?}; known: {}",
                known.join(", ")
            ))),
            None => Ok(()),
        };
        unknown(&self.only_scenarios, &scenario_ids(), "scenario")?;
        let peers: Vec<&str> = PeerKind::ALL.iter().map(|k| k.name()).collect();
        unknown(&self.only_peers, &peers, "peer")
    }

    /// Whether a throughput scenario the bare proxies serve is selected.
    fn bare_selected(&self) -> bool {
        SCENARIOS
            .iter()
            .any(|d| d.plain_keep_alive() && self.selected(d.id))
    }
}

/// Our controller's ConfigMap in the proxy benchmark: what differs from upstream's defaults,
/// as in nginx's configuration here (`peers.rs`). `keep-alive-requests` (1000 by default)
/// would end h2load's connections, which do not reconnect, after that many streams.
const OURS_SETTINGS: &[(&str, &str)] = &[("keep-alive-requests", "1000000")];

/// The phases besides the throughput scenarios, by the id `--scenarios` selects them with.
pub const IDLE: &str = "idle";
pub const LATENCY: &str = "latency";
pub const PROPAGATION: &str = "propagation";
pub const EDITS_UNDER_LOAD: &str = "edits-under-load";
pub const SCALE: &str = "scale";

/// Every scenario and phase id, in the order they run.
pub fn scenario_ids() -> Vec<&'static str> {
    let mut ids = vec![IDLE];
    ids.extend(SCENARIOS.iter().map(|d| d.id));
    ids.extend([LATENCY, PROPAGATION, EDITS_UNDER_LOAD, SCALE]);
    ids
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

/// Whether the bare proxies take part in throughput scenario `id`.
pub fn bare_scenario(id: &str) -> bool {
    SCENARIOS.iter().any(|d| d.id == id && d.plain_keep_alive())
}

impl Def {
    /// Plain HTTP/1.1 on kept-alive connections: all the bare proxies serve.
    fn plain_keep_alive(&self) -> bool {
        matches!(
            self.kind,
            Kind::Wrk {
                tls: false,
                close: false
            }
        )
    }
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
    shared: Shared,
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
        vs_floor: None,
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

/// Runs every selected scenario against every peer and returns the figures (not yet written).
///
/// Order: idle keep-alive connections first, each proxy in a fresh process; then every peer
/// restarted for the throughput and latency rounds (so neither the idle figures nor the peak
/// RSS under load carry the other's allocations); then, with the other proxies stopped, the
/// Ingress edit phases and the scale scenario (our controller started afresh once more).
pub async fn run(opts: &Options) -> Result<Results, Error> {
    opts.check()?;
    integration_tests::install_crypto_provider();
    // The idle scenario holds thousands of sockets here; peers started later inherit the limit.
    idle::raise_nofile();
    let loadavg_before = procfs::loadavg();
    let started_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let split = placement(opts)?;
    let workers = split.as_ref().map(|s| s.2).unwrap_or_else(cores);
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
    let backend = start_backend(&shared, &p.backend, split.as_ref(), workers).await?;
    let cluster = Cluster::start(ClusterOptions::default()).await?;
    let mut env = cluster::start(
        &cluster,
        &shared,
        &p.ingress_controller,
        backend.plain,
        OURS_SETTINGS,
    )
    .await?;
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
    let mut results = Results {
        started_unix,
        method: method(opts, split.as_ref(), workers),
        ..Results::default()
    };
    let runner = Runner {
        opts,
        tools,
        backend,
        split,
        shared,
    };

    if opts.selected(IDLE) {
        runner.idle_phase(&mut env, &mut results).await?;
    }
    if runner.load_selected() {
        runner.load_phases(&mut env, &mut results).await?;
    }
    runner.ingress_phases(&mut env, &mut results).await?;

    versions.extend(results.peers.iter().cloned());
    results.machine = machine(versions);
    results.machine.loadavg_before = loadavg_before;
    results.machine.loadavg_after = procfs::loadavg();
    results.evaluate_targets();
    drop(env);
    drop(cluster);
    Ok(results)
}

fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// The CPU split when pinning; the harness (and the apiserver and etcd it starts) moves off
/// the proxies' CPUs.
fn placement(opts: &Options) -> Result<Option<(String, String, usize)>, Error> {
    let split = if opts.pin { cpu_split(cores()) } else { None };
    if let Some((_, loadgen, _)) = &split {
        let me = std::process::id().to_string();
        integration_tests::process::run("taskset", &["-a", "-p", "-c", loadgen, &me])?;
    }
    Ok(split)
}

/// Starts the backend on the load generators' CPUs and waits until it answers.
async fn start_backend(
    shared: &Shared,
    program: &std::path::Path,
    split: Option<&(String, String, usize)>,
    workers: usize,
) -> Result<Backend, Error> {
    let backend = Backend::start(shared, program, split.map(|s| s.1.as_str()), workers)?;
    probe::wait_status(
        backend.plain,
        HOST,
        "/1k",
        200,
        Duration::from_millis(50),
        Duration::from_secs(10),
    )
    .await?;
    Ok(backend)
}

fn method(opts: &Options, split: Option<&(String, String, usize)>, workers: usize) -> Method {
    Method {
        rounds: opts.rounds,
        seconds_per_run: opts.duration.as_secs_f64(),
        warmup_seconds: opts.warmup.as_secs_f64(),
        proxy_cpus: split.map(|s| s.0.clone()),
        loadgen_cpus: split.map(|s| s.1.clone()),
        workers_per_proxy: workers,
        wrk_connections: opts.wrk_connections,
        h2_clients: opts.h2_clients,
        h2_streams: opts.h2_streams,
        latency_rate: 0.0,
        latency_connections: opts.latency_connections,
        idle_connections: opts.idle_connections,
        notes: Vec::new(),
    }
}

/// Waits until `peer` answers on its plain listener; its log is in the error otherwise.
async fn wait_serving(peer: &mut Peer) -> Result<(), Error> {
    let ready = probe::wait_status(
        peer.http,
        HOST,
        "/1k",
        200,
        Duration::from_millis(50),
        Duration::from_secs(20),
    )
    .await;
    ready.map_err(|e| Error::Peer {
        peer: peer.kind.name().into(),
        message: format!("{e}; log: {}", peer.log_tail()),
    })
}

/// As [`wait_serving`], but fails as soon as the peer has exited (a bare proxy whose io_uring
/// was refused ends at once).
async fn wait_serving_while_running(peer: &mut Peer) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        peer.check_running()?;
        if let Ok((200, _)) = probe::get(peer.http, HOST, "/1k").await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return wait_serving(peer).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Our peer first, then the others, in the same order every time; `--only` narrows it.
fn chosen<'p>(
    opts: &Options,
    env: &'p mut IngressEnv,
    others: &'p mut [Peer],
) -> Vec<&'p mut Peer> {
    let mut all: Vec<&mut Peer> = std::iter::once(&mut env.peer)
        .chain(others.iter_mut())
        .collect();
    all.retain(|p| opts.chosen(p.kind));
    all
}

/// Records which peers took part (and their versions) once each.
fn note_peers<'p>(results: &mut Results, peers: impl IntoIterator<Item = &'p Peer>) {
    for peer in peers {
        let name = peer.kind.name();
        if !results.peers.iter().any(|(n, _)| n == name) {
            results.peers.push((name.into(), peer.version.clone()));
        }
    }
}

impl Runner<'_> {
    /// nginx, haproxy, pingora (when it could be built), the bare proxies (`with_bare`, when
    /// chosen and when they start) and direct, freshly started and serving.
    async fn start_others(
        &self,
        results: &mut Results,
        with_bare: bool,
    ) -> Result<Vec<Peer>, Error> {
        let p = &self.opts.programs;
        let mut others = vec![
            peers::nginx(&self.shared, &p.nginx, &self.backend)?,
            peers::haproxy(&self.shared, &p.haproxy, &self.backend)?,
        ];
        match &p.pingora {
            Ok(path) => others.push(peers::pingora(&self.shared, path, &self.backend)?),
            Err(why) if !results.skipped.iter().any(|(n, _)| n == "pingora") => {
                results.skipped.push(("pingora".into(), why.clone()));
            }
            Err(_) => {}
        }
        for peer in &mut others {
            wait_serving(peer).await?;
        }
        if with_bare {
            for kind in [PeerKind::BareEpoll, PeerKind::BareIoUring] {
                if self.opts.chosen(kind) {
                    others.extend(self.start_bare(kind, results).await);
                }
            }
        }
        others.push(Peer::direct(&self.backend));
        Ok(others)
    }

    /// A bare proxy, serving; or `None`, and the reason recorded as skipped (io_uring, for
    /// one, may be refused by the kernel or a seccomp profile).
    async fn start_bare(&self, kind: PeerKind, results: &mut Results) -> Option<Peer> {
        let p = &self.opts.programs;
        let started = match peers::bare(&self.shared, &p.bare, &self.backend, kind) {
            Ok(mut peer) => wait_serving_while_running(&mut peer).await.map(|()| peer),
            Err(e) => Err(e),
        };
        match started {
            Ok(peer) => Some(peer),
            Err(e) => {
                if !results.skipped.iter().any(|(n, _)| n == kind.name()) {
                    results.skipped.push((kind.name().into(), e.to_string()));
                }
                None
            }
        }
    }

    /// Idle keep-alive connections against every proxy, each in a fresh process (allocations
    /// of earlier load would otherwise be reused and hide the cost); then our controller is
    /// restarted so that what follows starts fresh too (the other proxies are started anew
    /// for it anyway).
    async fn idle_phase(&self, env: &mut IngressEnv, results: &mut Results) -> Result<(), Error> {
        let count = self.opts.idle_connections;
        // The bare proxies keep their buffers per connection by design: no idle figure.
        let mut others = self.start_others(results, false).await?;
        let mut peers = chosen(self.opts, env, &mut others);
        // The backend is no proxy: direct has no figure here.
        peers.retain(|p| p.kind != PeerKind::Direct);
        note_peers(results, peers.iter().map(|p| &**p));
        for peer in peers {
            eprintln!(
                "    idle: {count} keep-alive connections to {}",
                peer.kind.name()
            );
            let ours = peer.kind == PeerKind::IngressController;
            if ours {
                let split = procfs::memory_split(peer.pid, "fresh process, idle");
                results.memory.push(split);
            }
            let figures = idle::idle(peer.http, peer.pid, count).await;
            if ours {
                results.memory.push(figures.held_memory.clone());
            }
            // A peer that died under the connections is an error, not a figure.
            peer.check_running()?;
            results.idle.push(IdlePeer {
                peer: peer.kind.name().into(),
                idle: figures,
                vs_nginx: None,
            });
        }
        report::idle_ratios(&mut results.idle);
        drop(others);
        env.restart(&self.shared).await
    }

    fn load_selected(&self) -> bool {
        SCENARIOS.iter().any(|d| self.opts.selected(d.id)) || self.opts.selected(LATENCY)
    }

    /// Throughput rounds, then fixed-rate latency, against fresh peers; memory and CPU over
    /// both. The other proxies are stopped at the end so the edit phases have the machine.
    async fn load_phases(&self, env: &mut IngressEnv, results: &mut Results) -> Result<(), Error> {
        let mut others = self
            .start_others(results, self.opts.bare_selected())
            .await?;
        let mut all = chosen(self.opts, env, &mut others);
        note_peers(results, all.iter().map(|p| &**p));
        let start: Vec<procfs::ProcStats> = all.iter().map(|p| procfs::stats(p.pid)).collect();
        let mut requests = vec![0u64; all.len()];
        results.throughput = self.throughput(&mut all, &mut requests).await?;
        if self.opts.selected(LATENCY) {
            match nginx_saturation(&results.throughput) {
                Some(saturation) => {
                    let rate = saturation * 0.5;
                    results.method.latency_rate = rate;
                    results.latency = self.latency(&mut all, rate, &mut requests).await?;
                }
                None => results.method.notes.push(
                    "The fixed-rate latency phase did not run: its rate is half of nginx's h1-1k \
                     figure from the same run, which this run did not measure."
                        .into(),
                ),
            }
        }
        results.resources = resources(&all, &start, &requests);
        if let Some(ours) = all.iter().find(|p| p.kind == PeerKind::IngressController) {
            let split = procfs::memory_split(ours.pid, "after the throughput and latency phases");
            results.memory.push(split);
        }
        if self.opts.profile {
            results.profiles = self.profiles(&all).await?;
        }
        Ok(())
    }

    /// One extra run per throughput scenario for our controller and nginx, under `perf
    /// record` (after the measured runs, so sampling costs none of their figures).
    async fn profiles(&self, all: &[&mut Peer]) -> Result<Vec<profile::Profile>, Error> {
        let mut out = Vec::new();
        let profiled = [PeerKind::IngressController, PeerKind::Nginx];
        for def in SCENARIOS.iter().filter(|d| self.opts.selected(d.id)) {
            for peer in all.iter().filter(|p| profiled.contains(&p.kind)) {
                let name = peer.kind.name();
                eprintln!("    profile {:<16} {name}", def.id);
                let file = self.shared.dir.join(format!("{}-{name}.perf", def.id));
                let recording = profile::start(&procfs::tree(peer.pid), &file)?;
                let load = self.load(def, peer, self.opts.duration).await;
                let profile = recording.finish(def.id, name)?;
                load?;
                out.push(profile);
            }
        }
        Ok(out)
    }

    /// Throughput: rounds × scenarios × peers.
    async fn throughput(
        &self,
        all: &mut [&mut Peer],
        requests: &mut [u64],
    ) -> Result<Vec<Scenario>, Error> {
        let opts = self.opts;
        let scenarios: Vec<&Def> = SCENARIOS.iter().filter(|d| opts.selected(d.id)).collect();
        let mut samples: Vec<Vec<Vec<Sample>>> = (0..scenarios.len())
            .map(|_| (0..all.len()).map(|_| Vec::new()).collect())
            .collect();
        for round in 0..opts.rounds {
            for (si, def) in scenarios.iter().enumerate() {
                for (pi, peer) in all.iter_mut().enumerate() {
                    if peer.kind.is_bare() && !def.plain_keep_alive() {
                        continue;
                    }
                    eprintln!(
                        "    round {}/{} {:<16} {}",
                        round + 1,
                        opts.rounds,
                        def.id,
                        peer.kind.name()
                    );
                    if !opts.warmup.is_zero() {
                        self.load(def, peer, opts.warmup).await?;
                    }
                    peer.check_running()?;
                    let peer: &Peer = peer;
                    let s = self
                        .measure(peer, || self.load(def, peer, opts.duration))
                        .await?;
                    requests[pi] += s.load.requests;
                    samples[si][pi].push(s);
                }
            }
        }
        Ok(scenarios
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
                        .filter(|(pi, _)| !samples[si][*pi].is_empty())
                        .map(|(pi, peer)| figures(peer, &samples[si][pi], |s| s.load.rps))
                        .collect(),
                    floor_us_per_request: None,
                };
                s.compute_ratios();
                s.compute_floor();
                s
            })
            .collect())
    }

    /// One fixed-rate oha run (after its warm-up) against `peer`.
    async fn latency_run(&self, peer: &mut Peer, rate: f64) -> Result<Sample, Error> {
        let url = Runner::url(peer, false, "/1k");
        let o = self.opts;
        let (conns, duration, warmup) = (o.latency_connections, o.duration, o.warmup);
        if !warmup.is_zero() {
            let (tools, url) = (self.tools.clone(), url.clone());
            tokio::task::spawn_blocking(move || tools.oha_rate(&url, HOST, rate, conns, warmup))
                .await??;
        }
        peer.check_running()?;
        let peer: &Peer = peer;
        self.measure(peer, || {
            let (tools, url) = (self.tools.clone(), url.clone());
            async move {
                tokio::task::spawn_blocking(move || {
                    tools.oha_rate(&url, HOST, rate, conns, duration)
                })
                .await?
            }
        })
        .await
    }

    /// Fixed-rate latency at `rate` (HTTP/1.1, 1 KiB): p50, p99 and p99.9 per peer.
    async fn latency(
        &self,
        all: &mut [&mut Peer],
        rate: f64,
        requests: &mut [u64],
    ) -> Result<Vec<Scenario>, Error> {
        let mut lat: Vec<Vec<Sample>> = (0..all.len()).map(|_| Vec::new()).collect();
        for round in 0..self.opts.rounds {
            // The bare proxies measure throughput only.
            for (pi, peer) in all.iter_mut().enumerate() {
                if peer.kind.is_bare() {
                    continue;
                }
                eprintln!(
                    "    round {}/{} latency@{rate:.0}/s  {}",
                    round + 1,
                    self.opts.rounds,
                    peer.kind.name()
                );
                let s = self.latency_run(peer, rate).await?;
                requests[pi] += s.load.requests;
                lat[pi].push(s);
            }
        }
        Ok(latency_scenarios(all, &lat, rate))
    }

    /// Edit propagation, edits under load and the scale scenario (our controller only: the
    /// other peers have no Ingress API).
    async fn ingress_phases(
        &self,
        env: &mut IngressEnv,
        results: &mut Results,
    ) -> Result<(), Error> {
        let o = self.opts;
        if o.selected(PROPAGATION) {
            for &n in &o.fillers {
                eprintln!("    edit propagation with {n} other Ingresses");
                let p = env.propagation(n, o.edits).await?;
                results.propagation.push(PropagationSummary::of(&p));
            }
        }
        if o.selected(EDITS_UNDER_LOAD) {
            eprintln!("    {} edits under load", o.edits_under_load);
            results.edits_under_load = Some(env.edits_under_load(o.edits_under_load).await?);
        }
        if o.selected(SCALE) {
            eprintln!(
                "    scale: {} Ingresses, {} of them with their own TLS Secret; {} edits",
                o.scale_ingresses, o.scale_certificates, o.edits
            );
            let s = env
                .scale(
                    &self.shared,
                    o.scale_ingresses,
                    o.scale_certificates,
                    o.edits,
                    o.profile,
                )
                .await;
            // It runs last: a failure here is reported with everything measured before it
            // rather than losing a quarter of an hour of figures.
            match s {
                Ok(s) => results.scale = Some(ScaleSummary::of(s)),
                Err(e) => results.failed.push((SCALE.into(), e.to_string())),
            }
        }
        if o.selected(PROPAGATION) || o.selected(EDITS_UNDER_LOAD) || o.selected(SCALE) {
            note_peers(results, [&env.peer]);
        }
        Ok(())
    }
}

/// nginx's median `h1-1k` rate in this run, which sets the fixed-rate latency phase's rate.
fn nginx_saturation(throughput: &[Scenario]) -> Option<f64> {
    throughput
        .iter()
        .find(|s| s.id == "h1-1k")
        .and_then(|s| s.get(PeerKind::Nginx))
        .map(|p| p.value.median)
        .filter(|m| *m > 0.0)
}

fn latency_scenarios(all: &[&mut Peer], lat: &[Vec<Sample>], rate: f64) -> Vec<Scenario> {
    [
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
                .filter(|(pi, _)| !lat[*pi].is_empty())
                .map(|(pi, peer)| figures(peer, &lat[pi], pick))
                .collect(),
            floor_us_per_request: None,
        };
        s.compute_ratios();
        s
    })
    .collect()
}

/// Memory and CPU of each peer over the throughput and latency phases.
fn resources(all: &[&mut Peer], start: &[procfs::ProcStats], requests: &[u64]) -> Vec<Resources> {
    let mut resources: Vec<Resources> = all
        .iter()
        .enumerate()
        .map(|(pi, peer)| {
            let end = procfs::stats(peer.pid);
            Resources {
                peer: peer.kind.name().into(),
                peak_rss_mib: end.peak_rss_bytes as f64 / (1024.0 * 1024.0),
                cpu_seconds: end.cpu_seconds - start[pi].cpu_seconds,
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
    resources
}

/// Where set-up installs oha (`cargo install --root`), outside the repository.
pub fn oha_path() -> PathBuf {
    integration_tests::paths::cache_dir()
        .join("oha")
        .join("bin")
        .join("oha")
}

pub use integration_tests::bench_peers::build_pingora;

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn options() -> Options {
        let p = PathBuf::new;
        Options::smoke(Programs {
            ingress_controller: p(),
            backend: p(),
            pingora: Ok(p()),
            bare: p(),
            nginx: p(),
            haproxy: p(),
            wrk: p(),
            h2load: p(),
            oha: p(),
        })
    }

    #[test]
    fn unknown_scenarios_and_peers_are_refused() {
        let mut o = options();
        assert!(o.check().is_ok());
        o.only_peers = Some(vec!["nginx".into(), "bare-io-uring".into()]);
        assert!(o.check().is_ok());
        assert!(o.chosen(PeerKind::BareIoUring) && !o.chosen(PeerKind::BareEpoll));
        o.only_peers = Some(vec!["floor-epoll".into()]);
        let e = o.check().unwrap_err().to_string();
        assert!(e.contains("unknown peer \"floor-epoll\""), "{e}");
        o.only_peers = None;
        o.only_scenarios = Some(vec!["h1-2k".into()]);
        assert!(o.check().is_err());
    }

    #[test]
    fn bare_proxies_start_only_for_their_scenarios() {
        let mut o = options();
        assert!(o.bare_selected());
        o.only_scenarios = Some(vec!["tls-1k".into(), LATENCY.into()]);
        assert!(!o.bare_selected());
        o.only_scenarios = Some(vec!["h1-64k".into()]);
        assert!(o.bare_selected());
        assert!(bare_scenario("h1-1k") && !bare_scenario("tls-new-conn-1k"));
    }
}
