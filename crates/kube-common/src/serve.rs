//! The accept loop every server uses (the ingress proxy, both admission webhooks, the HTTP-01
//! solver, the health/metrics server), so each gets the same defences:
//! - a bound on open connections: at the bound no more are accepted until one closes (the
//!   kernel's backlog holds the rest), as nginx stops accepting when `worker_connections` are
//!   in use;
//! - accept errors (out of file descriptors, for one) back off from 5 ms doubling to 1 s, as Go's
//!   `net/http` does, instead of spinning; accepting resumes when descriptors free up;
//! - TLS handshakes that do not finish in time are dropped ([`tls_handshake`]);
//! - on shutdown the connections already queued are taken, the listener closes (new connections
//!   are refused, or go to another process sharing the port with SO_REUSEPORT), then open
//!   connections get a drain period to finish what they are doing.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::idle::{Activity, Tracked};

/// A TLS handshake not done by then is dropped (a client that opens a connection and sends
/// nothing would otherwise hold it for good).
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The small servers' [`serve_http`] timeout: request heads must arrive, and idle connections
/// close, within this (hyper's default header timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The same for servers whose client pools idle connections (the apiserver calling webhooks
/// keeps them 90 s, Go's default): longer than the client's, so the client always closes first
/// and never sends a request on a connection the server is closing.
pub const POOLED_CLIENT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// HTTP/2 pings this often find peers that went away without closing.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(30);

/// Connections accepted in the last moment before shutdown get this long to send their first
/// request before the drain asks them to close (hyper closes a connection that has not sent
/// anything yet at once, which its client would see as a failure).
const LAST_ACCEPTED_GRACE: Duration = Duration::from_millis(500);

/// The listen backlog (tokio's default for `TcpListener::bind`).
const BACKLOG: u32 = 1024;

const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Bounds of one server.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections open at once at most.
    pub max_connections: usize,
    /// After shutdown, how long open connections get to finish.
    pub drain: Duration,
}

impl Default for Limits {
    /// For the small servers (health, webhooks, the solver): enough for any legitimate caller.
    fn default() -> Self {
        Self {
            max_connections: 1024,
            drain: Duration::from_secs(5),
        }
    }
}

/// Binds a listener on `addr`; with `reuse_port`, SO_REUSEPORT lets another process of the same
/// user bind the same port (a new instance taking over while this one drains, as nginx's
/// `listen ... reuseport`).
pub fn bind(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    if reuse_port {
        socket.set_reuseport(true)?;
    }
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// One accepted connection, for the server's handler.
pub struct Accepted {
    pub stream: TcpStream,
    pub remote: SocketAddr,
    /// Cancelled when the server starts draining: finish the request in progress, then close.
    pub drain: CancellationToken,
    /// The connection's place under the bound: keep it while the connection is open (the
    /// drain waits for every place to come back). A handler may keep it beyond its own future,
    /// as the ingress proxy does for connections it holds idle without a task.
    pub slot: Slot,
}

/// One open connection's place under [`Limits::max_connections`]; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Accepts on `listener` until `shutdown`, each connection handled by `handle` on its own task;
/// returns once the open connections have finished or `limits.drain` has passed.
pub async fn accept_loop<H, Fut>(
    name: &str,
    listener: TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
    handle: H,
) where
    H: Fn(Accepted) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let drain = CancellationToken::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut at_bound = false;
    let mut last_accept = tokio::time::Instant::now() - LAST_ACCEPTED_GRACE;
    loop {
        if slots.available_permits() == 0 && !at_bound {
            tracing::warn!(
                server = name,
                max,
                "connection bound reached; accepting resumes when one closes"
            );
        }
        at_bound = slots.available_permits() == 0;
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
        };
        let (stream, remote) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(server = name, error = %e, retry_in = ?backoff, "accept failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = ACCEPT_BACKOFF_MIN;
        last_accept = tokio::time::Instant::now();
        spawn_connection(&handle, stream, remote, &drain, slot);
    }
    if sweep_queue(listener, &slots, &handle, &drain) || last_accept.elapsed() < LAST_ACCEPTED_GRACE
    {
        tokio::time::sleep(LAST_ACCEPTED_GRACE).await;
    }
    drain.cancel();
    // Every open connection holds a slot: having them all back means all have closed.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    if tokio::time::timeout(limits.drain, slots.acquire_many(all))
        .await
        .is_err()
    {
        tracing::info!(
            server = name,
            open = max - slots.available_permits(),
            "drain period over; the remaining connections end with the process"
        );
    }
}

/// Takes the connections the kernel has already queued (they would be reset when the listener
/// closes) and closes the listener; true if there were any. Asks the socket itself until it
/// would block: tokio's readiness flag may not know of connections queued since its last poll.
fn sweep_queue<H, Fut>(
    listener: TcpListener,
    slots: &Arc<Semaphore>,
    handle: &H,
    drain: &CancellationToken,
) -> bool
where
    H: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(listener) = listener.into_std() else {
        return false;
    };
    let mut any = false;
    while let Ok(slot) = slots.clone().try_acquire_owned() {
        let Ok((stream, remote)) = listener.accept() else {
            break;
        };
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| TcpStream::from_std(stream));
        if let Ok(stream) = stream {
            spawn_connection(handle, stream, remote, drain, slot);
            any = true;
        }
    }
    any
}

fn spawn_connection<H, Fut>(
    handle: &H,
    stream: TcpStream,
    remote: SocketAddr,
    drain: &CancellationToken,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    H: Fn(Accepted) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(handle(Accepted {
        stream,
        remote,
        drain: drain.clone(),
        slot: Slot { _permit: slot },
    }));
}

/// The TLS handshake with [`TLS_HANDSHAKE_TIMEOUT`]; `None` if it failed or took too long.
pub async fn tls_handshake<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    handshake_within(TLS_HANDSHAKE_TIMEOUT, acceptor, io).await
}

async fn handshake_within<IO>(
    limit: Duration,
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    match tokio::time::timeout(limit, acceptor.accept(io)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

/// Serves HTTP/1.1 or HTTP/2 on `io` for the small servers. Request heads must arrive, and a
/// connection with no request in progress and no bytes moving closes, within `timeout` (the
/// second also for HTTP/2, which hyper does not time out by itself: idle connections cannot
/// pile up against the connection bound). On drain, the request in progress finishes, then the
/// connection closes (HTTP/2 clients get a GOAWAY).
pub async fn serve_http<IO, F, Fut, B>(
    io: IO,
    timeout: Duration,
    drain: &CancellationToken,
    service: F,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let activity = Arc::new(Activity::default());
    let in_service = activity.clone();
    let service = Arc::new(service);
    let svc = hyper::service::service_fn(move |req| {
        let guard = in_service.enter();
        let service = service.clone();
        async move {
            let response = service(req).await;
            drop(guard);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(H2_KEEP_ALIVE);
    let io = TokioIo::new(Tracked::new(io, activity.clone()));
    let conn = builder.serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        // The connection first: a request already sent is read before a due drain closes it.
        biased;
        _ = conn.as_mut() => {}
        () = activity.idle_for(timeout) => {}
        _ = drain.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                () = activity.idle_for(timeout) => {}
            }
        }
    }
}

/// A plain HTTP server of the small kind (health, the HTTP-01 solver): every request answered
/// at once by `answer`, with [`IDLE_TIMEOUT`].
pub async fn serve_plain<F, B>(
    name: &str,
    listener: TcpListener,
    shutdown: CancellationToken,
    answer: F,
) where
    F: Fn(&hyper::Request<Incoming>) -> hyper::Response<B> + Clone + Send + Sync + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    accept_loop(name, listener, Limits::default(), shutdown, move |a| {
        let answer = answer.clone();
        async move {
            let Accepted {
                stream,
                drain,
                slot,
                ..
            } = a;
            serve_http(stream, IDLE_TIMEOUT, &drain, move |req| {
                let response = answer(&req);
                async move { response }
            })
            .await;
            drop(slot);
        }
    })
    .await
}

/// An HTTPS server for clients that pool connections (the admission webhooks): TLS with
/// `tls`, then [`serve_http`] with [`POOLED_CLIENT_IDLE_TIMEOUT`], every request answered by
/// `service`.
pub async fn serve_https<F, Fut, B>(
    name: &str,
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
    service: F,
) where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    accept_loop(name, listener, Limits::default(), shutdown, move |a| {
        let (acceptor, service) = (acceptor.clone(), service.clone());
        async move {
            let Accepted {
                stream,
                drain,
                slot,
                ..
            } = a;
            // Fails while no certificate is loaded yet; the apiserver retries.
            let Some(tls) = tls_handshake(&acceptor, stream).await else {
                return;
            };
            serve_http(tls, POOLED_CLIENT_IDLE_TIMEOUT, &drain, service).await;
            drop(slot);
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn hold_until_closed(a: Accepted) {
        let mut s = a.stream;
        let mut buf = [0u8; 16];
        tokio::select! {
            _ = s.read(&mut buf) => {}
            _ = a.drain.cancelled() => {}
        }
    }

    #[tokio::test]
    async fn at_the_bound_no_more_connections_are_served_until_one_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let limits = Limits {
            max_connections: 2,
            drain: Duration::from_secs(1),
        };
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = served.clone();
        let server = tokio::spawn(accept_loop("t", listener, limits, stop.clone(), move |a| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            hold_until_closed(a)
        }));
        let c1 = TcpStream::connect(addr).await.expect("c1");
        let _c2 = TcpStream::connect(addr).await.expect("c2");
        // The third completes the TCP handshake in the backlog but is not taken.
        let _c3 = TcpStream::connect(addr).await.expect("c3");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 2);
        let mut c1 = c1;
        c1.write_all(b"x").await.expect("write");
        drop(c1);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 3);
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(3), server)
            .await
            .expect("drained in time")
            .expect("server task");
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn a_silent_tls_client_is_dropped() {
        let (server_io, _client_io) = tokio::io::duplex(64);
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(NoCert));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let handshake = handshake_within(Duration::from_millis(100), &acceptor, server_io);
        let gave_up = tokio::time::timeout(Duration::from_secs(5), handshake).await;
        assert!(matches!(gave_up, Ok(None)), "given up after the timeout");
    }

    #[tokio::test]
    async fn an_idle_http2_connection_is_closed() {
        let (server_io, client_io) = tokio::io::duplex(64 * 1024);
        let drain = CancellationToken::new();
        let server = tokio::spawn(async move {
            serve_http(
                server_io,
                Duration::from_millis(200),
                &drain,
                |_req| async {
                    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
                        b"ok",
                    )))
                },
            )
            .await
        });
        // HTTP/2 with prior knowledge: a request, then nothing.
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(client_io))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri("http://x/")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let r = sender.send_request(req).await.expect("response");
        assert_eq!(r.status(), 200);
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("idle connection closed")
            .expect("server task");
    }

    #[derive(Debug)]
    struct NoCert;

    impl rustls::server::ResolvesServerCert for NoCert {
        fn resolve(
            &self,
            _: rustls::server::ClientHello<'_>,
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            None
        }
    }
}
