//! HTTP/2 answers written together. hyper's HTTP/2 server flushes as soon as one stream's
//! frames are out, so with many streams in flight every small answer cost its own `writev` and
//! wakeup of the client (0.9 writes per response in the `h2-1k` benchmark, where haproxy sends
//! what one pass of its event loop produced at once: 0.1). [`Batched`] does the same under
//! tokio: a flush only leaves the bytes encrypted in rustls's send buffer and asks for the
//! connection to be polled again; by then the streams made ready by the same I/O events have
//! run and added their frames, and that poll (h2 reads the socket first on every poll) sends
//! everything in one `writev` (TLS records stay one per write, as before). rustls's buffer limit
//! (64 KiB) bounds what waits: past it, writing waits for the socket, as before.
//!
//! Only HTTP/2 is batched: flushes wait only once the client's connection preface has been
//! read. A client may speak HTTP/1 on a connection that negotiated h2 (hyper's auto builder
//! serves it), and HTTP/1 does not read on every poll (a streamed body with a pipelined request
//! waiting, an upgraded tunnel).

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream over a server-side TLS session that takes plaintext without writing to the socket.
pub(crate) trait TlsSession {
    fn session(&mut self) -> &mut rustls::ServerConnection;
}

impl<S> TlsSession for TlsStream<S> {
    fn session(&mut self) -> &mut rustls::ServerConnection {
        self.get_mut().1
    }
}

/// What the client has shown it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// This many bytes of the HTTP/2 preface read so far: flushes are flushes.
    Sniffing(usize),
    /// HTTP/2: flushes wait for the next poll.
    Http2,
    /// Anything else: flushes are flushes.
    Other,
}

impl Mode {
    /// After `bytes` more of the client's stream.
    fn after(self, bytes: &[u8]) -> Self {
        let Mode::Sniffing(seen) = self else {
            return self;
        };
        let n = (PREFACE.len() - seen).min(bytes.len());
        if bytes[..n] != PREFACE[seen..seen + n] {
            Mode::Other
        } else if seen + n == PREFACE.len() {
            Mode::Http2
        } else {
            Mode::Sniffing(seen + n)
        }
    }
}

/// A TLS stream whose flushes are deferred to the connection's next poll once it speaks
/// HTTP/2. It is the outermost layer, so that every read reaches it, also one that a layer
/// below refuses.
pub(crate) struct Batched<IO: AsyncWrite + TlsSession + Unpin> {
    inner: IO,
    mode: Mode,
    /// A flush was promised: what was written waits in rustls until the next read.
    owed: bool,
}

impl<IO> Batched<IO>
where
    IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
{
    pub(crate) fn new(inner: IO) -> Self {
        Self {
            inner,
            mode: Mode::Sniffing(0),
            owed: false,
        }
    }

    /// Sends what a promised flush left waiting.
    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.owed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.owed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypts `bufs` into rustls's send buffer (HTTP/2); when that is full, sends it first.
    fn poll_buffer(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.mode != Mode::Http2 {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        let n = self.inner.session().writer().write_vectored(bufs)?;
        if n > 0 || bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(n));
        }
        ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
        self.owed = false;
        // Zero again means rustls takes nothing more (a closed session): the caller's
        // WriteZero.
        Poll::Ready(self.inner.session().writer().write_vectored(bufs))
    }
}

impl<IO> AsyncRead for Batched<IO>
where
    IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // h2 reads first whenever the connection is polled: the promised flush happens here.
        // A full socket (Pending) wakes the connection again when it drains; reading goes on
        // meanwhile.
        if let Poll::Ready(Err(e)) = self.poll_settle(cx) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(self.mode, Mode::Sniffing(_)) && matches!(polled, Poll::Ready(Ok(()))) {
            self.mode = self.mode.after(&buf.filled()[before..]);
        }
        polled
    }
}

impl<IO> AsyncWrite for Batched<IO>
where
    IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_buffer(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_buffer(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// HTTP/2: promises the flush; the task is woken to poll the connection again, after the
    /// tasks already due on this thread.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.mode != Mode::Http2 {
            return Pin::new(&mut self.inner).poll_flush(cx);
        }
        if !self.owed && self.inner.session().wants_write() {
            self.owed = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // tokio-rustls sends what waits, then close_notify; until it has, the flush is owed
        // (a flush meanwhile must not wake the task again).
        let done = ready!(Pin::new(&mut self.inner).poll_shutdown(cx));
        self.owed = false;
        Poll::Ready(done)
    }
}

impl<IO: AsyncWrite + TlsSession + Unpin> Drop for Batched<IO> {
    /// A connection dropped while it owed a flush (an idle timeout, a CONNECT that hyper ends
    /// at once) still sends what the socket takes now, as it would have before.
    fn drop(&mut self) {
        if self.owed {
            let _ = Pin::new(&mut self.inner).poll_flush(&mut Context::from_waker(Waker::noop()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Wake;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    type Client = tokio_rustls::client::TlsStream<DuplexStream>;

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn counting() -> (Arc<Counting>, Waker) {
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        (counter.clone(), Waker::from(counter))
    }

    /// A TLS connection over an in-memory pipe of `capacity` bytes each way.
    async fn tls_pair(capacity: usize) -> (TlsStream<DuplexStream>, Client) {
        let cert = crate::tls_store::fake_certificate().unwrap();
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(
            (*cert.key).clone(),
        )));
        let client = kube_common::tls::insecure_client_config();
        let (s, c) = tokio::io::duplex(capacity);
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s);
        let name = rustls::pki_types::ServerName::try_from("ingress.local").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, c);
        let (s, c) = tokio::join!(accept, connect);
        (s.unwrap(), c.unwrap())
    }

    /// The client opens with `first`; the server reads it.
    async fn opened<IO>(server: &mut Batched<IO>, client: &mut Client, first: &[u8])
    where
        IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
    {
        client.write_all(first).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; first.len()];
        server.read_exact(&mut got).await.unwrap();
    }

    /// What the client has received so far, without waiting for more.
    async fn received(client: &mut Client) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), client.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    /// Writes `part` and flushes, polled once each.
    fn write_and_flush<IO>(server: &mut Batched<IO>, cx: &mut Context<'_>, part: &[u8])
    where
        IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
    {
        let mut s = Pin::new(server);
        assert!(matches!(s.as_mut().poll_write(cx, part), Poll::Ready(Ok(n)) if n == part.len()));
        assert!(matches!(s.poll_flush(cx), Poll::Ready(Ok(()))));
    }

    #[tokio::test]
    async fn http2_flushes_go_out_together_on_the_next_read() {
        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, PREFACE).await;
        let (counter, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        write_and_flush(&mut server, &mut cx, b"one ");
        write_and_flush(&mut server, &mut cx, b"two");
        // One wakeup for both flushes, and nothing sent yet.
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
        assert!(received(&mut client).await.is_empty());
        // The next read sends both.
        let mut buf = [0u8; 16];
        let mut rb = ReadBuf::new(&mut buf);
        assert!(
            Pin::new(&mut server)
                .poll_read(&mut cx, &mut rb)
                .is_pending()
        );
        assert_eq!(received(&mut client).await, b"one two");
        // Nothing owed: a flush with nothing written wakes nobody.
        assert!(Pin::new(&mut server).poll_flush(&mut cx).is_ready());
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn other_protocols_and_the_server_preface_are_flushed_at_once() {
        let (counter, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        // HTTP/1 on a connection that negotiated h2.
        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, b"GET / HTTP/1.1\r\n").await;
        write_and_flush(&mut server, &mut cx, b"HTTP/1.1 200 OK\r\n");
        assert_eq!(received(&mut client).await, b"HTTP/1.1 200 OK\r\n");
        // HTTP/2's server SETTINGS may go out before the client's preface has been read.
        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, &PREFACE[..10]).await;
        write_and_flush(&mut server, &mut cx, b"settings");
        assert_eq!(received(&mut client).await, b"settings");
        assert_eq!(counter.0.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn the_preface_is_followed_across_reads() {
        let m = Mode::Sniffing(0).after(&PREFACE[..5]);
        assert_eq!(m, Mode::Sniffing(5));
        let mut rest = PREFACE[5..].to_vec();
        rest.extend_from_slice(b"\0\0\x12\x04");
        assert_eq!(m.after(&rest), Mode::Http2);
        assert_eq!(m.after(b""), m);
        assert_eq!(Mode::Sniffing(0).after(b"PRI * HTTP/1.1"), Mode::Other);
        assert_eq!(Mode::Other.after(PREFACE), Mode::Other);
    }

    /// A layer that stops reading (as `ControlFrames` does after a flood).
    struct Refusing {
        inner: TlsStream<DuplexStream>,
        refuse: bool,
    }

    impl TlsSession for Refusing {
        fn session(&mut self) -> &mut rustls::ServerConnection {
            self.inner.session()
        }
    }

    impl AsyncRead for Refusing {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            if self.refuse {
                return Poll::Pending;
            }
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Refusing {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn what_waits_goes_out_when_the_layer_below_stops_reading() {
        let (inner, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(Refusing {
            inner,
            refuse: false,
        });
        opened(&mut server, &mut client, PREFACE).await;
        server.inner.refuse = true;
        server.write_all(b"GOAWAY").await.unwrap();
        server.flush().await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_millis(10), server.read(&mut buf));
        assert!(read.await.is_err(), "the layer below reads nothing");
        assert_eq!(received(&mut client).await, b"GOAWAY");
    }

    #[tokio::test]
    async fn a_full_send_buffer_is_written_out_before_more_is_taken() {
        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, PREFACE).await;
        // Four times rustls's default limit of 64 KiB, written without a flush.
        let body = vec![7u8; 256 * 1024];
        let reader = tokio::spawn(async move {
            let mut got = vec![0u8; 256 * 1024];
            client.read_exact(&mut got).await.map(|_| got)
        });
        server.write_all(&body).await.unwrap();
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), body);
    }

    #[tokio::test]
    async fn shutdown_sends_what_waits_and_drop_what_the_socket_takes() {
        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, PREFACE).await;
        server.write_all(b"last words").await.unwrap();
        server.flush().await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");

        let (tls, mut client) = tls_pair(1 << 20).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, PREFACE).await;
        server.write_all(b"dropped").await.unwrap();
        server.flush().await.unwrap();
        drop(server);
        assert_eq!(received(&mut client).await, b"dropped");
    }

    #[tokio::test]
    async fn a_shutdown_held_up_by_a_full_socket_does_not_wake_in_a_loop() {
        // The client reads nothing; the pipe holds 16 KiB.
        let (tls, mut client) = tls_pair(16 * 1024).await;
        let mut server = Batched::new(tls);
        opened(&mut server, &mut client, PREFACE).await;
        let (counter, waker) = counting();
        let mut cx = Context::from_waker(&waker);
        let mut s = Pin::new(&mut server);
        assert!(s.as_mut().poll_write(&mut cx, &[1u8; 60 * 1024]).is_ready());
        for _ in 0..3 {
            assert!(s.as_mut().poll_shutdown(&mut cx).is_pending());
            assert!(s.as_mut().poll_flush(&mut cx).is_ready());
        }
        assert!(counter.0.load(Ordering::SeqCst) <= 1);
    }
}
