//! `cert-manager-webhook`: validating (`/validate`) and mutating (`/mutate`) admission for the
//! cert-manager kinds over HTTPS, with the serving certificate from a self-managed CA
//! ([`authority`]), and `/healthz` + `/livez` on a plain HTTP port. No leader election: every
//! replica serves.

pub mod admission;
pub mod authority;
pub mod validation;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use kube_common::Manager;
use kube_common::args::CommonArgs;
use kube_common::serve::serve_https;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use authority::{Authority, DynamicCert};

/// AdmissionReview bodies are small; anything larger is refused.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// Flags, with upstream's names and the chart's values as defaults.
#[derive(Clone, Debug, clap::Parser)]
#[command(name = "webhook")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// HTTPS port of the admission endpoints (upstream's chart uses 10250).
    #[arg(long, default_value_t = 10250)]
    pub secure_port: u16,

    /// Plain HTTP port of /livez, /healthz, /readyz and /metrics (`--health-address` overrides).
    #[arg(long, default_value_t = 6080)]
    pub healthz_port: u16,

    /// Address both servers listen on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub listen_host: IpAddr,

    /// Namespace of the Secret holding the self-managed serving CA.
    #[arg(long, env = "POD_NAMESPACE", default_value = "cert-manager")]
    pub dynamic_serving_ca_secret_namespace: String,

    /// Name of the Secret holding the self-managed serving CA.
    #[arg(long, default_value = "cert-manager-webhook-ca")]
    pub dynamic_serving_ca_secret_name: String,

    /// Names the serving certificate is valid for (IP literals become IP SANs).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "cert-manager-webhook,cert-manager-webhook.cert-manager,cert-manager-webhook.cert-manager.svc"
    )]
    pub dynamic_serving_dns_names: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("health server: {0}")]
    Health(#[from] kube_common::Error),
}

/// The bound addresses and the live serving certificate (for tests and embedding).
pub struct Running {
    pub secure_addr: SocketAddr,
    pub healthz_addr: SocketAddr,
    pub cert: Arc<DynamicCert>,
}

/// Entry point of `cert-manager-webhook`: starts everything in the background.
pub async fn start(mgr: &Manager, args: &Args) -> anyhow::Result<()> {
    let running = run(mgr, args).await?;
    tracing::info!(secure = %running.secure_addr, healthz = %running.healthz_addr, "webhook listening");
    Ok(())
}

/// Starts the CA/leaf loop, the HTTPS admission server and the health server; returns once
/// both listeners are bound.
pub async fn run(mgr: &Manager, args: &Args) -> Result<Running, WebhookError> {
    kube_common::client::install_crypto_provider();
    let authority = Authority::new(
        mgr.client.clone(),
        &args.dynamic_serving_ca_secret_namespace,
        &args.dynamic_serving_ca_secret_name,
        args.dynamic_serving_dns_names.clone(),
    );
    let cert = authority.cert.clone();
    tokio::spawn(authority.run(mgr.shutdown.clone()));

    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(cert.clone());
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let secure_addr = serve_admission(
        SocketAddr::new(args.listen_host, args.secure_port),
        Arc::new(tls),
        mgr.shutdown.clone(),
    )
    .await?;
    // kube-common's server on the health port: /livez and /healthz while running, /readyz once
    // a serving certificate is loaded, /metrics.
    let ready = mgr
        .readiness
        .register("cert-manager-webhook/serving-certificate");
    let loaded = cert.clone();
    tokio::spawn(async move {
        while !loaded.is_ready() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        ready.set(true);
    });
    let health = args
        .common
        .health_address
        .unwrap_or_else(|| SocketAddr::new(args.listen_host, args.healthz_port));
    let healthz_addr = mgr.serve_health(health).await?;
    Ok(Running {
        secure_addr,
        healthz_addr,
        cert,
    })
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), WebhookError> {
    let listen = |source| WebhookError::Listen { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(listen)?;
    let bound = listener.local_addr().map_err(listen)?;
    Ok((listener, bound))
}

async fn serve_admission(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, WebhookError> {
    let (listener, bound) = bind(addr).await?;
    tokio::spawn(serve_https("webhook", listener, tls, shutdown, admit));
    Ok(bound)
}

async fn admit(req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let mutate = match (req.method(), req.uri().path()) {
        (&Method::POST, "/validate") => false,
        (&Method::POST, "/mutate") => true,
        _ => return reply(StatusCode::NOT_FOUND, "not found".into()),
    };
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "request too large".into()),
    };
    match admission::review(&body, mutate).and_then(|v| Ok(serde_json::to_vec(&v)?)) {
        Ok(json) => {
            let mut r = Response::new(Full::new(Bytes::from(json)));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        Err(e) => reply(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn reply(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg)));
    *r.status_mut() = status;
    r
}
