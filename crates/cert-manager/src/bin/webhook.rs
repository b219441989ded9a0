//! `cert-manager-webhook`: upstream's webhook image (flags only, no subcommand).

use clap::Parser;

#[derive(Parser)]
#[command(name = "cert-manager-webhook", version, about)]
struct Cli {
    #[command(flatten)]
    args: cert_manager::webhook::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cert_manager::roles::webhook(&Cli::parse().args).await
}
