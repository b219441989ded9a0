//! `floor-proxy --listen ADDR --backend ADDR --driver uring|epoll`: the least an HTTP/1 proxy can
//! do per request (read a GET head, forward it on the client's own upstream connection, read the
//! answer by its Content-Length, write it back), on one monoio thread with either io_uring or
//! epoll (mio) underneath. The same code on both drivers measures what io_uring itself buys
//! on this kernel, for issue 12's question whether an io_uring runtime could move the floor
//! (benches/README.md, change 14). Not a proxy: no routing, no header rewriting, GET only.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::{TcpListener, TcpStream};

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
    let threads: Vec<_> = (0..args.threads.max(1))
        .map(|_| {
            let (driver, setup) = (args.driver, args.uring_setup.clone());
            let (listen, backend) = (args.listen, args.backend);
            std::thread::spawn(move || worker(driver, &setup, listen, backend))
        })
        .collect();
    for t in threads {
        t.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
    }
    Ok(())
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
        let (client, _) = listener.accept().await.context("accept")?;
        monoio::spawn(async move {
            if let Err(e) = connection(client, backend).await {
                eprintln!("connection: {e:#}");
            }
        });
    }
}

/// One client connection with its own upstream connection, request after request.
async fn connection(mut client: TcpStream, backend: SocketAddr) -> Result<()> {
    client.set_nodelay(true)?;
    let mut upstream = TcpStream::connect(backend).await.context("connect")?;
    upstream.set_nodelay(true)?;
    let mut req = Vec::with_capacity(4096);
    let mut resp = Vec::with_capacity(8192);
    loop {
        let head = match read_until(&mut client, &mut req, |b| Ok(head_len(b))).await? {
            Some(n) => n,
            None => return Ok(()),
        };
        let rest = req.split_off(head);
        let (r, sent) = upstream.write_all(req).await;
        r.context("upstream write")?;
        req = sent;
        req.clear();
        req.extend_from_slice(&rest);

        let whole = read_until(&mut upstream, &mut resp, response_len)
            .await?
            .context("upstream closed")?;
        let rest = resp.split_off(whole);
        let (r, sent) = client.write_all(resp).await;
        r.context("client write")?;
        resp = sent;
        resp.clear();
        if !rest.is_empty() {
            bail!("upstream sent bytes past its response");
        }
    }
}

/// Reads into `buf` until `complete` says how long the message is (None: the peer closed
/// before sending anything).
async fn read_until(
    io: &mut TcpStream,
    buf: &mut Vec<u8>,
    complete: impl Fn(&[u8]) -> Result<Option<usize>>,
) -> Result<Option<usize>> {
    loop {
        if let Some(n) = complete(buf)?
            && buf.len() >= n
        {
            return Ok(Some(n));
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16384);
        }
        let (len, cap) = (buf.len(), buf.capacity());
        let (r, back) = io.read(std::mem::take(buf).slice_mut(len..cap)).await;
        *buf = back.into_inner();
        if r.context("read")? == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            bail!("peer closed mid-message");
        }
    }
}

/// The length of a complete head, if `b` holds one.
fn head_len(b: &[u8]) -> Option<usize> {
    b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The length of the whole response (head and Content-Length body), once its head is in.
fn response_len(b: &[u8]) -> Result<Option<usize>> {
    let Some(head) = head_len(b) else {
        return Ok(None);
    };
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    r.parse(&b[..head]).context("response head")?;
    let length = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .context("no Content-Length")?;
    let length: usize = std::str::from_utf8(length.value)?.trim().parse()?;
    Ok(Some(head + length))
}
