//! Small HTTP(S) client helpers for tests: GET/POST with a custom CA, no proxy, no redirects.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::{HarnessError, Result};

/// Status and body of a response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A rustls client config (TLS 1.2 and 1.3) trusting only the certificates of `ca_pem`
/// (no roots at all without it): tests check the chain a server presents against the CA that
/// issued it, never against the system's roots.
pub fn tls_config(ca_pem: Option<&str>) -> Result<rustls::ClientConfig> {
    crate::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(pem) = ca_pem {
        for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes()) {
            let cert: rustls::pki_types::CertificateDer<'static> =
                cert.map_err(|e| HarnessError::Http(format!("bad CA PEM: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| HarnessError::Http(format!("bad CA certificate: {e}")))?;
        }
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// A TLS connection to `addr` with SNI (and verified name) `server_name`.
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    server_name: &str,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(std::io::Error::other)?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(name, tcp)
        .await
}

/// Sends `method url` with `body`, trusting only `ca_pem` for HTTPS.
pub async fn request(
    method: &str,
    url: &str,
    body: Option<Vec<u8>>,
    ca_pem: Option<&str>,
) -> Result<Reply> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls_config(ca_pem)?)
        .https_or_http()
        .enable_http1()
        .build();
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
    let req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| HarnessError::Http(e.to_string()))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| HarnessError::Http(format!("{method} {url}: {e}")))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| HarnessError::Http(format!("{method} {url}: {e}")))?
        .to_bytes();
    Ok(Reply { status, body })
}

pub async fn get(url: &str, ca_pem: Option<&str>) -> Result<Reply> {
    request("GET", url, None, ca_pem).await
}

pub async fn post_json(url: &str, json: &serde_json::Value, ca_pem: Option<&str>) -> Result<Reply> {
    request("POST", url, Some(json.to_string().into_bytes()), ca_pem).await
}
