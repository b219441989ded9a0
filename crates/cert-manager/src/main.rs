//! `cert-manager`: every role in one binary, for development: `controller`, `cainjector` and
//! `webhook` run what the images' own binaries run (`cert-manager-controller`, ...); `crds`
//! prints the CRD manifest.

use std::io::Write;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cert-manager", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates, CertificateRequests, Orders, Challenges, Issuers and the ingress-shim.
    Controller(Box<cert_manager::cli::ControllerArgs>),
    /// Injects CA bundles into webhook configurations, CRDs and APIServices.
    Cainjector(cert_manager::cainjector::Args),
    /// Validating (and mutating) admission webhook for the cert-manager kinds.
    Webhook(cert_manager::webhook::Args),
    /// Prints the CRD manifest generated from the types (deploy/cert-manager/crds.yaml).
    Crds,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Controller(args) => cert_manager::roles::controller(&args).await?,
        Command::Cainjector(args) => cert_manager::roles::cainjector(&args).await?,
        Command::Webhook(args) => cert_manager::roles::webhook(&args).await?,
        Command::Crds => {
            std::io::stdout()
                .lock()
                .write_all(cert_manager::crds::manifest()?.as_bytes())?;
        }
    }
    Ok(())
}
