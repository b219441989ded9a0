//! `cert-manager-controller`: upstream's controller image (flags only, no subcommand).

use clap::Parser;

#[derive(Parser)]
#[command(name = "cert-manager-controller", version, about)]
struct Cli {
    #[command(flatten)]
    args: cert_manager::cli::ControllerArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cert_manager::roles::controller(&Cli::parse().args).await
}
