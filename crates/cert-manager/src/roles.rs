//! Upstream's three Deployments, each run until shutdown. Each has its own binary
//! (`cert-manager-controller`, `-cainjector`, `-webhook`: upstream's three images), so a
//! process maps only its own role's code; `cert-manager <role>` runs any of them.

use kube_common::Manager;

use crate::cli::ControllerArgs;

/// Certificates, CertificateRequests, Orders, Challenges, Issuers and the ingress-shim.
pub async fn controller(args: &ControllerArgs) -> anyhow::Result<()> {
    let mgr = Manager::from_args("cert-manager", &args.common).await?;
    crate::controller::start(&mgr, args).await?;
    mgr.shutdown.cancelled().await;
    Ok(())
}

/// CA bundles injected into webhook configurations, CRDs and APIServices.
pub async fn cainjector(args: &crate::cainjector::Args) -> anyhow::Result<()> {
    let mgr = Manager::from_args("cert-manager-cainjector", &args.common).await?;
    crate::cainjector::start(&mgr, args).await?;
    mgr.shutdown.cancelled().await;
    Ok(())
}

/// The admission webhook for the cert-manager kinds.
pub async fn webhook(args: &crate::webhook::Args) -> anyhow::Result<()> {
    let mgr = Manager::from_args("cert-manager-webhook", &args.common).await?;
    crate::webhook::start(&mgr, args).await?;
    mgr.shutdown.cancelled().await;
    Ok(())
}
