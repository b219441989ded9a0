//! Listeners: accept, terminate TLS where configured, and hand each request to the proxy.
//! Plain HTTP speaks HTTP/1.1 (as nginx on port 80); TLS negotiates h2 or http/1.1 by ALPN.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use kube_common::idle::{Activity, Tracked};
use kube_common::serve::{Accepted, Limits, accept_loop, tls_handshake};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::batched_writes::Batched;
use crate::control_frames::ControlFrames;
use crate::framing::{Scanned, Verdicts};
use crate::keepalive::{self, Finishing, Lent, Outcome, Parkable, Requests, Socket, Tracker};
use crate::proxy::{ConnInfo, Proxy, plain};

/// ingress-nginx's `max-worker-connections` default: connections one worker's listener keeps
/// open.
const MAX_CONNECTIONS: usize = 16_384;
/// ingress-nginx's `worker-shutdown-timeout` default: how long open connections get to finish
/// after shutdown starts.
const DRAIN: Duration = Duration::from_secs(240);
/// How long a connection closed for flooding control frames gets to send its GOAWAY, and an
/// idle one closed by the drain its TLS close_notify.
const FLOOD_LINGER: Duration = Duration::from_secs(1);

/// Accepts until `shutdown` (kube-common's accept loop), then lets open connections finish the
/// requests they have in progress.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    proxy: Arc<Proxy>,
    shutdown: CancellationToken,
    worker: usize,
) {
    let limits = Limits {
        max_connections: MAX_CONNECTIONS,
        drain: DRAIN,
    };
    let name = if tls.is_some() { "https" } else { "http" };
    accept_loop(name, listener, limits, shutdown, move |a| {
        connection(a, tls.clone(), proxy.clone(), worker)
    })
    .await
}

// On drain hyper finishes the request in progress and closes: HTTP/1 answers it with
// `Connection: close` (an idle connection closes at once), HTTP/2 sends GOAWAY.
// A connection that spent its control-frame budget (`control_frames`) gets GOAWAY the same
// way, then at most FLOOD_LINGER to finish: nothing more is read from it.
macro_rules! until_drained {
    ($serving:expr, $drain:expr, $flood:expr) => {{
        let serving = $serving;
        let drain: CancellationToken = $drain;
        let flood: Option<CancellationToken> = $flood;
        let conn: Connection<'_> = Box::pin(async move {
            let mut serving = std::pin::pin!(serving);
            let flooded = async {
                match &flood {
                    Some(f) => f.cancelled().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // Serving first: a request already in the socket is read before a drain
                // that is already due asks the connection to close.
                biased;
                r = serving.as_mut() => r.map_err(Into::into),
                _ = drain.cancelled() => {
                    serving.as_mut().graceful_shutdown();
                    serving.await.map_err(Into::into)
                }
                _ = flooded => {
                    serving.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(FLOOD_LINGER, serving).await;
                    Ok(())
                }
            }
        });
        conn
    }};
}

async fn connection(
    a: Accepted,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    proxy: Arc<Proxy>,
    worker: usize,
) {
    let Accepted {
        stream,
        remote,
        drain,
    } = a;
    let _ = stream.set_nodelay(true);
    let Ok(local) = stream.local_addr() else {
        return;
    };
    let cfg = proxy.snapshot().config.clone();
    let activity = Arc::new(Activity::default());
    let verdicts = Arc::new(Verdicts::default());
    let requests = Requests::default();
    let sessions = Sessions {
        http1: http1_builder(&cfg),
        service: RequestService {
            proxy,
            conn: Arc::new(ConnInfo::new(remote, local, tls.is_some(), worker)),
            activity: activity.clone(),
            framing: verdicts.clone(),
            requests: requests.tracker(),
        },
        drain: drain.clone(),
    };
    let idle = Idle {
        activity: &activity,
        keep_alive: cfg.keep_alive,
        drain: &drain,
    };
    match tls {
        None => {
            let io = Scanned::new(Tracked::new(stream, activity.clone()), verdicts);
            http1_connection(Socket::new(io), &sessions, &requests, &idle).await;
        }
        // Boxed: a TLS connection's state (rustls's, kilobytes) would otherwise size every
        // connection's task, plain and idle ones included.
        Some(config) => {
            let tracked = Tracked::new(stream, activity.clone());
            let tls = tls_connection(
                tracked, &config, &cfg, &sessions, &requests, &idle, verdicts,
            );
            Box::pin(tls).await;
        }
    }
    activity.requests_done().await;
}

/// TLS, then HTTP/2 or HTTP/1 as negotiated.
async fn tls_connection(
    tracked: Tracked<TcpStream>,
    config: &ArcSwap<rustls::ServerConfig>,
    cfg: &crate::config::Config,
    sessions: &Sessions,
    requests: &Requests,
    idle: &Idle<'_>,
    verdicts: Arc<Verdicts>,
) {
    // The current settings (ssl-protocols, use-http2) for each new connection.
    let acceptor = TlsAcceptor::from(config.load_full());
    let Some(tls_stream) = tls_handshake(&acceptor, tracked).await else {
        return;
    };
    if tls_stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        let flood = CancellationToken::new();
        // Flushes wait for the connection's next poll: the answers of every stream made ready
        // meanwhile go out in one write.
        let io = TokioIo::new(Batched::new(ControlFrames::new(tls_stream, flood.clone())));
        let builder = h2_builder(cfg);
        let conn = until_drained!(
            builder.serve_connection_with_upgrades(io, sessions.service.clone()),
            sessions.drain.clone(),
            Some(flood)
        );
        until_idle(conn, idle.activity, idle.keep_alive).await;
    } else {
        // No ALPN or http/1.1: HTTP/1, as nginx decides on a TLS listener. Only HTTP/1
        // carries Content-Length/Transfer-Encoding framing.
        let io = Scanned::new(tls_stream, verdicts);
        http1_connection(Socket::new(io), sessions, requests, idle).await;
    }
}

/// What an HTTP/1 connection starts each hyper connection (session) with.
struct Sessions {
    http1: hyper::server::conn::http1::Builder,
    service: RequestService,
    drain: CancellationToken,
}

impl Sessions {
    fn http1<S>(&self, io: Lent<S>) -> Connection<'static>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        until_drained!(
            self.http1
                .serve_connection(TokioIo::new(io), self.service.clone())
                .with_upgrades(),
            self.drain.clone(),
            None
        )
    }
}

/// What ends an idle HTTP/1 connection.
struct Idle<'a> {
    activity: &'a Activity,
    /// `keep-alive` (nginx's `keepalive_timeout`); zero turns keep-alive off.
    keep_alive: Duration,
    drain: &'a CancellationToken,
}

/// An HTTP/1 connection: a hyper connection serves it while requests are under way; between
/// requests only the socket is kept (see [`keepalive`]), until the next request's bytes, the
/// keep-alive timeout or the drain. The socket comes shared already, and the serving state is
/// boxed while a session runs: a connection parked between requests keeps room only for what
/// waiting needs (benches/README.md, change 13).
async fn http1_connection<S>(
    socket: Socket<S>,
    sessions: &Sessions,
    requests: &Requests,
    idle: &Idle<'_>,
) where
    S: Parkable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // One deadline for the connection's life, not one per request.
    let timeout = async {
        if idle.keep_alive.is_zero() {
            std::future::pending().await
        } else {
            idle.activity.idle_for(idle.keep_alive).await
        }
    };
    let mut timeout = std::pin::pin!(timeout);
    loop {
        let serving = Box::pin(keepalive::until_parked(
            sessions.http1(socket.lend()),
            &socket,
            requests,
            idle.activity,
            keepalive::GRACE,
        ));
        let outcome = tokio::select! {
            o = serving => o,
            () = &mut timeout => return,
        };
        if outcome == Outcome::Ended {
            return;
        }
        tokio::select! {
            // A request already waiting is served (and answered with `Connection: close`
            // when draining), as a busy connection's is.
            biased;
            r = socket.readable() => {
                if r.is_err() {
                    return;
                }
            }
            () = idle.drain.cancelled() => {
                // As hyper closes an idle connection on graceful shutdown.
                let _ = tokio::time::timeout(FLOOD_LINGER, socket.shutdown()).await;
                return;
            }
            () = &mut timeout => return,
        }
    }
}

/// HTTP/1 over plain TCP.
impl Parkable for Scanned<Tracked<TcpStream>> {
    fn between_requests(&self) -> bool {
        self.scanner().between_requests()
    }
    fn socket(&self) -> &TcpStream {
        self.get_ref().get_ref()
    }
}

/// HTTP/1 over TLS. Waiting on the TCP socket is enough: hyper's last read left no decrypted
/// bytes behind.
impl Parkable for Scanned<TlsStream<Tracked<TcpStream>>> {
    fn between_requests(&self) -> bool {
        self.scanner().between_requests()
    }
    fn socket(&self) -> &TcpStream {
        self.get_ref().get_ref().0.get_ref()
    }
}

/// The TLS listener's builder for connections that negotiated h2 (ALPN); its HTTP/1 settings
/// match [`http1_builder`]'s should a client speak HTTP/1 anyway (the builder sniffs).
fn h2_builder(cfg: &crate::config::Config) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.client_header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        // keep-alive: 0 turns keep-alive off, as in nginx.
        .keep_alive(!cfg.keep_alive.is_zero());
    builder.http2().timer(TokioTimer::new());
    builder
}

/// HTTP/1 connections use hyper's own HTTP/1 server, without the auto builder's protocol
/// sniffing and rewind buffer (measurably cheaper per request, see benches/README.md). The
/// header limit is checked on the head itself, so it is exact whatever the read sizes.
fn http1_builder(cfg: &crate::config::Config) -> hyper::server::conn::http1::Builder {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.client_header_timeout)
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .max_header_size(cfg.max_header_bytes)
        .keep_alive(!cfg.keep_alive.is_zero());
    http1
}

/// Each request of one connection: refused when its head had conflicting framing, else
/// proxied, counted as in progress meanwhile; the connection counts as busy (not idle between
/// requests, see [`keepalive`]) until hyper has taken the whole response.
#[derive(Clone)]
struct RequestService {
    proxy: Arc<Proxy>,
    conn: Arc<ConnInfo>,
    activity: Arc<Activity>,
    framing: Arc<Verdicts>,
    requests: Tracker,
}

type Response = hyper::Response<Finishing<crate::proxy::Body>>;

impl hyper::service::Service<hyper::Request<hyper::body::Incoming>> for RequestService {
    type Response = Response;
    type Error = std::convert::Infallible;
    // Boxed: hyper keeps room for one request's future in every HTTP/1 connection; a box there
    // is a pointer instead of the request's whole state (about 5 KB).
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response, Self::Error>> + Send>>;

    fn call(&self, mut req: hyper::Request<hyper::body::Incoming>) -> Self::Future {
        let mut guard = Some(self.activity.enter());
        // An upgrade's tunnel outlives its request: it takes the guard along, so the
        // connection keeps its slot in the accept loop until the tunnel ends.
        if req.headers().contains_key(http::header::UPGRADE)
            && let Some(g) = guard.take()
        {
            req.extensions_mut().insert(Arc::new(g));
        }
        // HTTP/1 only: one verdict per request head, in order.
        let conflict = req.version() <= http::Version::HTTP_11 && self.framing.next();
        let proxy = self.proxy.clone();
        let conn = self.conn.clone();
        let busy = self.requests.start();
        Box::pin(async move {
            let response = if conflict {
                plain(
                    http::StatusCode::BAD_REQUEST,
                    "400 Bad Request: both Content-Length and Transfer-Encoding\n",
                )
            } else {
                let Ok(response) = proxy.handle(req, conn).await;
                response
            };
            drop(guard);
            Ok(response.map(|body| Finishing::new(body, busy)))
        })
    }
}

/// A serving connection, boxed: spelling its type out keeps the spawned future `Send` (the
/// compiler cannot prove it for the unnamed type through a generic).
type Connection<'a> = std::pin::Pin<
    Box<
        dyn std::future::Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>>
            + Send
            + 'a,
    >,
>;

/// Drives a connection until it ends or has been idle for `keep_alive` (dropping it closes it).
async fn until_idle(conn: Connection<'_>, activity: &Activity, keep_alive: Duration) {
    let mut conn = conn;
    if keep_alive.is_zero() {
        let _ = conn.await;
        return;
    }
    tokio::select! {
        _ = &mut conn => {}
        () = activity.idle_for(keep_alive) => {}
    }
}
