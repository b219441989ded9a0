//! One worker's HTTP/1 upstream keep-alive pool (nginx's `upstream { keepalive N; }`), built on
//! hyper's `client::conn`: a checkout is a lock no other thread takes, a pop and a readiness
//! check; the connection goes back when its response body ends. No task, channel or timer per
//! request beyond hyper's own.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{Builder, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::PoolSettings;
use crate::proxy::Body;
use crate::snapshot::Upstream;

/// The most a pooled HTTP/1 upstream connection reads ahead of its client: hyper's default
/// (about 400 KiB for the read buffer and again for a chunk in flight) let 1,000 slow readers
/// pin 800 MiB; 16 KiB holds about 50 KiB per reader (nginx without proxy buffering holds one
/// 4-8 KiB buffer). The cost on 64 KiB bodies is in benches/README.md.
const READ_BUFFER: usize = 16 * 1024;

/// Where a pooled connection goes: the upstream and whether it speaks TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Dest {
    tls: bool,
    addr: Addr,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Addr {
    Ip(SocketAddr),
    Dns(String, u16),
}

impl Dest {
    pub fn new(upstream: &Upstream, tls: bool) -> Self {
        let addr = match upstream {
            Upstream::Addr(a) => Addr::Ip(*a),
            Upstream::Dns { host, port } => Addr::Dns(host.clone(), *port),
        };
        Self { tls, addr }
    }
}

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connecting: {0}")]
    Connect(#[source] std::io::Error),
    #[error("connecting: timed out")]
    ConnectTimeout,
    #[error("no address for {0}")]
    Unresolved(String),
    #[error("{0} is not a valid TLS server name")]
    ServerName(String),
    #[error("upstream TLS: {0}")]
    Tls(#[source] std::io::Error),
    #[error(transparent)]
    Http(#[from] hyper::Error),
}

/// A connection and what it has served: closed at `upstream-keepalive-requests` or
/// `upstream-keepalive-time`, as nginx closes them.
struct Conn {
    sender: SendRequest<Body>,
    born: Instant,
    served: u32,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle connections per destination, most recently used last; `upstream-keepalive-connections`
/// bounds them all together, as nginx's one balancer upstream does.
#[derive(Default)]
struct IdleSet {
    by_dest: HashMap<Dest, Vec<Idle>>,
    total: usize,
}

impl IdleSet {
    /// Removes the connection idle the longest, whatever its destination.
    fn evict_oldest(&mut self) {
        let oldest = self
            .by_dest
            .iter()
            .filter_map(|(d, list)| list.first().map(|e| (e.since, d)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, d)| d.clone());
        if let Some(list) = oldest.and_then(|d| self.by_dest.get_mut(&d)) {
            list.remove(0);
            self.total -= 1;
        }
    }

    fn retain(&mut self, keep: impl Fn(&Idle) -> bool) {
        let mut total = 0;
        self.by_dest.retain(|_, list| {
            list.retain(&keep);
            total += list.len();
            !list.is_empty()
        });
        self.total = total;
    }
}

pub struct Pool {
    idle: Mutex<IdleSet>,
    settings: PoolSettings,
    tls: Arc<rustls::ClientConfig>,
}

impl Pool {
    /// A pool; when called inside a runtime, a sweeper closes connections idle for longer than
    /// `upstream-keepalive-timeout` even when no request comes to trigger it.
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let mut tls = super::upstream_tls_config();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let pool = Arc::new(Self {
            idle: Mutex::new(IdleSet::default()),
            settings,
            tls: Arc::new(tls),
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Sends `req` on an idle connection to `dest` or a new one (within `connect_timeout`).
    /// The returned [`Checkin`] gives the connection back once the response body has been
    /// read to its end.
    pub async fn send(
        self: &Arc<Self>,
        dest: &Dest,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<(Response<Incoming>, Checkin), Error> {
        let mut req = req;
        while let Some(mut conn) = self.checkout(dest) {
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, self.checkin_for(dest, conn))),
                // Not written: the connection closed before the request went out, so it can
                // go on another connection safely.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return Err(e.into_error().into()),
                },
            }
        }
        // Boxed: connecting (TCP, TLS, handshake) is the rare path, and inline its state would
        // be copied with every request's future.
        let sender = Box::pin(self.connect(dest, connect_timeout)).await?;
        let mut conn = Conn {
            sender,
            born: Instant::now(),
            served: 0,
        };
        let resp = conn.sender.send_request(req).await?;
        Ok((resp, self.checkin_for(dest, conn)))
    }

    /// The most recently used connection to `dest` that is ready for a request; expired and
    /// closed ones are dropped. One whose driver has not yet taken up the end of its last
    /// response (another thread may be running it) stays for a later request.
    fn checkout(&self, dest: &Dest) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let set = &mut *idle;
        let list = set.by_dest.get_mut(dest)?;
        let now = Instant::now();
        let mut found = None;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let entry = &list[i];
            if entry.conn.sender.is_closed() || self.expired(entry, now) {
                list.remove(i);
                set.total -= 1;
            } else if entry.conn.sender.is_ready() {
                found = Some(list.remove(i).conn);
                set.total -= 1;
                break;
            }
        }
        if list.is_empty() {
            set.by_dest.remove(dest);
        }
        found
    }

    fn expired(&self, entry: &Idle, now: Instant) -> bool {
        now.duration_since(entry.since) >= self.settings.keepalive_timeout
    }

    fn checkin_for(self: &Arc<Self>, dest: &Dest, conn: Conn) -> Checkin {
        let mut conn = conn;
        conn.served = conn.served.saturating_add(1);
        Checkin {
            pool: Arc::downgrade(self),
            dest: dest.clone(),
            conn,
        }
    }

    fn checkin(&self, dest: Dest, conn: Conn) {
        let max = self.settings.keepalive_connections as usize;
        if max == 0 || conn.sender.is_closed() || self.worn_out(&conn) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        if idle.total >= max {
            // The least recently used goes, as nginx's keepalive cache evicts.
            idle.evict_oldest();
        }
        idle.by_dest.entry(dest).or_default().push(Idle {
            conn,
            since: Instant::now(),
        });
        idle.total += 1;
    }

    fn worn_out(&self, conn: &Conn) -> bool {
        conn.served >= self.settings.keepalive_requests
            || conn.born.elapsed() >= self.settings.keepalive_time
    }

    /// Drops expired and closed connections, and destinations left with none.
    fn sweep_now(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|e| !e.conn.sender.is_closed() && !self.expired(e, now));
    }

    async fn connect(&self, dest: &Dest, timeout: Duration) -> Result<SendRequest<Body>, Error> {
        let tcp = tokio::time::timeout(timeout, tcp_connect(&dest.addr))
            .await
            .map_err(|_| Error::ConnectTimeout)??;
        let _ = tcp.set_nodelay(true);
        if dest.tls {
            let name = server_name(&dest.addr)?;
            let connector = tokio_rustls::TlsConnector::from(self.tls.clone());
            let tls = tokio::time::timeout(timeout, connector.connect(name, tcp))
                .await
                .map_err(|_| Error::ConnectTimeout)?
                .map_err(Error::Tls)?;
            handshake(TokioIo::new(tls)).await
        } else {
            handshake(TokioIo::new(tcp)).await
        }
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.total
    }
}

/// A TCP connection to the upstream; a name is resolved and each of its addresses tried in
/// turn, as nginx tries a name's addresses.
async fn tcp_connect(addr: &Addr) -> Result<TcpStream, Error> {
    match addr {
        Addr::Ip(a) => TcpStream::connect(a).await.map_err(Error::Connect),
        Addr::Dns(host, port) => {
            let addrs = tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(Error::Connect)?;
            let mut last = Error::Unresolved(host.clone());
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Error::Connect(e),
                }
            }
            Err(last)
        }
    }
}

/// SNI as a client would send it for the upstream's name (none for an IP address, as rustls
/// does for IP names).
fn server_name(addr: &Addr) -> Result<rustls::pki_types::ServerName<'static>, Error> {
    match addr {
        Addr::Ip(a) => Ok(a.ip().into()),
        Addr::Dns(host, _) => rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| Error::ServerName(host.clone())),
    }
}

/// An HTTP/1 client connection on `io`, its driver spawned on this worker's runtime.
async fn handshake<T>(io: T) -> Result<SendRequest<Body>, Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = Builder::new()
        .max_buf_size(READ_BUFFER)
        .handshake(io)
        .await?;
    // Upgrades: a WebSocket's 101 hands the connection to the tunnel.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
    Ok(sender)
}

async fn sweep(pool: Weak<Pool>) {
    let every = match pool.upgrade() {
        Some(p) => (p.settings.keepalive_timeout / 2)
            .clamp(Duration::from_secs(1), Duration::from_secs(30)),
        None => return,
    };
    loop {
        tokio::time::sleep(every).await;
        match pool.upgrade() {
            Some(p) => p.sweep_now(),
            None => return,
        }
    }
}

/// A connection lent to one request: back to its pool when the response body is read to its
/// end, closed if the body is dropped before (HTTP/1 cannot skip the rest of a response).
pub struct Checkin {
    pool: Weak<Pool>,
    dest: Dest,
    conn: Conn,
}

impl Checkin {
    fn give_back(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(self.dest, self.conn);
        }
    }
}

/// A response body that returns its connection to the pool when it ends.
pub struct Returning {
    body: Incoming,
    checkin: Option<Checkin>,
}

impl Returning {
    pub fn new(body: Incoming, checkin: Checkin) -> Self {
        Self {
            body,
            checkin: Some(checkin),
        }
    }

    fn ended(&mut self) {
        if let Some(c) = self.checkin.take() {
            c.give_back();
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.ended(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.ended(),
            Poll::Ready(Some(Err(_))) => self.checkin = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for Returning {
    fn drop(&mut self) {
        // A body with nothing to read (HEAD, 204, 304, Content-Length: 0) ends unpolled.
        if self.body.is_end_stream() {
            self.ended();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const CONNECT: Duration = Duration::from_secs(2);

    fn settings() -> PoolSettings {
        PoolSettings {
            keepalive_timeout: Duration::from_secs(60),
            keepalive_connections: 2,
            keepalive_requests: 100,
            keepalive_time: Duration::from_secs(3600),
        }
    }

    /// A keep-alive HTTP/1 server answering `hello` to every request; counts connections.
    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            return;
                        }
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
                        if s.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header("host", "a.test")
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap()
    }

    async fn fetch(pool: &Arc<Pool>, dest: &Dest) -> Bytes {
        let (resp, checkin) = pool.send(dest, CONNECT, get()).await.unwrap();
        let body = Returning::new(resp.into_body(), checkin);
        body.collect().await.unwrap().to_bytes()
    }

    #[tokio::test]
    async fn a_connection_is_reused_once_its_response_is_read() {
        let (addr, conns) = server().await;
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        for _ in 0..5 {
            assert_eq!(fetch(&pool, &dest).await, "hello");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_closes_after_keepalive_requests() {
        let (addr, conns) = server().await;
        let pool = Pool::new(PoolSettings {
            keepalive_requests: 2,
            ..settings()
        });
        let dest = Dest::new(&Upstream::Addr(addr), false);
        for _ in 0..5 {
            assert_eq!(fetch(&pool, &dest).await, "hello");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_dropped_unread_does_not_return_its_connection() {
        let (addr, _) = server().await;
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        let (resp, checkin) = pool.send(&dest, CONNECT, get()).await.unwrap();
        // The head has arrived; the body may or may not be complete yet: only an ended body
        // gives the connection back.
        let body = Returning::new(resp.into_body(), checkin);
        let ended = body.is_end_stream();
        drop(body);
        assert_eq!(pool.idle_count(), usize::from(ended));
    }

    #[tokio::test]
    async fn idle_connections_are_capped_and_expire() {
        let (addr, _) = server().await;
        let pool = Pool::new(PoolSettings {
            keepalive_timeout: Duration::from_millis(50),
            ..settings()
        });
        let dest = Dest::new(&Upstream::Addr(addr), false);
        // Three at once: three connections, of which two stay idle.
        let (a, b, c) = tokio::join!(
            pool.send(&dest, CONNECT, get()),
            pool.send(&dest, CONNECT, get()),
            pool.send(&dest, CONNECT, get())
        );
        for (resp, checkin) in [a.unwrap(), b.unwrap(), c.unwrap()] {
            Returning::new(resp.into_body(), checkin)
                .collect()
                .await
                .unwrap();
        }
        assert_eq!(pool.idle_count(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        pool.sweep_now();
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn the_idle_bound_covers_all_upstreams_together() {
        let ((a, _), (b, _)) = (server().await, server().await);
        let pool = Pool::new(settings());
        let (da, db) = (
            Dest::new(&Upstream::Addr(a), false),
            Dest::new(&Upstream::Addr(b), false),
        );
        for dest in [&da, &da, &db] {
            assert_eq!(fetch(&pool, dest).await, "hello");
        }
        let (x, y) = tokio::join!(fetch(&pool, &da), fetch(&pool, &da));
        assert_eq!((x, y), (Bytes::from("hello"), Bytes::from("hello")));
        // Two connections to a, one to b were idle; the bound is 2 in all: b's (the oldest)
        // went.
        assert_eq!(pool.idle_count(), 2);
        assert!(pool.checkout(&db).is_none());
    }

    #[tokio::test]
    async fn a_refused_connection_is_an_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        assert!(matches!(
            pool.send(&dest, CONNECT, get()).await,
            Err(Error::Connect(_))
        ));
    }
}
