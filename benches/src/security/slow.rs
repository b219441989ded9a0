//! Slow clients with Debian's `slowhttptest`: slowloris (headers a few bytes at a time), slow
//! body (R-U-Dead-Yet) and slow read (a tiny receive window), each while the normal client runs.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::Error;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Slowloris,
    SlowBody,
    SlowRead,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Slowloris, Mode::SlowBody, Mode::SlowRead];

    pub fn id(self) -> &'static str {
        match self {
            Mode::Slowloris => "slowloris",
            Mode::SlowBody => "slow-body",
            Mode::SlowRead => "slow-read",
        }
    }

    fn args(self, url_base: &str) -> Vec<String> {
        let a: &[&str] = match self {
            // A header line of up to 24 bytes every 10 s.
            Mode::Slowloris => &["-H", "-i", "10", "-x", "24"],
            // Content-Length 8192 (within proxy-body-size), 10 bytes every 10 s.
            Mode::SlowBody => &["-B", "-i", "10", "-s", "8192", "-x", "10"],
            // Window 512-1024 bytes, 32 bytes read every 5 s, 3 requests per connection.
            Mode::SlowRead => &[
                "-X", "-w", "512", "-y", "1024", "-n", "5", "-z", "32", "-k", "3",
            ],
        };
        let path = if self == Mode::SlowRead {
            "big"
        } else {
            "slow"
        };
        let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        v.push("-u".into());
        v.push(format!("{url_base}/{path}"));
        v
    }
}

/// What slowhttptest itself saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Tool {
    /// Most connections it held open at once.
    pub max_connected: u64,
    /// Its probe found the service available at the end.
    pub available_at_end: bool,
}

/// Runs slowhttptest for `seconds` with `connections` against `addr`; the caller measures the
/// normal client meanwhile.
pub async fn run(
    program: &Path,
    mode: Mode,
    addr: SocketAddr,
    connections: u32,
    time: Duration,
    dir: &Path,
) -> Result<Tool, Error> {
    let prefix = dir.join(format!("slow-{}-{}", mode.id(), addr.port()));
    let mut args = mode.args(&format!("http://{addr}"));
    let secs = time.as_secs().max(1).to_string();
    let conns = connections.to_string();
    let rate = connections.min(500).to_string();
    args.extend(
        [
            "-c", &conns, "-r", &rate, "-l", &secs, "-p", "3", "-g", "-o",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(prefix.display().to_string());
    let csv =
        super::tool_output("slowhttptest", program, args, &prefix.with_extension("csv")).await?;
    Ok(parse_csv(&csv))
}

/// slowhttptest's `-g` CSV: `Seconds,Closed,Pending,Connected,Service Available`.
pub fn parse_csv(csv: &str) -> Tool {
    let mut tool = Tool::default();
    for line in csv.lines().skip(1) {
        let cols: Vec<&str> = line.split(',').map(str::trim).collect();
        if cols.len() < 5 {
            continue;
        }
        if let Ok(c) = cols[3].parse::<u64>() {
            tool.max_connected = tool.max_connected.max(c);
        }
        tool.available_at_end = cols[4] != "0";
    }
    tool
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_statistics() {
        let csv = "Seconds,Closed,Pending,Connected,Service Available\n0,0,1,0,1\n1,0,0,200,1\n2,0,0,150,0\n";
        let t = parse_csv(csv);
        assert_eq!(t.max_connected, 200);
        assert!(!t.available_at_end);
    }
}
