//! `cert-manager-cainjector`: upstream's cainjector image (flags only, no subcommand).

use clap::Parser;

#[derive(Parser)]
#[command(name = "cert-manager-cainjector", version, about)]
struct Cli {
    #[command(flatten)]
    args: cert_manager::cainjector::Args,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cert_manager::roles::cainjector(&Cli::parse().args).await
}
