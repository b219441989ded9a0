//! The command-line flags every binary of the project shares (flattened into each component's own).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Flags common to every component: client, logging, health/metrics server, leader election.
#[derive(Clone, Debug, Args)]
pub struct CommonArgs {
    /// Path to a kubeconfig file; falls back to $KUBECONFIG, then the in-cluster service account.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,

    /// Log format: human-readable text or JSON lines.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `kube=debug,info`).
    #[arg(long, default_value = "info", global = true)]
    pub log_level: String,

    /// klog's verbosity, which upstream's manifests pass (`--v=2`): with `--log-level` left at
    /// `info`, 4 or more logs at debug and 6 or more at trace.
    #[arg(long = "v", value_name = "LEVEL", global = true)]
    pub verbosity: Option<i32>,

    /// Address of the /healthz, /readyz and /metrics server; each component has its own default.
    #[arg(long, global = true)]
    pub health_address: Option<SocketAddr>,

    #[command(flatten)]
    pub leader_election: LeaderElectionArgs,
}

impl CommonArgs {
    /// The log filter: `--log-level`, raised by `--v` when that was left at `info`.
    pub fn log_filter(&self) -> &str {
        match self.verbosity {
            Some(6..) if self.log_level == "info" => "trace",
            Some(4..) if self.log_level == "info" => "debug",
            _ => &self.log_level,
        }
    }
}

/// Leader election flags, with client-go's names and defaults.
#[derive(Clone, Debug, Args)]
pub struct LeaderElectionArgs {
    /// Take a Lease before running the controllers that need exactly one writer.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, global = true)]
    pub leader_elect: bool,

    /// Namespace of the leader election Lease.
    #[arg(long, default_value = "kube-system", global = true)]
    pub leader_election_namespace: String,

    /// Name of the leader election Lease; each component sets its own default.
    #[arg(long, global = true)]
    pub leader_election_id: Option<String>,

    /// How long a non-leader waits after the last observed renewal before taking the Lease.
    #[arg(long, default_value = "15s", value_parser = parse_duration, global = true)]
    pub leader_elect_lease_duration: Duration,

    /// How long the leader keeps trying to renew before it stops acting.
    #[arg(long, default_value = "10s", value_parser = parse_duration, global = true)]
    pub leader_elect_renew_deadline: Duration,

    /// Pause between acquire/renew attempts.
    #[arg(long, default_value = "2s", value_parser = parse_duration, global = true)]
    pub leader_elect_retry_period: Duration,
}

/// Parses Go-style durations as used by client-go flags: `15s`, `500ms`, `1m30s`, `2h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("duration {s:?} is missing a unit (ms, s, m, h)"))?;
        if num_len == 0 {
            return Err(format!("duration {s:?} has a unit without a number"));
        }
        let value: f64 = rest[..num_len]
            .parse()
            .map_err(|_| format!("bad number in duration {s:?}"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            other => return Err(format!("unknown unit {other:?} in duration {s:?}")),
        };
        rest = &rest[unit_len..];
        total += Duration::try_from_secs_f64(value * unit)
            .map_err(|e| format!("duration {s:?} out of range: {e}"))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("15").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3d").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn defaults_match_client_go() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            common: CommonArgs,
        }
        let cli = <Cli as clap::Parser>::try_parse_from(["x"]).expect("defaults parse");
        let le = cli.common.leader_election;
        assert!(le.leader_elect);
        assert_eq!(le.leader_elect_lease_duration, Duration::from_secs(15));
        assert_eq!(le.leader_elect_renew_deadline, Duration::from_secs(10));
        assert_eq!(le.leader_elect_retry_period, Duration::from_secs(2));
        assert_eq!(cli.common.log_format, LogFormat::Text);
    }

    #[test]
    fn klog_verbosity_is_accepted_and_raises_only_the_default_level() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            common: CommonArgs,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .expect("parses")
                .common
        };
        assert_eq!(parse(&["--v=2"]).log_filter(), "info");
        assert_eq!(parse(&["--v=4"]).log_filter(), "debug");
        assert_eq!(parse(&["--v=6"]).log_filter(), "trace");
        assert_eq!(parse(&["--v=6", "--log-level=warn"]).log_filter(), "warn");
        assert_eq!(parse(&[]).log_filter(), "info");
    }
}
