//! One worker's HTTP/1 upstream keep-alive pool (nginx's `upstream { keepalive N; }`) of
//! [`h1`] connections: a checkout is a lock no other thread takes, a pop and a check that the
//! upstream has not closed it; the connection goes back when its response body ends. No task,
//! channel or timer per request or per connection: one sweeper per pool closes the idle
//! connections that expired or that the upstream closed (woken by their sockets, as nginx closes
//! a cached connection on its read event).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::net::TcpStream;

use super::PoolSettings;
use super::h1;
use crate::FastMap;
use crate::proxy::Body;
use crate::snapshot::Upstream;

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
    Http(#[from] h1::Error),
}

/// What the upstream answered.
pub enum Sent {
    Response(Response<Returning>),
    /// A 101: the connection is the tunnel's and never goes back to the pool.
    Switched(Response<()>, h1::Upgraded),
}

/// A connection and what it has served: closed at `upstream-keepalive-requests` or
/// `upstream-keepalive-time`, as nginx closes them.
struct Conn {
    h1: h1::Conn,
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
    by_dest: FastMap<Dest, Vec<Idle>>,
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

    fn retain(&mut self, mut keep: impl FnMut(&mut Idle) -> bool) {
        let mut total = 0;
        self.by_dest.retain(|_, list| {
            list.retain_mut(&mut keep);
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
    /// What the sweeper waits on besides its timer.
    watch: Arc<Watch>,
    /// Registered with every idle connection's socket: wakes the sweeper when one becomes
    /// readable (closed by the upstream, or sent something unasked).
    watcher: Waker,
}

impl Drop for Pool {
    /// The sweeper ends at once rather than at its next timer.
    fn drop(&mut self) {
        self.watch.0.notify_one();
    }
}

/// How long an idle connection keeps its read buffer.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// What an idle connection's readable event wakes.
#[derive(Default)]
struct Watch(tokio::sync::Notify);

impl Wake for Watch {
    fn wake(self: Arc<Self>) {
        self.0.notify_one();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.notify_one();
    }
}

impl Pool {
    /// A pool; when called inside a runtime, a sweeper closes connections idle for longer than
    /// `upstream-keepalive-timeout` even when no request comes to trigger it.
    pub fn new(settings: PoolSettings) -> Arc<Self> {
        let mut tls = super::upstream_tls_config();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let watch = Arc::new(Watch::default());
        let pool = Arc::new(Self {
            idle: Mutex::new(IdleSet::default()),
            settings,
            tls: Arc::new(tls),
            watcher: Waker::from(watch.clone()),
            watch,
        });
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(sweep(Arc::downgrade(&pool)));
        }
        pool
    }

    /// Sends `req` on an idle connection to `dest` or a new one (within `connect_timeout`).
    /// A response's body ([`Returning`]) gives the connection back once read to its end.
    pub async fn send(
        self: &Arc<Self>,
        dest: &Dest,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Sent, Error> {
        let (parts, body) = req.into_parts();
        let mut out = h1::Outgoing::new(&parts, body)?;
        if let Some(conn) = self.checkout(dest) {
            let (born, served) = (conn.born, conn.served);
            match conn.h1.exchange(&mut out).await {
                Ok(answer) => return Ok(self.sent(dest, answer, born, served)),
                // The upstream closed the kept-alive connection as it was reused, before any
                // answer: a request that can be repeated goes again, as nginx retries on a
                // cached connection; once, on a new connection, so that an upstream that drops
                // every connection it reads this request on does not get it from each idle one.
                Err(failed) if failed.stale => {}
                Err(failed) => return Err(failed.error.into()),
            }
        }
        // Boxed: connecting (TCP, TLS) is the rare path, and inline its state would be copied
        // with every request's future.
        let conn = Box::pin(self.connect(dest, connect_timeout)).await?;
        match conn.exchange(&mut out).await {
            Ok(answer) => Ok(self.sent(dest, answer, Instant::now(), 0)),
            Err(failed) => Err(failed.error.into()),
        }
    }

    fn sent(self: &Arc<Self>, dest: &Dest, answer: h1::Answer, born: Instant, served: u32) -> Sent {
        match answer {
            h1::Answer::Switched(head, upgraded) => Sent::Switched(head, upgraded),
            h1::Answer::Response(resp) => Sent::Response(resp.map(|body| Returning {
                body,
                checkin: Some(Checkin {
                    pool: Arc::downgrade(self),
                    dest: dest.clone(),
                    born,
                    served: served.saturating_add(1),
                }),
            })),
        }
    }

    /// The most recently used connection to `dest` that the upstream has not closed; expired
    /// and closed ones are dropped.
    fn checkout(&self, dest: &Dest) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        let set = &mut *idle;
        let list = set.by_dest.get_mut(dest)?;
        let now = Instant::now();
        let mut found = None;
        let mut i = list.len();
        while i > 0 {
            i -= 1;
            let mut entry = list.remove(i);
            set.total -= 1;
            // The connection leaves the pool: its readable event need wake nobody now.
            if !self.expired(&entry, now) && entry.conn.h1.is_open(Waker::noop()) {
                found = Some(entry.conn);
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

    fn checkin(&self, dest: Dest, mut conn: Conn) {
        let max = self.settings.keepalive_connections as usize;
        if max == 0 || self.worn_out(&conn) || !conn.h1.is_open(&self.watcher) {
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

    /// Drops expired and closed connections, and destinations left with none; those idle for
    /// a second or more give back their read buffers (a sweep may come microseconds after a
    /// busy connection's checkin, woken by another connection's close).
    fn sweep_now(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(PoisonError::into_inner);
        idle.retain(|e| {
            let keep = !self.expired(e, now) && e.conn.h1.is_open(&self.watcher);
            if keep && now.duration_since(e.since) >= RELEASE_AFTER {
                e.conn.h1.release_buffer();
            }
            keep
        });
    }

    async fn connect(&self, dest: &Dest, timeout: Duration) -> Result<h1::Conn, Error> {
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
            Ok(h1::Conn::new(h1::Stream::Right(Box::new(tls))))
        } else {
            Ok(h1::Conn::new(h1::Stream::Left(tcp)))
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

async fn sweep(pool: Weak<Pool>) {
    let (every, watch) = match pool.upgrade() {
        Some(p) => (
            (p.settings.keepalive_timeout / 2)
                .clamp(Duration::from_secs(1), Duration::from_secs(30)),
            p.watch.clone(),
        ),
        None => return,
    };
    loop {
        // A wake starts the timer over: every sweep checks expiry, whatever woke it.
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = watch.0.notified() => {}
        }
        match pool.upgrade() {
            Some(p) => p.sweep_now(),
            None => return,
        }
    }
}

/// A connection lent to one request: back to its pool when the response body is read to its
/// end, closed if the body is dropped before (HTTP/1 cannot skip the rest of a response).
struct Checkin {
    pool: Weak<Pool>,
    dest: Dest,
    born: Instant,
    served: u32,
}

/// A response body that returns its connection to the pool when it ends.
pub struct Returning {
    body: h1::ResponseBody,
    checkin: Option<Checkin>,
}

impl Returning {
    fn ended(&mut self) {
        let Some(c) = self.checkin.take() else { return };
        if let (Some(h1), Some(pool)) = (self.body.take_reusable(), c.pool.upgrade()) {
            let conn = Conn {
                h1,
                born: c.born,
                served: c.served,
            };
            pool.checkin(c.dest, conn);
        }
    }
}

impl HttpBody for Returning {
    type Data = Bytes;
    type Error = h1::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h1::Error>>> {
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

    const HELLO: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";

    /// A server running `serve` on each connection; counts connections.
    async fn counting_server<F, Fut>(serve: F) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>)
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = conns.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(serve(s));
            }
        });
        (addr, conns)
    }

    /// A keep-alive HTTP/1 server answering `hello` to every request.
    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        counting_server(|mut s| async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 || s.write_all(HELLO).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    fn get() -> Request<Body> {
        Request::builder()
            .uri("/")
            .header("host", "a.test")
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap()
    }

    fn response(sent: Result<Sent, Error>) -> Response<Returning> {
        match sent {
            Ok(Sent::Response(r)) => r,
            Ok(Sent::Switched(..)) => panic!("unexpected 101"),
            Err(e) => panic!("{e}"),
        }
    }

    async fn fetch(pool: &Arc<Pool>, dest: &Dest) -> Bytes {
        let resp = response(pool.send(dest, CONNECT, get()).await);
        resp.into_body().collect().await.unwrap().to_bytes()
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
        let resp = response(pool.send(&dest, CONNECT, get()).await);
        // The head has arrived; the body may or may not be complete yet: only an ended body
        // gives the connection back.
        let body = resp.into_body();
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
        for sent in [a, b, c] {
            response(sent).into_body().collect().await.unwrap();
        }
        assert_eq!(pool.idle_count(), 2);
        tokio::time::sleep(Duration::from_millis(60)).await;
        pool.sweep_now();
        assert_eq!(pool.idle_count(), 0);
    }

    /// An upstream that answers once, waits 50 ms, then does `after` to the idle connection
    /// (and keeps it open); the pool must retire the connection well before its first timed
    /// sweep (30 s here).
    async fn retired_at_once(after: &'static [u8]) {
        let (addr, _) = counting_server(move |mut s| async move {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(HELLO).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if after.is_empty() {
                return;
            }
            let _ = s.write_all(after).await;
            let _ = s.read(&mut buf).await;
        })
        .await;
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        assert_eq!(fetch(&pool, &dest).await, "hello");
        assert_eq!(pool.idle_count(), 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn an_idle_connection_is_retired_on_any_byte_from_its_upstream() {
        // A close.
        retired_at_once(b"").await;
        // A stray byte, as a TLS upstream's late session ticket would arrive.
        retired_at_once(b"x").await;
    }

    #[tokio::test]
    async fn a_sweep_gives_back_idle_read_buffers() {
        let (addr, _) = server().await;
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        assert_eq!(fetch(&pool, &dest).await, "hello");
        let capacity = |pool: &Pool| {
            let idle = pool.idle.lock().unwrap();
            idle.by_dest[&dest][0].conn.h1.buffer_capacity()
        };
        assert!(capacity(&pool) > 0);
        // Just put back: a sweep woken by another connection leaves it alone.
        pool.sweep_now();
        assert!(capacity(&pool) > 0);
        tokio::time::sleep(RELEASE_AFTER).await;
        pool.sweep_now();
        assert_eq!(capacity(&pool), 0);
        // Still fit for the next request, on the same connection.
        assert_eq!(fetch(&pool, &dest).await, "hello");
        assert_eq!(pool.idle_count(), 1);
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

    /// Answers the first request on each connection, then reads the next one and closes
    /// without a word, as an upstream whose keep-alive timer fired at that moment.
    async fn closing_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        counting_server(|mut s| async move {
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(HELLO).await;
            let _ = s.read(&mut buf).await;
        })
        .await
    }

    #[tokio::test]
    async fn a_repeatable_request_goes_again_when_a_reused_connection_closes() {
        let (addr, conns) = closing_server().await;
        let pool = Pool::new(settings());
        let dest = Dest::new(&Upstream::Addr(addr), false);
        for _ in 0..3 {
            assert_eq!(fetch(&pool, &dest).await, "hello");
        }
        assert_eq!(conns.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A POST is not repeated: nginx does not resend a non-idempotent request either.
        let post = Request::post("/")
            .header("host", "a.test")
            .body(Empty::new().map_err(|e| match e {}).boxed_unsync())
            .unwrap();
        assert!(pool.send(&dest, CONNECT, post).await.is_err());
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
