//! Request smuggling and malformed framing: raw bytes on a plain connection, the answer read
//! back, and what the backend saw. Each vector's request path is `/sm<N>`; a request hidden in
//! its body or after it is `/sm<N>-x`, so a proxy that let one through is caught by the
//! backend's log, not by guessing from the answer.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::recorder::Recorder;
use crate::peers::HOST;

/// What RFC 9112/9110 require of the receiving server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// "MUST respond with 400" (or another 4xx/501 the RFC names): nothing may be forwarded.
    Reject,
    /// Reject, or normalise and forward (no hidden request, no raw control byte, connection
    /// closed where the RFC says so).
    RejectOrNormalise,
    /// Route by the request target's authority, not the Host header (RFC 9112 §3.2.2).
    TargetAuthority,
}

pub struct Vector {
    pub id: &'static str,
    pub description: &'static str,
    pub rule: Rule,
    /// `{P}` is replaced by the vector's path, `{H}` by the benchmark host, `{S}` by the hidden
    /// request, `{N}` and `{L}` by its length in decimal and hex, `{M}` by 5 + its length
    /// (a last chunk `0\r\n\r\n` followed by it).
    raw: &'static str,
}

pub const VECTORS: &[Vector] = &[
    Vector {
        id: "cl-te",
        description: "Content-Length and Transfer-Encoding: chunked, a request after the last chunk",
        rule: Rule::RejectOrNormalise,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: {M}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "te-cl",
        description: "Transfer-Encoding: chunked then Content-Length, a request inside the chunk",
        rule: Rule::RejectOrNormalise,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{L}\r\n{S}\r\n0\r\n\r\n",
    },
    Vector {
        id: "te-space-colon",
        description: "`Transfer-Encoding : chunked` (whitespace before the colon) with Content-Length",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding : chunked\r\nContent-Length: {M}\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "te-xchunked",
        description: "`Transfer-Encoding: xchunked` (unknown coding) with Content-Length",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: xchunked\r\nContent-Length: {M}\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "te-chunked-identity",
        description: "`Transfer-Encoding: chunked, identity` (chunked not last)",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "te-twice",
        description: "two Transfer-Encoding: chunked fields",
        rule: Rule::RejectOrNormalise,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    },
    Vector {
        id: "te-http10",
        description: "HTTP/1.0 request with Transfer-Encoding: chunked and Content-Length",
        rule: Rule::RejectOrNormalise,
        raw: "POST {P} HTTP/1.0\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\nContent-Length: {M}\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "cl-duplicate",
        description: "two Content-Length fields with different values",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: 0\r\nContent-Length: {N}\r\n\r\n{S}",
    },
    Vector {
        id: "cl-plus",
        description: "`Content-Length: +35`",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length: +{N}\r\n\r\n{S}",
    },
    Vector {
        id: "cl-space-colon",
        description: "`Content-Length : 35` (whitespace before the colon)",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nContent-Length : {N}\r\n\r\n{S}",
    },
    Vector {
        id: "obs-fold",
        description: "a folded header line (obs-fold) carrying Transfer-Encoding",
        rule: Rule::RejectOrNormalise,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nX-Folded: a\r\n Transfer-Encoding: chunked\r\nContent-Length: {M}\r\n\r\n0\r\n\r\n{S}",
    },
    Vector {
        id: "bare-lf",
        description: "lines ended by a bare LF",
        rule: Rule::RejectOrNormalise,
        raw: "GET {P} HTTP/1.1\nHost: {H}\n\n",
    },
    Vector {
        id: "bare-cr",
        description: "a bare CR inside a header value",
        rule: Rule::RejectOrNormalise,
        raw: "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-Cr: a\rb\r\n\r\n",
    },
    Vector {
        id: "nul-in-value",
        description: "a NUL byte inside a header value",
        rule: Rule::RejectOrNormalise,
        raw: "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-Nul: a\0b\r\n\r\n",
    },
    Vector {
        id: "ctl-in-value",
        description: "a control byte (0x01) inside a header value",
        rule: Rule::RejectOrNormalise,
        raw: "GET {P} HTTP/1.1\r\nHost: {H}\r\nX-Ctl: a\u{1}b\r\n\r\n",
    },
    Vector {
        id: "bad-name",
        description: "a header name with a space inside",
        rule: Rule::Reject,
        raw: "GET {P} HTTP/1.1\r\nHost: {H}\r\nBad Name: x\r\n\r\n",
    },
    Vector {
        id: "absolute-form",
        description: "absolute-form target naming another host than the Host field",
        rule: Rule::TargetAuthority,
        raw: "GET http://other.test{P} HTTP/1.1\r\nHost: {H}\r\n\r\n",
    },
    Vector {
        id: "two-hosts",
        description: "two Host fields",
        rule: Rule::Reject,
        raw: "GET {P} HTTP/1.1\r\nHost: {H}\r\nHost: other.test\r\n\r\n",
    },
    Vector {
        id: "no-host",
        description: "HTTP/1.1 request without Host",
        rule: Rule::Reject,
        raw: "GET {P} HTTP/1.1\r\nX: y\r\n\r\n",
    },
    Vector {
        id: "chunk-overflow",
        description: "a chunk size that overflows 64 bits",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n{S}\r\n0\r\n\r\n",
    },
    Vector {
        id: "chunk-not-hex",
        description: "a chunk size that is not hexadecimal (`0x2b`)",
        rule: Rule::Reject,
        raw: "POST {P} HTTP/1.1\r\nHost: {H}\r\nTransfer-Encoding: chunked\r\n\r\n0x{L}\r\n{S}\r\n0\r\n\r\n",
    },
    Vector {
        id: "space-in-target",
        description: "a space inside the request target",
        rule: Rule::Reject,
        raw: "GET {P} x HTTP/1.1\r\nHost: {H}\r\n\r\n",
    },
];

/// One vector against one peer.
#[derive(Clone, Debug, Serialize)]
pub struct Outcome {
    pub id: &'static str,
    pub peer: String,
    /// Statuses of the responses read back, in order ("" when none came).
    pub statuses: Vec<u16>,
    /// The peer closed the connection after answering.
    pub closed: bool,
    /// Requests of this vector the backend received (path `/sm<N>`).
    pub forwarded: usize,
    /// A hidden request (`/sm<N>-x`) reached the backend.
    pub smuggled: bool,
    /// A raw control byte or bare CR reached the backend.
    pub raw_ctl: bool,
    /// Host header the backend saw for the vector's own request.
    pub host: Option<String>,
    pub safe: bool,
}

impl Outcome {
    pub fn answer(&self) -> String {
        let s: Vec<String> = self.statuses.iter().map(u16::to_string).collect();
        let mut a = if s.is_empty() {
            "no answer".to_string()
        } else {
            s.join(" + ")
        };
        if self.closed {
            a.push_str(", closed");
        }
        a
    }
}

/// Sends every vector to `addr` (a plain HTTP listener), one after the other (a proxy that
/// desynchronised its upstream connection on one must not blur the next one's verdict), and
/// judges what the client got back and the backend received.
pub async fn run(peer: &str, addr: SocketAddr, backend: &Recorder) -> Vec<Outcome> {
    let mut out = Vec::new();
    for (i, v) in VECTORS.iter().enumerate() {
        // A path unique to this peer and vector: the backend's log is shared.
        let path = format!("/sm{i}{}", peer.replace('-', ""));
        let (statuses, closed) = exchange(addr, render(v.raw, &path)).await;
        // Give a forwarded request time to arrive.
        tokio::time::sleep(Duration::from_millis(50)).await;
        out.push(judge(v, peer, &path, statuses, closed, backend));
    }
    out
}

fn judge(
    v: &Vector,
    peer: &str,
    path: &str,
    statuses: Vec<u16>,
    closed: bool,
    backend: &Recorder,
) -> Outcome {
    let seen = backend.seen(path);
    let hidden = format!("{path}-x");
    let smuggled = seen.iter().any(|s| s.path.starts_with(&hidden));
    let own: Vec<_> = seen
        .iter()
        .filter(|s| !s.path.starts_with(&hidden))
        .collect();
    let raw_ctl = seen.iter().any(|s| s.raw_ctl);
    let host = own.first().map(|s| s.host.clone());
    let first = statuses.first().copied();
    let rejected = matches!(first, Some(400..=499 | 501)) && own.is_empty();
    let safe = !smuggled
        && !raw_ctl
        && match v.rule {
            Rule::Reject => rejected,
            Rule::RejectOrNormalise => {
                rejected || (matches!(first, Some(200..=299)) && statuses.len() == 1)
            }
            Rule::TargetAuthority => {
                rejected
                    || (own.is_empty() && matches!(first, Some(404)))
                    || host.as_deref() == Some("other.test")
            }
        };
    Outcome {
        id: v.id,
        peer: peer.to_string(),
        statuses,
        closed,
        forwarded: own.len(),
        smuggled,
        raw_ctl,
        host,
        safe,
    }
}

fn render(template: &str, path: &str) -> String {
    let hidden = format!("GET {path}-x HTTP/1.1\r\nHost: {HOST}\r\n\r\n");
    template
        .replace("{S}", &hidden)
        .replace("{N}", &hidden.len().to_string())
        .replace("{L}", &format!("{:x}", hidden.len()))
        .replace("{M}", &(hidden.len() + 5).to_string())
        .replace("{P}", path)
        .replace("{H}", HOST)
}

/// Writes `raw`, then reads until the peer closes or stays silent for a moment; returns the
/// statuses of the responses read and whether the peer closed.
async fn exchange(addr: SocketAddr, raw: String) -> (Vec<u16>, bool) {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return (Vec::new(), true);
    };
    if stream.write_all(raw.as_bytes()).await.is_err() {
        return (Vec::new(), true);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let closed = loop {
        let quiet = if got.is_empty() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(300)
        };
        match tokio::time::timeout_at(
            deadline.min(tokio::time::Instant::now() + quiet),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    (statuses(&got), closed)
}

/// Status codes of every `HTTP/1.x NNN` status line in `bytes`.
pub fn statuses(bytes: &[u8]) -> Vec<u16> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(pos) = bytes[i..].windows(7).position(|w| w == b"HTTP/1.") {
        let start = i + pos;
        let code = bytes
            .get(start + 9..start + 12)
            .and_then(|c| std::str::from_utf8(c).ok())
            .and_then(|c| c.parse().ok());
        if let Some(code) = code
            && bytes.get(start + 8) == Some(&b' ')
        {
            out.push(code);
        }
        i = start + 7;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines_are_found_in_order() {
        let r = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\nok";
        assert_eq!(statuses(r), vec![400, 200]);
        assert!(statuses(b"garbage").is_empty());
    }
}
