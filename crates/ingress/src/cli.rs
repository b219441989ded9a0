//! Flags, named as ingress-nginx names them where it has them.

use std::net::IpAddr;

use clap::Parser;
use kube_common::CommonArgs;

use crate::ingress_class::{DEFAULT_CLASS, DEFAULT_CONTROLLER};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "ingress-controller",
    version,
    about = "Ingress controller and reverse proxy (ingress-nginx compatible)"
)]
pub struct Args {
    /// Port for plain HTTP (0: any free port).
    #[arg(long, default_value_t = 80)]
    pub http_port: u16,
    /// Port for HTTPS.
    #[arg(long, default_value_t = 443)]
    pub https_port: u16,
    /// Port of /healthz and /metrics.
    #[arg(long, default_value_t = 10254)]
    pub healthz_port: u16,
    /// Address every listener binds.
    #[arg(long, default_value = "0.0.0.0")]
    pub bind_address: IpAddr,
    /// IngressClass `spec.controller` value this controller owns.
    #[arg(long, default_value = DEFAULT_CONTROLLER)]
    pub controller_class: String,
    /// `kubernetes.io/ingress.class` annotation value this controller owns.
    #[arg(long, default_value = DEFAULT_CLASS)]
    pub ingress_class: String,
    /// Also serve Ingresses with neither a class name nor a class annotation.
    #[arg(long)]
    pub watch_ingress_without_class: bool,
    /// Controller ConfigMap, `namespace/name`.
    #[arg(long)]
    pub configmap: Option<String>,
    /// TLS Secret served when no Ingress certificate matches, `namespace/name`.
    #[arg(long)]
    pub default_ssl_certificate: Option<String>,
    /// Service for requests no rule matches, `namespace/name` (else a built-in 404).
    #[arg(long)]
    pub default_backend_service: Option<String>,
    /// Service whose address is written to Ingress status, `namespace/name`.
    #[arg(long)]
    pub publish_service: Option<String>,
    /// Lease name for leader election (status updates).
    #[arg(long, default_value = "ingress-nginx-leader")]
    pub election_id: String,
    /// Address of the validating admission webhook (e.g. `:8443`); off when unset.
    #[arg(long)]
    pub validating_webhook: Option<String>,
    #[arg(long)]
    pub validating_webhook_certificate: Option<std::path::PathBuf>,
    #[arg(long)]
    pub validating_webhook_key: Option<std::path::PathBuf>,
    /// Seconds to keep accepting after the shutdown signal (`/readyz` fails meanwhile, so load
    /// balancers and endpoints move away first); then the listeners close and open connections
    /// drain.
    #[arg(long, default_value_t = 0)]
    pub shutdown_grace_period: u64,

    #[command(flatten)]
    pub common: CommonArgs,
}
