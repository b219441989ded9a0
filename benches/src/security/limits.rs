//! Connection limits: many idle keep-alive connections (memory per connection), then the peer's
//! file descriptors exhausted (its limit lowered with `prlimit` while it runs): it must not
//! crash or spin, and must serve again once descriptors free up.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::TcpStream;

// The idle-connection measurement is shared with the proxy benchmark.
use crate::idle::open_one;
pub use crate::idle::{Idle, idle};
use crate::{Error, procfs};

#[derive(Clone, Debug, Default, Serialize)]
pub struct Exhaustion {
    /// Soft descriptor limit set on every process of the peer (the most any had open + 32).
    pub limit: u64,
    /// Connections the attacker held open.
    pub held: usize,
    /// CPU the peer used while it could not accept, in % of one core.
    pub cpu_percent: f64,
    /// The peer's processes all still ran afterwards.
    pub survived: bool,
    /// Of 20 fresh requests after the attacker let go, how many were answered.
    pub served_after: usize,
}

fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn prlimit(pid: u32, limit: &str) -> Result<(), Error> {
    integration_tests::process::run(
        "prlimit",
        &[&format!("--pid={pid}"), &format!("--nofile={limit}")],
    )?;
    Ok(())
}

pub async fn exhaust(
    addr: SocketAddr,
    root: u32,
    attackers: usize,
    hold: Duration,
) -> Result<Exhaustion, Error> {
    let pids = procfs::tree(root);
    let most = pids.iter().map(|&p| open_fds(p)).max().unwrap_or(0);
    let limit = most + 32;
    // Only the soft limit: lowering the hard one could not be undone without
    // CAP_SYS_RESOURCE.
    let originals: Vec<(u32, String)> = pids
        .iter()
        .filter_map(|&p| Some((p, format!("{}:", nofile_soft(p)?))))
        .collect();
    let restore = |originals: &[(u32, String)]| {
        for (p, original) in originals {
            let _ = prlimit(*p, original);
        }
    };
    for &p in &pids {
        if let Err(e) = prlimit(p, &format!("{limit}:")) {
            restore(&originals);
            return Err(e);
        }
    }
    let mut held = Vec::new();
    for _ in 0..attackers {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
    }
    let (cpu0, t0) = (procfs::stats(root).cpu_seconds, Instant::now());
    tokio::time::sleep(hold).await;
    let cpu_percent = 100.0 * (procfs::stats(root).cpu_seconds - cpu0) / t0.elapsed().as_secs_f64();
    let held_n = held.len();
    drop(held);
    restore(&originals);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let survived = pids
        .iter()
        .all(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
    let mut served_after = 0;
    for _ in 0..20 {
        if open_one(addr).await.is_some() {
            served_after += 1;
        }
    }
    Ok(Exhaustion {
        limit,
        held: held_n,
        cpu_percent,
        survived,
        served_after,
    })
}

/// The process's current soft descriptor limit.
fn nofile_soft(pid: u32) -> Option<String> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3).map(str::to_string)
}
