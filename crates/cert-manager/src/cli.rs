//! Flags of `cert-manager-controller` (and `cert-manager controller`), with upstream's names and defaults where upstream has
//! the flag.

use std::net::SocketAddr;
use std::time::Duration;

use kube_common::args::{CommonArgs, parse_duration};

#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Namespace for ClusterIssuer resources (their ACME account Secrets live here).
    #[arg(long, default_value = "kube-system")]
    pub cluster_resource_namespace: String,

    /// Issuer used for Ingresses with only `kubernetes.io/tls-acme: "true"`.
    #[arg(long, default_value = "")]
    pub default_issuer_name: String,

    #[arg(long, default_value = "Issuer")]
    pub default_issuer_kind: String,

    #[arg(long, default_value = "cert-manager.io")]
    pub default_issuer_group: String,

    /// Annotations that make the ingress-shim act with the default issuer.
    #[arg(long, value_delimiter = ',', default_value = "kubernetes.io/tls-acme")]
    pub auto_certificate_annotations: Vec<String>,

    /// Ingress annotations copied onto the Certificates the ingress-shim makes.
    #[arg(long, value_delimiter = ',')]
    pub extra_certificate_annotations: Vec<String>,

    /// Give the TLS Secret an owner reference to its Certificate (deleted with it).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub enable_certificate_owner_ref: bool,

    /// Address of /metrics (plus /healthz and /readyz).
    #[arg(long, default_value = "0.0.0.0:9402")]
    pub metrics_listen_address: SocketAddr,

    /// DNS servers (host:port) for the HTTP-01 self-check, instead of the system resolver.
    #[arg(long, value_delimiter = ',')]
    pub acme_http01_solver_nameservers: Vec<SocketAddr>,

    /// Upstream's acmesolver image, which its manifests pass: accepted and unused, as this
    /// process answers HTTP-01 challenges itself (no solver pods).
    #[arg(long)]
    pub acme_http01_solver_image: Option<String>,

    /// Upstream's bound on challenges presented at once (its manifests pass 60): accepted;
    /// not enforced (each challenge here is an in-memory route, not a pod).
    #[arg(long, default_value_t = 60)]
    pub max_concurrent_challenges: u32,

    /// Where this process answers HTTP-01 challenges (upstream's acmesolver port).
    #[arg(long, default_value = "0.0.0.0:8089")]
    pub acme_http01_solver_listen_address: SocketAddr,

    /// Address the challenge Services point at: this pod's IP (downward API `POD_IP`).
    #[arg(long, env = "POD_IP")]
    pub acme_http01_solver_address: Option<std::net::IpAddr>,

    /// Port of the HTTP-01 self-check GET (80 in production; tests point it at their ingress).
    #[arg(long, default_value_t = 80)]
    pub acme_http01_self_check_port: u16,

    /// Passes of the self-check needed before the ACME server is asked to validate
    /// (upstream: 5, 2 s apart).
    #[arg(long, default_value_t = 3)]
    pub acme_http01_self_check_passes: u32,

    /// Pause between self-check passes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub acme_http01_self_check_interval: Duration,

    /// First delay after a failed issuance; doubles per failure.
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub certificate_request_minimum_backoff_duration: Duration,

    /// Longest delay after repeated failed issuances.
    #[arg(long, default_value = "32h", value_parser = parse_duration)]
    pub certificate_request_maximum_backoff_duration: Duration,
}
