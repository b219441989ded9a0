//! `cert-manager`: one binary, three Deployments (as upstream ships three images).
//! `controller` runs the issuance controllers, `cainjector` keeps CA bundles injected,
//! `webhook` validates cert-manager resources; `crds` prints the CRD manifest.

use std::io::Write;

use clap::{Parser, Subcommand};
use kube_common::Manager;

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
        Command::Controller(args) => {
            let mgr = Manager::from_args("cert-manager", &args.common).await?;
            cert_manager::controller::start(&mgr, &args).await?;
            mgr.shutdown.cancelled().await;
        }
        Command::Cainjector(args) => {
            let mgr = Manager::from_args("cert-manager-cainjector", &args.common).await?;
            cert_manager::cainjector::start(&mgr, &args).await?;
            mgr.shutdown.cancelled().await;
        }
        Command::Webhook(args) => {
            let mgr = Manager::from_args("cert-manager-webhook", &args.common).await?;
            cert_manager::webhook::start(&mgr, &args).await?;
            mgr.shutdown.cancelled().await;
        }
        Command::Crds => {
            std::io::stdout()
                .lock()
                .write_all(cert_manager::crds::manifest()?.as_bytes())?;
        }
    }
    Ok(())
}
