//! Where HTTP/1 messages end, for the harness's own clients and the bare proxy.

/// Where a response ends, as far as the bytes at the start of a buffer say.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// The head is not complete yet.
    Incomplete,
    /// The whole response is this many bytes (head included).
    Length(usize),
    /// Chunked: it ends with the last chunk and an empty trailer.
    Chunked,
    /// The head cannot be read, has more fields than are read, or gives no length (or one
    /// that overflows): where the response ends is not known from it.
    Unframed,
}

/// The framing of the response at the start of `buf`.
pub fn framing(buf: &[u8]) -> Framing {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(buf) {
        Ok(httparse::Status::Complete(head)) => head,
        Ok(httparse::Status::Partial) => return Framing::Incomplete,
        Err(_) => return Framing::Unframed,
    };
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if value("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Framing::Chunked;
    }
    value("content-length")
        .and_then(|v| v.trim().parse::<usize>().ok())
        .and_then(|length| head.checked_add(length))
        .map_or(Framing::Unframed, Framing::Length)
}

/// Whether `buf` holds a whole response.
pub fn complete(buf: &[u8]) -> bool {
    match framing(buf) {
        Framing::Length(total) => buf.len() >= total,
        Framing::Chunked => buf.ends_with(b"0\r\n\r\n"),
        Framing::Incomplete | Framing::Unframed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ends_by_length_or_last_chunk() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(framing(head), Framing::Length(head.len() + 3));
        assert!(!complete(head));
        assert!(complete(&[&head[..], b"ok\n"].concat()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n";
        assert!(!complete(chunked));
        assert!(complete(&[&chunked[..], b"0\r\n\r\n"].concat()));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n"));
        assert_eq!(framing(b"HTTP/1.1 200 OK\r\n"), Framing::Incomplete);
        let huge = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", usize::MAX);
        assert_eq!(framing(huge.as_bytes()), Framing::Unframed);
        assert_eq!(
            framing(b"HTTP/1.1 204 No Content\r\n\r\n"),
            Framing::Unframed
        );
        assert_eq!(framing(b"HTTP/1.1 2x0 OK\r\n\r\n"), Framing::Unframed);
    }
}
