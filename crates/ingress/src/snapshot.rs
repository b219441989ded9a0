//! Builds one immutable routing snapshot from the cluster's objects, off the request path.
//!
//! Ingresses of our class are merged per host in creationTimestamp order (the oldest wins a
//! conflict, as upstream). Bad input never takes effect: an Ingress that fails validation is
//! replaced by its last good version, a bad ConfigMap by the last good configuration, an
//! invalid TLS Secret by the last good certificate; each problem is reported once per object
//! version so the controller can raise an Event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressClass};
use kube::Resource;

use crate::annotations::Annotations;
use crate::config::Config;
use crate::endpoints::{Slice, resolve, service_port};
use crate::ingress_class::ClassSelector;
use crate::path_rules::{HostRules, PathKind, PathRule, Router};
use crate::tls_store::{CertTable, LoadedCert, load_pem};

/// `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn parse(s: &str) -> Option<ObjectKey> {
        let (namespace, name) = s.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        })
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Where a backend's requests go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    Addr(SocketAddr),
    /// ExternalName Services: resolved when connecting.
    Dns {
        host: String,
        port: u16,
    },
}

/// A Service port with its ready endpoints; round-robin over them.
#[derive(Debug)]
pub struct Backend {
    pub namespace: String,
    pub service: String,
    pub upstreams: Vec<Upstream>,
    /// Stable per-upstream ids for affinity cookies (the same on every replica).
    ids: Vec<String>,
    next: AtomicUsize,
}

fn upstream_id(u: &Upstream) -> String {
    use sha1::Digest;
    let text = match u {
        Upstream::Addr(a) => a.to_string(),
        Upstream::Dns { host, port } => format!("{host}:{port}"),
    };
    let digest = sha1::Sha1::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl Backend {
    pub fn new(namespace: &str, service: &str, upstreams: Vec<Upstream>) -> Self {
        Self {
            namespace: namespace.into(),
            service: service.into(),
            ids: upstreams.iter().map(upstream_id).collect(),
            upstreams,
            next: AtomicUsize::new(0),
        }
    }

    /// The upstream a session cookie names, if it is still an endpoint; else the next one in
    /// round-robin order with its id (to be set as the new cookie).
    pub fn pick_sticky(&self, cookie: Option<&str>) -> Option<(&Upstream, Option<&str>)> {
        if let Some(id) = cookie
            && let Some(i) = self.ids.iter().position(|x| x == id)
        {
            return self.upstreams.get(i).map(|u| (u, None));
        }
        if self.upstreams.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        Some((&self.upstreams[i], self.ids.get(i).map(String::as_str)))
    }

    /// The next upstream in round-robin order.
    pub fn pick(&self) -> Option<&Upstream> {
        if self.upstreams.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.upstreams.len();
        self.upstreams.get(i)
    }
}

/// What serves a location.
#[derive(Clone, Debug)]
pub enum Target {
    Service(Arc<Backend>),
    /// The Service or its port is missing: 503, as nginx answers for an empty upstream.
    Unavailable {
        namespace: String,
        service: String,
    },
    /// The built-in default backend: 404, and 200 on `/healthz`.
    BuiltIn404,
}

/// One location: a path of a host, with the settings of the Ingress that defined it.
#[derive(Debug)]
pub struct Location {
    pub ingress: Option<ObjectKey>,
    pub host: String,
    pub path: String,
    pub kind: PathKind,
    pub target: Target,
    pub annotations: Arc<Annotations>,
    /// The defining Ingress lists this host under `tls` (ssl-redirect applies).
    pub tls: bool,
    /// Basic auth users, when the Ingress asks for it.
    pub auth: Option<AuthUsers>,
    /// Response headers from the `custom-headers` ConfigMap.
    pub add_headers: Arc<Vec<(http::HeaderName, http::HeaderValue)>>,
    /// Request metric series resolved for this location (filled by the proxy).
    pub metrics: crate::metrics::SeriesCache,
}

/// Users for `auth-type: basic`; `Unavailable` when the Secret is missing or unusable (then
/// every request is refused, as nginx refuses when its auth file is missing).
#[derive(Clone, Debug)]
pub enum AuthUsers {
    Users(Arc<crate::auth::Htpasswd>),
    Unavailable,
}

/// One configuration generation.
pub struct Snapshot {
    pub router: Router<Arc<Location>>,
    pub config: Arc<Config>,
    /// The catch-all default backend (no host matched and no catch-all rule did).
    pub default_location: Arc<Location>,
    pub generation: u64,
    /// Ingresses in effect, for status and the webhook's overlap check.
    pub ingresses: Vec<ObjectKey>,
}

/// A problem with one object, reported once per object version.
#[derive(Clone, Debug)]
pub struct Problem {
    pub object: ObjectReference,
    pub reason: &'static str,
    pub message: String,
}

/// Everything the builder reads.
#[derive(Default)]
pub struct Inputs {
    pub ingresses: Vec<Arc<Ingress>>,
    pub classes: Vec<Arc<IngressClass>>,
    pub services: Vec<Arc<Service>>,
    pub slices: Vec<Slice>,
    pub secrets: Vec<Arc<Secret>>,
    pub configmap: Option<Arc<ConfigMap>>,
    /// Every ConfigMap, for `custom-headers`.
    pub configmaps: Vec<Arc<ConfigMap>>,
}

/// Controller flags that shape the build.
#[derive(Clone, Debug, Default)]
pub struct Options {
    pub class: ClassSelector,
    pub default_backend_service: Option<ObjectKey>,
    pub default_ssl_certificate: Option<ObjectKey>,
}

/// One served certificate, for `nginx_ingress_controller_ssl_certificate_info`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub host: String,
    pub secret: ObjectKey,
    /// SHA-1 of the leaf certificate (hex).
    pub fingerprint: String,
}

fn fingerprint(der: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The result of one build.
pub struct Built {
    pub cert_info: Vec<CertInfo>,
    pub snapshot: Snapshot,
    pub certs: CertTable,
    /// New problems (not reported for this object version before).
    pub problems: Vec<Problem>,
    /// Whether the ConfigMap in effect is the one in the cluster (false: last good kept).
    pub config_ok: bool,
}

/// Stateful builder: remembers the last good version of everything it validates.
pub struct Builder {
    opts: Options,
    fake: LoadedCert,
    generation: u64,
    last_good_ingress: HashMap<ObjectKey, Arc<Ingress>>,
    last_good_config: Config,
    last_good_cert: HashMap<ObjectKey, LoadedCert>,
    reported: HashSet<String>,
}

/// Exact and Prefix paths must look like this (ingress-nginx `strict-validate-path-type`).
fn strict_path_ok(path: &str) -> bool {
    path.starts_with('/')
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// A DNS name, optionally with `*.` as its whole first label.
fn host_ok(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks one Ingress; returns every problem found.
pub fn validate(ingress: &Ingress) -> Result<Arc<Annotations>, Vec<String>> {
    let mut problems = Vec::new();
    let annotations = match Annotations::parse(ingress.metadata.annotations.as_ref()) {
        Ok(a) => Some(a),
        Err(errs) => {
            problems.extend(errs.into_iter().map(|e| format!("annotation {e}")));
            None
        }
    };
    let regex = annotations.as_ref().is_some_and(Annotations::forces_regex);
    let spec = ingress.spec.as_ref();
    for rule in spec.and_then(|s| s.rules.as_ref()).into_iter().flatten() {
        if let Some(host) = rule.host.as_deref()
            && !host_ok(host)
        {
            problems.push(format!(
                "host {host:?}: not a DNS name (a wildcard must be a whole first label, like *.example.com)"
            ));
        }
        for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
            let p = path.path.as_deref().unwrap_or("/");
            match PathKind::parse(Some(path.path_type.as_str())) {
                None => problems.push(format!("path {p:?}: unknown pathType {:?}", path.path_type)),
                Some(PathKind::Exact | PathKind::Prefix) if !regex && !strict_path_ok(p) => {
                    problems.push(format!(
                        "path {p:?}: Exact and Prefix paths may only contain letters, digits and . _ - /; use ImplementationSpecific"
                    ))
                }
                Some(_) if regex => {
                    if let Err(e) = regex::Regex::new(&format!("(?i)^{p}")) {
                        problems.push(format!("path {p:?} is not a valid regular expression: {e}"));
                    }
                }
                Some(_) if !p.starts_with('/') => problems.push(format!("path {p:?} must start with /")),
                Some(_) => {}
            }
            if path.backend.service.is_none() {
                problems.push(format!("path {p:?}: only Service backends are supported"));
            }
        }
    }
    match annotations {
        Some(a) if problems.is_empty() => Ok(Arc::new(a)),
        _ => Err(problems),
    }
}

/// Reads the headers of a `custom-headers` ConfigMap (same namespace only).
fn custom_headers(
    ns: &str,
    reference: &str,
    configmaps: &HashMap<ObjectKey, &ConfigMap>,
) -> Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    let (cm_ns, name) = reference.split_once('/').unwrap_or((ns, reference));
    if cm_ns != ns {
        return Err(format!(
            "custom-headers {reference} is in another namespace; cross-namespace references are not allowed"
        ));
    }
    let key = ObjectKey {
        namespace: ns.into(),
        name: name.into(),
    };
    let cm = configmaps
        .get(&key)
        .ok_or_else(|| format!("custom-headers ConfigMap {key} not found"))?;
    cm.data
        .iter()
        .flatten()
        .map(|(k, v)| {
            let name = http::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("custom-headers {key}: {k:?} is not a header name"))?;
            let value = http::HeaderValue::from_str(v).map_err(|_| {
                format!("custom-headers {key}: value of {k:?} is not a header value")
            })?;
            Ok((name, value))
        })
        .collect()
}

/// Reads the users of `auth-secret` (same namespace only, as upstream's default).
fn auth_users(
    ns: &str,
    basic: &crate::annotations::BasicAuth,
    secrets: &HashMap<ObjectKey, &Secret>,
) -> Result<crate::auth::Htpasswd, String> {
    let (secret_ns, name) = match basic.secret.split_once('/') {
        Some((n, name)) => (n, name),
        None => (ns, basic.secret.as_str()),
    };
    if secret_ns != ns {
        return Err(format!(
            "auth-secret {} is in another namespace; cross-namespace references are not allowed",
            basic.secret
        ));
    }
    let key = ObjectKey {
        namespace: ns.into(),
        name: name.into(),
    };
    let secret = secrets
        .get(&key)
        .ok_or_else(|| format!("auth-secret {key} not found; requests are refused"))?;
    let data = secret.data.clone().unwrap_or_default();
    let text = if basic.map {
        data.iter()
            .map(|(user, hash)| format!("{user}:{}", String::from_utf8_lossy(&hash.0).trim()))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        let auth = data
            .get("auth")
            .ok_or_else(|| format!("auth-secret {key} has no key \"auth\""))?;
        String::from_utf8_lossy(&auth.0).into_owned()
    };
    crate::auth::Htpasswd::parse(&text).map_err(|e| format!("auth-secret {key}: {e}"))
}

fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    ObjectKey {
        namespace: obj.meta().namespace.clone().unwrap_or_default(),
        name: obj.meta().name.clone().unwrap_or_default(),
    }
}

impl Builder {
    pub fn new(opts: Options, fake: LoadedCert) -> Self {
        Self {
            opts,
            fake,
            generation: 0,
            last_good_ingress: HashMap::new(),
            last_good_config: Config::default(),
            last_good_cert: HashMap::new(),
            reported: HashSet::new(),
        }
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    fn report<K: Resource<DynamicType = ()>>(
        &mut self,
        problems: &mut Vec<Problem>,
        obj: &K,
        reason: &'static str,
        message: String,
    ) {
        let version = obj.meta().resource_version.clone().unwrap_or_default();
        let id = format!(
            "{}/{}/{version}/{reason}/{message}",
            K::kind(&()),
            key_of(obj)
        );
        if self.reported.insert(id) {
            problems.push(Problem {
                object: obj.object_ref(&()),
                reason,
                message,
            });
        }
    }

    pub fn build(&mut self, inputs: &Inputs) -> Built {
        self.generation += 1;
        let mut problems = Vec::new();

        // ConfigMap: all or nothing; unknown keys are warned about once.
        let mut config_ok = true;
        if let Some(cm) = &inputs.configmap {
            match Config::parse(cm.data.as_ref()) {
                Ok(parsed) => {
                    self.last_good_config = parsed.config;
                    for key in parsed.unknown {
                        self.report(
                            &mut problems,
                            cm.as_ref(),
                            "UnknownConfigKey",
                            format!("ConfigMap key {key:?} is not supported and is ignored"),
                        );
                    }
                }
                Err(errs) => {
                    config_ok = false;
                    let msg = errs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ");
                    self.report(
                        &mut problems,
                        cm.as_ref(),
                        "InvalidConfiguration",
                        format!("ConfigMap rejected, keeping the last good configuration: {msg}"),
                    );
                }
            }
        }
        let config = Arc::new(self.last_good_config.clone());

        let configmaps: HashMap<ObjectKey, &ConfigMap> = inputs
            .configmaps
            .iter()
            .map(|c| (key_of(c.as_ref()), c.as_ref()))
            .collect();
        let services: HashMap<ObjectKey, &Service> = inputs
            .services
            .iter()
            .map(|s| (key_of(s.as_ref()), s.as_ref()))
            .collect();
        let mut slices: HashMap<ObjectKey, Vec<&Slice>> = HashMap::new();
        for s in &inputs.slices {
            slices
                .entry(ObjectKey {
                    namespace: s.namespace.clone(),
                    name: s.service.clone(),
                })
                .or_default()
                .push(s);
        }
        let mut backends: HashMap<(ObjectKey, String), Arc<Backend>> = HashMap::new();
        let mut target_for = |ns: &str, b: &IngressBackend, service_upstream: bool| -> Target {
            let Some(svc_ref) = b.service.as_ref() else {
                return Target::BuiltIn404;
            };
            let key = ObjectKey {
                namespace: ns.into(),
                name: svc_ref.name.clone(),
            };
            let (port_name, port_number) = match &svc_ref.port {
                Some(p) => (p.name.as_deref(), p.number),
                None => (None, None),
            };
            let port_label = format!("{port_name:?}/{port_number:?}/{service_upstream}");
            if let Some(existing) = backends.get(&(key.clone(), port_label.clone())) {
                return Target::Service(existing.clone());
            }
            let unavailable = Target::Unavailable {
                namespace: ns.into(),
                service: svc_ref.name.clone(),
            };
            let Some(service) = services.get(&key) else {
                return unavailable;
            };
            let spec = service.spec.as_ref();
            let upstreams = if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
                let host = spec
                    .and_then(|s| s.external_name.clone())
                    .unwrap_or_default();
                let port = port_number.and_then(|n| u16::try_from(n).ok()).or_else(|| {
                    service_port(service, port_name, port_number)
                        .and_then(|p| u16::try_from(p.port).ok())
                });
                // Loopback targets are refused (as upstream): an ExternalName must not turn the
                // proxy into a way to reach the controller's own local ports.
                let loopback = host.eq_ignore_ascii_case("localhost")
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
                match port {
                    Some(port) if !host.is_empty() && !loopback => {
                        vec![Upstream::Dns { host, port }]
                    }
                    _ => Vec::new(),
                }
            } else {
                let Some(port) = service_port(service, port_name, port_number) else {
                    return unavailable;
                };
                if service_upstream {
                    spec.and_then(|s| s.cluster_ip.as_deref())
                        .and_then(|ip| ip.parse().ok())
                        .and_then(|ip| {
                            u16::try_from(port.port)
                                .ok()
                                .map(|p| SocketAddr::new(ip, p))
                        })
                        .map(Upstream::Addr)
                        .into_iter()
                        .collect()
                } else {
                    resolve(port, slices.get(&key).into_iter().flatten().copied())
                        .into_iter()
                        .map(Upstream::Addr)
                        .collect()
                }
            };
            let backend = Arc::new(Backend::new(ns, &svc_ref.name, upstreams));
            backends.insert((key, port_label), backend.clone());
            Target::Service(backend)
        };

        // Our Ingresses, validated (or their last good version), oldest first.
        let classes: Vec<&IngressClass> = inputs.classes.iter().map(Arc::as_ref).collect();
        let mut current_keys = HashSet::new();
        let mut effective: Vec<(Arc<Ingress>, Arc<Annotations>)> = Vec::new();
        for ing in &inputs.ingresses {
            if !self.opts.class.accepts(ing, classes.iter().copied()) {
                continue;
            }
            let key = key_of(ing.as_ref());
            current_keys.insert(key.clone());
            match validate(ing) {
                Ok(ann) => {
                    self.last_good_ingress.insert(key, ing.clone());
                    effective.push((ing.clone(), ann));
                }
                Err(errs) => {
                    let kept = self.last_good_ingress.get(&key).cloned();
                    let suffix = if kept.is_some() {
                        "; its last valid version stays in effect"
                    } else {
                        "; it is not served"
                    };
                    self.report(
                        &mut problems,
                        ing.as_ref(),
                        "InvalidIngress",
                        format!("{}{suffix}", errs.join("; ")),
                    );
                    if let Some(old) = kept
                        && let Ok(ann) = validate(&old)
                    {
                        effective.push((old, ann));
                    }
                }
            }
        }
        self.last_good_ingress
            .retain(|k, _| current_keys.contains(k));
        effective.sort_by(|(a, _), (b, _)| {
            let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
            ta.cmp(&tb)
                .then_with(|| key_of(a.as_ref()).cmp(&key_of(b.as_ref())))
        });

        // Certificates from TLS Secrets (or their last good version).
        let secrets: HashMap<ObjectKey, &Secret> = inputs
            .secrets
            .iter()
            .map(|s| (key_of(s.as_ref()), s.as_ref()))
            .collect();
        let load_secret = |builder: &mut Self, problems: &mut Vec<Problem>, key: &ObjectKey| {
            if let Some(secret) = secrets.get(key) {
                let data = secret.data.as_ref();
                let crt = data.and_then(|d| d.get("tls.crt")).map(|b| b.0.as_slice());
                let k = data.and_then(|d| d.get("tls.key")).map(|b| b.0.as_slice());
                match (crt, k) {
                    (Some(crt), Some(k)) => match load_pem(crt, k) {
                        Ok(cert) => {
                            builder.last_good_cert.insert(key.clone(), cert.clone());
                            return Some(cert);
                        }
                        Err(e) => builder.report(
                            problems,
                            *secret,
                            "InvalidCertificate",
                            format!("Secret {key} is not a usable TLS certificate: {e}"),
                        ),
                    },
                    _ => builder.report(
                        problems,
                        *secret,
                        "InvalidCertificate",
                        format!("Secret {key} has no tls.crt and tls.key"),
                    ),
                }
            }
            builder.last_good_cert.get(key).cloned()
        };

        let default_cert = self
            .opts
            .default_ssl_certificate
            .clone()
            .and_then(|k| load_secret(self, &mut problems, &k))
            .unwrap_or_else(|| self.fake.clone());
        let mut certs = CertTable::new(default_cert.key.clone());
        certs.reject_unknown = config.ssl_reject_handshake;

        let default_location = Arc::new(Location {
            ingress: None,
            host: "_".into(),
            path: "/".into(),
            kind: PathKind::Prefix,
            target: match &self.opts.default_backend_service {
                Some(k) => target_for(
                    &k.namespace,
                    &IngressBackend {
                        service: Some(k8s_openapi::api::networking::v1::IngressServiceBackend {
                            name: k.name.clone(),
                            port: None,
                        }),
                        resource: None,
                    },
                    false,
                ),
                None => Target::BuiltIn404,
            },
            annotations: Arc::default(),
            tls: false,
            auth: None,
            add_headers: Arc::default(),
            metrics: Default::default(),
        });

        let mut host_rules: BTreeMap<String, Vec<PathRule<Arc<Location>>>> = BTreeMap::new();
        let mut host_regex: HashSet<String> = HashSet::new();
        let mut host_default: HashMap<String, Arc<Location>> = HashMap::new();
        let mut catch_all_default: Option<Arc<Location>> = None;
        let mut in_effect = Vec::new();
        let mut cert_info = Vec::new();
        for (ing, ann) in &effective {
            let key = key_of(ing.as_ref());
            in_effect.push(key.clone());
            let ns = key.namespace.as_str();
            let Some(spec) = ing.spec.as_ref() else {
                continue;
            };
            let tls_hosts: HashSet<String> = spec
                .tls
                .iter()
                .flatten()
                .flat_map(|t| t.hosts.iter().flatten())
                .map(|h| h.to_ascii_lowercase())
                .collect();
            for tls in spec.tls.iter().flatten() {
                let Some(secret_name) = tls.secret_name.as_ref() else {
                    continue;
                };
                let secret_key = ObjectKey {
                    namespace: ns.into(),
                    name: secret_name.clone(),
                };
                let Some(cert) = load_secret(self, &mut problems, &secret_key) else {
                    continue;
                };
                for host in tls.hosts.iter().flatten() {
                    let host = host.to_ascii_lowercase();
                    cert_info.push(CertInfo {
                        host: host.clone(),
                        secret: secret_key.clone(),
                        fingerprint: fingerprint(&cert.leaf_der),
                    });
                    match host.strip_prefix("*.") {
                        Some(suffix) => {
                            certs
                                .wildcard
                                .entry(suffix.into())
                                .or_insert(cert.key.clone());
                        }
                        None => {
                            certs.exact.entry(host).or_insert(cert.key.clone());
                        }
                    }
                }
            }
            let rules = spec.rules.as_deref().unwrap_or_default();
            let add_headers = match &ann.custom_headers {
                None => Arc::default(),
                Some(reference) => match custom_headers(ns, reference, &configmaps) {
                    Ok(h) => Arc::new(h),
                    Err(msg) => {
                        self.report(&mut problems, ing.as_ref(), "InvalidCustomHeaders", msg);
                        Arc::default()
                    }
                },
            };
            let auth = ann
                .basic_auth
                .as_ref()
                .map(|basic| match auth_users(ns, basic, &secrets) {
                    Ok(users) => AuthUsers::Users(Arc::new(users)),
                    Err(msg) => {
                        self.report(&mut problems, ing.as_ref(), "InvalidAuthSecret", msg);
                        AuthUsers::Unavailable
                    }
                });
            if let Some(b) = &spec.default_backend {
                let loc = Arc::new(Location {
                    ingress: Some(key.clone()),
                    host: "_".into(),
                    path: "/".into(),
                    kind: PathKind::Prefix,
                    target: target_for(ns, b, ann.service_upstream),
                    annotations: ann.clone(),
                    tls: false,
                    auth: auth.clone(),
                    add_headers: add_headers.clone(),
                    metrics: Default::default(),
                });
                if rules.is_empty() {
                    catch_all_default.get_or_insert(loc);
                } else {
                    for rule in rules {
                        let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
                        host_default.entry(host).or_insert(loc.clone());
                    }
                }
            }
            for rule in rules {
                let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
                certs.known_hosts.insert(host.clone());
                if ann.forces_regex() {
                    host_regex.insert(host.clone());
                }
                for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
                    let Some(kind) = PathKind::parse(Some(path.path_type.as_str())) else {
                        continue;
                    };
                    let p = path.path.clone().unwrap_or_else(|| "/".into());
                    let loc = Arc::new(Location {
                        ingress: Some(key.clone()),
                        host: host.clone(),
                        path: p.clone(),
                        kind,
                        target: target_for(ns, &path.backend, ann.service_upstream),
                        annotations: ann.clone(),
                        tls: tls_hosts.contains(&host),
                        auth: auth.clone(),
                        add_headers: add_headers.clone(),
                        metrics: Default::default(),
                    });
                    host_rules.entry(host.clone()).or_default().push(PathRule {
                        path: p,
                        kind,
                        target: loc,
                    });
                }
            }
        }

        let mut hosts = HashMap::new();
        let mut catch_all = None;
        for (host, rules) in host_rules {
            let default = host_default
                .get(&host)
                .cloned()
                .or_else(|| catch_all_default.clone())
                .unwrap_or_else(|| default_location.clone());
            let (rules, errors) = HostRules::new(rules, host_regex.contains(&host), Some(default));
            for e in errors {
                tracing::warn!(%host, error = %e, "path left out of regex matching");
            }
            if host == "_" {
                catch_all = Some(rules);
            } else {
                hosts.insert(host, rules);
            }
        }
        let fallback = catch_all_default.unwrap_or_else(|| default_location.clone());
        let catch_all = catch_all
            .unwrap_or_else(|| HostRules::new(Vec::new(), false, Some(fallback.clone())).0);
        Built {
            snapshot: Snapshot {
                router: Router::new(hosts, catch_all),
                config,
                default_location: fallback,
                generation: self.generation,
                ingresses: in_effect,
            },
            certs,
            problems,
            config_ok,
            cert_info,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn build(objects: serde_json::Value) -> Built {
        let mut inputs = Inputs::default();
        for o in objects.as_array().expect("array") {
            match o["kind"].as_str() {
                Some("Ingress") => inputs.ingresses.push(Arc::new(
                    serde_json::from_value(o.clone()).expect("ingress"),
                )),
                Some("Service") => inputs.services.push(Arc::new(
                    serde_json::from_value(o.clone()).expect("service"),
                )),
                Some("IngressClass") => inputs
                    .classes
                    .push(Arc::new(serde_json::from_value(o.clone()).expect("class"))),
                _ => panic!("unexpected {o}"),
            }
        }
        let fake = crate::tls_store::fake_certificate().expect("fake");
        Builder::new(Options::default(), fake).build(&inputs)
    }

    fn ingress(service: &str, annotations: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "i", "namespace": "ns", "annotations": annotations},
               "spec": {"ingressClassName": "nginx", "rules": [{"host": "a.example", "http": {"paths": [
                   {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": service, "port": {"number": 80}}}}]}}]}})
    }

    fn class() -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
               "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}})
    }

    fn upstreams(built: &Built) -> Option<Vec<Upstream>> {
        match built.snapshot.router.lookup("a.example", "/") {
            crate::path_rules::Match::Rule(r, _) => match &r.target.target {
                Target::Service(b) => Some(b.upstreams.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn external_name_and_service_upstream() {
        let ext = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "ns"},
                         "spec": {"type": "ExternalName", "externalName": "db.example.org"}});
        let built = build(json!([class(), ext, ingress("ext", json!({}))]));
        assert_eq!(
            upstreams(&built),
            Some(vec![Upstream::Dns {
                host: "db.example.org".into(),
                port: 80
            }])
        );

        for loopback in ["localhost", "127.0.0.1", "::1"] {
            let ext = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": "ns"},
                             "spec": {"type": "ExternalName", "externalName": loopback}});
            let built = build(json!([class(), ext, ingress("ext", json!({}))]));
            assert_eq!(upstreams(&built), Some(vec![]), "{loopback} refused");
        }

        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": 8080}]}});
        let built = build(json!([
            class(),
            svc,
            ingress(
                "web",
                json!({"nginx.ingress.kubernetes.io/service-upstream": "true"})
            )
        ]));
        assert_eq!(
            upstreams(&built),
            Some(vec![Upstream::Addr("10.96.0.10:80".parse().expect("addr"))])
        );
    }

    #[test]
    fn missing_service_is_unavailable_and_bad_ingress_is_skipped() {
        let built = build(json!([class(), ingress("nope", json!({}))]));
        assert!(matches!(
            built.snapshot.router.lookup("a.example", "/"),
            crate::path_rules::Match::Rule(r, _) if matches!(r.target.target, Target::Unavailable { .. })
        ));
        let built = build(json!([
            class(),
            ingress(
                "web",
                json!({"nginx.ingress.kubernetes.io/ssl-redirect": "sometimes"})
            )
        ]));
        assert_eq!(built.problems.len(), 1);
        assert!(
            built.snapshot.ingresses.is_empty(),
            "no valid version to keep"
        );
    }
}
