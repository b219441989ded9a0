//! HTTP/2 answers written together. hyper's HTTP/2 server flushes as soon as one stream's
//! frames are out, so with many streams in flight every small answer cost its own TLS record,
//! `writev` and wakeup of the client (0.9 writes per response in the `h2-1k` benchmark, where
//! haproxy sends what one pass of its event loop produced at once: 0.1). [`Batched`] does the
//! same under tokio: a flush only leaves the bytes encrypted in rustls's send buffer and asks for
//! the connection to be polled again; by then the streams made ready by the same I/O events have
//! run and added their frames, and that poll (which reads the socket first) sends everything in
//! one `writev`. rustls's buffer limit (64 KiB) bounds what waits: past it, writing waits for
//! the socket, as before.

use std::io::{self, IoSlice, Write as _};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;

/// A stream over a server-side TLS session that takes plaintext without writing to the socket.
pub trait TlsSession {
    fn session(&mut self) -> &mut rustls::ServerConnection;
}

impl<S> TlsSession for TlsStream<S> {
    fn session(&mut self) -> &mut rustls::ServerConnection {
        self.get_mut().1
    }
}

/// A TLS stream whose flushes are deferred to the connection's next poll. It is the outermost
/// layer, so that every read reaches it, also one that a layer below refuses.
pub struct Batched<IO> {
    inner: IO,
    /// A flush was promised: what was written waits in rustls until the next read.
    owed: bool,
}

impl<IO> Batched<IO>
where
    IO: AsyncRead + AsyncWrite + TlsSession + Unpin,
{
    pub fn new(inner: IO) -> Self {
        Self { inner, owed: false }
    }

    /// Sends what a promised flush left waiting.
    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.owed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            self.owed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Encrypts `bufs` into rustls's send buffer; when that is full, sends it first.
    fn poll_buffer(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
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
        // hyper reads first whenever the connection is polled: the promised flush happens
        // here. A full socket (Pending) wakes the connection again when it drains; reading
        // goes on meanwhile.
        if let Poll::Ready(Err(e)) = self.poll_settle(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
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

    /// Promises the flush: the task is woken to poll the connection again, after the tasks
    /// already due on this thread.
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.owed && self.inner.session().wants_write() {
            self.owed = true;
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // tokio-rustls sends what waits, then close_notify.
        self.owed = false;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Wake, Waker};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    struct Counting(AtomicUsize);

    impl Wake for Counting {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    async fn pair() -> (
        Batched<TlsStream<DuplexStream>>,
        tokio_rustls::client::TlsStream<DuplexStream>,
    ) {
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
        let (s, c) = tokio::io::duplex(1 << 20);
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(s);
        let name = rustls::pki_types::ServerName::try_from("ingress.local").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, c);
        let (s, c) = tokio::join!(accept, connect);
        (Batched::new(s.unwrap()), c.unwrap())
    }

    /// What the client has received so far, without waiting.
    async fn received(client: &mut tokio_rustls::client::TlsStream<DuplexStream>) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(50), client.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[tokio::test]
    async fn flushed_writes_go_out_together_on_the_next_read() {
        let (mut server, mut client) = pair().await;
        let counter = Arc::new(Counting(AtomicUsize::new(0)));
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        for part in [&b"one "[..], b"two"] {
            let mut s = Pin::new(&mut server);
            assert!(
                matches!(s.as_mut().poll_write(&mut cx, part), Poll::Ready(Ok(n)) if n == part.len())
            );
            assert!(matches!(s.poll_flush(&mut cx), Poll::Ready(Ok(()))));
        }
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

    /// A layer that refuses to read (as `ControlFrames` does after a flood).
    struct Refusing(TlsStream<DuplexStream>);

    impl TlsSession for Refusing {
        fn session(&mut self) -> &mut rustls::ServerConnection {
            self.0.session()
        }
    }

    impl AsyncRead for Refusing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Refusing {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            Pin::new(&mut self.0).poll_write(cx, buf)
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn what_waits_goes_out_when_the_layer_below_refuses_to_read() {
        let (server, mut client) = pair().await;
        let mut server = Batched::new(Refusing(server.inner));
        server.write_all(b"GOAWAY").await.unwrap();
        server.flush().await.unwrap();
        let mut buf = [0u8; 16];
        let read =
            tokio::time::timeout(std::time::Duration::from_millis(10), server.read(&mut buf));
        assert!(read.await.is_err(), "the layer below reads nothing");
        assert_eq!(received(&mut client).await, b"GOAWAY");
    }

    #[tokio::test]
    async fn a_full_send_buffer_is_written_out_before_more_is_taken() {
        let (mut server, mut client) = pair().await;
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
    async fn shutdown_sends_what_waits() {
        let (mut server, mut client) = pair().await;
        server.write_all(b"last words").await.unwrap();
        server.flush().await.unwrap();
        server.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last words");
    }
}
