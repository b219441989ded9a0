//! The one HTTP server every component runs: `/healthz` (alive; also `/health`), `/readyz` (every registered
//! check ready, 503 before) and `/metrics` (OpenMetrics text of the component's registry).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use crate::serve::serve_plain;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::Error;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Named readiness checks; `/readyz` answers 200 only once all are ready.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// One check of [`Readiness`], e.g. "a controller's cache has synced".
#[derive(Clone)]
pub struct ReadyHandle {
    name: String,
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    /// Adds a check that starts not ready.
    pub fn register(&self, name: impl Into<String>) -> ReadyHandle {
        let name = name.into();
        self.lock().insert(name.clone(), false);
        ReadyHandle {
            name,
            checks: self.checks.clone(),
        }
    }

    /// Names of the checks not ready yet; empty means ready.
    pub fn pending(&self) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, bool>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts).
        self.checks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ReadyHandle {
    pub fn set(&self, ready: bool) {
        self.checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(self.name.clone(), ready);
    }
}

/// Shared state of the health server.
#[derive(Clone)]
pub struct HealthState {
    pub readiness: Readiness,
    pub registry: Arc<Mutex<Registry>>,
}

/// Binds `addr` and serves until `shutdown` is cancelled. Returns the bound address (port 0 picks
/// a free one) and the serving task.
pub async fn serve(
    addr: SocketAddr,
    state: HealthState,
    shutdown: CancellationToken,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), Error> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| Error::Bind { addr, source })?;
    tracing::info!(address = %local, "serving /healthz, /readyz and /metrics");
    let task = tokio::spawn(serve_plain("health", listener, shutdown, move |req| {
        route(&state, req)
    }));
    Ok((local, task))
}

fn route(state: &HealthState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed\n".into(),
        );
    }
    match req.uri().path() {
        // `/health` and `/ready`: the probe paths of components whose upstream used them
        // (local-path-provisioner), so their manifests keep working.
        "/healthz" | "/livez" | "/health" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" | "/ready" => {
            let pending = state.readiness.pending();
            if pending.is_empty() {
                text(StatusCode::OK, "ok\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", pending.join(", ")),
                )
            }
        }
        "/metrics" => {
            let mut body = String::new();
            let registry = state
                .registry
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match prometheus_client::encoding::text::encode(&mut body, &registry) {
                Ok(()) => Response::builder()
                    .header(CONTENT_TYPE, OPENMETRICS)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default(),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("encoding metrics failed: {e}\n"),
                ),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_check() {
        let r = Readiness::default();
        assert!(r.is_ready());
        let a = r.register("a");
        let b = r.register("b");
        assert_eq!(r.pending(), vec!["a".to_string(), "b".to_string()]);
        a.set(true);
        assert_eq!(r.pending(), vec!["b".to_string()]);
        b.set(true);
        assert!(r.is_ready());
        b.set(false);
        assert!(!r.is_ready());
    }
}
