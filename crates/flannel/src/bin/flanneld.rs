//! flanneld: the kube subnet manager and the VXLAN backend (see the crate docs).

use clap::Parser;
use flannel::args::Args;

// One thread: flanneld's work is a few netlink and API calls at a time; a single-threaded
// runtime keeps its memory small.
#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let _ = kube_common::telemetry::init(kube_common::args::LogFormat::Text, &args.log_level);
    let shutdown = kube_common::shutdown::on_signal();
    if let Err(e) = flannel::daemon::run(args, shutdown).await {
        tracing::error!("{e:#}");
        eprintln!("flanneld: {e:#}");
        std::process::exit(1);
    }
}
