//! Where HTTP/1 messages end, for the harness's own clients and the bare proxy.

/// Where the body of a response ends, once its head is complete.
#[derive(Debug, PartialEq, Eq)]
pub enum Framing {
    /// The whole response is this many bytes (head included).
    Length(usize),
    /// Chunked: it ends with the last chunk and an empty trailer.
    Chunked,
}

/// The framing of the response at the start of `buf`, or `None` while its head is incomplete
/// or unreadable (or its length overflows).
pub fn framing(buf: &[u8]) -> Option<Framing> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = resp.parse(buf).ok()? else {
        return None;
    };
    let value = |name: &str| {
        resp.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    if value("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        return Some(Framing::Chunked);
    }
    let length = value("content-length").and_then(|v| v.trim().parse::<usize>().ok())?;
    head.checked_add(length).map(Framing::Length)
}

/// Whether `buf` holds a whole response.
pub fn complete(buf: &[u8]) -> bool {
    match framing(buf) {
        Some(Framing::Length(total)) => buf.len() >= total,
        Some(Framing::Chunked) => buf.ends_with(b"0\r\n\r\n"),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_ends_by_length_or_last_chunk() {
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n";
        assert_eq!(framing(head), Some(Framing::Length(head.len() + 3)));
        assert!(!complete(head));
        assert!(complete(&[&head[..], b"ok\n"].concat()));
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n";
        assert!(!complete(chunked));
        assert!(complete(&[&chunked[..], b"0\r\n\r\n"].concat()));
        assert!(!complete(b"HTTP/1.1 200 OK\r\n"));
        let huge = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", usize::MAX);
        assert_eq!(framing(huge.as_bytes()), None);
    }
}
