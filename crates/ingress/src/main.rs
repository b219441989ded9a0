//! `ingress-controller`: the ingress-nginx drop-in. It runs the Ingress sync loop (caches →
//! routing snapshot) and the HTTP/HTTPS proxy in one process; every replica serves traffic.

use clap::Parser;
use ingress::cli::Args;
use kube_common::Manager;

// musl's allocator maps and unmaps small groups under load (benches/README.md, change 9).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mgr = Manager::from_args("ingress-nginx", &args.common).await?;
    let running = ingress::app::start(&mgr, &args).await?;
    mgr.shutdown.cancelled().await;
    // New connections are refused from here; open ones finish their requests.
    for server in running.servers {
        let _ = server.await;
    }
    Ok(())
}
