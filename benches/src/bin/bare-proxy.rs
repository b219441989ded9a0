//! `bare-proxy --listen ADDR --backend ADDR --driver uring|epoll [--threads N]`: the least an
//! HTTP/1 proxy can do per request (read a GET head, forward it unchanged on the client's own
//! upstream connection, read the answer by its Content-Length and write it back), on monoio
//! runtimes with either io_uring or epoll (mio) underneath. The same code on both drivers
//! measures what io_uring itself buys on this kernel, for issue 12's question whether an
//! io_uring runtime could move the floor (benches/README.md, change 14). Not a proxy: no
//! routing, no header rewriting, GET without a body only; anything else closes the connection.

use std::io;
use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use benches::http1::{Framing, framing};
use clap::{Parser, ValueEnum};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

/// Longest request head read; longer ones close the connection.
const MAX_HEAD: usize = 64 * 1024;
/// Largest response forwarded (it is held whole).
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

#[derive(Clone, Copy, ValueEnum)]
enum Driver {
    Uring,
    Epoll,
}

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    backend: SocketAddr,
    #[arg(long, value_enum)]
    driver: Driver,
    /// io_uring set-up flags: none, coop (COOP_TASKRUN), defer (DEFER_TASKRUN + SINGLE_ISSUER).
    #[arg(long, default_value = "none")]
    uring_setup: String,
    /// Threads, each with its own runtime and SO_REUSEPORT listener (as the proxies' workers).
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (failed, failures) = std::sync::mpsc::channel();
    for _ in 0..args.threads.max(1) {
        let (driver, setup) = (args.driver, args.uring_setup.clone());
        let (listen, backend, failed) = (args.listen, args.backend, failed.clone());
        std::thread::spawn(move || {
            let _ = failed.send(worker(driver, &setup, listen, backend));
        });
    }
    drop(failed);
    // Workers serve until one fails: then the process exits, so that no peer runs with fewer
    // workers than it was given.
    match failures.recv() {
        Ok(result) => result,
        Err(_) => bail!("every worker ended"),
    }
}

fn worker(driver: Driver, setup: &str, listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    match driver {
        Driver::Uring => monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .with_entries(4096)
            .uring_builder(uring_setup(setup)?)
            .build()
            .context("io_uring runtime (refused by the kernel or a seccomp profile?)")?
            .block_on(serve(listen, backend)),
        Driver::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .build()
            .context("epoll runtime")?
            .block_on(serve(listen, backend)),
    }
}

fn uring_setup(name: &str) -> Result<io_uring::Builder> {
    let mut b = io_uring::IoUring::builder();
    match name {
        "none" => {}
        "coop" => {
            b.setup_coop_taskrun();
        }
        "defer" => {
            b.setup_defer_taskrun().setup_single_issuer();
        }
        other => bail!("unknown --uring-setup {other}"),
    }
    Ok(b)
}

async fn serve(listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    // monoio binds with SO_REUSEPORT by default: one listener per thread.
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    loop {
        // A failed accept (an aborted connection, no descriptors left) loses one client only.
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        monoio::spawn(async move {
            if let Err(e) = connection(client, backend).await
                && !client_went_away(&e)
            {
                eprintln!("connection: {e:#}");
            }
        });
    }
}

/// A client closing its connection at the end of a load run is no failure.
fn client_went_away(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>().is_some_and(|e| {
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        )
    })
}

/// One client connection with its own upstream connection, request after request.
async fn connection(mut client: TcpStream, backend: SocketAddr) -> Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(backend).await.context("connect")?;
    upstream.set_nodelay(true)?;
    let mut req = Vec::with_capacity(4096);
    let mut resp = Vec::with_capacity(8192);
    loop {
        let Some(head) = read_until(&mut client, &mut req, MAX_HEAD, request_len).await? else {
            return Ok(());
        };
        let rest = req.split_off(head);
        let (r, sent) = upstream.write_all(req).await;
        r?;
        req = sent;
        req.clear();
        req.extend_from_slice(&rest);

        let whole = read_until(&mut upstream, &mut resp, MAX_RESPONSE, response_len)
            .await?
            .context("upstream closed")?;
        if resp.len() > whole {
            bail!("upstream sent bytes past its response");
        }
        let (r, sent) = client.write_all(resp).await;
        r?;
        resp = sent;
        resp.clear();
    }
}

/// Reads into `buf` until `complete` says how long the message is and it is all there (None:
/// the peer closed before sending anything). `complete` sees only what is new since its last
/// answer of `None`, so a long body is not parsed again at every read.
async fn read_until(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    complete: impl Fn(&[u8]) -> Result<Option<usize>>,
) -> Result<Option<usize>> {
    let mut known = None;
    loop {
        if known.is_none() {
            known = complete(buf)?;
        }
        match known {
            Some(n) if n > limit => bail!("message of {n} bytes, over {limit}"),
            Some(n) if buf.len() >= n => return Ok(Some(n)),
            None if buf.len() > limit => bail!("head over {limit} bytes"),
            _ => {}
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(known.map_or(16384, |n| n.saturating_sub(buf.len()).max(4096)));
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, back) = io.read(std::mem::take(buf).slice_mut(len..cap)).await;
        *buf = back.into_inner();
        if r? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("peer closed mid-message");
        }
    }
}

/// The length of a GET head without a body, once it is complete.
fn request_len(b: &[u8]) -> Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Request::new(&mut headers);
    let httparse::Status::Complete(head) = r.parse(b).context("request head")? else {
        return Ok(None);
    };
    let body = r.headers.iter().any(|h| {
        h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || h.name.eq_ignore_ascii_case("transfer-encoding")
    });
    if r.method != Some("GET") || body {
        bail!("only GET without a body is forwarded");
    }
    Ok(Some(head))
}

/// The length of the whole response (head and Content-Length body), once its head is in.
fn response_len(b: &[u8]) -> Result<Option<usize>> {
    match framing(b) {
        Some(Framing::Length(n)) => Ok(Some(n)),
        Some(Framing::Chunked) => bail!("a chunked response (only Content-Length is forwarded)"),
        // An incomplete head (or an unreadable one, which the bench backend never sends).
        None => Ok(None),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // test code
mod tests {
    use super::*;

    #[test]
    fn only_gets_without_a_body_are_forwarded() {
        let get = b"GET /1k HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(request_len(get).unwrap(), Some(get.len()));
        assert_eq!(request_len(&get[..10]).unwrap(), None);
        assert!(request_len(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n").is_err());
        assert!(request_len(b"GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab").is_err());
        assert!(request_len(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(response_len(chunked).is_err());
    }
}
