//! HTTP/2 control-frame floods: hyper answers every SETTINGS and PING a client sends and never
//! closes the connection over them, so a client could keep the proxy busy for 15 bytes a frame
//! for as long as it likes. An HTTP/2 connection is read through [`ControlFrames`], which follows
//! the frame boundaries (the client preface, then 9-byte headers and their lengths) and counts
//! the SETTINGS and PING frames that are not acknowledgements against a budget. Past it, the
//! connection's flood token is cancelled (the server sends GOAWAY and closes the connection a
//! moment later) and nothing more is read from that client.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

/// Control frames a client may send at once; a browser or gRPC client sends a handful.
const BURST: f64 = 1000.0;
/// And per second after that.
const PER_SECOND: f64 = 100.0;

const PREFACE_LEN: usize = 24;
const HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the reader is in the client's byte stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Position {
    Preface { left: usize },
    Header { have: usize },
    Payload { left: usize },
}

/// The frame scanner and the budget, apart from I/O (tested on byte slices).
#[derive(Debug)]
struct Scanner {
    position: Position,
    header: [u8; HEADER_LEN],
    tokens: f64,
    refilled: Instant,
}

impl Scanner {
    fn new() -> Self {
        Self {
            position: Position::Preface { left: PREFACE_LEN },
            header: [0; HEADER_LEN],
            tokens: BURST,
            refilled: Instant::now(),
        }
    }

    /// Follows `bytes`; false once the client has spent its control-frame budget.
    fn scan(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        while !bytes.is_empty() {
            match self.position {
                Position::Preface { left } | Position::Payload { left } => {
                    let n = left.min(bytes.len());
                    bytes = &bytes[n..];
                    self.position = if n == left {
                        Position::Header { have: 0 }
                    } else if matches!(self.position, Position::Preface { .. }) {
                        Position::Preface { left: left - n }
                    } else {
                        Position::Payload { left: left - n }
                    };
                }
                Position::Header { have } => {
                    let n = (HEADER_LEN - have).min(bytes.len());
                    self.header[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < HEADER_LEN {
                        self.position = Position::Header { have: have + n };
                        continue;
                    }
                    if !self.frame(now) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// A complete frame header: charge it if it is a control frame; what comes next.
    fn frame(&mut self, now: Instant) -> bool {
        let h = self.header;
        let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
        self.position = if len == 0 {
            Position::Header { have: 0 }
        } else {
            Position::Payload { left: len }
        };
        let control = matches!(h[3], SETTINGS | PING) && h[4] & ACK == 0;
        if !control {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * PER_SECOND).min(BURST);
        self.refilled = now;
        self.tokens -= 1.0;
        self.tokens >= 0.0
    }
}

/// A client's HTTP/2 byte stream, read with a budget on control frames.
pub struct ControlFrames<IO> {
    inner: IO,
    scanner: Scanner,
    /// Cancelled when the budget is spent: the connection's driver sends GOAWAY and closes it.
    over_budget: CancellationToken,
    stopped: bool,
}

impl<IO> ControlFrames<IO> {
    pub fn new(inner: IO, over_budget: CancellationToken) -> Self {
        Self {
            inner,
            scanner: Scanner::new(),
            over_budget,
            stopped: false,
        }
    }
}

/// Writes pass through: the batching layer above reaches the TLS session beneath.
impl<IO: crate::batched_writes::TlsSession> crate::batched_writes::TlsSession
    for ControlFrames<IO>
{
    fn session(&mut self) -> &mut rustls::ServerConnection {
        self.inner.session()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for ControlFrames<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.stopped {
            // Nothing more from this client; the GOAWAY goes out, the connection closes.
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let now = Instant::now();
            let this = &mut *self;
            if !this.scanner.scan(&buf.filled()[before..], now) {
                tracing::warn!("HTTP/2 control frame flood: closing the connection");
                this.stopped = true;
                this.over_budget.cancel();
                buf.set_filled(before);
                return Poll::Pending;
            }
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for ControlFrames<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend([kind, flags, 0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn preface() -> Vec<u8> {
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()
    }

    #[test]
    fn a_ping_flood_spends_the_budget_acks_and_data_do_not() {
        let now = Instant::now();
        let mut s = Scanner::new();
        assert!(s.scan(&preface(), now));
        let data = frame(0x0, 0, &[b'x'; 100]);
        let ack = frame(PING, ACK, &[0; 8]);
        for _ in 0..5000 {
            assert!(s.scan(&data, now) && s.scan(&ack, now));
        }
        let ping = frame(PING, 0, &[0; 8]);
        let mut sent = 0;
        while s.scan(&ping, now) {
            sent += 1;
            assert!(sent <= 1000, "the burst is bounded");
        }
        assert_eq!(sent, 1000);
    }

    #[test]
    fn the_budget_refills_over_time() {
        let start = Instant::now();
        let mut s = Scanner::new();
        assert!(s.scan(&preface(), start));
        let settings = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        for _ in 0..1000 {
            assert!(s.scan(&settings, start));
        }
        let later = start + Duration::from_secs(1);
        for _ in 0..100 {
            assert!(s.scan(&settings, later), "100 a second come back");
        }
        assert!(!s.scan(&settings, later));
    }

    #[test]
    fn frames_split_across_reads_are_followed() {
        let now = Instant::now();
        let mut bytes = preface();
        for _ in 0..1001 {
            bytes.extend(frame(0x1, 0x4, b"headers"));
            bytes.extend(frame(PING, 0, &[7; 8]));
        }
        let mut s = Scanner::new();
        let ok = bytes.chunks(5).all(|c| s.scan(c, now));
        assert!(
            !ok,
            "1001 pings over a burst of 1000, however they are split"
        );
        let mut s = Scanner::new();
        assert!(
            bytes[..bytes.len() - 17 * 2]
                .chunks(7)
                .all(|c| s.scan(c, now))
        );
    }
}
