//! Results: medians with min/max, ratios to nginx and haproxy, targets, and the markdown and
//! JSON files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::Error;
use crate::cluster::{EditsUnderLoad, Propagation};
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

/// Everything one run produced.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Results {
    pub started_unix: u64,
    pub machine: Machine,
    pub method: Method,
    pub peers: Vec<(String, String)>,
    /// Peers that could not run, with the reason.
    pub skipped: Vec<(String, String)>,
    pub throughput: Vec<Scenario>,
    pub latency: Vec<Scenario>,
    pub resources: Vec<Resources>,
    pub propagation: Vec<PropagationSummary>,
    pub edits_under_load: Option<EditsUnderLoad>,
    pub targets: Vec<Target>,
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

impl Results {
    /// Computes the targets from the figures.
    pub fn evaluate_targets(&mut self) {
        let mut t = Vec::new();
        let ours = PeerKind::IngressController;
        for s in &self.throughput {
            let Some(p) = s.get(ours) else { continue };
            let (nginx_goal, haproxy_goal) = if s.id.starts_with("h2") {
                (Some(1.0), None)
            } else if s.id.starts_with("h1") || s.id.starts_with("tls-") && !s.id.contains("new") {
                (Some(1.25), Some(1.15))
            } else {
                (None, None)
            };
            if let (Some(goal), Some(r)) = (nginx_goal, p.vs_nginx) {
                t.push(Target {
                    name: format!("{} throughput vs nginx", s.id),
                    goal: format!("≥ {goal:.2}×"),
                    actual: format!("{r:.2}×"),
                    met: r >= goal,
                });
            }
            if let (Some(goal), Some(r)) = (haproxy_goal, p.vs_haproxy) {
                t.push(Target {
                    name: format!("{} throughput vs haproxy", s.id),
                    goal: format!("≥ {goal:.2}×"),
                    actual: format!("{r:.2}×"),
                    met: r >= goal,
                });
            }
        }
        if let Some(p99) = self.latency.iter().find(|s| s.id == "latency-p99")
            && let Some(r) = p99.get(ours).and_then(|p| p.vs_nginx)
        {
            t.push(Target {
                name: "p99 at the fixed rate vs nginx".into(),
                goal: "≤ 0.80×".into(),
                actual: format!("{r:.2}×"),
                met: r <= 0.8,
            });
        }
        if let Some(r) = self
            .resources
            .iter()
            .find(|r| r.peer == ours.name())
            .and_then(|r| r.vs_nginx_rss)
        {
            t.push(Target {
                name: "peak RSS vs nginx".into(),
                goal: "≤ 0.50×".into(),
                actual: format!("{r:.2}×"),
                met: r <= 0.5,
            });
        }
        if let Some(p) = self.propagation.iter().max_by_key(|p| p.ingresses) {
            t.push(Target {
                name: format!("edit propagation p99 at {} Ingresses", p.ingresses),
                goal: "< 50 ms".into(),
                actual: format!("{:.1} ms", p.p99_from_request_ms),
                met: p.p99_from_request_ms < 50.0,
            });
        }
        if let Some(e) = &self.edits_under_load {
            t.push(Target {
                name: format!("failed requests across {} edits under load", e.edits),
                goal: "0".into(),
                actual: format!("{} of {}", e.failed, e.requests),
                met: e.failed == 0,
            });
        }
        self.targets = t;
    }

    pub fn markdown(&self) -> String {
        let mut o = String::new();
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
            "\nMethod: {} rounds, peers alternating within each round (A B C … A B C …); {:.0} s per run after a {:.0} s warm-up; medians with (min–max) over rounds; ratios are to the medians of nginx and haproxy from this run. Proxies on CPUs {}, {} worker(s) each; load generators and backend on CPUs {}. wrk: 1 thread, {} connections; h2load: {} clients × {} streams; fixed-rate latency: oha at {:.0} req/s (50% of nginx's HTTP/1.1 1 KiB saturation rate), {} connections.",
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

        let _ = writeln!(o, "\n## Targets\n");
        let _ = writeln!(o, "| Target | Goal | This run | Met |\n|---|---|---|---|");
        for t in &self.targets {
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} |",
                t.name,
                t.goal,
                t.actual,
                if t.met { "yes" } else { "**no**" }
            );
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

        let _ = writeln!(
            o,
            "\n## Latency at a fixed rate ({:.0} req/s, HTTP/1.1 keep-alive, 1 KiB)\n",
            me.latency_rate
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
        o
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
}
