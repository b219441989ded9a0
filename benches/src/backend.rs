//! The benchmark backend: a small multi-threaded hyper server answering every request with a
//! fixed body (64 KiB when the path ends in `64k`, else 1 KiB), on a plain listener and on a
//! TLS listener (HTTP/1.1 and h2 by ALPN) so that direct-to-backend is the ceiling of every
//! scenario.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

pub const SMALL: usize = 1024;
pub const LARGE: usize = 64 * 1024;

/// The body for a request path.
pub fn body_for(path: &str, small: &Bytes, large: &Bytes) -> Bytes {
    if path.ends_with("64k") {
        large.clone()
    } else {
        small.clone()
    }
}

/// Serves `plain` (and `tls` with `config`) until the process ends.
pub async fn serve(
    plain: TcpListener,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
) -> std::io::Result<()> {
    let small = Bytes::from(vec![b'a'; SMALL]);
    let large = Bytes::from(vec![b'b'; LARGE]);
    if let Some((listener, config)) = tls {
        let acceptor = TlsAcceptor::from(config);
        let (small, large) = (small.clone(), large.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let acceptor = acceptor.clone();
                let (small, large) = (small.clone(), large.clone());
                tokio::spawn(async move {
                    if let Ok(tls) = acceptor.accept(stream).await {
                        serve_conn(TokioIo::new(tls), small, large).await;
                    }
                });
            }
        });
    }
    loop {
        let (stream, _) = plain.accept().await?;
        let _ = stream.set_nodelay(true);
        let (small, large) = (small.clone(), large.clone());
        tokio::spawn(serve_conn(TokioIo::new(stream), small, large));
    }
}

async fn serve_conn<I>(io: I, small: Bytes, large: Bytes)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
        let body = body_for(req.uri().path(), &small, &large);
        async move {
            let mut resp = Response::new(Full::new(body));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/octet-stream"),
            );
            Ok::<_, Infallible>(resp)
        }
    });
    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(io, svc)
        .await;
}

/// A rustls server config from PEM files, offering h2 and HTTP/1.1.
pub fn tls_config(cert_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig, crate::Error> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| crate::Error::Tls(e.to_string()))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| crate::Error::Tls(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| crate::Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| crate::Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}
