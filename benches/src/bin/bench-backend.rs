//! `bench-backend --plain ADDR [--tls ADDR --cert PEM --key PEM] [--threads N]`: the benchmark
//! backend as its own process, so its CPU is not the harness's or a proxy's.

use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    plain: std::net::SocketAddr,
    #[arg(long)]
    tls: Option<std::net::SocketAddr>,
    #[arg(long)]
    cert: Option<std::path::PathBuf>,
    #[arg(long)]
    key: Option<std::path::PathBuf>,
    /// Worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    threads: Option<usize>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async {
        let plain = tokio::net::TcpListener::bind(args.plain)
            .await
            .with_context(|| format!("binding {}", args.plain))?;
        let tls = match (args.tls, &args.cert, &args.key) {
            (Some(addr), Some(cert), Some(key)) => {
                let cert = std::fs::read_to_string(cert).context("reading --cert")?;
                let key = std::fs::read_to_string(key).context("reading --key")?;
                let config = benches::backend::tls_config(&cert, &key)?;
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                Some((listener, Arc::new(config)))
            }
            (None, _, _) => None,
            _ => anyhow::bail!("--tls needs --cert and --key"),
        };
        benches::backend::serve(plain, tls).await?;
        Ok(())
    })
}
