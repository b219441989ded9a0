//! Many idle keep-alive connections held against a peer, and what they cost it in resident
//! memory. Shared by the proxy benchmark (its "idle keep-alive connections" scenario) and the
//! security benchmark (`security::limits`).

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::peers::HOST;
use crate::procfs;

/// The path each connection's one request asks for (both benchmarks' backends answer it with a
/// small body).
pub const PATH: &str = "/idle";

/// How long one read of the answer may take before the connection counts as not opened.
const READ_LIMIT: Duration = Duration::from_secs(10);

/// Connections opened at once: a burst of thousands of SYNs overflows the listen backlog.
const BATCH: usize = 64;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Idle {
    /// Connections opened, each after one request answered.
    pub opened: usize,
    /// Of those, still open (not closed by the peer) when all were open.
    pub held: usize,
    pub rss_before_mib: f64,
    pub rss_after_mib: f64,
    /// (after - before) / held.
    pub kib_per_connection: f64,
    /// A new client was served while they were all open.
    pub served_meanwhile: bool,
    /// `pid`'s memory by kind while they were all open.
    pub held_memory: procfs::MemorySplit,
}

/// One keep-alive GET of [`PATH`] on a new connection; the connection is returned open once the
/// whole answer has arrived (the peer then holds an idle keep-alive connection).
pub async fn open_one(addr: SocketAddr) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !crate::http1::complete(&got) {
        let n = tokio::time::timeout(READ_LIMIT, s.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
    }
    Some(s)
}

/// Still open: a read would block (no EOF queued).
fn is_open(s: &TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.try_read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Opens `count` keep-alive connections to `addr`, each after one answered request, and
/// measures the resident memory of `pid`'s process tree before and after (and `pid`'s own by
/// kind while they are open). The connections are
/// closed again when it returns. The caller's descriptor limit must allow `count` sockets
/// (see [`raise_nofile`]).
pub async fn idle(addr: SocketAddr, pid: u32, count: usize) -> Idle {
    let before = procfs::stats(pid).rss_bytes as f64 / 1024.0;
    let mut conns = Vec::with_capacity(count);
    let mut left = count;
    while left > 0 {
        let n = left.min(BATCH);
        let opened = futures::future::join_all((0..n).map(|_| open_one(addr))).await;
        conns.extend(opened.into_iter().flatten());
        left -= n;
    }
    // Let the peer finish with the last answers (buffers freed, timers set) before measuring.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = procfs::stats(pid).rss_bytes as f64 / 1024.0;
    let held = conns.iter().filter(|c| is_open(c)).count();
    // Read now: the connections close when this returns.
    let held_memory =
        procfs::memory_split(pid, &format!("holding {held} idle keep-alive connections"));
    let served_meanwhile = open_one(addr).await.is_some();
    let per = if held > 0 {
        (after - before).max(0.0) / held as f64
    } else {
        0.0
    };
    Idle {
        opened: conns.len(),
        held,
        rss_before_mib: before / 1024.0,
        rss_after_mib: after / 1024.0,
        kib_per_connection: per,
        served_meanwhile,
        held_memory,
    }
}

/// Raises this process's soft descriptor limit to its hard limit: the harness holds thousands
/// of sockets at once, and peers started afterwards inherit the higher limit (nginx sets its
/// own with `worker_rlimit_nofile`).
pub fn raise_nofile() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    l.current = l.maximum;
    // Best effort: with the lower limit the scenario reports fewer connections opened.
    let _ = setrlimit(Resource::Nofile, l);
}
