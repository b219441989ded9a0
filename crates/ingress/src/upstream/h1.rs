//! An HTTP/1.1 client exchange driven by the request's own task, as nginx's upstream module
//! drives its connection: the request is written, the head read and the body decoded on the
//! task that serves the client. hyper's client connection needs a task of its own per
//! connection, and a channel, a oneshot and a body channel per request (with a wakeup at each
//! hand-over); here nothing crosses tasks.
//!
//! Framing follows RFC 9112 §6.3 as nginx applies it: no body for HEAD, 1xx, 204 and 304;
//! `Transfer-Encoding` must be `chunked` alone and never come with `Content-Length` (nginx
//! answers 502 to either); otherwise the body runs to the connection's close. A connection
//! goes back to the pool only when the request went out whole and the response ended exactly
//! where the next one would start.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::proxy::forward::connection_has;
use crate::proxy::{Body, BoxError};

/// The most a connection reads ahead of its client, the response head included: hyper's
/// default (about 400 KiB) let 1,000 slow readers pin 800 MiB (benches/README.md,
/// `UPSTREAM_READ_BUFFER`). A head this large is refused, as nginx refuses one over its
/// `proxy_buffer_size`.
const READ_BUFFER: usize = 16 * 1024;
/// hyper's default for a response head.
const MAX_HEADERS: usize = 100;
/// A chunk-size line with its extensions; a trailer section.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream I/O: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before answering")]
    Closed,
    #[error("upstream response head: {0}")]
    Parse(httparse::Error),
    #[error("upstream response head is over {READ_BUFFER} bytes")]
    HeadTooLarge,
    #[error("upstream response: {0}")]
    Framing(&'static str),
    #[error("upstream response body ended early")]
    Truncated,
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
    #[error("request body does not match its Content-Length")]
    RequestLength,
}

/// The byte stream to one upstream.
pub type Stream = Either<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// A connection between exchanges: the stream and what it read ahead (nothing, when it is
/// fit for another request).
pub struct Conn {
    io: Stream,
    buf: BytesMut,
}

/// The request as written upstream: its head encoded once (a request sent again on another
/// connection reuses it) and its body, if it has one.
pub struct Outgoing {
    head: Bytes,
    body: Option<Body>,
    length: Option<u64>,
    head_only: bool,
    /// Bodiless and idempotent: safe to send again. Fixed when made, as the body is taken by
    /// the first exchange.
    replayable: bool,
}

/// What came back.
pub enum Answer {
    Response(Response<ResponseBody>),
    /// A 101: the connection is the tunnel's from here, with what the upstream sent after the
    /// head.
    Switched(Response<()>, Upgraded),
}

/// An upgraded connection: the stream and the bytes already read past the 101's head.
pub struct Upgraded {
    pub io: Stream,
    pub read_ahead: Bytes,
}

/// A failed exchange. `stale` says nothing was answered and the request can go again on
/// another connection: a kept-alive connection the upstream closed as it was reused.
pub struct Failed {
    pub error: Error,
    pub stale: bool,
}

impl Outgoing {
    /// Encodes `parts` (origin-form target, headers already rewritten for the upstream).
    /// A body without `Content-Length` goes chunked; one with it is held to it.
    pub fn new(parts: &http::request::Parts, body: Body) -> Result<Self, Error> {
        let body = (!body.is_end_stream()).then_some(body);
        let length = content_length(&parts.headers).map_err(|_| Error::RequestLength)?;
        let chunked = body.is_some() && length.is_none();
        let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        Ok(Self {
            head: encode_head(&parts.method, target, &parts.headers, chunked),
            replayable: body.is_none() && parts.method.is_idempotent(),
            body,
            length,
            head_only: parts.method == Method::HEAD,
        })
    }
}

/// The request line and header section, written without formatting machinery.
fn encode_head(method: &Method, target: &str, headers: &HeaderMap, chunked: bool) -> Bytes {
    let size = headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + method.as_str().len()
        + target.len()
        + 64;
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // Names and values cannot hold CR or LF (the http crate refuses them), so nothing a
    // client sent can start a header or a request of its own here.
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if chunked {
        out.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out.into()
}

impl Conn {
    pub fn new(io: Stream) -> Self {
        Self {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can take a request: nothing has arrived on its socket since
    /// its response ended. nginx closes a cached connection on any byte, so a close, data sent
    /// unasked, or a TLS record (a session ticket, an alert) all retire it. A peek at the TCP
    /// socket: no system call unless it became readable, and `waker` is woken when it does
    /// later. (When the task's cooperative budget is spent, a closed one passes: the stale
    /// retry covers that.)
    pub fn is_open(&mut self, waker: &Waker) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let tcp = match &mut self.io {
            Either::Left(tcp) => &*tcp,
            Either::Right(tls) => {
                // Bytes rustls already took off the socket are unasked too: plaintext past
                // the response's end, or a record it failed on.
                let (tcp, session) = tls.get_mut();
                if session
                    .process_new_packets()
                    .map_or(true, |state| state.plaintext_bytes_to_read() > 0)
                {
                    return false;
                }
                &*tcp
            }
        };
        let mut probe = [0u8; 1];
        let mut rb = ReadBuf::new(&mut probe);
        tcp.poll_peek(&mut Context::from_waker(waker), &mut rb)
            .is_pending()
    }

    /// Gives back the read buffer (up to 16 KiB) of a connection that sits idle; the next
    /// read allocates again. nginx's idle upstream keep-alive connections hold no buffer.
    pub fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.buf.capacity()
    }

    /// Writes the request and reads the response head. A request body is written while the
    /// head is awaited, and after it, so an upstream that answers early (a 413, say) or
    /// streams its answer to an upload is heard.
    pub async fn exchange(self, req: &mut Outgoing) -> Result<Answer, Failed> {
        let upload = Upload::new(req);
        let mut ex = Exchange {
            conn: self,
            upload: Some(upload),
            write_error: None,
            received: false,
        };
        let head = std::future::poll_fn(|cx| ex.poll_head(cx)).await;
        let Exchange {
            conn,
            upload,
            write_error,
            received,
        } = ex;
        match head.and_then(|h| conn.answer(h, req.head_only, upload, write_error.is_none())) {
            Ok(answer) => Ok(answer),
            Err(error) => {
                let stale = req.replayable && !received && is_stale(&error);
                Err(Failed { error, stale })
            }
        }
    }

    /// The response's body decoder (which finishes the upload, if any is left), or the
    /// tunnel for a 101.
    fn answer(
        self,
        head: Response<()>,
        head_only: bool,
        upload: Option<Upload>,
        writable: bool,
    ) -> Result<Answer, Error> {
        if head.status() == StatusCode::SWITCHING_PROTOCOLS {
            let Conn { io, buf } = self;
            return Ok(Answer::Switched(
                head,
                Upgraded {
                    io,
                    read_ahead: buf.freeze(),
                },
            ));
        }
        // A head that cannot be framed is a failed exchange (502), not a broken body.
        let (decode, keep_alive) = framing(&head, head_only)?;
        let (parts, ()) = head.into_parts();
        Ok(Answer::Response(Response::from_parts(
            parts,
            ResponseBody {
                conn: Some(self),
                decode,
                keep_alive: keep_alive && writable,
                upload,
                upload_error: None,
            },
        )))
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.capacity() - self.buf.len() < 1024 {
            self.buf
                .reserve(READ_BUFFER.saturating_sub(self.buf.len()).max(1024));
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf)
    }
}

/// Errors that mean the connection was gone before it answered anything. rustls reports a
/// close without close_notify as an unexpected end.
fn is_stale(e: &Error) -> bool {
    match e {
        Error::Closed => true,
        Error::Io(io) => matches!(
            io.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::UnexpectedEof
        ),
        _ => false,
    }
}

struct Exchange {
    conn: Conn,
    /// The request's bytes still to go; `None` once all are written or writing failed.
    upload: Option<Upload>,
    /// Writing failed: an answer may still have come (an upstream that refuses a body often
    /// answers and closes), so this is the outcome only if none did.
    write_error: Option<io::Error>,
    /// Any byte of a response has arrived.
    received: bool,
}

impl Exchange {
    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Response<()>, Error>> {
        if let Some(upload) = self.upload.as_mut() {
            // Pending means the upstream (or the client's body) is not ready now; the
            // answer may come all the same, so the head is read in any case.
            match upload.poll(&mut self.conn.io, cx) {
                Poll::Ready(Ok(())) => self.upload = None,
                Poll::Ready(Err(Error::Io(e))) => {
                    self.upload = None;
                    self.write_error = Some(e);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        loop {
            match parse_head(&mut self.conn.buf)? {
                Some(head) if head.status().is_informational() && !is_switch(&head) => continue,
                Some(head) => return Poll::Ready(Ok(head)),
                None if self.conn.buf.len() >= READ_BUFFER => {
                    return Poll::Ready(Err(Error::HeadTooLarge));
                }
                None => {}
            }
            let read = match ready!(self.conn.poll_fill(cx)) {
                Ok(n) => n,
                Err(e) => return Poll::Ready(Err(self.write_error.take().unwrap_or(e).into())),
            };
            if read == 0 {
                return Poll::Ready(Err(match self.write_error.take() {
                    Some(e) => e.into(),
                    None if self.received => Error::Truncated,
                    None => Error::Closed,
                }));
            }
            self.received = true;
        }
    }
}

fn is_switch(head: &Response<()>) -> bool {
    head.status() == StatusCode::SWITCHING_PROTOCOLS
}

/// The request's bytes on their way: the head, then the body's frames (chunk-framed when
/// the request has no length), written together where they are ready together.
struct Upload {
    queue: VecDeque<Bytes>,
    body: Option<Body>,
    chunked: bool,
    /// What `Content-Length` still promises.
    left: Option<u64>,
}

impl Upload {
    fn new(req: &mut Outgoing) -> Self {
        let body = req.body.take();
        Self {
            queue: VecDeque::from([req.head.clone()]),
            chunked: body.is_some() && req.length.is_none(),
            left: body.as_ref().and(req.length),
            body,
        }
    }

    fn poll(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        loop {
            // What the body has ready joins the queue first, so that the head and the first
            // frame (or a frame and its chunk framing) leave in one write.
            let mut body_pending = false;
            if self.queue.len() < 2
                && let Some(body) = self.body.as_mut()
            {
                match Pin::new(body).poll_frame(cx) {
                    Poll::Ready(frame) => {
                        self.take(frame)?;
                        continue;
                    }
                    Poll::Pending => body_pending = true,
                }
            }
            if !self.queue.is_empty() {
                ready!(self.poll_write(io, cx))?;
                continue;
            }
            // TLS may hold written bytes back until flushed; a waiting body must not strand
            // them.
            ready!(Pin::new(&mut *io).poll_flush(cx))?;
            if self.body.is_none() {
                return Poll::Ready(Ok(()));
            }
            if body_pending {
                return Poll::Pending;
            }
        }
    }

    fn take(&mut self, frame: Option<Result<Frame<Bytes>, BoxError>>) -> Result<(), Error> {
        match frame {
            None => {
                self.body = None;
                if self.left.is_some_and(|l| l > 0) {
                    return Err(Error::RequestLength);
                }
                if self.chunked {
                    self.queue.push_back(Bytes::from_static(b"0\r\n\r\n"));
                }
            }
            Some(Err(e)) => return Err(Error::RequestBody(e)),
            // Trailers are not passed on, as nginx does not pass them.
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data()
                    && !data.is_empty()
                {
                    self.push(data)?;
                }
            }
        }
        Ok(())
    }

    fn push(&mut self, data: Bytes) -> Result<(), Error> {
        if let Some(left) = self.left.as_mut() {
            *left = left
                .checked_sub(data.len() as u64)
                .ok_or(Error::RequestLength)?;
            // All that was promised: the body's end-of-stream (an HTTP/2 client may send it
            // in a frame of its own, later) is not waited for.
            if *left == 0 {
                self.body = None;
            }
        }
        if self.chunked {
            self.queue.push_back(chunk_size_line(data.len()));
            self.queue.push_back(data);
            self.queue.push_back(Bytes::from_static(b"\r\n"));
        } else {
            self.queue.push_back(data);
        }
        Ok(())
    }

    /// Writes the queue, gathered into one system call where the stream allows.
    fn poll_write(&mut self, io: &mut Stream, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        while !self.queue.is_empty() {
            let mut slices = [io::IoSlice::new(&[]); 8];
            let count = slices.len().min(self.queue.len());
            for (slice, b) in slices.iter_mut().zip(&self.queue) {
                *slice = io::IoSlice::new(b);
            }
            let written = Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]);
            let mut n = ready!(written)?;
            if n == 0 {
                return Poll::Ready(Err(io::Error::from(io::ErrorKind::WriteZero).into()));
            }
            while n > 0 {
                let Some(front) = self.queue.front_mut() else {
                    break;
                };
                let step = n.min(front.len());
                front.advance(step);
                n -= step;
                if front.is_empty() {
                    self.queue.pop_front();
                }
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// `{size:x}\r\n` without formatting machinery.
fn chunk_size_line(size: usize) -> Bytes {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut line = [0u8; 18];
    let mut at = 16;
    let mut n = size;
    loop {
        at -= 1;
        line[at] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    line[16] = b'\r';
    line[17] = b'\n';
    Bytes::copy_from_slice(&line[at..])
}

/// A complete head at the front of `buf`, taken off it; `None` while it is incomplete.
/// Header values share the head's bytes rather than being copied one by one.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Response<()>>, Error> {
    // Uninitialised slots: 100 headers zeroed per response would cost more than parsing.
    let mut headers = [std::mem::MaybeUninit::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut []);
    let config = httparse::ParserConfig::default();
    let len = match config
        .parse_response_with_uninit_headers(&mut parsed, buf, &mut headers)
        .map_err(Error::Parse)?
    {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = parsed
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Error::Framing("invalid status code"))?;
    let version = if parsed.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let base = buf.as_ptr() as usize;
    // Offsets into the head; u32 as the head is bounded by the read buffer.
    let mut spans = [[0u32; 4]; MAX_HEADERS];
    let count = parsed.headers.len();
    for (span, h) in spans.iter_mut().zip(parsed.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        let at = [name, name + h.name.len(), value, value + h.value.len()];
        *span = at.map(|a| u32::try_from(a).unwrap_or(u32::MAX));
    }
    let reason = parsed
        .reason
        .filter(|r| Some(*r) != status.canonical_reason())
        .and_then(|r| hyper::ext::ReasonPhrase::try_from(r.as_bytes()).ok());
    let head = buf.split_to(len).freeze();
    let map = header_map(&head, &spans[..count])?;
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    *resp.version_mut() = version;
    *resp.headers_mut() = map;
    // The upstream's own reason phrase reaches the client, as nginx passes its status line.
    if let Some(reason) = reason {
        resp.extensions_mut().insert(reason);
    }
    Ok(Some(resp))
}

/// The header fields at `spans` (name and value offsets) of `head`, values sharing its bytes.
fn header_map(head: &Bytes, spans: &[[u32; 4]]) -> Result<HeaderMap, Error> {
    // One more than the upstream sent: the proxy adds HSTS to answers over TLS, and a map
    // sized exactly would grow (rehashing every field) for it.
    let mut map = HeaderMap::with_capacity(spans.len() + 1);
    for span in spans {
        let [ns, ne, vs, ve] = span.map(|a| a as usize);
        let (Some(name), Some(_)) = (head.get(ns..ne), head.get(vs..ve)) else {
            return Err(Error::HeadTooLarge);
        };
        let name =
            HeaderName::from_bytes(name).map_err(|_| Error::Framing("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| Error::Framing("invalid header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// How the body is delimited and whether the connection may carry another request after it.
fn framing(head: &Response<()>, head_only: bool) -> Result<(Decode, bool), Error> {
    let headers = head.headers();
    let keep_alive = !connection_has(headers, "close")
        && (head.version() != Version::HTTP_10 || connection_has(headers, "keep-alive"));
    let status = head.status();
    if head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Decode::Done, keep_alive));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        // Either would be passed on wrongly framed (the client's framing is hyper's, from
        // Content-Length or chunked), and both may be a smuggling attempt: nginx refuses them.
        if headers.contains_key(header::CONTENT_LENGTH) {
            return Err(Error::Framing(
                "Content-Length and Transfer-Encoding together",
            ));
        }
        if head.version() == Version::HTTP_10 || !only_chunked(headers) {
            return Err(Error::Framing("unknown Transfer-Encoding"));
        }
        return Ok((Decode::Chunked(Chunk::Size), keep_alive));
    }
    match content_length(headers)? {
        Some(0) => Ok((Decode::Done, keep_alive)),
        Some(n) => Ok((Decode::Length(n), keep_alive)),
        None => Ok((Decode::Close, false)),
    }
}

/// `Transfer-Encoding: chunked` and nothing else, as nginx accepts it.
fn only_chunked(headers: &HeaderMap) -> bool {
    let mut all = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (all.next(), all.next()) {
        (Some(v), None) => v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"),
        _ => false,
    }
}

/// Content-Length: one field of digits. nginx refuses a repeated one ("duplicate header
/// line"), and passed on as a list it would reach the client unnormalised.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Error> {
    let mut all = headers.get_all(header::CONTENT_LENGTH).iter();
    let (value, None) = (all.next(), all.next()) else {
        return Err(Error::Framing("more than one Content-Length"));
    };
    let Some(value) = value else { return Ok(None) };
    let digits = value.as_bytes();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(Error::Framing("invalid Content-Length"));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| d.parse().ok())
        .map(Some)
        .ok_or(Error::Framing("invalid Content-Length"))
}

enum Decode {
    Length(u64),
    Chunked(Chunk),
    /// Until the upstream closes.
    Close,
    Done,
}

enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    /// Trailer bytes read so far.
    Trailers(usize),
    End,
}

/// A response body read from its connection by whoever polls it; the rest of the request
/// body, if the upstream answered before taking all of it, goes on being written meanwhile.
pub struct ResponseBody {
    conn: Option<Conn>,
    decode: Decode,
    keep_alive: bool,
    upload: Option<Upload>,
    /// The upload failed after the head: the upstream waits for a body that will not come,
    /// so the response ends with this error (nginx closes both connections).
    upload_error: Option<Error>,
}

impl ResponseBody {
    /// The connection, once the exchange has ended cleanly and nothing follows it.
    pub fn take_reusable(&mut self) -> Option<Conn> {
        let fit = matches!(self.decode, Decode::Done)
            && self.keep_alive
            && self.upload.is_none()
            && self.conn.as_ref().is_some_and(|c| c.buf.is_empty());
        if fit { self.conn.take() } else { None }
    }

    /// Moves the unfinished upload on. The upstream closing its reading side is not an error
    /// of the response (it may have answered without reading); anything else is.
    fn poll_upload(&mut self, cx: &mut Context<'_>) {
        let (Some(upload), Some(conn)) = (self.upload.as_mut(), self.conn.as_mut()) else {
            return;
        };
        match upload.poll(&mut conn.io, cx) {
            Poll::Ready(Ok(())) => self.upload = None,
            Poll::Ready(Err(e)) => {
                self.upload = None;
                self.keep_alive = false;
                if !matches!(e, Error::Io(_)) {
                    self.upload_error = Some(e);
                }
            }
            Poll::Pending => {}
        }
    }

    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Error>>> {
        loop {
            if !matches!(self.decode, Decode::Done) {
                self.poll_upload(cx);
            }
            if let Some(e) = self.upload_error.take() {
                self.conn = None;
                return Poll::Ready(Some(Err(e)));
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.decode {
                Decode::Done => return Poll::Ready(None),
                Decode::Length(left) if !conn.buf.is_empty() => {
                    let data = take(&mut conn.buf, left);
                    if *left == 0 {
                        self.decode = Decode::Done;
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Decode::Close if !conn.buf.is_empty() => {
                    return Poll::Ready(Some(Ok(conn.buf.split().freeze())));
                }
                Decode::Chunked(chunk) => {
                    if let Some(data) = chunked(chunk, &mut conn.buf)? {
                        return Poll::Ready(Some(Ok(data)));
                    }
                    if matches!(chunk, Chunk::End) {
                        self.decode = Decode::Done;
                        return Poll::Ready(None);
                    }
                }
                Decode::Length(_) | Decode::Close => {}
            }
            let read = match ready!(conn.poll_fill(cx)) {
                // A TLS upstream that closes without close_notify ends a body delimited by
                // the close all the same, as nginx takes it.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => 0,
                r => r?,
            };
            if read == 0 {
                if matches!(self.decode, Decode::Close) {
                    self.decode = Decode::Done;
                    self.keep_alive = false;
                    return Poll::Ready(None);
                }
                return Poll::Ready(Some(Err(Error::Truncated)));
            }
        }
    }
}

/// Up to `left` bytes from the front of `buf`.
fn take(buf: &mut BytesMut, left: &mut u64) -> Bytes {
    let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
    *left -= n as u64;
    buf.split_to(n).freeze()
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// A chunk-size line (without its CRLF): hex digits, then nothing or extensions of visible
/// characters. Stricter than httparse's, which takes a line without digits or with a bare LF:
/// a misread size would leave the connection mid-message for the next request.
fn chunk_size(line: &[u8]) -> Result<u64, Error> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    let rest = &line[digits..];
    let extensions_ok = match rest.first() {
        None => true,
        Some(b';' | b' ' | b'\t') => rest
            .iter()
            .all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80),
        Some(_) => false,
    };
    if digits == 0 || digits > 16 || !extensions_ok {
        return Err(Error::Framing("invalid chunk size"));
    }
    let hex =
        std::str::from_utf8(&line[..digits]).map_err(|_| Error::Framing("invalid chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| Error::Framing("invalid chunk size"))
}

/// Moves the chunked decoder on with what `buf` holds: data when a chunk has some, `None`
/// when more bytes are needed or the message ended ([`Chunk::End`]).
fn chunked(state: &mut Chunk, buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    loop {
        match state {
            Chunk::Size => match size_line(buf)? {
                Some(next) => *state = next,
                None => return Ok(None),
            },
            Chunk::Data(left) => {
                if buf.is_empty() {
                    return Ok(None);
                }
                let data = take(buf, left);
                if *left == 0 {
                    *state = Chunk::DataEnd;
                }
                return Ok(Some(data));
            }
            Chunk::DataEnd => {
                if buf.len() < 2 {
                    return Ok(None);
                }
                if &buf[..2] != b"\r\n" {
                    return Err(Error::Framing("chunk not followed by CRLF"));
                }
                buf.advance(2);
                *state = Chunk::Size;
            }
            Chunk::End => return Ok(None),
            Chunk::Trailers(seen) => match trailer_line(*seen, buf)? {
                Some(next) => *state = next,
                None => return Ok(None),
            },
        }
    }
}

/// A chunk-size line taken off `buf`: the state it leads to, `None` while incomplete.
fn size_line(buf: &mut BytesMut) -> Result<Option<Chunk>, Error> {
    let Some(end) = find_crlf(buf) else {
        if buf.len() > MAX_CHUNK_LINE {
            return Err(Error::Framing("chunk size line too long"));
        }
        return Ok(None);
    };
    let size = chunk_size(&buf[..end])?;
    buf.advance(end + 2);
    Ok(Some(if size == 0 {
        Chunk::Trailers(0)
    } else {
        Chunk::Data(size)
    }))
}

/// One trailer line (after `seen` bytes of them) read and dropped, as nginx drops trailers;
/// the empty line ends the message.
fn trailer_line(seen: usize, buf: &mut BytesMut) -> Result<Option<Chunk>, Error> {
    let Some(end) = find_crlf(buf) else {
        if seen + buf.len() > MAX_TRAILERS {
            return Err(Error::Framing("trailers too large"));
        }
        return Ok(None);
    };
    let seen = seen + end + 2;
    if seen > MAX_TRAILERS {
        return Err(Error::Framing("trailers too large"));
    }
    buf.advance(end + 2);
    Ok(Some(if end == 0 {
        Chunk::End
    } else {
        Chunk::Trailers(seen)
    }))
}

impl HttpBody for ResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        match ready!(this.poll_data(cx)) {
            Some(Ok(data)) => Poll::Ready(Some(Ok(Frame::data(data)))),
            Some(Err(e)) => {
                // Mid-message: the connection cannot be reused.
                this.conn = None;
                Poll::Ready(Some(Err(e)))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.decode, Decode::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.decode {
            Decode::Length(n) => SizeHint::with_exact(n),
            Decode::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty, Full};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Reads what the socket holds into rustls without decrypting it for anyone.
    struct TryRead<'a>(&'a TcpStream);

    impl io::Read for TryRead<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.0.try_read(buf)
        }
    }

    #[tokio::test]
    async fn plaintext_rustls_holds_past_the_response_retires_a_tls_connection() {
        let cert = crate::tls_store::fake_certificate().unwrap();
        let server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_cert_resolver(std::sync::Arc::new(rustls::sign::SingleCertAndKey::from(
            (*cert.key).clone(),
        )));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server));
            let mut tls = acceptor.accept(s).await.unwrap();
            tls.write_all(b"unasked").await.unwrap();
            tls.flush().await.unwrap();
            // Held open: only the bytes, no close.
            let mut buf = [0u8; 16];
            let _ = tls.read(&mut buf).await;
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("ingress.local").unwrap();
        let client = std::sync::Arc::new(kube_common::tls::insecure_client_config());
        let tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .unwrap();
        let mut conn = Conn::new(Either::Right(Box::new(tls)));
        let Either::Right(tls) = &mut conn.io else {
            unreachable!()
        };
        let (tcp, session) = tls.get_mut();
        // Session tickets and the bytes all in the socket, then all in rustls.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        while session.read_tls(&mut TryRead(tcp)).is_ok_and(|n| n > 0) {}
        // The socket is empty now; the bytes wait in rustls.
        assert!(!conn.is_open(Waker::noop()));
        upstream.abort();
    }

    fn head(raw: &str) -> Response<()> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_head(&mut buf).unwrap().unwrap()
    }

    fn decode_all(mut state: Chunk, raw: &[u8]) -> Result<(Vec<u8>, bool), Error> {
        let mut out = Vec::new();
        let mut buf = BytesMut::new();
        // One byte at a time: every state must wait for what it needs.
        for b in raw {
            buf.extend_from_slice(&[*b]);
            while let Some(data) = chunked(&mut state, &mut buf)? {
                out.extend_from_slice(&data);
            }
        }
        Ok((out, matches!(state, Chunk::End) && buf.is_empty()))
    }

    #[test]
    fn chunked_bodies_decode_byte_by_byte() {
        let raw = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n";
        let (data, ended) = decode_all(Chunk::Size, raw).unwrap();
        assert_eq!(data, b"hello world");
        assert!(ended);
        assert!(decode_all(Chunk::Size, b"zz\r\n").is_err());
        // No digits, a bare LF in an extension, a size past 64 bits: misreads refused.
        for bad in [
            &b"\r\n"[..],
            b";ext\r\n",
            b"1;a\nb\r\n",
            b"1x\r\n",
            b"11111111111111111\r\n",
        ] {
            assert!(decode_all(Chunk::Size, bad).is_err(), "{bad:?}");
        }
        assert_eq!(chunk_size(b"ff ; name=\"v\"").unwrap(), 255);
        assert_eq!(&chunk_size_line(0x1a2)[..], b"1a2\r\n");
        assert_eq!(&chunk_size_line(0)[..], b"0\r\n");
        assert!(decode_all(Chunk::Size, b"2\r\nabXX").is_err());
        let long = format!("1;{}\r\n", "e".repeat(MAX_CHUNK_LINE + 1));
        assert!(decode_all(Chunk::Size, long.as_bytes()).is_err());
        let trailers = format!("0\r\n{}", "x: y\r\n".repeat(MAX_TRAILERS / 6 + 1));
        assert!(decode_all(Chunk::Size, trailers.as_bytes()).is_err());
    }

    #[test]
    fn heads_share_their_bytes_and_keep_every_field() {
        let h = head("HTTP/1.1 200 OK\r\nA: 1\r\na: 2\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(h.status(), StatusCode::OK);
        let values: Vec<_> = h.headers().get_all("a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        let mut buf = BytesMut::from(&b"HTTP/1.1 200 OK\r\nA: 1\r\n"[..]);
        assert!(parse_head(&mut buf).unwrap().is_none(), "incomplete");
        let mut bad = BytesMut::from(&b"HTTP/1.1 200 OK\r\nA b: 1\r\n\r\n"[..]);
        assert!(parse_head(&mut bad).is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &str, head_only| framing(&head(raw), head_only);
        let done = |r: Result<(Decode, bool), Error>| {
            let (d, keep) = r.unwrap();
            (matches!(d, Decode::Done), keep)
        };
        assert_eq!(
            done(f("HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n", true)),
            (true, true)
        );
        assert_eq!(
            done(f("HTTP/1.1 204 No Content\r\n\r\n", false)),
            (true, true)
        );
        assert_eq!(
            done(f("HTTP/1.1 304 Not Modified\r\n\r\n", false)),
            (true, true)
        );
        assert_eq!(
            done(f("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false)),
            (true, true)
        );
        let (d, keep) = f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", false).unwrap();
        assert!(matches!(d, Decode::Length(5)) && keep);
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\n", false).is_err());
        let raw = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n";
        assert!(f(raw, false).is_err(), "nginx refuses a duplicate");
        assert!(f("HTTP/1.1 200 OK\r\ncontent-length: +5\r\n\r\n", false).is_err());
        // Both, or a coding other than chunked alone: refused, as nginx refuses them.
        let raw = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n";
        assert!(f(raw, false).is_err());
        assert!(f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false).is_err());
        let raw = "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n";
        assert!(f(raw, false).is_err());
        assert!(
            f(
                "HTTP/1.0 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false
            )
            .is_err()
        );
        let (d, keep) = f(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n",
            false,
        )
        .unwrap();
        assert!(matches!(d, Decode::Chunked(_)) && keep);
        let (d, keep) = f("HTTP/1.1 200 OK\r\n\r\n", false).unwrap();
        assert!(matches!(d, Decode::Close) && !keep);
        let (_, keep) = f("HTTP/1.0 200 OK\r\ncontent-length: 1\r\n\r\n", false).unwrap();
        assert!(!keep, "HTTP/1.0 closes unless it says keep-alive");
        let raw = "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 1\r\n\r\n";
        assert!(f(raw, false).unwrap().1);
        let raw = "HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 1\r\n\r\n";
        assert!(!f(raw, false).unwrap().1);
        let raw = "HTTP/1.0 200 OK\r\nconnection: keep-alive, close\r\ncontent-length: 1\r\n\r\n";
        assert!(!f(raw, false).unwrap().1, "close wins");
    }

    /// A connection to a server that reads one request head, then hands the stream and all
    /// it read to `serve`.
    async fn upstream_with<F, Fut, T>(serve: F) -> (Conn, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(TcpStream, Vec<u8>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
            }
            serve(s, seen).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        (Conn::new(Stream::Left(tcp)), server)
    }

    /// A server that reads one request head, then writes the pieces given.
    async fn upstream(pieces: Vec<&'static [u8]>) -> (Conn, tokio::task::JoinHandle<Vec<u8>>) {
        upstream_with(|mut s, seen| async move {
            for p in pieces {
                s.write_all(p).await.unwrap();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            seen
        })
        .await
    }

    fn request(method: Method, body: Body) -> Outgoing {
        let req = http::Request::builder()
            .method(method)
            .uri("/a?b=1")
            .header("host", "a.test")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        Outgoing::new(&parts, body).unwrap()
    }

    fn empty() -> Body {
        Empty::new().map_err(|e| match e {}).boxed_unsync()
    }

    async fn exchange(conn: Conn, req: &mut Outgoing) -> Response<ResponseBody> {
        match conn.exchange(req).await {
            Ok(Answer::Response(r)) => r,
            Ok(Answer::Switched(..)) => panic!("unexpected 101"),
            Err(f) => panic!("{}", f.error),
        }
    }

    #[tokio::test]
    async fn a_chunked_response_in_pieces_leaves_the_connection_reusable() {
        let (conn, server) = upstream(vec![
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-",
            b"encoding: chunked\r\n\r\n3\r\nabc\r",
            b"\n0\r\n\r\n",
        ])
        .await;
        let mut req = request(Method::GET, empty());
        let resp = exchange(conn, &mut req).await;
        assert_eq!(resp.status(), StatusCode::OK);
        let mut body = resp.into_body();
        let mut data = Vec::new();
        while let Some(frame) = body.frame().await {
            data.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(data, b"abc");
        assert!(body.take_reusable().is_some());
        let sent = server.await.unwrap();
        assert!(sent.starts_with(b"GET /a?b=1 HTTP/1.1\r\nhost: a.test\r\n\r\n"));
    }

    #[tokio::test]
    async fn a_short_body_is_an_error_and_the_connection_is_dropped() {
        let (conn, _server) =
            upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]).await;
        let mut req = request(Method::GET, empty());
        let resp = exchange(conn, &mut req).await;
        let mut body = resp.into_body();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "abc"
        );
        assert!(matches!(body.frame().await, Some(Err(Error::Truncated))));
        assert!(body.take_reusable().is_none());
    }

    #[tokio::test]
    async fn a_closed_connection_is_stale_only_for_a_repeatable_request() {
        for (method, stale) in [(Method::GET, true), (Method::POST, false)] {
            let (conn, server) = upstream(vec![]).await;
            let mut req = request(method, empty());
            match conn.exchange(&mut req).await {
                Err(f) => assert_eq!(f.stale, stale),
                Ok(_) => panic!("answered"),
            }
            server.await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_body_goes_chunked_without_a_length() {
        let (conn, server) = upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
        let body = Full::new(Bytes::from_static(b"hello"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let mut req = request(Method::POST, body);
        let resp = exchange(conn, &mut req).await;
        assert!(resp.into_body().take_reusable().is_some());
        let sent = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(
            sent.contains("transfer-encoding: chunked\r\n\r\n"),
            "{sent}"
        );
    }

    #[tokio::test]
    async fn an_early_answer_is_heard_while_the_body_is_unread() {
        // The upstream answers 413 without reading a body larger than the socket buffers.
        let (conn, _server) = upstream(vec![
            b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n",
        ])
        .await;
        let big = Bytes::from(vec![b'x'; 32 << 20]);
        let body = Full::new(big).map_err(|e| match e {}).boxed_unsync();
        let req = http::Request::builder()
            .method(Method::POST)
            .uri("/")
            .header("content-length", (32u64 << 20).to_string())
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Outgoing::new(&parts, body).unwrap();
        let resp = exchange(conn, &mut out).await;
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert!(
            resp.into_body().take_reusable().is_none(),
            "the body was not all sent"
        );
    }

    #[tokio::test]
    async fn a_reason_phrase_of_its_own_is_kept() {
        let h = head("HTTP/1.1 200 Fine\r\n\r\n");
        let reason = h.extensions().get::<hyper::ext::ReasonPhrase>().unwrap();
        assert_eq!(reason.as_bytes(), b"Fine");
        assert!(head("HTTP/1.1 200 OK\r\n\r\n").extensions().is_empty());
    }

    /// A server that answers at once, then echoes the 6 body bytes as they come.
    async fn echoing_upstream() -> (Conn, tokio::task::JoinHandle<()>) {
        upstream_with(|mut s, seen| async move {
            let at = seen.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\n";
            s.write_all(reply).await.unwrap();
            let mut echoed = seen.len() - at;
            s.write_all(&seen[at..]).await.unwrap();
            let mut buf = [0u8; 64];
            while echoed < 6 {
                let n = s.read(&mut buf).await.unwrap();
                s.write_all(&buf[..n]).await.unwrap();
                echoed += n;
            }
        })
        .await
    }

    type Frames = tokio::sync::mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

    /// A POST whose body is fed through the returned sender, `first` already in it.
    async fn streamed_post(
        length: Option<&str>,
        first: Option<&'static [u8]>,
    ) -> (Outgoing, Frames) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        if let Some(first) = first {
            tx.send(Ok(Frame::data(Bytes::from_static(first))))
                .await
                .unwrap();
        }
        let frames = futures::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let body = http_body_util::StreamBody::new(frames).boxed_unsync();
        let mut req = http::Request::post("/");
        if let Some(length) = length {
            req = req.header("content-length", length);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        (Outgoing::new(&parts, body).unwrap(), tx)
    }

    #[tokio::test]
    async fn the_body_goes_on_after_the_head_arrives() {
        let (conn, server) = echoing_upstream().await;
        // The second half of the body comes only once the head is out.
        let (mut out, tx) = streamed_post(Some("6"), Some(b"abc")).await;
        let resp = exchange(conn, &mut out).await;
        tx.send(Ok(Frame::data(Bytes::from_static(b"def"))))
            .await
            .unwrap();
        drop(tx);
        let mut body = resp.into_body();
        let got = (&mut body).collect().await.unwrap().to_bytes();
        assert_eq!(got, "abcdef");
        assert!(body.take_reusable().is_some(), "all of the body went");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_body_is_done_when_its_length_is_sent_without_waiting_for_its_end() {
        let (conn, _server) = upstream(vec![b"HTTP/1.1 204 No Content\r\n\r\n"]).await;
        let (mut out, tx) = streamed_post(Some("3"), Some(b"abc")).await;
        let resp = exchange(conn, &mut out).await;
        // `tx` is still open: the end of stream never came.
        assert!(resp.into_body().take_reusable().is_some());
        drop(tx);
    }

    #[tokio::test]
    async fn a_request_body_failing_after_the_head_fails_the_response() {
        let (conn, _server) = upstream(vec![b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n"]).await;
        let (mut out, tx) = streamed_post(None, None).await;
        let resp = exchange(conn, &mut out).await;
        tx.send(Err("client went away".into())).await.unwrap();
        let mut body = resp.into_body();
        assert!(matches!(
            body.frame().await,
            Some(Err(Error::RequestBody(_)))
        ));
        assert!(body.take_reusable().is_none());
    }

    #[tokio::test]
    async fn a_body_longer_than_its_length_is_refused() {
        let (conn, _server) = upstream(vec![]).await;
        let body = Full::new(Bytes::from_static(b"toolong"))
            .map_err(|e| match e {})
            .boxed_unsync();
        let req = http::Request::put("/")
            .header("content-length", "3")
            .body(())
            .unwrap();
        let (parts, ()) = req.into_parts();
        let mut out = Outgoing::new(&parts, body).unwrap();
        match conn.exchange(&mut out).await {
            Err(f) => {
                assert!(matches!(f.error, Error::RequestLength));
                assert!(!f.stale, "a request with a body is never sent again");
            }
            Ok(_) => panic!("answered"),
        }
    }

    #[tokio::test]
    async fn a_switch_hands_over_the_stream_and_what_followed_the_head() {
        let (conn, _server) = upstream(vec![
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nframe",
        ])
        .await;
        let mut req = request(Method::GET, empty());
        match conn.exchange(&mut req).await {
            Ok(Answer::Switched(head, up)) => {
                assert_eq!(head.status(), StatusCode::SWITCHING_PROTOCOLS);
                assert_eq!(up.read_ahead, "frame");
            }
            _ => panic!("no switch"),
        }
    }
}
