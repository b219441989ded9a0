//! Keep-alive between HTTP/1 requests, as nginx's `ngx_http_set_keepalive` does it: a
//! connection waiting for its next request holds no request buffers.
//!
//! hyper keeps about 16 KiB per HTTP/1 connection (its read and write buffers) for the
//! connection's whole life. Here hyper serves a connection only while requests are under way.
//! Once the connection is idle (no request open, every response handed to the socket, every
//! byte read so far part of a finished request) the hyper connection is dropped and only the
//! socket is kept, parked without a task ([`crate::parked`]) until it becomes readable; the
//! next request's bytes start a new hyper connection on the same socket. An upgraded
//! connection keeps its socket through hyper as before.
//!
//! Timeouts are nginx's: an idle connection is closed after `keep-alive` (75 s, to within a
//! second; hyper's header timer used to close it at `client-header-timeout`, 60 s), on drain
//! at once (TLS: close_notify first), and once the next request's
//! first bytes arrive, hyper's header timer (`client-header-timeout`) runs. A connection that
//! has not sent its first request yet stays with hyper, under that header timer.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use kube_common::idle::Activity;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Duration, Instant};

/// How long a connection stays idle between requests before its hyper connection is dropped.
/// Longer than a busy client's turn-around on a local network, so that one sending request
/// after request keeps its buffers instead of rebuilding them each time (no cost per request
/// under load, benches/README.md); short, because buffers freed late leave holes in the heap
/// that the next connections' small allocations fill: with 10,000 connections opened 64 at a
/// time, 250 ms cost 7.9 KiB per idle connection, 10 ms 2.8 KiB.
pub const GRACE: Duration = Duration::from_millis(10);

/// What the idle phase needs to know of a connection's I/O stack.
pub trait Parkable {
    /// Every byte read so far belongs to a request read whole (false when that is not known).
    fn between_requests(&self) -> bool;
    /// The client's socket underneath, to wait on while idle.
    fn socket(&self) -> &TcpStream;
}

/// A connection's requests: how many have started (upstream's `keep-alive-requests` counts
/// them), and which are under way (each holds a [`Busy`] from its head until hyper has taken
/// its whole response body).
#[derive(Debug, Default)]
pub struct Requests(Arc<AtomicU32>);

impl Requests {
    /// For a connection woken from parking, `served` requests behind it (at least one): it is
    /// parked again once idle even if what woke it was no request (a TLS record without data).
    pub fn resumed(served: u32) -> Self {
        Self(Arc::new(AtomicU32::new(served.max(1))))
    }

    /// The handle the connection's service keeps: a weak one, so that the service itself is
    /// not counted as a request under way.
    pub fn tracker(&self) -> Tracker {
        Tracker(Arc::downgrade(&self.0))
    }

    /// How many requests have started on the connection.
    pub fn count(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    fn none(&self) -> bool {
        Arc::strong_count(&self.0) == 1
    }

    fn started(&self) -> bool {
        self.count() > 0
    }
}

/// Starts [`Busy`] marks for one connection's requests.
#[derive(Clone, Debug)]
pub struct Tracker(Weak<AtomicU32>);

impl Tracker {
    /// Marks a request under way; with its number on the connection (from 1).
    pub fn start(&self) -> (Busy, u32) {
        let requests = self.0.upgrade();
        let nth = requests
            .as_ref()
            .map_or(0, |r| r.fetch_add(1, Ordering::Relaxed).saturating_add(1));
        let busy = Busy {
            _requests: requests,
        };
        (busy, nth)
    }
}

/// One request under way.
#[derive(Debug)]
pub struct Busy {
    _requests: Option<Arc<AtomicU32>>,
}

/// A response body that keeps its connection [`Busy`] until hyper drops it.
pub struct Finishing<B> {
    inner: B,
    _busy: Busy,
}

impl<B> Finishing<B> {
    pub fn new(inner: B, busy: Busy) -> Self {
        Self { inner, _busy: busy }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Finishing<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[derive(Debug)]
struct Shared<S> {
    io: S,
    /// hyper's last read found no bytes waiting.
    read_blocked: bool,
    /// hyper's last write or flush could not finish.
    write_blocked: bool,
}

/// A connection's I/O, lent to one hyper connection after another.
#[derive(Debug)]
pub struct Socket<S>(Arc<Mutex<Shared<S>>>);

impl<S> Socket<S> {
    pub fn new(io: S) -> Self {
        Self(Arc::new(Mutex::new(Shared {
            io,
            read_blocked: false,
            write_blocked: false,
        })))
    }

    fn lock(&self) -> MutexGuard<'_, Shared<S>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The I/O back, once no hyper connection holds it.
    pub fn into_inner(self) -> Option<S> {
        let shared = Arc::try_unwrap(self.0).ok()?;
        Some(
            shared
                .into_inner()
                .unwrap_or_else(PoisonError::into_inner)
                .io,
        )
    }

    /// The I/O for the next hyper connection.
    pub fn lend(&self) -> Lent<S> {
        let mut shared = self.lock();
        shared.read_blocked = false;
        shared.write_blocked = false;
        Lent(self.0.clone())
    }
}

impl<S: Parkable> Socket<S> {
    /// hyper is waiting for the next request with nothing of it read and nothing left to write.
    fn parkable(&self) -> bool {
        let shared = self.lock();
        shared.read_blocked && !shared.write_blocked && shared.io.between_requests()
    }

    /// Resolves once the socket has bytes (or an end) to read.
    #[cfg(test)]
    async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.lock().io.socket().poll_read_ready(cx)).await
    }
}

/// How a hyper connection stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It ended (closed, failed, upgraded).
    Ended,
    /// Idle between requests: it was dropped and the socket kept.
    Parked,
}

/// Drives `session` (a hyper connection over `socket`) until it ends, or until it has been
/// idle between requests for `grace`: a connection busy with one request after another keeps
/// its hyper connection (and buffers) rather than rebuilding them for each request.
/// Idleness is checked each time the session waits: after a poll that left it pending, hyper
/// has done all it can with the bytes it has.
pub async fn until_parked<S, F>(
    session: F,
    socket: &Socket<S>,
    requests: &Requests,
    activity: &Activity,
    grace: Duration,
) -> Outcome
where
    S: Parkable,
    F: Future + Unpin,
{
    let mut session = session;
    // One timer per session, moved forward as the connection stays busy.
    let mut timer = std::pin::pin!(tokio::time::sleep(grace));
    std::future::poll_fn(|cx| {
        if Pin::new(&mut session).poll(cx).is_ready() {
            return Poll::Ready(Outcome::Ended);
        }
        // Before its first request a connection stays with hyper, whose header timeout
        // (`client-header-timeout`) then applies, as nginx's does to a new connection.
        if !(requests.started() && requests.none() && socket.parkable()) {
            return Poll::Pending;
        }
        let due = activity.last_active() + grace;
        if Instant::now() >= due {
            return Poll::Ready(Outcome::Parked);
        }
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        // Pending until `due` (it may have passed since `now` was read).
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Outcome::Parked),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// The I/O as one hyper connection sees it; records whether hyper's last read and write
/// could finish.
#[derive(Debug)]
pub struct Lent<S>(Arc<Mutex<Shared<S>>>);

impl<S> Lent<S> {
    /// Runs `f` on the I/O and records whether it blocked.
    fn with<T>(
        &self,
        f: impl FnOnce(Pin<&mut S>) -> Poll<io::Result<T>>,
        record: impl FnOnce(&mut Shared<S>, bool),
    ) -> Poll<io::Result<T>>
    where
        S: Unpin,
    {
        let mut shared = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let r = f(Pin::new(&mut shared.io));
        record(&mut shared, r.is_pending());
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lent<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_read(cx, buf), |s, b| s.read_blocked = b)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Lent<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.with(|io| io.poll_write(cx, data), |s, b| s.write_blocked = b)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_flush(cx), |s, b| s.write_blocked = b)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(|io| io.poll_shutdown(cx), |s, b| s.write_blocked = b)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.with(
            |io| io.poll_write_vectored(cx, bufs),
            |s, b| s.write_blocked = b,
        )
    }

    fn is_write_vectored(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .io
            .is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::framing::Scanned;

    const GRACE: Duration = Duration::from_millis(20);

    type TestBody = BoxBody<Bytes, Infallible>;

    /// A server of one connection at a time that counts how often a connection was parked.
    /// `/slow` streams the chunks sent on the returned channel; other requests get their
    /// body's length back.
    async fn server(
        grace: Duration,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>, mpsc::Sender<Bytes>) {
        server_with(grace, Requests::default).await
    }

    /// [`server`], its connection's requests tracked from `requests`.
    async fn server_with(
        grace: Duration,
        requests: fn() -> Requests,
    ) -> (std::net::SocketAddr, Arc<AtomicUsize>, mpsc::Sender<Bytes>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let parked = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let slow = Arc::new(Mutex::new(Some(rx)));
        let count = parked.clone();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let activity = Arc::new(Activity::default());
            let stream = kube_common::idle::Tracked::new(stream, activity.clone());
            let socket = Socket::new(Scanned::new(stream, Arc::default()));
            let requests = requests();
            let svc = {
                let tracker = requests.tracker();
                service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (busy, _) = tracker.start();
                    let slow = slow.clone();
                    async move {
                        let body: TestBody = if req.uri().path() == "/slow" {
                            let rx = slow.lock().unwrap().take().unwrap();
                            let frames = futures::stream::unfold(rx, |mut rx| async move {
                                let chunk = rx.recv().await?;
                                Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
                            });
                            BodyExt::boxed(StreamBody::new(frames))
                        } else {
                            let got = req.into_body().collect().await.unwrap().to_bytes();
                            BodyExt::boxed(Full::new(Bytes::from(got.len().to_string())))
                        };
                        Ok::<_, Infallible>(hyper::Response::new(Finishing::new(body, busy)))
                    }
                })
            };
            loop {
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(socket.lend()), svc.clone());
                let outcome =
                    until_parked(Box::pin(conn), &socket, &requests, &activity, grace).await;
                if outcome == Outcome::Ended {
                    return;
                }
                count.fetch_add(1, Ordering::SeqCst);
                if socket.readable().await.is_err() {
                    return;
                }
            }
        });
        (addr, parked, tx)
    }

    /// A client connection; bytes after one response are kept for the next.
    struct Client {
        s: TcpStream,
        got: Vec<u8>,
    }

    impl Client {
        async fn connect(addr: std::net::SocketAddr) -> Self {
            let s = TcpStream::connect(addr).await.unwrap();
            Self { s, got: Vec::new() }
        }

        async fn send(&mut self, bytes: &[u8]) {
            self.s.write_all(bytes).await.unwrap();
        }

        /// Reads one response (Content-Length or chunked) and returns its body.
        async fn response(&mut self) -> String {
            let mut buf = [0u8; 1024];
            loop {
                if let Some((len, body)) = Self::complete(&self.got) {
                    self.got.drain(..len);
                    return body;
                }
                let n = tokio::time::timeout(Duration::from_secs(5), self.s.read(&mut buf))
                    .await
                    .expect("response in time")
                    .unwrap();
                assert!(n > 0, "connection closed after {:?}", self.got);
                self.got.extend_from_slice(&buf[..n]);
            }
        }

        /// The length and body of the response at the start of `got`, once whole.
        fn complete(got: &[u8]) -> Option<(usize, String)> {
            let text = String::from_utf8_lossy(got);
            let end = text.find("\r\n\r\n")? + 4;
            let head = text[..end].to_ascii_lowercase();
            let body = &text[end..];
            if let Some(len) = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse::<usize>().ok())
            {
                return (body.len() >= len).then(|| (end + len, body[..len].to_string()));
            }
            let last = body.find("0\r\n\r\n")? + 5;
            Some((end + last, body[..last].to_string()))
        }
    }

    async fn parked_reaches(parked: &AtomicUsize, n: usize) {
        for _ in 0..200 {
            if parked.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "parked {} times, expected {n}",
            parked.load(Ordering::SeqCst)
        );
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    #[tokio::test]
    async fn an_idle_connection_is_parked_and_serves_its_next_request() {
        let (addr, parked, _tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        for round in 1..=3 {
            c.send(GET).await;
            assert_eq!(c.response().await, "0");
            parked_reaches(&parked, round).await;
        }
    }

    #[tokio::test]
    async fn a_new_connection_stays_with_hyper_until_its_first_request() {
        let (addr, parked, _tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        tokio::time::sleep(GRACE * 5).await;
        assert_eq!(parked.load(Ordering::SeqCst), 0);
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
        parked_reaches(&parked, 1).await;
    }

    #[tokio::test]
    async fn a_woken_connection_is_parked_again_without_a_request() {
        // Woken by a TLS record without data, say: it does not stay with hyper.
        let (addr, parked, _tx) = server_with(GRACE, || Requests::resumed(1)).await;
        let mut c = Client::connect(addr).await;
        parked_reaches(&parked, 1).await;
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
    }

    #[tokio::test]
    async fn blank_lines_keep_the_connection_with_hyper() {
        // They start the next request to hyper (its header timeout then runs): a client
        // sending one now and then must not get a fresh wait each time.
        let (addr, parked, _tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
        parked_reaches(&parked, 1).await;
        c.send(b"\r\n").await;
        tokio::time::sleep(GRACE * 5).await;
        assert_eq!(parked.load(Ordering::SeqCst), 1);
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
        parked_reaches(&parked, 2).await;
    }

    #[tokio::test]
    async fn a_connection_busy_within_the_grace_keeps_its_hyper_connection() {
        let (addr, parked, _tx) = server(Duration::from_secs(60)).await;
        let mut c = Client::connect(addr).await;
        requests_30ms_apart(&mut c, 5).await;
        assert_eq!(parked.load(Ordering::SeqCst), 0);
    }

    /// `n` requests, each answered, 30 ms apart.
    async fn requests_30ms_apart(c: &mut Client, n: usize) {
        for _ in 0..n {
            c.send(GET).await;
            assert_eq!(c.response().await, "0");
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_busy_for_longer_than_the_grace_is_parked_only_once_idle() {
        // Requests 30 ms apart for longer than the grace: the session's first deadline is
        // moved on, not taken as idleness.
        let grace = Duration::from_millis(400);
        let (addr, parked, _tx) = server(grace).await;
        let mut c = Client::connect(addr).await;
        requests_30ms_apart(&mut c, 16).await;
        assert_eq!(parked.load(Ordering::SeqCst), 0);
        parked_reaches(&parked, 1).await;
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
    }

    #[tokio::test]
    async fn a_response_still_streaming_keeps_its_connection() {
        let (addr, parked, tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        c.send(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await;
        tx.send(Bytes::from_static(b"first")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(parked.load(Ordering::SeqCst), 0, "parked mid-response");
        tx.send(Bytes::from_static(b"second")).await.unwrap();
        drop(tx);
        let body = c.response().await;
        assert!(
            body.contains("first") && body.contains("second"),
            "{body:?}"
        );
        parked_reaches(&parked, 1).await;
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
    }

    #[tokio::test]
    async fn pipelined_requests_are_all_answered() {
        let (addr, parked, _tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        let post = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc";
        c.send(&[GET, &post[..], GET].concat()).await;
        assert_eq!(c.response().await, "0");
        assert_eq!(c.response().await, "3");
        assert_eq!(c.response().await, "0");
        parked_reaches(&parked, 1).await;
    }

    #[tokio::test]
    async fn a_request_arriving_in_pieces_is_read_whole() {
        let (addr, parked, _tx) = server(GRACE).await;
        let mut c = Client::connect(addr).await;
        c.send(GET).await;
        assert_eq!(c.response().await, "0");
        parked_reaches(&parked, 1).await;
        // A head, then a body, each in two pieces with pauses between: nothing is parked
        // (and lost) while a request is incomplete.
        let pieces: [&[u8]; 4] = [
            b"POST / HTTP/1.1\r\nHo",
            b"st: x\r\nContent-Length: 10\r\n\r\nhello",
            b"wor",
            b"ld",
        ];
        for piece in pieces {
            assert_eq!(parked.load(Ordering::SeqCst), 1, "parked mid-request");
            c.send(piece).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(c.response().await, "10");
        parked_reaches(&parked, 2).await;
    }
}
