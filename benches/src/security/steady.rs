//! The normal client kept up during every attack: a few keep-alive workers sending paced GETs,
//! each answer timed. Success and p99 during the attack are judged against the same client's
//! figures on the unloaded peer.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::TcpStream;

use crate::peers::HOST;

/// A request slower than this counts as failed (the client gave up).
const GIVE_UP: Duration = Duration::from_secs(5);
const WORKERS: usize = 4;
const PAUSE: Duration = Duration::from_millis(20);

#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Figures {
    pub requests: u64,
    pub failed: u64,
    pub p99_ms: f64,
}

impl Figures {
    pub fn success_pct(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        100.0 * (self.requests - self.failed) as f64 / self.requests as f64
    }
}

#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    failed: u64,
}

pub struct Steady {
    stop: Arc<AtomicBool>,
    tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Steady {
    pub fn start(addr: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let tasks = (0..WORKERS)
            .map(|_| tokio::spawn(worker(addr, stop.clone(), tally.clone())))
            .collect();
        Steady { stop, tally, tasks }
    }

    pub async fn stop(self) -> Figures {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let Ok(mut t) = self.tally.lock() else {
            return Figures::default();
        };
        t.latencies_ms.sort_by(f64::total_cmp);
        let ok = t.latencies_ms.len() as u64;
        let p99 = if t.latencies_ms.is_empty() {
            0.0
        } else {
            let i = ((t.latencies_ms.len() as f64 * 0.99).ceil() as usize).saturating_sub(1);
            t.latencies_ms[i.min(t.latencies_ms.len() - 1)]
        };
        Figures {
            requests: ok + t.failed,
            failed: t.failed,
            p99_ms: p99,
        }
    }

    /// The client alone for `time`.
    pub async fn measure(addr: SocketAddr, time: Duration) -> Figures {
        let s = Steady::start(addr);
        tokio::time::sleep(time).await;
        s.stop().await
    }
}

async fn connect(addr: SocketAddr) -> Option<SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(addr).await.ok()?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

async fn get(sender: &mut SendRequest<Empty<Bytes>>) -> bool {
    let Ok(req) = hyper::Request::builder()
        .uri("/steady")
        .header(http::header::HOST, HOST)
        .body(Empty::new())
    else {
        return false;
    };
    let Ok(resp) = sender.send_request(req).await else {
        return false;
    };
    resp.status() == 200 && resp.into_body().collect().await.is_ok()
}

async fn worker(addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let ok = tokio::time::timeout(GIVE_UP, async {
            // A connection the peer closed after its last answer is replaced, not a failure.
            if let Some(s) = sender.as_mut()
                && s.ready().await.is_err()
            {
                sender = None;
            }
            if sender.is_none() {
                sender = connect(addr).await;
            }
            match sender.as_mut() {
                Some(s) => get(s).await,
                None => false,
            }
        })
        .await
        .unwrap_or(false);
        if let Ok(mut t) = tally.lock() {
            if ok {
                t.latencies_ms
                    .push(started.elapsed().as_secs_f64() * 1000.0);
            } else {
                t.failed += 1;
            }
        }
        if !ok {
            sender = None;
        }
        tokio::time::sleep(PAUSE).await;
    }
}
