//! Validating admission webhook for Ingresses (AdmissionReview v1), as ingress-nginx's
//! `validate.nginx.ingress.kubernetes.io`, but pure: class, pathType and annotation checks and
//! the host+path overlap check run in-process; no generated configuration is ever executed.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::runtime::reflector::Store;
use kube_common::serve::serve_https;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ingress_class::ClassSelector;
use crate::path_rules::PathKind;
use crate::proxy::Proxy;
use crate::snapshot::validate;

/// AdmissionReview bodies are small; anything larger is refused.
const MAX_BODY: usize = 3 * 1024 * 1024;

/// What the webhook checks against.
#[derive(Clone)]
pub struct Validator {
    pub class: ClassSelector,
    pub classes: Store<IngressClass>,
    pub proxy: Arc<Proxy>,
}

impl Validator {
    /// Ok(()) to admit; Err(message) to deny.
    pub fn check(&self, ingress: &Ingress) -> Result<(), String> {
        let classes = self.classes.state();
        if !self.class.accepts(ingress, classes.iter().map(Arc::as_ref)) {
            return Ok(()); // not ours to judge
        }
        validate(ingress).map_err(|errs| errs.join("; "))?;
        self.overlap(ingress)
    }

    /// Rejects a host+path another Ingress already defines (ingress-nginx's checkOverlap).
    fn overlap(&self, ingress: &Ingress) -> Result<(), String> {
        let snap = self.proxy.snapshot();
        let me = (
            ingress.metadata.namespace.clone().unwrap_or_default(),
            ingress.metadata.name.clone().unwrap_or_default(),
        );
        for rule in ingress.spec.iter().flat_map(|s| s.rules.iter().flatten()) {
            let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
            let server = snap.router.server(&host);
            if host != "_" && !snap.router.has_server(&host) {
                continue;
            }
            for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
                let p = path.path.as_deref().unwrap_or("/");
                let kind = PathKind::parse(Some(path.path_type.as_str()));
                let clash = server.rules().iter().find(|r| {
                    r.path == p
                        && Some(r.kind) == kind
                        && r.target.ingress.as_ref().is_some_and(|k| {
                            (k.namespace.as_str(), k.name.as_str())
                                != (me.0.as_str(), me.1.as_str())
                        })
                });
                if let Some(r) = clash
                    && let Some(k) = &r.target.ingress
                {
                    return Err(format!(
                        "host \"{host}\" and path \"{p}\" is already defined in ingress {}/{}",
                        k.namespace, k.name
                    ));
                }
            }
        }
        Ok(())
    }

    fn review(&self, body: &[u8]) -> Result<AdmissionReview<DynamicObject>, String> {
        let review: AdmissionReview<DynamicObject> =
            serde_json::from_slice(body).map_err(|e| format!("not an AdmissionReview: {e}"))?;
        let request: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|e| format!("AdmissionReview without request: {e}"))?;
        let mut response = AdmissionResponse::from(&request);
        if let Some(obj) = &request.object {
            let ingress = serde_json::to_value(obj)
                .and_then(serde_json::from_value::<Ingress>)
                .map_err(|e| format!("object is not an Ingress: {e}"));
            match ingress.and_then(|i| self.check(&i)) {
                Ok(()) => {}
                Err(msg) => response = response.deny(msg),
            }
        }
        Ok(response.into_review())
    }
}

/// Serves HTTPS on `addr` until shutdown.
pub async fn serve(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    validator: Validator,
    shutdown: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve_https(
        "webhook",
        listener,
        tls,
        shutdown,
        move |req| {
            let validator = validator.clone();
            async move { handle(&validator, req).await }
        },
    ));
    Ok(bound)
}

async fn handle(
    validator: &Validator,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, "request too large".into()),
    };
    match validator.review(&body) {
        Ok(review) => match serde_json::to_vec(&review) {
            Ok(json) => {
                let mut r = Response::new(Full::new(Bytes::from(json)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("application/json"),
                );
                r
            }
            Err(e) => reply(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        },
        Err(msg) => reply(StatusCode::BAD_REQUEST, msg),
    }
}

fn reply(status: StatusCode, msg: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(msg)));
    *r.status_mut() = status;
    r
}
