//! The HTTP client under instant-acme: TLS trust per issuer (`caBundle`, `skipTLSVerify`, or
//! the system roots) and upstream's `certmanager_http_acme_client_*` metrics per request.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use instant_acme::{BodyWrapper, BytesResponse, HttpClient};
use rustls_pki_types::pem::PemObject;

use crate::metrics::{AcmeLabels, Metrics};

/// Upstream's ACME HTTP client gives each request 30 s: a CA that stops answering fails the
/// step (retried with backoff) instead of holding a worker forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

type Inner = HyperClient<hyper_rustls::HttpsConnector<HttpConnector>, BodyWrapper<Bytes>>;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("caBundle holds no usable PEM certificate")]
    BadCaBundle,
    #[error("TLS set-up failed: {0}")]
    Tls(String),
}

/// How the ACME server's certificate is checked.
pub enum Trust<'a> {
    System,
    /// PEM bundle (the issuer's decoded `caBundle`).
    Bundle(&'a [u8]),
    Insecure,
}

pub struct MeteredClient {
    inner: Inner,
    metrics: Metrics,
}

impl MeteredClient {
    pub fn new(trust: Trust<'_>, metrics: Metrics) -> Result<Self, ClientError> {
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match trust {
            Trust::System => builder
                .try_with_platform_verifier()
                .map_err(|e| ClientError::Tls(e.to_string()))?,
            Trust::Bundle(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem).flatten() {
                    roots.add(cert).map_err(|_| ClientError::BadCaBundle)?;
                }
                if roots.is_empty() {
                    return Err(ClientError::BadCaBundle);
                }
                builder.with_tls_config(
                    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                        rustls::crypto::ring::default_provider(),
                    ))
                    .with_safe_default_protocol_versions()
                    .map_err(|e| ClientError::Tls(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth(),
                )
            }
            Trust::Insecure => builder.with_tls_config(kube_common::tls::insecure_client_config()),
        };
        let connector = builder.https_only().enable_http1().enable_http2().build();
        Ok(Self {
            inner: HyperClient::builder(TokioExecutor::new()).build(connector),
            metrics,
        })
    }
}

impl HttpClient for MeteredClient {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let uri = req.uri().clone();
        let mut labels = AcmeLabels {
            scheme: uri.scheme_str().unwrap_or("https").to_string(),
            host: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            action: action(uri.path()),
            method: req.method().to_string(),
            status: String::new(),
        };
        let metrics = self.metrics.clone();
        let fut = HttpClient::request(&self.inner, req);
        Box::pin(async move {
            let started = Instant::now();
            // The body is read inside the deadline too (instant-acme reads it later,
            // without one): a CA that sends headers and then stalls fails the same way.
            let whole = async {
                let mut rsp = fut.await?;
                let body = rsp
                    .body
                    .into_bytes()
                    .await
                    .map_err(instant_acme::Error::Other)?;
                Ok(BytesResponse {
                    parts: rsp.parts,
                    body: Box::new(body),
                })
            };
            let result = match tokio::time::timeout(REQUEST_TIMEOUT, whole).await {
                Ok(r) => r,
                Err(_) => Err(instant_acme::Error::Other(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{} {uri}: no answer within {REQUEST_TIMEOUT:?}",
                        labels.method
                    ),
                )))),
            };
            labels.status = match &result {
                Ok(rsp) => rsp.parts.status.as_u16().to_string(),
                Err(_) => "999".into(),
            };
            metrics
                .acme_client_request_duration_seconds
                .get_or_create(&labels)
                .observe(started.elapsed().as_secs_f64());
            metrics
                .acme_client_request_count
                .get_or_create(&labels)
                .inc();
            result
        })
    }
}

/// The ACME resource a URL path addresses (its first segment), so per-order and
/// per-authorization URLs share one series.
fn action(path: &str) -> String {
    path.trim_start_matches('/')
        .split('/')
        .next()
        .filter(|s| !s.is_empty())
        .unwrap_or("directory")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A CA that accepts the connection and never answers fails the request after the
    /// timeout, instead of holding the caller forever.
    #[tokio::test(start_paused = true)]
    async fn a_silent_server_times_out() {
        kube_common::client::install_crypto_provider();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                open.push(s);
            }
        });
        let metrics = Metrics::register(&mut prometheus_client::registry::Registry::default());
        let client = MeteredClient::new(Trust::Insecure, metrics).unwrap();
        let req = http::Request::get(format!("https://{addr}/dir"))
            .body(BodyWrapper::from(Vec::new()))
            .unwrap();
        let started = tokio::time::Instant::now();
        let result = client.request(req).await;
        assert!(result.is_err(), "a silent server is an error");
        assert!(started.elapsed() >= REQUEST_TIMEOUT);
    }

    #[test]
    fn action_is_the_first_path_segment() {
        assert_eq!(super::action("/order-plz"), "order-plz");
        assert_eq!(super::action("/authZ/abc123"), "authZ");
        assert_eq!(super::action("/"), "directory");
    }
}
