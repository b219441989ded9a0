//! A small HTTP/1.1 client for readiness checks, propagation probes and the load kept up during
//! Ingress edits (where every single failure must be counted, which the tools do not expose
//! per request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Error;

/// Status and body length of one GET on a new connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<(u16, usize), Error> {
    let mut sender = connect(addr).await?;
    send(&mut sender, host, path).await
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, Error> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(
    sender: &mut SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Result<(u16, usize), Error> {
    let req = Request::builder()
        .uri(path)
        .header(http::header::HOST, host)
        .body(Empty::new())
        .map_err(|e| Error::Http(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Error::Http(e.to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| Error::Http(e.to_string()))?
        .to_bytes();
    Ok((status, body.len()))
}

/// Polls until GET returns `status`, every `interval`, for at most `limit`.
pub async fn wait_status(
    addr: SocketAddr,
    host: &str,
    path: &str,
    status: u16,
    interval: Duration,
    limit: Duration,
) -> Result<(), Error> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match get(addr, host, path).await {
            Ok((s, _)) if s == status => return Ok(()),
            Ok((s, _)) => format!("status {s}"),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "http://{host}{path} via {addr} did not answer {status} within {limit:?} (last: {last})"
            )));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Polls until a TLS handshake with SNI `host` succeeds and the certificate verifies for
/// `host` against `ca_pem` alone (so the default certificate, signed by another CA, does not
/// count), every `interval`, for at most `limit`.
pub async fn wait_tls(
    addr: SocketAddr,
    host: &str,
    ca_pem: &str,
    interval: Duration,
    limit: Duration,
) -> Result<(), Error> {
    let config = integration_tests::http::tls_config(Some(ca_pem))?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let last = match integration_tests::http::tls_connect(addr, host, config.clone()).await {
            Ok(_) => return Ok(()),
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "https://{host} via {addr} did not present its certificate within {limit:?} (last: {last})"
            )));
        }
        tokio::time::sleep(interval).await;
    }
}

/// Counters of a [`Load`].
#[derive(Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub failed: AtomicU64,
}

/// Paced GETs from several workers until stopped: `keepalive` workers on long-lived connections
/// and one that opens a new connection per request. Any non-200 answer or transport error is a
/// failure.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    pub counters: Arc<Counters>,
}

impl Load {
    pub fn start(
        addr: SocketAddr,
        host: &str,
        path: &str,
        keepalive: usize,
        pause: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut tasks = Vec::new();
        for i in 0..=keepalive {
            let (stop, counters) = (stop.clone(), counters.clone());
            let (host, path) = (host.to_string(), path.to_string());
            let reuse = i < keepalive;
            tasks.push(tokio::spawn(async move {
                let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
                while !stop.load(Ordering::Relaxed) {
                    // A connection the server closed after its last response (keep-alive
                    // request limit, idle timeout) is replaced, not counted as a failure.
                    if let Some(s) = sender.as_mut()
                        && s.ready().await.is_err()
                    {
                        sender = None;
                    }
                    if sender.is_none() {
                        sender = connect(addr).await.ok();
                    }
                    let ok = match sender.as_mut() {
                        Some(s) => matches!(send(s, &host, &path).await, Ok((200, _))),
                        None => false,
                    };
                    counters.requests.fetch_add(1, Ordering::Relaxed);
                    if !ok {
                        counters.failed.fetch_add(1, Ordering::Relaxed);
                    }
                    if !ok || !reuse {
                        sender = None;
                    }
                    tokio::time::sleep(pause).await;
                }
            }));
        }
        Load {
            stop,
            tasks,
            counters,
        }
    }

    /// Stops the workers and returns (requests, failed).
    pub async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        (
            self.counters.requests.load(Ordering::Relaxed),
            self.counters.failed.load(Ordering::Relaxed),
        )
    }
}
