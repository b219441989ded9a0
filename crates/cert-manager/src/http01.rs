//! HTTP-01 solving without a pod per challenge: this process answers
//! `/.well-known/acme-challenge/<token>` itself (upstream's acmesolver behaviour), and each
//! Challenge gets a selector-less Service, an EndpointSlice pointing at this pod, and an Ingress
//! shaped as upstream's, so any ingress controller that routes by EndpointSlices (ours,
//! ingress-nginx) serves the token. The self-check then GETs the public path like upstream.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressBackend, IngressRule,
    IngressServiceBackend, IngressSpec, ServiceBackendPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams};
use kube::{Client, Resource, ResourceExt};
use kube_common::serve::serve_plain;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::api::Challenge;

pub const SOLVER_PORT: i32 = 8089;
const NAME_PREFIX: &str = "cm-acme-http-solver-";
const WELL_KNOWN: &str = "/.well-known/acme-challenge/";

#[derive(Debug, thiserror::Error)]
pub enum Http01Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    SelfCheck(String),
}

/// Tokens this process answers for: token → (domain, key authorization).
type Tokens = Arc<RwLock<HashMap<String, (String, String)>>>;

/// The in-process solver: token table, HTTP listener, and what challenge resources point at.
pub struct Solver {
    tokens: Tokens,
    /// Where the listener is bound (its port goes into the EndpointSlices).
    pub bound: SocketAddr,
    /// This pod's address, as the challenge EndpointSlices carry it.
    pub address: Option<IpAddr>,
    slices: ApiResource,
    resolver: Option<hickory_resolver::TokioResolver>,
    self_check_port: u16,
}

impl Solver {
    pub async fn start(
        client: &Client,
        listen: SocketAddr,
        address: Option<IpAddr>,
        nameservers: &[SocketAddr],
        self_check_port: u16,
        shutdown: CancellationToken,
    ) -> Result<Self, Http01Error> {
        let listener = TcpListener::bind(listen).await.map_err(|e| {
            Http01Error::Config(format!("binding the HTTP-01 solver on {listen}: {e}"))
        })?;
        let bound = listener
            .local_addr()
            .map_err(|e| Http01Error::Config(e.to_string()))?;
        let tokens: Tokens = Arc::default();
        tokio::spawn(serve(listener, tokens.clone(), shutdown));
        let resolver = if nameservers.is_empty() {
            None
        } else {
            use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
            let servers = nameservers
                .iter()
                .map(|ns| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = ns.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = ns.port();
                    NameServerConfig::new(ns.ip(), true, vec![udp, tcp])
                })
                .collect();
            Some(
                hickory_resolver::TokioResolver::builder_with_config(
                    ResolverConfig::from_name_servers(servers),
                    hickory_resolver::net::runtime::TokioRuntimeProvider::default(),
                )
                .build()
                .map_err(|e| Http01Error::Config(format!("DNS resolver: {e}")))?,
            )
        };
        Ok(Self {
            tokens,
            bound,
            address,
            slices: kube_common::discovery::endpoint_slice_resource(client).await?,
            resolver,
            self_check_port,
        })
    }

    pub fn add(&self, token: &str, domain: &str, key: &str) {
        let mut t = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        t.insert(
            token.to_string(),
            (domain.to_ascii_lowercase(), key.to_string()),
        );
    }

    pub fn remove(&self, token: &str) {
        let mut t = self.tokens.write().unwrap_or_else(|e| e.into_inner());
        t.remove(token);
    }

    /// Whether `ch`'s solver EndpointSlice points at this process and it answers the token:
    /// false after a restart, or once another pod (now not leading) presented it last.
    pub async fn points_here(&self, client: &Client, ch: &Challenge) -> Result<bool, Http01Error> {
        let known = self
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&ch.spec.token);
        let (Some(address), true) = (self.address, known) else {
            return Ok(false);
        };
        let ns = ch.namespace().unwrap_or_default();
        let slice = Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &self.slices)
            .get_opt(&resource_name(ch))
            .await?;
        Ok(slice.is_some_and(|s| slice_points_at(&s.data, address, self.bound.port())))
    }

    /// Creates (or re-creates) the Service, EndpointSlice and Ingress for a challenge.
    pub async fn present(&self, client: &Client, ch: &Challenge) -> Result<(), Http01Error> {
        self.add(&ch.spec.token, &ch.spec.dns_name, &ch.spec.key);
        let address = self.address.ok_or_else(|| {
            Http01Error::Config(
                "the solver address is unknown: set POD_IP (downward API) or --acme-http01-solver-address".into(),
            )
        })?;
        let ns = ch.namespace().unwrap_or_default();
        let name = resource_name(ch);
        let owner = ch
            .controller_owner_ref(&())
            .ok_or_else(|| Http01Error::Config("challenge has no uid".into()))?;
        let labels = solver_labels(ch);
        let pp = PatchParams::apply(crate::FIELD_MANAGER).force();
        let ingress_spec = ch
            .spec
            .solver
            .http01
            .as_ref()
            .and_then(|h| h.ingress.clone())
            .unwrap_or_default();

        let service = Service {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(labels.clone()),
                annotations: Some(BTreeMap::from([(
                    "auth.istio.io/8089".into(),
                    "NONE".into(),
                )])),
                owner_references: Some(vec![owner.clone()]),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                // No selector: the EndpointSlice below points at this process.
                type_: Some(
                    ingress_spec
                        .service_type
                        .clone()
                        .filter(|t| !t.is_empty())
                        .unwrap_or_else(|| "ClusterIP".into()),
                ),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: SOLVER_PORT,
                    target_port: Some(
                        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
                            self.bound.port(),
                        )),
                    ),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut svc_value =
            serde_json::to_value(&service).map_err(|e| Http01Error::Config(e.to_string()))?;
        svc_value["apiVersion"] = json!("v1");
        svc_value["kind"] = json!("Service");
        Api::<Service>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(svc_value))
            .await?;

        let mut slice_labels = labels.clone();
        slice_labels.insert("kubernetes.io/service-name".into(), name.clone());
        slice_labels.insert(
            "endpointslice.kubernetes.io/managed-by".into(),
            "cert-manager.io".into(),
        );
        let slice = json!({
            "apiVersion": self.slices.api_version,
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": ns,
                "labels": slice_labels,
                "ownerReferences": [owner],
            },
            "addressType": if address.is_ipv4() { "IPv4" } else { "IPv6" },
            "endpoints": [{ "addresses": [address.to_string()], "conditions": { "ready": true } }],
            "ports": [{ "name": "http", "port": self.bound.port(), "protocol": "TCP" }],
        });
        Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &self.slices)
            .patch(&name, &pp, &Patch::Apply(slice))
            .await?;

        let path = HTTPIngressPath {
            path: Some(format!("{WELL_KNOWN}{}", ch.spec.token)),
            path_type: "ImplementationSpecific".into(),
            backend: IngressBackend {
                service: Some(IngressServiceBackend {
                    name: name.clone(),
                    port: Some(ServiceBackendPort {
                        number: Some(SOLVER_PORT),
                        name: None,
                    }),
                }),
                resource: None,
            },
        };
        if let Some(existing) = ingress_spec.name.as_deref().filter(|n| !n.is_empty()) {
            return edit_in_place(client, &ns, existing, &ch.spec.dns_name, path, true).await;
        }
        let template = ingress_spec
            .ingress_template
            .and_then(|t| t.metadata)
            .unwrap_or_default();
        let mut ing_labels = labels;
        ing_labels.extend(template.labels.unwrap_or_default());
        let mut annotations = template.annotations.unwrap_or_default();
        if !annotations
            .keys()
            .any(|k| k.ends_with("/whitelist-source-range"))
        {
            annotations.insert(
                "nginx.ingress.kubernetes.io/whitelist-source-range".into(),
                "0.0.0.0/0,::/0".into(),
            );
        }
        if let Some(class) = ingress_spec.class.as_deref().filter(|c| !c.is_empty()) {
            annotations.insert("kubernetes.io/ingress.class".into(), class.into());
        }
        let ingress = Ingress {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(ing_labels),
                annotations: Some(annotations),
                owner_references: Some(vec![owner]),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                ingress_class_name: ingress_spec
                    .ingress_class_name
                    .clone()
                    .filter(|c| !c.is_empty()),
                rules: Some(vec![IngressRule {
                    host: host_rule(&ch.spec.dns_name),
                    http: Some(HTTPIngressRuleValue { paths: vec![path] }),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut value =
            serde_json::to_value(&ingress).map_err(|e| Http01Error::Config(e.to_string()))?;
        value["apiVersion"] = json!("networking.k8s.io/v1");
        value["kind"] = json!("Ingress");
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .patch(&name, &pp, &Patch::Apply(value))
            .await?;
        Ok(())
    }

    /// Removes what `present` made (owner references would do it too, on Challenge deletion).
    pub async fn cleanup(&self, client: &Client, ch: &Challenge) -> Result<(), Http01Error> {
        self.remove(&ch.spec.token);
        let ns = ch.namespace().unwrap_or_default();
        let name = resource_name(ch);
        let dp = DeleteParams::background();
        let ingress_spec = ch
            .spec
            .solver
            .http01
            .as_ref()
            .and_then(|h| h.ingress.clone())
            .unwrap_or_default();
        if let Some(existing) = ingress_spec.name.as_deref().filter(|n| !n.is_empty()) {
            let path = HTTPIngressPath {
                path: Some(format!("{WELL_KNOWN}{}", ch.spec.token)),
                ..Default::default()
            };
            match edit_in_place(client, &ns, existing, &ch.spec.dns_name, path, false).await {
                Ok(()) | Err(Http01Error::Kube(kube::Error::Api(_))) => {}
                Err(e) => return Err(e),
            }
        } else {
            ignore_not_found(
                Api::<Ingress>::namespaced(client.clone(), &ns)
                    .delete(&name, &dp)
                    .await,
            )?;
        }
        ignore_not_found(
            Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &self.slices)
                .delete(&name, &dp)
                .await,
        )?;
        ignore_not_found(
            Api::<Service>::namespaced(client.clone(), &ns)
                .delete(&name, &dp)
                .await,
        )?;
        Ok(())
    }

    /// One self-check pass: GET the public challenge URL, expect 200 and exactly the key.
    pub async fn self_check(&self, ch: &Challenge) -> Result<(), Http01Error> {
        let host = ch.spec.dns_name.as_str();
        let port = if self.self_check_port == 80 {
            String::new()
        } else {
            format!(":{}", self.self_check_port)
        };
        let host_part = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_string()
        };
        let mut url = format!("http://{host_part}{port}{WELL_KNOWN}{}", ch.spec.token);
        for _ in 0..10 {
            let (status, location, body) =
                tokio::time::timeout(Duration::from_secs(10), self.get(&url))
                    .await
                    .map_err(|_| Http01Error::SelfCheck(format!("GET {url}: timed out")))??;
            if status.is_redirection() {
                let next = location.ok_or_else(|| {
                    Http01Error::SelfCheck(format!("GET {url}: redirect without Location"))
                })?;
                url = absolute(&url, &next);
                continue;
            }
            if status != StatusCode::OK {
                return Err(Http01Error::SelfCheck(format!(
                    "wrong status code '{}', expected '200'",
                    status.as_u16()
                )));
            }
            if body != ch.spec.key.as_bytes() {
                return Err(Http01Error::SelfCheck(format!(
                    "did not get expected response when querying endpoint, expected {:?} but got: {:?}",
                    ch.spec.key,
                    String::from_utf8_lossy(&body[..body.len().min(256)])
                )));
            }
            return Ok(());
        }
        Err(Http01Error::SelfCheck(format!(
            "GET {url}: too many redirects"
        )))
    }

    async fn resolve(&self, host: &str) -> Result<IpAddr, Http01Error> {
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            return Ok(ip);
        }
        let fail = |e: String| Http01Error::SelfCheck(format!("resolving {host}: {e}"));
        match &self.resolver {
            Some(r) => r
                .lookup_ip(host)
                .await
                .map_err(|e| fail(e.to_string()))?
                .iter()
                .next()
                .ok_or_else(|| fail("no addresses".into())),
            None => tokio::net::lookup_host((host, 0))
                .await
                .map_err(|e| fail(e.to_string()))?
                .next()
                .map(|a| a.ip())
                .ok_or_else(|| fail("no addresses".into())),
        }
    }

    async fn get(&self, url: &str) -> Result<(StatusCode, Option<String>, Bytes), Http01Error> {
        let fail = |e: String| {
            Http01Error::SelfCheck(format!(
                "failed to perform self check GET request '{url}': {e}"
            ))
        };
        let uri: http::Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| fail(e.to_string()))?;
        let host = uri
            .host()
            .ok_or_else(|| fail("no host".into()))?
            .to_string();
        let https = uri.scheme_str() == Some("https");
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let ip = self.resolve(&host).await?;
        let tcp = TcpStream::connect((ip, port))
            .await
            .map_err(|e| fail(e.to_string()))?;
        let path = uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string();
        let host_header = match uri.port_u16() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        let req = Request::get(path)
            .header(http::header::HOST, host_header)
            .header(
                http::header::USER_AGENT,
                concat!("cert-manager-rs/", env!("CARGO_PKG_VERSION")),
            )
            .header(http::header::CONNECTION, "close")
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| fail(e.to_string()))?;
        let rsp = if https {
            // Upstream follows redirects to HTTPS without verifying the certificate.
            let connector = tokio_rustls::TlsConnector::from(Arc::new(
                kube_common::tls::insecure_client_config(),
            ));
            let name = rustls_pki_types::ServerName::try_from(host.clone())
                .map_err(|e| fail(e.to_string()))?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| fail(e.to_string()))?;
            send(TokioIo::new(tls), req).await.map_err(fail)?
        } else {
            send(TokioIo::new(tcp), req).await.map_err(fail)?
        };
        let status = rsp.status();
        let location = rsp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = Limited::new(rsp.into_body(), 1 << 20)
            .collect()
            .await
            .map_err(|e| fail(e.to_string()))?
            .to_bytes();
        Ok((status, location, body))
    }
}

async fn send<T>(
    io: TokioIo<T>,
    req: Request<http_body_util::Empty<Bytes>>,
) -> Result<Response<Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

fn absolute(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_string();
    }
    let origin_end = base
        .find("://")
        .map(|i| i + 3)
        .and_then(|s| base[s..].find('/').map(|p| s + p));
    match origin_end {
        Some(end) => format!("{}{}", &base[..end], location),
        None => format!("{base}{location}"),
    }
}

/// Whether an EndpointSlice's (JSON) body lists `address` and `port` first, as `present`
/// writes it.
fn slice_points_at(data: &serde_json::Value, address: IpAddr, port: u16) -> bool {
    data["endpoints"][0]["addresses"][0].as_str() == Some(address.to_string().as_str())
        && data["ports"][0]["port"].as_u64() == Some(u64::from(port))
}

fn ignore_not_found<T>(r: Result<T, kube::Error>) -> Result<(), kube::Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Upstream leaves the host empty for IP identifiers.
fn host_rule(dns_name: &str) -> Option<String> {
    if dns_name.parse::<IpAddr>().is_ok() {
        None
    } else {
        Some(dns_name.to_string())
    }
}

/// Adds (or removes) the solver path in the user's Ingress rule for the host.
async fn edit_in_place(
    client: &Client,
    ns: &str,
    name: &str,
    host: &str,
    path: HTTPIngressPath,
    add: bool,
) -> Result<(), Http01Error> {
    let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
    for _ in 0..5 {
        let mut ing = api.get(name).await?;
        let spec = ing.spec.get_or_insert_with(Default::default);
        let rules = spec.rules.get_or_insert_with(Vec::new);
        let host_opt = host_rule(host);
        let idx = match rules.iter().position(|r| r.host == host_opt) {
            Some(i) => i,
            None if add => {
                rules.push(IngressRule {
                    host: host_opt,
                    http: Some(HTTPIngressRuleValue { paths: vec![] }),
                });
                rules.len() - 1
            }
            None => return Ok(()),
        };
        let paths = &mut rules[idx]
            .http
            .get_or_insert_with(|| HTTPIngressRuleValue { paths: vec![] })
            .paths;
        let present = paths.iter().any(|p| p.path == path.path);
        match (add, present) {
            (true, true) | (false, false) => return Ok(()),
            (true, false) => paths.insert(0, path.clone()),
            (false, true) => paths.retain(|p| p.path != path.path),
        }
        match api.replace(name, &Default::default(), &ing).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Http01Error::Config(format!(
        "Ingress {ns}/{name} kept changing while editing it"
    )))
}

/// Deterministic per-challenge name, so a restart finds what it made.
pub fn resource_name(ch: &Challenge) -> String {
    let key = format!("{}/{}", ch.namespace().unwrap_or_default(), ch.name_any());
    format!("{NAME_PREFIX}{:08x}", crate::names::fnv32a(key.as_bytes()))
}

fn solver_labels(ch: &Challenge) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("acme.cert-manager.io/http01-solver".into(), "true".into()),
        (
            "acme.cert-manager.io/http-domain".into(),
            crate::names::adler32(ch.spec.dns_name.as_bytes()).to_string(),
        ),
        (
            "acme.cert-manager.io/http-token".into(),
            crate::names::adler32(ch.spec.token.as_bytes()).to_string(),
        ),
    ])
}

pub fn owner_ref<K: Resource<DynamicType = ()>>(obj: &K) -> Option<OwnerReference> {
    obj.controller_owner_ref(&())
}

async fn serve(listener: TcpListener, tokens: Tokens, shutdown: CancellationToken) {
    serve_plain("http01-solver", listener, shutdown, move |req| {
        answer(&tokens, req)
    })
    .await
}

/// acmesolver's answer: the key authorization for a known token and matching Host, else 404.
fn answer(tokens: &Tokens, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path == "/" || path == "/healthz" {
        return text(StatusCode::OK, "ok");
    }
    let Some(token) = path.strip_prefix(WELL_KNOWN) else {
        return text(StatusCode::NOT_FOUND, "404 page not found\n");
    };
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().host())
        .unwrap_or("");
    let host = strip_port(host).to_ascii_lowercase();
    let t = tokens.read().unwrap_or_else(|e| e.into_inner());
    match t.get(token) {
        Some((domain, key)) if *domain == host && req.method() == http::Method::GET => {
            let mut rsp = Response::new(Full::new(Bytes::from(key.clone())));
            rsp.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-cache, no-store, must-revalidate"),
            );
            rsp
        }
        _ => text(StatusCode::NOT_FOUND, "404 page not found\n"),
    }
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut rsp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *rsp.status_mut() = status;
    rsp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_points_here_only_with_our_address_and_port() {
        let ip: IpAddr = "10.244.1.7".parse().unwrap();
        let slice = serde_json::json!({
            "endpoints": [{"addresses": ["10.244.1.7"]}], "ports": [{"port": 8089}]
        });
        assert!(slice_points_at(&slice, ip, 8089));
        assert!(!slice_points_at(
            &slice,
            "10.244.2.9".parse().unwrap(),
            8089
        ));
        assert!(!slice_points_at(&slice, ip, 8090));
        assert!(!slice_points_at(&serde_json::json!({}), ip, 8089));
    }

    #[test]
    fn host_ports_are_stripped() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
        assert_eq!(strip_port("::1"), "::1");
    }

    #[test]
    fn redirects_resolve_against_the_origin() {
        assert_eq!(absolute("http://a.test:81/x/y", "/z"), "http://a.test:81/z");
        assert_eq!(
            absolute("http://a.test/x", "https://b.test/y"),
            "https://b.test/y"
        );
    }

    #[test]
    fn ip_identifiers_have_no_host_rule() {
        assert_eq!(host_rule("10.0.0.1"), None);
        assert_eq!(host_rule("a.test"), Some("a.test".into()));
    }
}
