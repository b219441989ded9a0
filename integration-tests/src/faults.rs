//! Faults a real peer cannot be asked to produce, injected in front of it: a TCP forwarder that
//! can be cut (a network partition between one client and the real apiserver), and an HTTPS
//! proxy that answers chosen requests with a server error itself (a transient fault of the real
//! ACME server at one chosen step).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::pki::TestCa;
use crate::{HarnessError, Result};

/// Forwards 127.0.0.1:<port> to a target; [`TcpForwarder::partition`] drops every open
/// connection and refuses new ones until [`TcpForwarder::heal`].
pub struct TcpForwarder {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_now: Arc<Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpForwarder {
    pub async fn start(target: SocketAddr) -> Result<TcpForwarder> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let cut = Arc::new(AtomicBool::new(false));
        let cut_now = Arc::new(Notify::new());
        let (c, n) = (cut.clone(), cut_now.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees a reset
                }
                let n = n.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = n.notified() => {}
                    }
                });
            }
        });
        Ok(TcpForwarder {
            addr,
            cut,
            cut_now,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn partition(&self) {
        self.cut.store(true, Ordering::SeqCst);
        self.cut_now.notify_waiters();
    }

    pub fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One request the [`HttpsFaultProxy`] answered.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    /// The status the client got (502 when the upstream could not be reached).
    pub status: u16,
    /// Answered by the proxy as an injected fault; the upstream never saw it.
    pub injected: bool,
}

impl std::fmt::Display for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let by = if self.injected { " (injected)" } else { "" };
        write!(f, "{} {} → {}{by}", self.method, self.path, self.status)
    }
}

/// How the [`HttpsFaultProxy`] answers during an outage window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// Every request answered 503 at once (an ACME `serverInternal` problem).
    ServerError,
    /// Every request held until the window ends, then answered 504: a server that stopped
    /// answering (the client's own timeout decides when it gives up).
    Hang,
}

#[derive(Default)]
struct ProxyState {
    /// Path prefix → how many more requests under it to fail.
    faults: Vec<(String, usize)>,
    /// Outage windows, in order, as (end, kind); each starts where the previous one ends.
    outages: Vec<(tokio::time::Instant, Outage)>,
    log: Vec<Exchange>,
}

impl ProxyState {
    /// The outage in force now and when it ends, dropping windows already over.
    fn outage(&mut self) -> Option<(tokio::time::Instant, Outage)> {
        let now = tokio::time::Instant::now();
        self.outages.retain(|(end, _)| *end > now);
        self.outages.first().copied()
    }

    /// Takes one armed fault for `path`, if any.
    fn take_fault(&mut self, path: &str) -> bool {
        match self
            .faults
            .iter_mut()
            .find(|(prefix, left)| *left > 0 && path.starts_with(prefix.as_str()))
        {
            Some((_, left)) => {
                *left -= 1;
                true
            }
            None => false,
        }
    }
}

type Upstream = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// An HTTPS reverse proxy in front of a real HTTPS server (pebble's ACME API): it logs every
/// request and can answer the next N requests under a path prefix with a 500 itself, a fault
/// the real server cannot be asked to produce at a chosen step (e.g. right after new-order).
///
/// It listens on 127.0.0.1 with a certificate for `localhost` and `127.0.0.1` from a CA of its
/// own ([`HttpsFaultProxy::ca_pem`]). The Host header is passed on unchanged: pebble builds every
/// URL it returns (directory, Location, order and authorization URLs) from it, so clients keep
/// talking through the proxy, and the JWS `url` they sign is the one pebble checks against.
pub struct HttpsFaultProxy {
    addr: SocketAddr,
    ca_pem: String,
    state: Arc<Mutex<ProxyState>>,
    task: tokio::task::JoinHandle<()>,
}

impl HttpsFaultProxy {
    /// Proxies to the scheme and authority of `upstream` (e.g. pebble's directory URL), trusting
    /// only `upstream_ca_pem` for its certificate.
    pub async fn start(upstream: &str, upstream_ca_pem: &str) -> Result<HttpsFaultProxy> {
        crate::install_crypto_provider();
        let bad_upstream =
            || HarnessError::Http(format!("fault proxy: bad upstream URL {upstream}"));
        let upstream: Uri = upstream.parse().map_err(|_| bad_upstream())?;
        let authority = upstream.authority().ok_or_else(bad_upstream)?.clone();
        let base = format!("https://{authority}");

        let ca = TestCa::new("homecluster-fault-proxy-ca")?;
        let leaf = ca.leaf("fault-proxy", &["localhost", "127.0.0.1"])?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(
            &leaf.cert_pem,
            &leaf.key_pem,
        )?));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::http::tls_config(Some(upstream_ca_pem))?)
            .https_only()
            .enable_http1()
            .build();
        let client: Upstream = Client::builder(TokioExecutor::new()).build(connector);

        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let shared = state.clone();
        let task = tokio::spawn(async move {
            // Connections end with the proxy (the set aborts them when dropped).
            let mut connections = JoinSet::new();
            while let Ok((tcp, _)) = listener.accept().await {
                while connections.try_join_next().is_some() {}
                let (acceptor, client, state, base) = (
                    acceptor.clone(),
                    client.clone(),
                    shared.clone(),
                    base.clone(),
                );
                connections.spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let svc = service_fn(move |req| {
                        let (client, state, base) = (client.clone(), state.clone(), base.clone());
                        async move { Ok::<_, Infallible>(handle(req, &client, &state, &base).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        Ok(HttpsFaultProxy {
            addr,
            ca_pem: ca.cert_pem,
            state,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA of the proxy's certificate: what its clients must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `https://localhost:<port><path>`: the upstream's `path`, through the proxy.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    /// Answers the next `n` requests whose path starts with `prefix` with a 500 (an ACME
    /// `serverInternal` problem) instead of forwarding them.
    pub fn fail_next(&self, prefix: &str, n: usize) {
        lock(&self.state).faults.push((prefix.to_string(), n));
    }

    /// Makes the upstream unavailable for `length`, in the way `kind` says, starting when the
    /// outages armed before it end (or now).
    pub fn outage(&self, kind: Outage, length: Duration) {
        let mut state = lock(&self.state);
        let now = tokio::time::Instant::now();
        let start = state.outages.last().map_or(now, |(end, _)| (*end).max(now));
        state.outages.push((start + length, kind));
    }

    /// Every request answered so far, in order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        lock(&self.state).log.clone()
    }
}

impl Drop for HttpsFaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock(state: &Mutex<ProxyState>) -> std::sync::MutexGuard<'_, ProxyState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn handle(
    req: Request<Incoming>,
    client: &Upstream,
    state: &Mutex<ProxyState>,
    base: &str,
) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let outage = lock(state).outage();
    let injected = outage.is_some() || lock(state).take_fault(&path);
    let response = if let Some((end, kind)) = outage {
        if kind == Outage::Hang {
            tokio::time::sleep_until(end).await;
        }
        let status = match kind {
            Outage::ServerError => StatusCode::SERVICE_UNAVAILABLE,
            Outage::Hang => StatusCode::GATEWAY_TIMEOUT,
        };
        problem(status, "serverInternal", "injected outage")
    } else if injected {
        problem(
            StatusCode::INTERNAL_SERVER_ERROR,
            "serverInternal",
            "injected fault",
        )
    } else {
        match forward(req, client, base).await {
            Ok(r) => r,
            Err(e) => problem(StatusCode::BAD_GATEWAY, "serverInternal", &e.to_string()),
        }
    };
    lock(state).log.push(Exchange {
        method,
        path,
        status: response.status().as_u16(),
        injected,
    });
    response
}

async fn forward(
    req: Request<Incoming>,
    client: &Upstream,
    base: &str,
) -> Result<Response<Full<Bytes>>> {
    let http_err = |e: &dyn std::fmt::Display| HarnessError::Http(format!("fault proxy: {e}"));
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut out = Request::builder()
        .method(parts.method.clone())
        .uri(format!("{base}{path}"));
    if let Some(h) = out.headers_mut() {
        copy_end_to_end(&parts.headers, h);
    }
    let body = body.collect().await.map_err(|e| http_err(&e))?.to_bytes();
    let out = out.body(Full::new(body)).map_err(|e| http_err(&e))?;
    let rsp = client.request(out).await.map_err(|e| http_err(&e))?;
    let (parts, body) = rsp.into_parts();
    let body = body.collect().await.map_err(|e| http_err(&e))?.to_bytes();
    let mut back = Response::new(Full::new(body));
    *back.status_mut() = parts.status;
    copy_end_to_end(&parts.headers, back.headers_mut());
    Ok(back)
}

/// Headers minus the per-connection ones (hyper frames the collected body itself).
fn copy_end_to_end(from: &HeaderMap, to: &mut HeaderMap) {
    for (name, value) in from {
        if ![
            header::CONNECTION,
            header::TRANSFER_ENCODING,
            header::CONTENT_LENGTH,
            header::UPGRADE,
        ]
        .contains(name)
        {
            to.append(name, value.clone());
        }
    }
}

/// An RFC 7807 problem document, as an ACME server answers errors.
fn problem(status: StatusCode, acme_type: &str, detail: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({
        "type": format!("urn:ietf:params:acme:error:{acme_type}"),
        "detail": detail,
        "status": status.as_u16(),
    });
    let mut rsp = Response::new(Full::new(Bytes::from(body.to_string())));
    *rsp.status_mut() = status;
    rsp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/problem+json"),
    );
    rsp
}

fn server_config(cert_pem: &str, key_pem: &str) -> Result<rustls::ServerConfig> {
    let tls_err = |e: &dyn std::fmt::Display| HarnessError::Http(format!("fault proxy TLS: {e}"));
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| tls_err(&e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| tls_err(&e))?;
    rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&e))
}
