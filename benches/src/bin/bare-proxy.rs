//! `bare-proxy --listen ADDR --backend ADDR --driver uring|epoll [--threads N]`: the least an
//! HTTP/1 proxy can do per request (read a GET head, forward it unchanged on the client's own
//! upstream connection, read the answer by its Content-Length and write it back), on monoio
//! runtimes with either io_uring or epoll (mio) underneath. The same code on both drivers
//! measures what io_uring itself buys on this kernel, for issue 12's question whether an
//! io_uring runtime would lower what a proxy costs per request (benches/README.md, change 14).
//! Not a proxy: no routing, no header rewriting, GET without a body only; anything else closes
//! the connection.

use std::io;
use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow, bail};
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
            // monoio does not catch a task's panic: it ends the thread, and so the process.
            let served = std::panic::catch_unwind(|| worker(driver, &setup, listen, backend));
            let _ = failed.send(served.unwrap_or_else(|_| Err(anyhow!("a worker panicked"))));
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
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                accept_failed(e)?;
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

/// An accept that failed for one connection (aborted, or out of descriptors or memory for a
/// moment) loses that client only; any other failure ends the worker.
fn accept_failed(e: io::Error) -> Result<()> {
    use rustix::io::Errno;
    match Errno::from_io_error(&e) {
        Some(Errno::CONNABORTED | Errno::INTR) => Ok(()),
        Some(Errno::MFILE | Errno::NFILE | Errno::NOBUFS | Errno::NOMEM) => {
            eprintln!("accept: {e}");
            // Blocking this worker briefly is the point: nothing can be accepted meanwhile.
            std::thread::sleep(std::time::Duration::from_millis(10));
            Ok(())
        }
        _ => Err(e).context("accept"),
    }
}

/// What the client's side of a connection failed with: a client closing its connection at
/// the end of a load run is no failure.
#[derive(Debug, thiserror::Error)]
#[error("client: {0}")]
struct ClientIo(io::Error);

fn client_went_away(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ClientIo>().is_some_and(|ClientIo(e)| {
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
        let Some(head) = read_until(&mut client, &mut req, MAX_HEAD, request_len)
            .await
            .map_err(|e| match e {
                ReadError::Io(e) => anyhow::Error::new(ClientIo(e)),
                ReadError::Message(e) => e.context("request"),
            })?
        else {
            return Ok(());
        };
        let rest = req.split_off(head);
        let (r, sent) = upstream.write_all(req).await;
        r.context("upstream write")?;
        req = sent;
        req.clear();
        req.extend_from_slice(&rest);

        let whole = read_until(&mut upstream, &mut resp, MAX_RESPONSE, response_len)
            .await
            .map_err(|e| match e {
                ReadError::Io(e) => anyhow::Error::new(e).context("upstream read"),
                ReadError::Message(e) => e.context("response"),
            })?
            .context("upstream closed")?;
        if resp.len() > whole {
            bail!("upstream sent bytes past its response");
        }
        let (r, sent) = client.write_all(resp).await;
        r.map_err(ClientIo)?;
        resp = sent;
        resp.clear();
    }
}

/// Why a message could not be read: the socket, or the message itself.
enum ReadError {
    Io(io::Error),
    Message(anyhow::Error),
}

/// Reads into `buf` until `complete` says how long the message is and it is all there (None:
/// the peer closed before sending anything). `complete` is called on the whole buffer until it
/// gives a length, then not again: a long body is not parsed at every read.
async fn read_until(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    limit: usize,
    complete: impl Fn(&[u8]) -> Result<Option<usize>>,
) -> Result<Option<usize>, ReadError> {
    let mut known = None;
    loop {
        if known.is_none() {
            known = complete(buf).map_err(ReadError::Message)?;
        }
        match known {
            Some(n) if n > limit => {
                return Err(ReadError::Message(anyhow!("{n} bytes, over {limit}")));
            }
            Some(n) if buf.len() >= n => return Ok(Some(n)),
            None if buf.len() > limit => {
                return Err(ReadError::Message(anyhow!("head over {limit} bytes")));
            }
            _ => {}
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(known.map_or(16384, |n| n.saturating_sub(buf.len()).max(4096)));
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, back) = io.read(std::mem::take(buf).slice_mut(len..cap)).await;
        *buf = back.into_inner();
        if r.map_err(ReadError::Io)? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(ReadError::Message(anyhow!("peer closed mid-message")));
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
        Framing::Incomplete => Ok(None),
        Framing::Length(n) => Ok(Some(n)),
        Framing::Chunked => bail!("chunked (only Content-Length is forwarded)"),
        Framing::Unframed => bail!("no length known from its head"),
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
        assert!(response_len(b"HTTP/1.1 204 No Content\r\n\r\n").is_err());
        assert_eq!(response_len(b"HTTP/1.1 200 OK\r\n").unwrap(), None);
    }
}
