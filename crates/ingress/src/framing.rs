//! Conflicting request framing (nginx answers 400 to a request carrying both Content-Length and
//! Transfer-Encoding). hyper accepts such a request, framed by Transfer-Encoding, and drops the
//! Content-Length header before the handler sees it, so the check has to look at the bytes:
//! this wrapper follows the HTTP/1 request stream as hyper reads it (heads parsed with
//! httparse, bodies skipped by their framing) and queues one verdict per request head, which
//! the handler takes in order. On anything it does not follow (HTTP/2, upgrades, parse errors)
//! it stops and records nothing more; hyper's own handling then stands.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Heads longer than this are not followed (hyper refuses them anyway).
const MAX_HEAD: usize = 64 * 1024;
const MAX_HEADERS: usize = 128;

/// Per-connection verdicts, one per request head: true = both Content-Length and
/// Transfer-Encoding were present.
#[derive(Debug, Default)]
pub struct Verdicts(Mutex<VecDeque<bool>>);

impl Verdicts {
    /// The verdict for the next request handled on this connection.
    pub fn next(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop_front()
            .unwrap_or(false)
    }

    fn push(&self, conflict: bool) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(conflict);
    }
}

#[derive(Debug)]
enum State {
    Head(Vec<u8>),
    Body(u64),
    ChunkSize(Vec<u8>),
    ChunkData(u64),
    ChunkCrlf(u8),
    /// Trailer section: length of the current line, and whether it has just had a CR.
    Trailers(usize, bool),
    /// Not followed any more.
    Stopped,
}

/// Follows the request framing of one HTTP/1 connection.
///
/// The keep-alive idle phase (`keepalive`) trusts [`Scanner::between_requests`] to say that
/// hyper holds no part of a request, so where hyper and this scanner could read the same bytes
/// differently (a head ended by bare LFs, bare LF in chunk lines or trailers) it stops instead:
/// a stopped connection is never parked.
#[derive(Debug)]
pub struct Scanner {
    state: State,
    /// Blank lines came after the last request: hyper holds them as the start of the next.
    blank: bool,
    verdicts: Arc<Verdicts>,
}

impl Scanner {
    pub fn new(verdicts: Arc<Verdicts>) -> Self {
        Self {
            state: State::Head(Vec::new()),
            blank: false,
            verdicts,
        }
    }

    /// Every byte fed so far belongs to a request read whole (its head and body); false once
    /// the stream is not followed any more.
    pub fn between_requests(&self) -> bool {
        matches!(&self.state, State::Head(buf) if buf.is_empty()) && !self.blank
    }

    /// Feeds bytes as they are read from the client.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Stopped => return,
                State::Head(buf) => {
                    // Skip blank lines between requests, as HTTP/1 servers do.
                    if buf.is_empty() {
                        let skip = data
                            .iter()
                            .take_while(|b| **b == b'\r' || **b == b'\n')
                            .count();
                        self.blank |= skip > 0;
                        data = &data[skip..];
                        if data.is_empty() {
                            return;
                        }
                        // Common case: the whole head arrived in one read; parse it in place.
                        if let Some(end) = find_head_end(data).map(|i| i + 4) {
                            let (head, rest) = data.split_at(end);
                            self.state = self.after_head(head);
                            data = rest;
                            continue;
                        }
                    }
                    let start = buf.len().saturating_sub(3);
                    let take = data.len().min(MAX_HEAD + 1 - buf.len().min(MAX_HEAD));
                    buf.extend_from_slice(&data[..take]);
                    let Some(end) = find_head_end(&buf[start..]).map(|i| start + i + 4) else {
                        data = &data[take..];
                        if buf.len() > MAX_HEAD {
                            self.state = State::Stopped;
                        }
                        continue;
                    };
                    // Bytes after the head belong to the body or the next request.
                    let extra = buf.len() - end;
                    let head = std::mem::take(buf);
                    data = &data[take - extra..];
                    self.state = self.after_head(&head[..end]);
                }
                State::Body(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::Head(Vec::new());
                    }
                }
                State::ChunkSize(line) => match data.iter().position(|b| *b == b'\n') {
                    None => {
                        line.extend_from_slice(data);
                        data = &[];
                        if line.len() > 1024 {
                            self.state = State::Stopped;
                        }
                    }
                    Some(i) => {
                        line.extend_from_slice(&data[..i]);
                        data = &data[i + 1..];
                        // hyper takes only CRLF here.
                        if line.last() != Some(&b'\r') {
                            self.state = State::Stopped;
                            return;
                        }
                        let text = String::from_utf8_lossy(line);
                        let hex = text.split([';', '\r']).next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(hex, 16) {
                            Ok(0) => State::Trailers(0, false),
                            Ok(size) => State::ChunkData(size),
                            Err(_) => State::Stopped,
                        };
                    }
                },
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64) as usize;
                    *n -= k as u64;
                    data = &data[k..];
                    if *n == 0 {
                        self.state = State::ChunkCrlf(2);
                    }
                }
                State::ChunkCrlf(left) => {
                    let k = usize::from(*left).min(data.len());
                    *left -= k as u8;
                    data = &data[k..];
                    if *left == 0 {
                        self.state = State::ChunkSize(Vec::new());
                    }
                }
                State::Trailers(line_len, cr) => {
                    let b = data[0];
                    data = &data[1..];
                    match (b, *cr) {
                        (b'\n', true) if *line_len == 0 => self.state = State::Head(Vec::new()),
                        (b'\n', true) => (*line_len, *cr) = (0, false),
                        (b'\r', false) => *cr = true,
                        (b'\n' | b'\r', _) | (_, true) => self.state = State::Stopped,
                        _ => *line_len += 1,
                    }
                }
            }
        }
    }

    fn after_head(&mut self, head: &[u8]) -> State {
        // Uninitialised, as hyper parses: filling 128 empty headers first cost more than
        // parsing a small head.
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let parsed = req.parse_with_uninit_headers(head, &mut headers);
        // httparse (hyper's parser) also ends a head at "\n\n" or "\r\n\n": then it ends
        // before the "\r\n\r\n" found here, and the two would disagree on where the body starts.
        if !matches!(parsed, Ok(httparse::Status::Complete(n)) if n == head.len()) {
            return State::Stopped;
        }
        self.blank = false;
        let mut content_length = None;
        let mut te = None::<String>;
        let mut upgrade = req.method == Some("CONNECT");
        for h in req.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                content_length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .or(Some(u64::MAX));
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                te = Some(String::from_utf8_lossy(h.value).to_ascii_lowercase());
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                upgrade = true;
            }
        }
        self.verdicts.push(content_length.is_some() && te.is_some());
        if upgrade {
            return State::Stopped;
        }
        match (te, content_length) {
            (Some(te), _) if te.split(',').next_back().map(str::trim) == Some("chunked") => {
                State::ChunkSize(Vec::new())
            }
            // hyper answers 400 and closes.
            (Some(_), _) => State::Stopped,
            (None, Some(u64::MAX)) => State::Stopped,
            (None, Some(n)) if n > 0 => State::Body(n),
            _ => State::Head(Vec::new()),
        }
    }
}

/// Where the first CRLFCRLF starts. Found from the line feeds: a head has a few lines, and a
/// one-shot substring search costs more to set up than that.
fn find_head_end(data: &[u8]) -> Option<usize> {
    memchr::memchr_iter(b'\n', data)
        .find(|&i| i >= 3 && data[i - 3..=i] == *b"\r\n\r\n")
        .map(|i| i - 3)
}

/// An I/O stream whose incoming bytes are followed by a [`Scanner`].
pub struct Scanned<S> {
    inner: S,
    scanner: Scanner,
}

impl<S> Scanned<S> {
    pub fn new(inner: S, verdicts: Arc<Verdicts>) -> Self {
        Self {
            inner,
            scanner: Scanner::new(verdicts),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn scanner(&self) -> &Scanner {
        &self.scanner
    }

    /// The I/O underneath, once no request is partly read.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Scanned<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.scanner.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Scanned<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdicts_of(chunks: &[&[u8]]) -> Vec<bool> {
        let v = Arc::new(Verdicts::default());
        let mut s = Scanner::new(v.clone());
        for c in chunks {
            s.feed(c);
        }
        let mut out = Vec::new();
        while let Some(x) = v.0.lock().expect("lock").pop_front() {
            out.push(x);
        }
        out
    }

    #[test]
    fn a_head_ends_at_the_first_crlf_crlf() {
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\r\n\r\n"),
            Some(23)
        );
        assert_eq!(find_head_end(b"\r\n\r\n"), Some(0));
        assert_eq!(find_head_end(b"\n\r\n\r\n"), Some(1));
        for none in [&b""[..], b"\n", b"\r\n\r", b"a\n\n", b"a\r\n\n\r\n"] {
            assert_eq!(find_head_end(none), None, "{none:?}");
        }
        // Every string of CR, LF and another byte up to 8 long, against a plain search.
        let naive = |d: &[u8]| d.windows(4).position(|w| w == b"\r\n\r\n");
        let mut data = Vec::new();
        for len in 0..=8u32 {
            for n in 0..3usize.pow(len) {
                data.clear();
                data.extend((0..len).map(|i| b"\r\na"[n / 3usize.pow(i) % 3]));
                assert_eq!(find_head_end(&data), naive(&data), "{data:?}");
            }
        }
    }

    #[test]
    fn a_head_with_more_fields_than_followed_stops_the_scanner() {
        let mut head = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            head.extend_from_slice(format!("X-{i}: 1\r\n").as_bytes());
        }
        head.extend_from_slice(b"\r\n");
        let mut s = Scanner::new(Arc::new(Verdicts::default()));
        s.feed(&head);
        assert!(matches!(s.state, State::Stopped));
        assert!(!s.between_requests());
    }

    #[test]
    fn follows_keep_alive_requests_with_bodies() {
        let stream = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
GET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n\
POST /d HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert_eq!(verdicts_of(&[stream]), vec![false, false, false, true]);
        // Byte by byte gives the same answer.
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert_eq!(verdicts_of(&bytes), vec![false, false, false, true]);
    }

    #[test]
    fn body_text_that_looks_like_a_head_is_not_a_head() {
        let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut stream = format!(
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        stream.extend_from_slice(body);
        stream.extend_from_slice(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(verdicts_of(&[&stream]), vec![false, false]);
    }

    fn scanner_after(chunks: &[&[u8]]) -> Scanner {
        let mut s = Scanner::new(Arc::default());
        for c in chunks {
            s.feed(c);
        }
        s
    }

    #[test]
    fn knows_when_every_byte_belongs_to_a_finished_request() {
        let get = &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..];
        let chunked = &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"[..];
        assert!(scanner_after(&[]).between_requests());
        assert!(scanner_after(&[get, get]).between_requests());
        assert!(!scanner_after(&[b"GET / HT"]).between_requests());
        assert!(!scanner_after(&[chunked, b"3\r\nab"]).between_requests());
        assert!(!scanner_after(&[chunked, b"0\r\nX-T: 1\r\n"]).between_requests());
        assert!(scanner_after(&[chunked, b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"]).between_requests());
        // Blank lines after a request are the start of the next one to hyper.
        assert!(!scanner_after(&[get, b"\r\n"]).between_requests());
        assert!(scanner_after(&[get, b"\r\n", get]).between_requests());
    }

    #[test]
    fn stops_where_hyper_could_frame_differently() {
        // A head ended by a bare LF: httparse ends it before the "\r\n\r\n" in the body.
        let lf = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\n\r\n\r\nGET ";
        assert!(!scanner_after(&[lf]).between_requests());
        assert!(!scanner_after(&[lf, b"/x HTTP/1.1\r\n\r\n"]).between_requests());
        let chunked = &b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"[..];
        for tail in [
            &b"0\r\n\n"[..],
            b"0\n\r\n",
            b"0\r\nX-T: 1\n\r\n",
            b"0\r\n\rX",
        ] {
            let s = scanner_after(&[chunked, tail, b"\r\n\r\n"]);
            assert!(!s.between_requests(), "{:?}", String::from_utf8_lossy(tail));
        }
    }

    #[test]
    fn stops_on_http2_and_upgrades() {
        assert!(verdicts_of(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]).is_empty());
        let up = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nGET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(
            verdicts_of(&[up]),
            vec![false],
            "tunnel bytes are not requests"
        );
    }
}
