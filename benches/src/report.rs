//! Results: medians with min/max, ratios to nginx and haproxy, targets, and the markdown and
//! JSON files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Error;
use crate::cluster::{EditsUnderLoad, Propagation, Scale};
use crate::idle::Idle;
use crate::peers::PeerKind;

/// Median, min and max of some samples.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: &[f64]) -> Stat {
        let mut s: Vec<f64> = samples.iter().copied().filter(|v| v.is_finite()).collect();
        s.sort_by(f64::total_cmp);
        if s.is_empty() {
            return Stat::default();
        }
        let mid = s.len() / 2;
        let median = if s.len() % 2 == 1 {
            s[mid]
        } else {
            (s[mid - 1] + s[mid]) / 2.0
        };
        Stat {
            median,
            min: s[0],
            max: s[s.len() - 1],
            samples: samples.to_vec(),
        }
    }
}

/// The `q` quantile (0..=1) by nearest rank.
pub fn quantile(samples: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = samples.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return 0.0;
    }
    let rank = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len());
    s[rank - 1]
}

/// Below this many cores busy, a proxy pinned to one CPU spent a sixth of the run waiting for
/// its clients: its load generator, not its own work, set the pace.
const LOADGEN_BOUND_CORES: f64 = 0.85;

/// One peer's figures in one scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerFigures {
    pub peer: String,
    pub value: Stat,
    pub vs_nginx: Option<f64>,
    pub vs_haproxy: Option<f64>,
    /// Proxy CPU microseconds per request (median over rounds).
    pub cpu_us_per_request: Stat,
    /// The user-space part (the rest is the kernel's TCP and TLS-independent work).
    pub user_us_per_request: Stat,
    /// Proxy CPU seconds per wall second during the run (1.0 = one core busy).
    pub cpu_cores: Stat,
    /// `cpu_us_per_request` against the scenario's floor (throughput scenarios only).
    pub vs_floor: Option<f64>,
    pub errors: u64,
    pub non_2xx: u64,
}

/// One scenario across peers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scenario {
    pub id: String,
    pub description: String,
    /// What `value` measures, e.g. "req/s" or "p99 ms".
    pub unit: String,
    pub higher_is_better: bool,
    pub peers: Vec<PeerFigures>,
    /// Twice the direct backend's CPU µs per request in this scenario and run: a proxy does
    /// the backend's server-side work plus the client side of the same exchange, so this is
    /// about the least a proxy can spend. `None` when direct did not run.
    pub floor_us_per_request: Option<f64>,
}

impl Scenario {
    pub fn get(&self, peer: PeerKind) -> Option<&PeerFigures> {
        self.peers.iter().find(|p| p.peer == peer.name())
    }

    /// Fills in the ratios from the medians of nginx and haproxy.
    pub fn compute_ratios(&mut self) {
        let base = |k: PeerKind| self.get(k).map(|p| p.value.median).filter(|m| *m > 0.0);
        let (n, h) = (base(PeerKind::Nginx), base(PeerKind::Haproxy));
        for p in &mut self.peers {
            p.vs_nginx = n.map(|n| p.value.median / n);
            p.vs_haproxy = h.map(|h| p.value.median / h);
        }
    }

    /// Fills in the floor from direct's CPU per request, and each peer's ratio to it.
    pub fn compute_floor(&mut self) {
        self.floor_us_per_request = self
            .get(PeerKind::Direct)
            .map(|d| 2.0 * d.cpu_us_per_request.median)
            .filter(|f| *f > 0.0);
        let floor = self.floor_us_per_request;
        for p in &mut self.peers {
            p.vs_floor = floor.map(|f| p.cpu_us_per_request.median / f);
        }
    }
}

/// Peak memory and CPU of one peer over the throughput and latency phases.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Resources {
    pub peer: String,
    pub peak_rss_mib: f64,
    pub cpu_seconds: f64,
    pub requests: u64,
    pub vs_nginx_rss: Option<f64>,
    pub vs_haproxy_rss: Option<f64>,
}

/// A target of the issue and whether this run met it.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub name: String,
    pub goal: String,
    pub actual: String,
    pub met: bool,
    /// For a missed goal: the measured line (profile, memory split) that explains it.
    pub why: String,
}

impl Target {
    /// Attaches `why` when the goal was missed.
    fn because(mut self, why: impl FnOnce() -> Option<String>) -> Self {
        if !self.met {
            self.why = why().unwrap_or_default();
        }
        self
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu_model: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub os: String,
    pub versions: BTreeMap<String, String>,
    pub loadavg_before: String,
    pub loadavg_after: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Method {
    pub rounds: usize,
    pub seconds_per_run: f64,
    pub warmup_seconds: f64,
    pub proxy_cpus: Option<String>,
    pub loadgen_cpus: Option<String>,
    pub workers_per_proxy: usize,
    pub wrk_connections: u32,
    pub h2_clients: u32,
    pub h2_streams: u32,
    pub latency_rate: f64,
    pub latency_connections: u32,
    pub idle_connections: usize,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PropagationSummary {
    pub ingresses: usize,
    pub edits: usize,
    pub from_request_ms: Stat,
    pub p99_from_request_ms: f64,
    pub p99_from_ack_ms: f64,
    pub p50_from_ack_ms: f64,
    pub raw: Propagation,
}

impl PropagationSummary {
    pub fn of(p: &Propagation) -> Self {
        PropagationSummary {
            ingresses: p.ingresses,
            edits: p.from_request_ms.len(),
            from_request_ms: Stat::of(&p.from_request_ms),
            p99_from_request_ms: quantile(&p.from_request_ms, 0.99),
            p99_from_ack_ms: quantile(&p.from_ack_ms, 0.99),
            p50_from_ack_ms: quantile(&p.from_ack_ms, 0.5),
            raw: p.clone(),
        }
    }
}

/// One proxy's figures in the idle keep-alive connections scenario.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IdlePeer {
    pub peer: String,
    pub idle: Idle,
    /// KiB per connection against nginx's.
    pub vs_nginx: Option<f64>,
}

/// Fills in each peer's KiB per connection against nginx's.
pub fn idle_ratios(idle: &mut [IdlePeer]) {
    let nginx = idle
        .iter()
        .find(|p| p.peer == PeerKind::Nginx.name())
        .map(|p| p.idle.kib_per_connection)
        .filter(|k| *k > 0.0);
    for p in idle {
        p.vs_nginx = nginx.map(|n| p.idle.kib_per_connection / n);
    }
}

/// The scale scenario with its edit series summarised.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleSummary {
    pub edits: PropagationSummary,
    pub raw: Scale,
}

impl ScaleSummary {
    pub fn of(raw: Scale) -> Self {
        ScaleSummary {
            edits: PropagationSummary::of(&raw.propagation),
            raw,
        }
    }

    /// The controller's resident memory in that state: the higher of once everything was
    /// served and after the edits.
    pub fn rss_mib(&self) -> f64 {
        self.raw.rss_loaded_mib.max(self.raw.rss_after_edits_mib)
    }
}

/// Everything one run produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub started_unix: u64,
    pub machine: Machine,
    pub method: Method,
    pub peers: Vec<(String, String)>,
    /// Peers that could not run, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Scenarios that did not complete, with the error (the others' figures are kept).
    pub failed: Vec<(String, String)>,
    pub throughput: Vec<Scenario>,
    pub latency: Vec<Scenario>,
    pub resources: Vec<Resources>,
    pub propagation: Vec<PropagationSummary>,
    pub edits_under_load: Option<EditsUnderLoad>,
    /// Idle keep-alive connections, fresh processes (before the throughput scenarios).
    pub idle: Vec<IdlePeer>,
    pub scale: Option<ScaleSummary>,
    /// Our controller's memory by kind at points of the run.
    pub memory: Vec<crate::procfs::MemorySplit>,
    /// One extra run per throughput scenario under `perf record` (ours and nginx).
    pub profiles: Vec<crate::profile::Profile>,
    pub targets: Vec<Target>,
}

/// A target's comparison.
#[derive(Clone, Copy, Debug)]
enum Goal {
    AtLeast(f64),
    Above(f64),
    AtMost(f64),
    Below(f64),
}

impl Goal {
    fn met(self, v: f64) -> bool {
        match self {
            Goal::AtLeast(g) => v >= g,
            Goal::Above(g) => v > g,
            Goal::AtMost(g) => v <= g,
            Goal::Below(g) => v < g,
        }
    }

    fn text(self, unit: &str) -> String {
        let (op, g) = match self {
            Goal::AtLeast(g) => ("≥", g),
            Goal::Above(g) => (">", g),
            Goal::AtMost(g) => ("≤", g),
            Goal::Below(g) => ("<", g),
        };
        if unit == "×" {
            format!("{op} {g:.2}×")
        } else {
            format!("{op} {g} {unit}")
        }
    }

    /// A target on a ratio to another peer.
    fn ratio(self, name: &str, r: f64) -> Target {
        Target {
            name: name.into(),
            goal: self.text("×"),
            actual: format!("{r:.2}×"),
            met: self.met(r),
            why: String::new(),
        }
    }

    /// A target on an absolute figure in `unit`.
    fn value(self, name: &str, v: f64, unit: &str) -> Target {
        Target {
            name: name.into(),
            goal: self.text(unit),
            actual: format!("{v:.1} {unit}"),
            met: self.met(v),
            why: String::new(),
        }
    }
}

/// Issue 12's throughput goals for our controller: (against nginx, against haproxy).
fn throughput_goals(id: &str) -> (Option<Goal>, Option<Goal>) {
    match id {
        "h1-1k" | "tls-1k" => (Some(Goal::AtLeast(1.15)), Some(Goal::AtLeast(1.15))),
        "h2-1k" | "tls-new-conn-1k" => (Some(Goal::AtLeast(1.0)), Some(Goal::AtLeast(1.0))),
        "h1-64k" | "tls-64k" | "h2-64k" => (Some(Goal::Above(1.0)), Some(Goal::AtLeast(1.15))),
        _ => (None, None),
    }
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "–".into())
}

fn fmt_value(v: f64, unit: &str) -> String {
    if unit == "req/s" {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// `split` as one line.
fn split_line(split: &crate::procfs::MemorySplit) -> String {
    format!(
        "{}: anonymous (heap, stacks) {:.1} MiB, mapped files (the binary, libraries) {:.1} MiB",
        split.when, split.anon_mib, split.file_mib
    )
}

impl Results {
    /// Computes issue 12's targets from the figures (those whose figures this run has).
    pub fn evaluate_targets(&mut self) {
        let mut t = Vec::new();
        self.throughput_targets(&mut t);
        let ours = PeerKind::IngressController;
        if let Some(p99) = self.latency.iter().find(|s| s.id == "latency-p99")
            && let Some(r) = p99.get(ours).and_then(|p| p.vs_nginx)
        {
            let target = Goal::AtMost(0.8).ratio("p99 at the fixed rate vs nginx", r);
            t.push(target.because(|| self.latency_why()));
        }
        if let Some(r) = self
            .resources
            .iter()
            .find(|r| r.peer == ours.name())
            .and_then(|r| r.vs_nginx_rss)
        {
            let target = Goal::AtMost(0.5).ratio("peak RSS under load vs nginx", r);
            t.push(target.because(|| self.memory_why("after the throughput")));
        }
        self.idle_targets(&mut t);
        if let Some(p) = self.propagation.iter().max_by_key(|p| p.ingresses) {
            t.push(Goal::Below(50.0).value(
                &format!("edit propagation p99 at {} Ingresses", p.ingresses),
                p.p99_from_request_ms,
                "ms",
            ));
        }
        self.scale_targets(&mut t);
        if let Some(e) = &self.edits_under_load {
            t.push(Target {
                name: format!("failed requests across {} edits under load", e.edits),
                goal: "0".into(),
                actual: format!("{} of {}", e.failed, e.requests),
                met: e.failed == 0,
                why: String::new(),
            });
        }
        self.targets = t;
    }

    fn throughput_targets(&self, t: &mut Vec<Target>) {
        for s in &self.throughput {
            let Some(p) = s.get(PeerKind::IngressController) else {
                continue;
            };
            let (vs_nginx, vs_haproxy) = throughput_goals(&s.id);
            if let (Some(goal), Some(r)) = (vs_nginx, p.vs_nginx) {
                let target = goal.ratio(&format!("{} throughput vs nginx", s.id), r);
                t.push(target.because(|| self.cpu_why(&s.id, PeerKind::Nginx)));
            }
            if let (Some(goal), Some(r)) = (vs_haproxy, p.vs_haproxy) {
                let target = goal.ratio(&format!("{} throughput vs haproxy", s.id), r);
                t.push(target.because(|| self.cpu_why(&s.id, PeerKind::Haproxy)));
            }
        }
    }

    fn idle_targets(&self, t: &mut Vec<Target>) {
        let of = |k: PeerKind| self.idle.iter().find(|p| p.peer == k.name());
        let Some(ours) = of(PeerKind::IngressController) else {
            return;
        };
        let target = Goal::Below(10.0).value(
            "idle RSS of the proxy (fresh process, no connections)",
            ours.idle.rss_before_mib,
            "MiB",
        );
        t.push(target.because(|| self.memory_why("fresh process")));
        if let Some(nginx) = of(PeerKind::Nginx) {
            let (a, b) = (ours.idle.kib_per_connection, nginx.idle.kib_per_connection);
            t.push(
                Target {
                    name: format!(
                        "memory per idle keep-alive connection ({} open) vs nginx",
                        ours.idle.held
                    ),
                    goal: "≤ nginx's".into(),
                    actual: format!("{a:.1} KiB (nginx {b:.1} KiB)"),
                    met: a <= b,
                    why: String::new(),
                }
                .because(|| self.connections_why()),
            );
        }
    }

    fn scale_targets(&self, t: &mut Vec<Target>) {
        let Some(s) = &self.scale else {
            // A scale run that failed still shows its goals, unmet.
            if self.failed.iter().any(|(id, _)| id == crate::SCALE) {
                for name in ["edit → served p99 at scale", "proxy RSS at scale"] {
                    t.push(Target {
                        name: name.into(),
                        goal: "the scenario completes".into(),
                        actual: "did not complete".into(),
                        met: false,
                        why: String::new(),
                    });
                }
            }
            return;
        };
        let state = format!(
            "{} Ingresses and {} TLS Secrets",
            s.raw.ingresses, s.raw.tls_secrets
        );
        let served = Goal::Below(50.0).value(
            &format!("edit → served p99 with {state}"),
            s.edits.p99_from_request_ms,
            "ms",
        );
        t.push(served.because(|| {
            let p = s.raw.profile.as_ref()?;
            Some(format!(
                "profile of the controller during the edits: {}",
                p.line(4)
            ))
        }));
        let rss = Goal::Below(64.0).value(&format!("proxy RSS with {state}"), s.rss_mib(), "MiB");
        t.push(rss.because(|| Some(split_line(&s.raw.memory))));
    }

    fn profile(&self, scenario: &str, peer: PeerKind) -> Option<&crate::profile::Profile> {
        self.profiles
            .iter()
            .find(|p| p.scenario == scenario && p.peer == peer.name())
    }

    /// Our profile of `scenario`, and the kernel's share in the peer's (nginx is profiled;
    /// for haproxy the floor table says the rest).
    fn cpu_why(&self, scenario: &str, peer: PeerKind) -> Option<String> {
        let figures = |k: PeerKind| {
            let s = self.throughput.iter().find(|s| s.id == scenario)?;
            s.get(k)
        };
        let mut why = Vec::new();
        // A proxy that idles part of the run while spending less CPU per request than the
        // peer is held back by its load generator (which shares the other CPU with the
        // backend), not by its own work.
        if let (Some(a), Some(b)) = (figures(PeerKind::IngressController), figures(peer))
            && a.cpu_cores.median < LOADGEN_BOUND_CORES
            && a.cpu_us_per_request.median < b.cpu_us_per_request.median
        {
            why.push(format!(
                "not CPU-bound: ours busy {:.2} cores (the load generator's CPU is the limit) at \
                 {:.2}× {}'s CPU per request",
                a.cpu_cores.median,
                a.cpu_us_per_request.median / b.cpu_us_per_request.median.max(f64::MIN_POSITIVE),
                peer.name()
            ));
        }
        if let Some(ours) = self.profile(scenario, PeerKind::IngressController) {
            why.push(format!("ours: {}", ours.line(3)));
        }
        if let Some(p) = self.profile(scenario, PeerKind::Nginx) {
            why.push(format!("nginx: kernel {:.0} %", p.kernel_percent()));
        }
        let cpu = |k: PeerKind| figures(k).map(|p| p.cpu_us_per_request.median);
        if let (Some(a), Some(b)) = (cpu(PeerKind::IngressController), cpu(peer)) {
            why.push(format!(
                "CPU per request {a:.1} µs against {}'s {b:.1}",
                peer.name()
            ));
        }
        // The bare proxies say how far forwarding alone got in this run and harness.
        let bare: Vec<String> = [PeerKind::BareEpoll, PeerKind::BareIoUring]
            .into_iter()
            .filter_map(|k| {
                let f = figures(k)?;
                let r = match peer {
                    PeerKind::Nginx => f.vs_nginx,
                    _ => f.vs_haproxy,
                }?;
                Some(format!(
                    "{}: {r:.2}× at {:.2} cores busy",
                    k.name(),
                    f.cpu_cores.median
                ))
            })
            .collect();
        if !bare.is_empty() {
            why.push(format!(
                "forwarding alone against {}: {}",
                peer.name(),
                bare.join(", ")
            ));
        }
        (!why.is_empty()).then(|| why.join("; "))
    }

    /// Where the fixed rate sits against our own saturation rate.
    fn latency_why(&self) -> Option<String> {
        let h1 = self.throughput.iter().find(|s| s.id == "h1-1k")?;
        let ours = h1.get(PeerKind::IngressController)?.value.median;
        let rate = self.method.latency_rate;
        let mut why = format!(
            "the rate ({rate:.0}/s, half of nginx's h1-1k median) is {:.0} % of ours ({ours:.0}/s): \
             the queue grows with utilisation",
            100.0 * rate / ours.max(1.0)
        );
        if let Some(p) = self.profile("h1-1k", PeerKind::IngressController) {
            let _ = write!(why, "; h1-1k profile: {}", p.line(2));
        }
        Some(why)
    }

    fn memory_why(&self, when: &str) -> Option<String> {
        let split = self.memory.iter().find(|m| m.when.starts_with(when))?;
        Some(split_line(split))
    }

    /// The growth of our memory by kind while holding the idle connections.
    fn connections_why(&self) -> Option<String> {
        let fresh = self.memory.iter().find(|m| m.when.starts_with("fresh"))?;
        let held = self.memory.iter().find(|m| m.when.starts_with("holding"))?;
        Some(format!(
            "{}: anonymous memory {:.1} → {:.1} MiB, mapped files {:.1} → {:.1} MiB (an idle \
             connection keeps no task, only its socket, tokio's readiness record, a parking entry \
             and a waker; the rest is allocator pages freed after the connections' first \
             requests and not yet returned to the system: benches/README.md, change 15)",
            held.when, fresh.anon_mib, held.anon_mib, fresh.file_mib, held.file_mib
        ))
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
        self.header_md(&mut o);
        self.targets_md(&mut o);
        self.throughput_md(&mut o);
        self.latency_md(&mut o);
        self.resources_md(&mut o);
        self.idle_md(&mut o);
        self.edits_md(&mut o);
        self.scale_md(&mut o);
        self.profiles_md(&mut o);
        o
    }

    fn profiles_md(&self, o: &mut String) {
        if self.profiles.is_empty() && self.scale.as_ref().is_none_or(|s| s.raw.profile.is_none()) {
            return;
        }
        let _ = writeln!(
            o,
            "\n## Where the CPU goes (perf, cpu-clock)\n\nOne extra run per scenario after the measured ones, `perf record -e cpu-clock -F 999` on the peer's processes (no call graphs); share of samples by binary, then the largest user-space symbols.\n\n| Scenario | Peer | samples | profile |\n|---|---|---|---|"
        );
        let scale = self.scale.as_ref().and_then(|s| s.raw.profile.as_ref());
        for p in self.profiles.iter().chain(scale) {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                p.scenario,
                p.peer,
                p.samples,
                p.line(5)
            );
        }
        if !self.memory.is_empty() {
            let _ = writeln!(
                o,
                "\nMemory of the ingress-controller by kind (`/proc/PID/status` RssAnon, RssFile + RssShmem):\n\n| When | anonymous MiB | mapped files MiB |\n|---|---|---|"
            );
            let scale = self.scale.as_ref().map(|s| &s.raw.memory);
            for m in self.memory.iter().chain(scale) {
                let _ = writeln!(o, "| {} | {:.1} | {:.1} |", m.when, m.anon_mib, m.file_mib);
            }
        }
    }

    /// Machine, versions, method, notes and skipped peers.
    fn header_md(&self, o: &mut String) {
        let m = &self.machine;
        let _ = writeln!(o, "# Proxy benchmark results\n");
        let _ = writeln!(
            o,
            "Machine: {} cores ({}), {:.0} GiB, kernel {}, {}. Load average before: {}; after: {}.\n",
            m.cores, m.cpu_model, m.memory_gib, m.kernel, m.os, m.loadavg_before, m.loadavg_after
        );
        let _ = writeln!(o, "Versions:");
        for (k, v) in &m.versions {
            let _ = writeln!(o, "- {k}: {v}");
        }
        let me = &self.method;
        let _ = writeln!(
            o,
            "\nMethod: {} rounds, peers alternating within each round (A B C … A B C …); {:.0} s per run after a {:.0} s warm-up; medians with (min–max) over rounds; ratios are to the medians of nginx and haproxy from this run. Proxies on CPUs {}, {} worker(s) each; load generators and backend on CPUs {}. wrk: 1 thread, {} connections; h2load: {} clients × {} streams; fixed-rate latency: oha at {:.0} req/s (50% of nginx's HTTP/1.1 1 KiB saturation rate), {} connections. Order: idle keep-alive connections first, each proxy in a fresh process; every peer restarted for the throughput and latency rounds; then, the other proxies stopped, the Ingress edit phases and the scale scenario (its objects created with our controller stopped, then a fresh controller started).",
            me.rounds,
            me.seconds_per_run,
            me.warmup_seconds,
            me.proxy_cpus.as_deref().unwrap_or("any"),
            me.workers_per_proxy,
            me.loadgen_cpus.as_deref().unwrap_or("any"),
            me.wrk_connections,
            me.h2_clients,
            me.h2_streams,
            me.latency_rate,
            me.latency_connections,
        );
        for n in &me.notes {
            let _ = writeln!(o, "\n{n}");
        }
        for (peer, why) in &self.skipped {
            let _ = writeln!(o, "\n**{peer} did not run**: {why}");
        }
        for (scenario, why) in &self.failed {
            let _ = writeln!(o, "\n**{scenario} did not complete**: {why}");
        }
    }

    fn targets_md(&self, o: &mut String) {
        let _ = writeln!(o, "\n## Targets\n");
        let _ = writeln!(
            o,
            "| Target | Goal | This run | Met | Why, as measured (missed goals) |\n|---|---|---|---|---|"
        );
        for t in &self.targets {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} | {} |",
                t.name,
                t.goal,
                t.actual,
                if t.met { "yes" } else { "**no**" },
                t.why
            );
        }
    }

    fn throughput_md(&self, o: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n## Throughput\n");
        let _ = writeln!(
            o,
            "| Scenario | Peer | req/s median (min–max) | × nginx | × haproxy | proxy CPU µs/req (user) | proxy cores busy | errors / non-2xx |\n|---|---|---|---|---|---|---|---|"
        );
        for s in &self.throughput {
            for p in &s.peers {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} ({}–{}) | {} | {} | {:.1} ({:.1}) | {:.2} | {} / {} |",
                    s.id,
                    p.peer,
                    fmt_value(p.value.median, &s.unit),
                    fmt_value(p.value.min, &s.unit),
                    fmt_value(p.value.max, &s.unit),
                    ratio(p.vs_nginx),
                    ratio(p.vs_haproxy),
                    p.cpu_us_per_request.median,
                    p.user_us_per_request.median,
                    p.cpu_cores.median,
                    p.errors,
                    p.non_2xx
                );
            }
        }
        let _ = writeln!(o, "\nScenarios:");
        for s in &self.throughput {
            let _ = writeln!(o, "- `{}`: {}", s.id, s.description);
        }
        self.floor_md(o);
    }

    fn latency_md(&self, o: &mut String) {
        if self.latency.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\n## Latency at a fixed rate ({:.0} req/s, HTTP/1.1 keep-alive, 1 KiB)\n",
            self.method.latency_rate
        );
        let _ = writeln!(
            o,
            "| Percentile | Peer | ms median (min–max) | × nginx | × haproxy | errors / non-2xx |\n|---|---|---|---|---|---|"
        );
        for s in &self.latency {
            for p in &s.peers {
                let _ = writeln!(
                    o,
                    "| {} | {} | {:.3} ({:.3}–{:.3}) | {} | {} | {} / {} |",
                    s.id.trim_start_matches("latency-"),
                    p.peer,
                    p.value.median,
                    p.value.min,
                    p.value.max,
                    ratio(p.vs_nginx),
                    ratio(p.vs_haproxy),
                    p.errors,
                    p.non_2xx
                );
            }
        }
    }

    fn resources_md(&self, o: &mut String) {
        if self.resources.is_empty() {
            return;
        }
        let _ = writeln!(o, "\n## Memory and CPU (throughput and latency phases)\n");
        let _ = writeln!(
            o,
            "| Peer | peak RSS MiB | × nginx | × haproxy | CPU seconds | requests | CPU µs/req |\n|---|---|---|---|---|---|---|"
        );
        for r in &self.resources {
            let per = if r.requests > 0 {
                r.cpu_seconds * 1e6 / r.requests as f64
            } else {
                0.0
            };
            let _ = writeln!(
                o,
                "| {} | {:.1} | {} | {} | {:.1} | {} | {:.1} |",
                r.peer,
                r.peak_rss_mib,
                ratio(r.vs_nginx_rss),
                ratio(r.vs_haproxy_rss),
                r.cpu_seconds,
                r.requests,
                per
            );
        }
    }

    fn edits_md(&self, o: &mut String) {
        if self.propagation.is_empty() && self.edits_under_load.is_none() {
            return;
        }
        let _ = writeln!(o, "\n## Ingress edit → served (ingress-controller)\n");
        let _ = writeln!(
            o,
            "| Other Ingresses | edits | from request: median (min–max) ms | p99 ms | from apiserver answer: p50 / p99 ms |\n|---|---|---|---|---|"
        );
        for p in &self.propagation {
            let _ = writeln!(
                o,
                "| {} | {} | {:.1} ({:.1}–{:.1}) | {:.1} | {:.1} / {:.1} |",
                p.ingresses,
                p.edits,
                p.from_request_ms.median,
                p.from_request_ms.min,
                p.from_request_ms.max,
                p.p99_from_request_ms,
                p.p50_from_ack_ms,
                p.p99_from_ack_ms
            );
        }
        if let Some(e) = &self.edits_under_load {
            let s = PropagationSummary::of(&e.propagation);
            let _ = writeln!(
                o,
                "\nUnder load ({} other Ingresses): {} edits of the Ingress that carries the loaded path; {} requests, **{} failed**; edit → served median {:.1} ms, p99 {:.1} ms.",
                e.ingresses,
                e.edits,
                e.requests,
                e.failed,
                s.from_request_ms.median,
                s.p99_from_request_ms
            );
        }
    }

    /// Each peer's CPU per request against the floor, one row per throughput scenario.
    fn floor_md(&self, o: &mut String) {
        if self.throughput.is_empty() {
            return;
        }
        // Every peer of any scenario, in first-seen order (the bare proxies run only some).
        let mut proxies: Vec<&str> = Vec::new();
        for p in self.throughput.iter().flat_map(|s| &s.peers) {
            if p.peer != PeerKind::Direct.name() && !proxies.contains(&p.peer.as_str()) {
                proxies.push(&p.peer);
            }
        }
        let _ = writeln!(
            o,
            "\n## CPU per request against the floor\n\nThe floor is twice the direct backend's CPU µs per request in the same scenario and run (a proxy does the backend's server-side work plus the client side of the same exchange). Each cell: the proxy's CPU µs/req (× floor).\n"
        );
        let _ = writeln!(
            o,
            "| Scenario | floor µs/req | {} |\n|---|---|{}",
            proxies.join(" | "),
            "---|".repeat(proxies.len())
        );
        for s in &self.throughput {
            let cells: Vec<String> = proxies
                .iter()
                .map(|name| {
                    s.peers
                        .iter()
                        .find(|p| p.peer == *name)
                        .map(|p| {
                            format!("{:.1} ({})", p.cpu_us_per_request.median, ratio(p.vs_floor))
                        })
                        .unwrap_or_else(|| "–".into())
                })
                .collect();
            let floor = s
                .floor_us_per_request
                .map(|f| format!("{f:.1}"))
                .unwrap_or_else(|| "–".into());
            let _ = writeln!(o, "| {} | {floor} | {} |", s.id, cells.join(" | "));
        }
    }

    fn idle_md(&self, o: &mut String) {
        if self.idle.is_empty() {
            return;
        }
        let _ = writeln!(
            o,
            "\n## Idle keep-alive connections ({} per proxy)\n\nEach proxy in a fresh process, before any throughput run (every peer is restarted afterwards): the connections are opened 64 at a time, each after one answered `GET /idle` (1 KiB), then held idle for a second. RSS of the process tree before and after; KiB per connection = the difference ÷ connections still open.\n",
            self.method.idle_connections
        );
        let _ = writeln!(
            o,
            "| Peer | opened | still open | RSS before → after MiB | KiB per connection | × nginx | new client served meanwhile |\n|---|---|---|---|---|---|---|"
        );
        for p in &self.idle {
            let i = &p.idle;
            let _ = writeln!(
                o,
                "| {} | {} | {} | {:.1} → {:.1} | {:.2} | {} | {} |",
                p.peer,
                i.opened,
                i.held,
                i.rss_before_mib,
                i.rss_after_mib,
                i.kib_per_connection,
                ratio(p.vs_nginx),
                if i.served_meanwhile { "yes" } else { "**no**" }
            );
        }
    }

    fn scale_md(&self, o: &mut String) {
        let Some(s) = &self.scale else { return };
        let r = &s.raw;
        let e = &s.edits;
        let _ = writeln!(
            o,
            "\n## Scale: {} other Ingresses, {} with their own TLS Secret (ingress-controller)\n\nThe objects are created with the controller stopped (32 creates in flight); then a fresh controller starts against the filled apiserver, and {} timed edits of the probe Ingress follow.\n",
            r.ingresses, r.tls_secrets, e.edits
        );
        let _ = writeln!(o, "| Figure | Value |\n|---|---|");
        let rows = [
            ("creating the objects", format!("{:.1} s", r.create_seconds)),
            (
                "controller start → newest TLS host served with its certificate",
                format!("{:.1} s", r.start_seconds),
            ),
            (
                "RSS then / after the edits / peak",
                format!(
                    "{:.1} / {:.1} / {:.1} MiB",
                    r.rss_loaded_mib, r.rss_after_edits_mib, r.peak_rss_mib
                ),
            ),
            (
                "edit → served from request: median (min–max), p99",
                format!(
                    "{:.1} ({:.1}–{:.1}), p99 {:.1} ms",
                    e.from_request_ms.median,
                    e.from_request_ms.min,
                    e.from_request_ms.max,
                    e.p99_from_request_ms
                ),
            ),
            (
                "edit → served from the apiserver's answer: p50 / p99",
                format!("{:.1} / {:.1} ms", e.p50_from_ack_ms, e.p99_from_ack_ms),
            ),
        ];
        for (figure, value) in rows {
            let _ = writeln!(o, "| {figure} | {value} |");
        }
    }

    /// Writes `proxy.md` and `proxy.json` into `dir`; returns their paths.
    pub fn write(&self, dir: &Path) -> Result<(PathBuf, PathBuf), Error> {
        std::fs::create_dir_all(dir)?;
        let md = dir.join("proxy.md");
        let json = dir.join("proxy.json");
        std::fs::write(&md, self.markdown())?;
        std::fs::write(&json, serde_json::to_string_pretty(self)?)?;
        Ok((md, json))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Stat::of(&[3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(&[1.0, 2.0, 3.0, 4.0]).median, 2.5);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.99), 4.0);
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
    }

    fn peer(kind: PeerKind, cpu_us: f64) -> PeerFigures {
        PeerFigures {
            peer: kind.name().into(),
            value: Stat::of(&[100.0]),
            cpu_us_per_request: Stat::of(&[cpu_us]),
            ..PeerFigures::default()
        }
    }

    #[test]
    fn floor_is_twice_direct() {
        let mut s = Scenario {
            peers: vec![
                peer(PeerKind::IngressController, 30.0),
                peer(PeerKind::Direct, 5.0),
            ],
            ..Scenario::default()
        };
        s.compute_floor();
        assert_eq!(s.floor_us_per_request, Some(10.0));
        assert_eq!(s.peers[0].vs_floor, Some(3.0));
        let mut no_direct = Scenario {
            peers: vec![peer(PeerKind::Nginx, 3.0)],
            ..Scenario::default()
        };
        no_direct.compute_floor();
        assert_eq!(no_direct.peers[0].vs_floor, None);
    }

    #[test]
    fn a_proxy_held_back_by_its_load_generator_is_named_so() {
        let figures = |kind, cpu_us, cores| PeerFigures {
            cpu_cores: Stat::of(&[cores]),
            ..peer(kind, cpu_us)
        };
        let mut r = Results {
            profiles: vec![crate::profile::Profile {
                scenario: "tls-new-conn-1k".into(),
                peer: PeerKind::IngressController.name().into(),
                ..Default::default()
            }],
            throughput: vec![Scenario {
                id: "tls-new-conn-1k".into(),
                peers: vec![
                    figures(PeerKind::IngressController, 330.0, 0.66),
                    figures(PeerKind::Nginx, 400.0, 0.92),
                ],
                ..Scenario::default()
            }],
            ..Results::default()
        };
        let why = r.cpu_why("tls-new-conn-1k", PeerKind::Nginx).unwrap();
        assert!(
            why.starts_with("not CPU-bound: ours busy 0.66 cores"),
            "{why}"
        );
        assert!(why.contains("0.82× nginx's CPU per request"), "{why}");
        // Busy, or dearer per request: the profile alone explains it.
        r.throughput[0].peers[0].cpu_cores = Stat::of(&[0.95]);
        let why = r.cpu_why("tls-new-conn-1k", PeerKind::Nginx).unwrap();
        assert!(why.starts_with("ours: "), "{why}");
    }

    #[test]
    fn a_miss_says_how_far_forwarding_alone_got() {
        let figures = |kind, rps, cores| PeerFigures {
            value: Stat::of(&[rps]),
            cpu_cores: Stat::of(&[cores]),
            ..peer(kind, 20.0)
        };
        let mut s = Scenario {
            id: "h1-1k".into(),
            peers: vec![
                figures(PeerKind::IngressController, 80.0, 0.98),
                figures(PeerKind::Nginx, 100.0, 0.95),
                figures(PeerKind::Haproxy, 100.0, 0.95),
                figures(PeerKind::BareEpoll, 104.0, 0.85),
                figures(PeerKind::BareIoUring, 106.0, 0.82),
            ],
            ..Scenario::default()
        };
        s.compute_ratios();
        let r = Results {
            profiles: vec![crate::profile::Profile {
                scenario: "h1-1k".into(),
                peer: PeerKind::IngressController.name().into(),
                ..Default::default()
            }],
            throughput: vec![s],
            ..Results::default()
        };
        let why = r.cpu_why("h1-1k", PeerKind::Nginx).unwrap();
        assert!(
            why.ends_with(
                "forwarding alone against nginx: bare-epoll: 1.04× at 0.85 cores busy, \
                 bare-io-uring: 1.06× at 0.82 cores busy"
            ),
            "{why}"
        );
        // Without profiles (--no-profile), the figures still explain the miss.
        let r = Results {
            profiles: Vec::new(),
            ..r
        };
        let why = r.cpu_why("h1-1k", PeerKind::Nginx).unwrap();
        assert!(why.starts_with("CPU per request 20.0 µs"), "{why}");
    }

    #[test]
    fn goals_compare_as_the_issue_says() {
        // 64 KiB scenarios: strictly above nginx.
        let (nginx, haproxy) = throughput_goals("h2-64k");
        assert!(nginx.is_some_and(|g| !g.met(1.0) && g.met(1.01)));
        assert!(haproxy.is_some_and(|g| g.met(1.15) && !g.met(1.14)));
        let (nginx, _) = throughput_goals("tls-1k");
        assert!(nginx.is_some_and(|g| g.text("×") == "≥ 1.15×"));
        assert_eq!(Goal::Below(64.0).text("MiB"), "< 64 MiB");
        assert!(throughput_goals("latency-p99").0.is_none());
    }
}
