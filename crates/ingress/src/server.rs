//! Listeners: accept, terminate TLS where configured, and hand each request to the proxy.
//! Plain HTTP speaks HTTP/1.1 (as nginx on port 80); TLS negotiates h2 or http/1.1 by ALPN.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use kube_common::idle::{Activity, Tracked};
use kube_common::serve::{Accepted, Limits, Slot, accept_loop, tls_handshake};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::batched_writes::Batched;
use crate::control_frames::ControlFrames;
use crate::framing::{Scanned, Verdicts};
use crate::keepalive::{self, Finishing, Lent, Outcome, Parkable, Requests, Socket, Tracker};
use crate::parked::{Lot, Sleeper};
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

/// What every connection of one listener shares.
struct Listener {
    proxy: Arc<Proxy>,
    worker: usize,
    tls: bool,
}

/// Accepts until `shutdown` (kube-common's accept loop), then lets open connections finish the
/// requests they have in progress. HTTP/1 connections idle between requests wait in the
/// listener's [`Lot`] without a task.
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
    let shared = Arc::new(Listener {
        proxy,
        worker,
        tls: tls.is_some(),
    });
    match tls {
        None => {
            let lot = Lot::new(MAX_CONNECTIONS);
            accept_loop("http", listener, limits, shutdown, move |a| {
                plain_connection(a, shared.clone(), lot.clone())
            })
            .await
        }
        Some(config) => {
            let lot = Lot::new(MAX_CONNECTIONS);
            accept_loop("https", listener, limits, shutdown, move |a| {
                tls_connection(a, config.clone(), shared.clone(), lot.clone())
            })
            .await
        }
    }
}

// On drain hyper finishes the request in progress and closes: HTTP/1 answers it with
// `Connection: close` (an idle connection closes at once), HTTP/2 sends GOAWAY. HTTP/2's
// `keep-alive-requests` ends a connection through the same token (a child of the drain).
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

/// An accepted connection's parts, Nagle's algorithm off.
fn opened(a: Accepted) -> (TcpStream, std::net::SocketAddr, CancellationToken, Slot) {
    let Accepted {
        stream,
        remote,
        drain,
        slot,
    } = a;
    let _ = stream.set_nodelay(true);
    (stream, remote, drain, slot)
}

/// A plain connection: HTTP/1.1, as nginx on port 80.
async fn plain_connection(a: Accepted, shared: Arc<Listener>, lot: Lot<Asleep<Plain>>) {
    let (stream, remote, drain, slot) = opened(a);
    let conn = Asleep {
        idle: stream,
        served: 0,
        drain,
        slot,
        shared,
    };
    conn.serve(lot, Some(remote)).await;
}

/// TLS, then HTTP/2 or HTTP/1 as negotiated.
async fn tls_connection(
    a: Accepted,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
    shared: Arc<Listener>,
    lot: Lot<Asleep<Tls>>,
) {
    let (stream, remote, drain, slot) = opened(a);
    let activity = Arc::new(Activity::default());
    // The current settings (ssl-protocols, use-http2) for each new connection.
    let acceptor = TlsAcceptor::from(config.load_full());
    let tracked = Tracked::new(stream, activity.clone());
    let Some(tls_stream) = tls_handshake(&acceptor, tracked).await else {
        return;
    };
    let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
    let conn = Asleep {
        idle: (Box::new(tls_stream), activity),
        served: 0,
        drain,
        slot,
        shared,
    };
    if h2 {
        Box::pin(conn.h2(remote)).await;
    } else {
        // No ALPN or http/1.1: HTTP/1, as nginx decides on a TLS listener.
        conn.serve(lot, Some(remote)).await;
    }
}

type Plain = Tracked<TcpStream>;
type Tls = Box<TlsStream<Tracked<TcpStream>>>;

/// A client connection's I/O below HTTP: plain TCP, or TLS over it.
trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// What the connection keeps while parked.
    type Idle: Send + 'static;
    fn tcp(&self) -> &TcpStream;
    fn idle_tcp(idle: &Self::Idle) -> &TcpStream;
    /// Back to serving: the I/O and the activity record it reports to.
    fn from_idle(idle: Self::Idle) -> (Self, Arc<Activity>);
    fn into_idle(self, activity: Arc<Activity>) -> Self::Idle;
}

/// Parked, a plain connection is its socket alone; activity is recorded afresh.
impl ClientIo for Plain {
    type Idle = TcpStream;
    fn tcp(&self) -> &TcpStream {
        self.get_ref()
    }
    fn idle_tcp(idle: &TcpStream) -> &TcpStream {
        idle
    }
    fn from_idle(idle: TcpStream) -> (Self, Arc<Activity>) {
        let activity = Arc::new(Activity::default());
        (Tracked::new(idle, activity.clone()), activity)
    }
    fn into_idle(self, _: Arc<Activity>) -> TcpStream {
        self.into_inner()
    }
}

/// A TLS connection keeps its session (boxed) and the activity record underneath it.
impl ClientIo for Tls {
    type Idle = (Self, Arc<Activity>);
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0.get_ref()
    }
    fn idle_tcp(idle: &Self::Idle) -> &TcpStream {
        idle.0.tcp()
    }
    fn from_idle(idle: Self::Idle) -> (Self, Arc<Activity>) {
        idle
    }
    fn into_idle(self, activity: Arc<Activity>) -> Self::Idle {
        (self, activity)
    }
}

/// A client connection as it is kept between requests: its socket (and TLS state, no HTTP
/// buffers) and its place under the connection bound. What a session needs beyond this is
/// built again when the next request's bytes arrive.
struct Asleep<S: ClientIo> {
    idle: S::Idle,
    /// Requests served so far (`keep-alive-requests`).
    served: u32,
    drain: CancellationToken,
    slot: Slot,
    shared: Arc<Listener>,
}

impl<S: ClientIo> Asleep<S> {
    /// Serves HTTP/1 until the connection ends or is parked in `lot`. `remote` is the client's
    /// address on a new connection; a parked one, woken, asks its socket again.
    async fn serve(mut self, lot: Lot<Self>, mut remote: Option<std::net::SocketAddr>) {
        loop {
            let Some((idle, deadline)) = self.session(remote.take()).await else {
                return;
            };
            let drain = idle.drain.clone();
            match lot.park(idle, deadline, &drain) {
                Ok(()) => return,
                Err(readable) => self = readable,
            }
        }
    }

    /// One session: hyper serves the connection until it ends (`None`) or is idle between
    /// requests (see [`keepalive`]); then the connection and its keep-alive deadline.
    async fn session(
        self,
        remote: Option<std::net::SocketAddr>,
    ) -> Option<(Self, tokio::time::Instant)> {
        let Asleep {
            idle,
            served,
            drain,
            slot,
            shared,
        } = self;
        let (io, activity) = S::from_idle(idle);
        let cfg = shared.proxy.snapshot().config.clone();
        // A parked connection keeps no addresses (two system calls per wake-up, against 0.2 KiB
        // per idle connection); one whose peer has gone (ENOTCONN) is closed here.
        let local = io.tcp().local_addr().ok()?;
        let remote = match remote {
            Some(r) => r,
            None => io.tcp().peer_addr().ok()?,
        };
        let requests = match served {
            0 => Requests::default(),
            n => Requests::resumed(n),
        };
        let verdicts = Arc::new(Verdicts::default());
        let last = LastRequest {
            limit: cfg.keep_alive_requests,
            goaway: None,
        };
        let service = shared.service(remote, local, &activity, &verdicts, &requests, last);
        let sessions = Sessions {
            http1: http1_builder(&cfg),
            service,
            drain: drain.clone(),
        };
        let socket = Socket::new(Scanned::new(io, verdicts));
        let parked =
            http1_connection(&socket, &sessions, &requests, &activity, cfg.keep_alive).await;
        let io = match socket.into_inner() {
            Some(scanned) if parked && !cfg.keep_alive.is_zero() => scanned.into_inner(),
            _ => {
                // An upgraded connection's tunnel keeps the slot until it ends.
                activity.requests_done().await;
                drop(slot);
                return None;
            }
        };
        let deadline = activity.last_active() + cfg.keep_alive;
        let conn = Asleep {
            idle: io.into_idle(activity),
            served: requests.count(),
            drain,
            slot,
            shared,
        };
        Some((conn, deadline))
    }
}

impl Asleep<Tls> {
    /// HTTP/2, until the connection ends or has been idle for `keep-alive`.
    async fn h2(self, remote: std::net::SocketAddr) {
        let Asleep {
            idle: (io, activity),
            drain,
            slot,
            shared,
            ..
        } = self;
        let cfg = shared.proxy.snapshot().config.clone();
        let Ok(local) = io.tcp().local_addr() else {
            return;
        };
        let requests = Requests::default();
        // `keep-alive-requests` ends the connection as the drain does (GOAWAY, streams under
        // way finish).
        let goaway = drain.child_token();
        let last = LastRequest {
            limit: cfg.keep_alive_requests,
            goaway: Some(goaway.clone()),
        };
        let service = shared.service(remote, local, &activity, &Arc::default(), &requests, last);
        let flood = CancellationToken::new();
        // Flushes wait for the connection's next poll: the answers of every stream made ready
        // meanwhile go out in one write.
        let io = TokioIo::new(Batched::new(ControlFrames::new(*io, flood.clone())));
        let builder = h2_builder(&cfg);
        let conn = until_drained!(
            builder.serve_connection_with_upgrades(io, service),
            goaway,
            Some(flood)
        );
        until_idle(conn, &activity, cfg.keep_alive).await;
        activity.requests_done().await;
        drop(slot);
    }
}

impl<S: ClientIo> Sleeper for Asleep<S> {
    fn socket(&self) -> &TcpStream {
        S::idle_tcp(&self.idle)
    }

    fn wake(self, lot: Lot<Self>) -> impl Future<Output = ()> + Send + 'static {
        self.serve(lot, None)
    }

    async fn close(self) {
        // As hyper closes an idle connection on graceful shutdown.
        let (mut io, _) = S::from_idle(self.idle);
        let _ = tokio::time::timeout(FLOOD_LINGER, io.shutdown()).await;
    }
}

impl Listener {
    /// The service for one session's requests.
    fn service(
        &self,
        remote: std::net::SocketAddr,
        local: std::net::SocketAddr,
        activity: &Arc<Activity>,
        framing: &Arc<Verdicts>,
        requests: &Requests,
        last: LastRequest,
    ) -> RequestService {
        RequestService {
            proxy: self.proxy.clone(),
            conn: Arc::new(ConnInfo::new(remote, local, self.tls, self.worker)),
            activity: activity.clone(),
            framing: framing.clone(),
            requests: requests.tracker(),
            last,
        }
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

/// Serves an HTTP/1 connection with one hyper connection until it ends (false), has been idle
/// for `keep_alive` (false: it is closed) or is idle between requests (true: see
/// [`keepalive`]).
async fn http1_connection<S>(
    socket: &Socket<S>,
    sessions: &Sessions,
    requests: &Requests,
    activity: &Activity,
    keep_alive: Duration,
) -> bool
where
    S: Parkable + AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = async {
        if keep_alive.is_zero() {
            std::future::pending().await
        } else {
            activity.idle_for(keep_alive).await
        }
    };
    let serving = keepalive::until_parked(
        sessions.http1(socket.lend()),
        socket,
        requests,
        activity,
        keepalive::GRACE,
    );
    tokio::select! {
        o = serving => o == Outcome::Parked,
        () = timeout => false,
    }
}

/// HTTP/1 over plain TCP, or over TLS: waiting on the TCP socket is enough there, as hyper's
/// last read left no decrypted bytes behind.
impl<S: ClientIo> Parkable for Scanned<S> {
    fn between_requests(&self) -> bool {
        self.scanner().between_requests()
    }
    fn socket(&self) -> &TcpStream {
        self.get_ref().tcp()
    }
}

/// Answer bytes one HTTP/2 stream queues beyond what the connection has written, as much as
/// one upstream read (`READ_BUFFER`). A stream a client does not read then holds about 64 KiB:
/// this, hyper's overshoot by one chunk and the chunk it holds, and the upstream's read buffer.
/// hyper's default, 400 KiB, let one client that opens 128 streams of large answers and reads
/// nothing pin 56 MiB (16 KiB: 8 MiB; nginx 2 MiB), and h2-64k is as fast with 16 KiB
/// (benches/README.md, change 16).
const H2_SEND_BUFFER: usize = 16 * 1024;

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
    // nginx's limits (benches/README.md compares the other settings): the streams a client
    // may have open, and the request head's size, which `large-client-header-buffers` bounds
    // for HTTP/2 as for HTTP/1 (hyper's defaults: 200 streams, 16 KiB).
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2_max_concurrent_streams)
        .max_send_buf_size(H2_SEND_BUFFER)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
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
    last: LastRequest,
}

/// `keep-alive-requests`: the connection's last request, and how it ends the connection.
#[derive(Clone)]
struct LastRequest {
    /// The number of the last request.
    limit: u32,
    /// HTTP/2: cancelled to send GOAWAY. The limit is soft there, as in hyper's graceful
    /// shutdown: streams the client opens before it has acknowledged the GOAWAY are served.
    /// HTTP/1 answers the last request with `Connection: close`.
    goaway: Option<CancellationToken>,
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
        let (busy, nth) = self.requests.start();
        let last = nth >= self.last.limit;
        if last && let Some(goaway) = &self.last.goaway {
            goaway.cancel();
        }
        let close = last && req.version() <= http::Version::HTTP_11;
        let http10 = req.version() == http::Version::HTTP_10;
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
            let mut response = response;
            // An upgrade's 101 keeps its connection, for the tunnel.
            if close && response.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                response.headers_mut().insert(
                    http::header::CONNECTION,
                    http::HeaderValue::from_static("close"),
                );
                // hyper would add `keep-alive` for an HTTP/1.0 client that asked for it.
                if http10 {
                    *response.version_mut() = http::Version::HTTP_10;
                }
            }
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
