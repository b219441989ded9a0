//! `proxy-send-timeout`: nginx closes the upstream request when two successive writes of the
//! request body are more than the timeout apart. The body is wrapped to record progress each
//! time the upstream connection pulls a frame; a watchdog fires when it stalls mid-body.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Shared between the body and the watchdog.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Milliseconds since `start` of the last pulled frame.
    last_ms: AtomicU64,
    done: AtomicBool,
    /// Reading the client's body failed (bad chunked framing, say): the client's fault, not
    /// the upstream's.
    failed: AtomicBool,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
            failed: AtomicBool::new(false),
        }
    }
}

impl Progress {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Whether reading the client's body failed.
    pub fn client_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Resolves once the body has gone `timeout` without progress; never once it is done.
    pub async fn stalled(&self, timeout: Duration) {
        loop {
            if self.done.load(Ordering::Relaxed) {
                return std::future::pending().await;
            }
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + timeout;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// A request body that reports its progress.
pub struct Tracked<B> {
    inner: B,
    progress: Arc<Progress>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, progress: Arc<Progress>) -> Self
    where
        B: Body,
    {
        progress.touch();
        // Nothing to send (GET, upgrades): the send timeout does not apply at all.
        if inner.is_end_stream() {
            progress.done.store(true, Ordering::Relaxed);
        }
        Self { inner, progress }
    }
}

impl<B> Body for Tracked<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.progress.touch();
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Err(_))) => self.progress.failed.store(true, Ordering::Relaxed),
            Poll::Ready(None) => self.progress.done.store(true, Ordering::Relaxed),
            _ if self.inner.is_end_stream() => self.progress.done.store(true, Ordering::Relaxed),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    #[tokio::test(start_paused = true)]
    async fn done_bodies_never_stall_and_idle_ones_do() {
        let p = Arc::new(Progress::default());
        let mut body = Tracked::new(Full::new(Bytes::from_static(b"x")), p.clone());
        let _ = body.frame().await;
        assert!(body.is_end_stream());
        let timed =
            tokio::time::timeout(Duration::from_secs(10), p.stalled(Duration::from_secs(1))).await;
        assert!(timed.is_err(), "a finished body is never stalled");
        let empty = Arc::new(Progress::default());
        let _body = Tracked::new(http_body_util::Empty::<Bytes>::new(), empty.clone());
        let timed = tokio::time::timeout(
            Duration::from_secs(10),
            empty.stalled(Duration::from_secs(1)),
        )
        .await;
        assert!(timed.is_err(), "an empty body has nothing to send");

        let idle = Progress::default();
        let timed = tokio::time::timeout(
            Duration::from_secs(10),
            idle.stalled(Duration::from_secs(1)),
        )
        .await;
        assert!(timed.is_ok(), "no progress for the timeout is a stall");
    }
}
