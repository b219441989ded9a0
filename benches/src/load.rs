//! The load generators (wrk, h2load, oha) as child processes, and parsers for what they print.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde::Serialize;

use crate::Error;

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p99: f64,
    pub p999: f64,
}

/// What one load run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadResult {
    /// Completed responses (any status).
    pub requests: u64,
    pub rps: f64,
    /// Transport errors (connect, read, write, timeouts, protocol).
    pub errors: u64,
    /// Responses that were not 2xx.
    pub non_2xx: u64,
    pub latency_ms: Option<Percentiles>,
}

/// Where the load generators are and which CPUs they run on.
#[derive(Clone, Debug)]
pub struct Tools {
    pub wrk: PathBuf,
    pub h2load: PathBuf,
    pub oha: PathBuf,
    /// `taskset -c` list for the load generators, when pinning.
    pub cpus: Option<String>,
}

/// One HTTP/1.1 scenario for wrk.
pub struct WrkRun<'a> {
    pub url: &'a str,
    pub host: &'a str,
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close` so every request opens a new connection (and TLS handshake).
    pub close: bool,
}

impl Tools {
    fn command(&self, program: &std::path::Path) -> Command {
        let mut cmd = match &self.cpus {
            Some(cpus) => {
                let mut c = Command::new("taskset");
                c.args(["-c", cpus]).arg(program);
                c
            }
            None => Command::new(program),
        };
        cmd.stdin(Stdio::null());
        cmd
    }

    fn output(&self, tool: &str, mut cmd: Command) -> Result<String, Error> {
        let out = cmd.output().map_err(|e| Error::Tool {
            tool: tool.into(),
            message: format!("cannot run: {e}"),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            return Err(Error::Tool {
                tool: tool.into(),
                message: format!(
                    "{}: {}{}",
                    out.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(stdout)
    }

    /// wrk with one thread (the load generator gets one core when pinned).
    pub fn wrk(&self, run: &WrkRun) -> Result<LoadResult, Error> {
        let mut cmd = self.command(&self.wrk);
        cmd.args(["-t", "1"])
            .arg(format!("-c{}", run.connections))
            .arg(format!("-d{}s", run.duration.as_secs().max(1)))
            .args(["-H", &format!("Host: {}", run.host)]);
        if run.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(run.url);
        let out = self.output("wrk", cmd)?;
        parse_wrk(&out).ok_or_else(|| Error::Tool {
            tool: "wrk".into(),
            message: format!("unexpected output: {out}"),
        })
    }

    /// h2load over TLS (h2 by ALPN): `clients` connections with `streams` concurrent streams each.
    /// `url` names the virtual host (so SNI and :authority carry it); `connect` is the address.
    pub fn h2load(
        &self,
        url: &str,
        connect: std::net::SocketAddr,
        clients: u32,
        streams: u32,
        duration: Duration,
    ) -> Result<LoadResult, Error> {
        let mut cmd = self.command(&self.h2load);
        cmd.args(["-t", "1"])
            .arg(format!("-c{clients}"))
            .arg(format!("-m{streams}"))
            .arg(format!("-D{}", duration.as_secs().max(1)))
            .arg(format!("--connect-to={connect}"))
            .arg(url);
        let out = self.output("h2load", cmd)?;
        parse_h2load(&out).ok_or_else(|| Error::Tool {
            tool: "h2load".into(),
            message: format!("unexpected output: {out}"),
        })
    }

    /// oha at a fixed rate with latency correction (coordinated omission accounted for).
    pub fn oha_rate(
        &self,
        url: &str,
        host: &str,
        rate: f64,
        connections: u32,
        duration: Duration,
    ) -> Result<LoadResult, Error> {
        let mut cmd = self.command(&self.oha);
        cmd.args([
            "--no-tui",
            "--output-format",
            "json",
            "--latency-correction",
        ])
        .arg("-q")
        .arg(format!("{:.0}", rate.max(1.0)))
        .arg("-c")
        .arg(connections.to_string())
        .arg("-z")
        .arg(format!("{}ms", duration.as_millis()))
        .args(["-H", &format!("Host: {host}")])
        .arg(url);
        let out = self.output("oha", cmd)?;
        parse_oha(&out).ok_or_else(|| Error::Tool {
            tool: "oha".into(),
            message: format!("unexpected output: {out}"),
        })
    }

    /// The first line of each tool's version output, for the record.
    pub fn versions(&self) -> Vec<(String, String)> {
        let first_line = |p: &std::path::Path, arg: &str| {
            Command::new(p)
                .arg(arg)
                .output()
                .map(|o| {
                    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
                    s.push_str(&String::from_utf8_lossy(&o.stderr));
                    s.lines().next().unwrap_or("").trim().to_string()
                })
                .unwrap_or_default()
        };
        vec![
            ("wrk".into(), first_line(&self.wrk, "-v")),
            ("h2load".into(), first_line(&self.h2load, "--version")),
            ("oha".into(), first_line(&self.oha, "--version")),
        ]
    }
}

fn num<T: std::str::FromStr>(s: &str) -> Option<T> {
    s.trim_end_matches([',', 's']).parse().ok()
}

/// wrk's summary: "N requests in Xs", "Requests/sec:", "Non-2xx or 3xx responses:",
/// "Socket errors: connect a, read b, write c, timeout d".
pub fn parse_wrk(out: &str) -> Option<LoadResult> {
    let mut r = LoadResult::default();
    let mut seen_rps = false;
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            r.rps = num(v.trim())?;
            seen_rps = true;
        } else if line.contains(" requests in ") {
            r.requests = num(line.split_whitespace().next()?)?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = num(v.trim())?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            r.errors = v
                .split(',')
                .filter_map(|part| part.split_whitespace().last().and_then(num::<u64>))
                .sum();
        }
    }
    seen_rps.then_some(r)
}

/// h2load's summary: "finished in Xs, R req/s, ...", "requests: ... N succeeded, F failed, E
/// errored, T timeout", "status codes: a 2xx, b 3xx, c 4xx, d 5xx".
pub fn parse_h2load(out: &str) -> Option<LoadResult> {
    let mut r = LoadResult::default();
    let mut seen_rps = false;
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let rps = rest.split(", ").nth(1)?.strip_suffix(" req/s")?;
            r.rps = num(rps)?;
            seen_rps = true;
        } else if let Some(rest) = line.strip_prefix("requests: ") {
            for part in rest.split(", ") {
                let mut words = part.split_whitespace();
                let n: u64 = num(words.next()?)?;
                match words.next()? {
                    "done" => r.requests = n,
                    "failed" | "errored" | "timeout" => r.errors += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = line.strip_prefix("status codes: ") {
            for part in rest.split(", ") {
                let mut words = part.split_whitespace();
                let n: u64 = num(words.next()?)?;
                if words.next()? != "2xx" {
                    r.non_2xx += n;
                }
            }
        }
    }
    // h2load counts non-2xx responses as "failed" too; keep them only in non_2xx.
    r.errors = r.errors.saturating_sub(r.non_2xx);
    seen_rps.then_some(r)
}

/// oha's JSON report: summary.requestsPerSec, latencyPercentiles (seconds),
/// statusCodeDistribution, errorDistribution.
pub fn parse_oha(out: &str) -> Option<LoadResult> {
    let v: serde_json::Value = serde_json::from_str(out.trim()).ok()?;
    let mut r = LoadResult {
        rps: v["summary"]["requestsPerSec"].as_f64()?,
        ..LoadResult::default()
    };
    if let Some(codes) = v["statusCodeDistribution"].as_object() {
        for (code, n) in codes {
            let n = n.as_u64().unwrap_or(0);
            r.requests += n;
            if !code.starts_with('2') {
                r.non_2xx += n;
            }
        }
    }
    if let Some(errors) = v["errorDistribution"].as_object() {
        // Requests still in flight when the duration ends are cut off by oha itself.
        r.errors = errors
            .iter()
            .filter(|(k, _)| !k.contains("deadline"))
            .filter_map(|(_, n)| n.as_u64())
            .sum();
    }
    let p = &v["latencyPercentiles"];
    let ms = |key: &str| p[key].as_f64().map(|s| s * 1000.0);
    r.latency_ms = Some(Percentiles {
        p50: ms("p50")?,
        p99: ms("p99")?,
        p999: ms("p99.9")?,
    });
    Some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_summary() {
        let out = "Running 5s test @ http://127.0.0.1:1/1k\n  1 threads and 64 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     2.00ms  300.00us   9.00ms   90.00%\n  123456 requests in 5.00s, 150.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 7\nRequests/sec:  24691.20\nTransfer/sec:     30.00MB\n";
        let r = parse_wrk(out).expect("parsed");
        assert_eq!(r.requests, 123456);
        assert_eq!(r.errors, 6);
        assert_eq!(r.non_2xx, 7);
        assert!((r.rps - 24691.2).abs() < 1e-6);
        assert!(parse_wrk("garbage").is_none());
    }

    #[test]
    fn h2load_summary() {
        let out = "finished in 5.00s, 12345.60 req/s, 12.34MB/s\nrequests: 61728 total, 61792 started, 61728 done, 61720 succeeded, 8 failed, 0 errored, 1 timeout\nstatus codes: 61720 2xx, 0 3xx, 8 4xx, 0 5xx\n";
        let r = parse_h2load(out).expect("parsed");
        assert_eq!(r.requests, 61728);
        assert_eq!(r.non_2xx, 8);
        assert_eq!(r.errors, 1);
        assert!((r.rps - 12345.6).abs() < 1e-6);
    }

    #[test]
    fn oha_json() {
        let out = r#"{"summary":{"successRate":1.0,"requestsPerSec":1000.5},"latencyPercentiles":{"p50":0.001,"p99":0.002,"p99.9":0.004},"statusCodeDistribution":{"200":990,"502":10},"errorDistribution":{"connection reset":2}}"#;
        let r = parse_oha(out).expect("parsed");
        assert_eq!(r.requests, 1000);
        assert_eq!(r.non_2xx, 10);
        assert_eq!(r.errors, 2);
        let p = r.latency_ms.expect("latency");
        assert!((p.p99 - 2.0).abs() < 1e-9 && (p.p999 - 4.0).abs() < 1e-9);
    }
}
