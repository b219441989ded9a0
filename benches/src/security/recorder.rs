//! The backend of the security runs: a small HTTP/1.1 server that records every request a proxy
//! forwards (method, path, Host, raw control bytes), so a smuggling vector that reached it, or a second
//! request hidden in a first one's body, shows up by its path.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::Error;

/// Size of `/big`, the response slow readers are given.
pub const BIG: usize = 1 << 20;
/// Requests kept for inspection; older ones are dropped (floods send millions).
const KEEP: usize = 10_000;
/// A request head larger than this is answered 431 and the connection closed.
const MAX_HEAD: usize = 64 * 1024;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    /// The Host header as forwarded.
    pub host: String,
    /// The head carried a control byte other than CR, LF and HTAB (or a bare CR): forwarded
    /// unsanitised.
    pub raw_ctl: bool,
}

#[derive(Default)]
struct Log {
    seen: Vec<Seen>,
    total: u64,
}

/// The running backend; it stops when dropped.
pub struct Recorder {
    pub addr: SocketAddr,
    log: Arc<Mutex<Log>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    pub async fn start() -> Result<Self, Error> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let log = Arc::new(Mutex::new(Log::default()));
        let l = log.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, l.clone()));
            }
        });
        Ok(Recorder { addr, log, task })
    }

    /// Requests seen whose path starts with `prefix`.
    pub fn seen(&self, prefix: &str) -> Vec<Seen> {
        self.log
            .lock()
            .map(|l| {
                l.seen
                    .iter()
                    .filter(|s| s.path.starts_with(prefix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every request seen so far.
    pub fn total(&self) -> u64 {
        self.log.lock().map(|l| l.total).unwrap_or(0)
    }
}

fn record(log: &Mutex<Log>, seen: Seen) {
    if let Ok(mut l) = log.lock() {
        l.total += 1;
        if l.seen.len() >= KEEP {
            l.seen.drain(..KEEP / 2);
        }
        l.seen.push(seen);
    }
}

/// How the body of a parsed head is framed.
enum Framing {
    Length(usize),
    Chunked,
}

/// One connection: heads parsed with httparse, bodies read by Content-Length or chunked, every
/// request answered 200 (`/big` with [`BIG`] bytes).
async fn serve(mut stream: TcpStream, log: Arc<Mutex<Log>>) {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    loop {
        let Some((seen, framing, used)) = read_head(&mut stream, &mut buf, &log).await else {
            return;
        };
        buf.drain(..used);
        // Recorded on the head: a proxy that forwards a head and then aborts its body has still
        // forwarded it.
        record(&log, seen.clone());
        let body = match framing {
            Some(Framing::Length(n)) => read_exact_len(&mut stream, &mut buf, n).await,
            Some(Framing::Chunked) => read_chunked(&mut stream, &mut buf).await,
            None => None,
        };
        if body.is_none() {
            return;
        }
        let size = if seen.path.starts_with("/big") {
            BIG
        } else {
            3
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {size}\r\ncontent-type: text/plain\r\n\r\n"
        );
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        let ok = if size == 3 {
            stream.write_all(b"ok\n").await
        } else {
            stream.write_all(&vec![b'x'; size]).await
        };
        if ok.is_err() {
            return;
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<()> {
    let mut chunk = [0u8; 16 * 1024];
    let n = stream.read(&mut chunk).await.ok()?;
    if n == 0 {
        return None;
    }
    buf.extend_from_slice(&chunk[..n]);
    Some(())
}

async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    log: &Mutex<Log>,
) -> Option<(Seen, Option<Framing>, usize)> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 128];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(used)) => {
                let host = req
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("host"))
                    .map(|h| String::from_utf8_lossy(h.value).into_owned())
                    .unwrap_or_default();
                let seen = Seen {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    host,
                    raw_ctl: has_ctl(&buf[..used]),
                };
                return Some((seen, framing(req.headers), used));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => fill(stream, buf).await?,
            _ => {
                // A head this server cannot parse still reached it: recorded by its path.
                if let Some(seen) = unparsed(buf) {
                    record(log, seen);
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    .await;
                return None;
            }
        }
    }
}

/// What can be read off a head httparse refused (a forwarded NUL, say).
fn unparsed(buf: &[u8]) -> Option<Seen> {
    let line = buf.split(|&b| b == b'\n').next()?;
    let mut parts = line.split(|&b| b == b' ');
    let method = String::from_utf8_lossy(parts.next()?).into_owned();
    let path = String::from_utf8_lossy(parts.next()?).into_owned();
    let end = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(buf.len());
    Some(Seen {
        method,
        path,
        host: String::new(),
        raw_ctl: has_ctl(&buf[..end]),
    })
}

fn has_ctl(head: &[u8]) -> bool {
    head.iter().enumerate().any(|(i, &b)| match b {
        b'\r' => head.get(i + 1) != Some(&b'\n'),
        b'\n' | b'\t' => false,
        b => b < 0x20 || b == 0x7f,
    })
}

/// Transfer-Encoding chunked wins over Content-Length, as RFC 9112 says.
fn framing(headers: &[httparse::Header<'_>]) -> Option<Framing> {
    let mut length = 0;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Some(Framing::Chunked);
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value).ok()?.trim().parse().ok()?;
        }
    }
    Some(Framing::Length(length))
}

async fn read_exact_len(stream: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Option<usize> {
    while buf.len() < n {
        fill(stream, buf).await?;
    }
    buf.drain(..n);
    Some(n)
}

async fn read_line(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    loop {
        if let Some(i) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..i]).into_owned();
            buf.drain(..i + 2);
            return Some(line);
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        fill(stream, buf).await?;
    }
}

async fn read_chunked(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let mut total = 0;
    loop {
        let line = read_line(stream, buf).await?;
        let size = line.split(';').next()?.trim();
        let size = usize::from_str_radix(size, 16).ok()?;
        if size == 0 {
            // Trailers, up to the empty line.
            while !read_line(stream, buf).await?.is_empty() {}
            return Some(total);
        }
        read_exact_len(stream, buf, size).await?;
        total += size;
        if read_line(stream, buf).await?.is_empty() {
            continue;
        }
        return None;
    }
}
