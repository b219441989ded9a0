//! Routes phase: a Location per host and path of the Ingresses, each host's default backend,
//! and the router over them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::{
    Ingress, IngressBackend, IngressServiceBackend, IngressSpec,
};

use super::{
    AuthUsers, Backend, Builder, Inputs, Location, ObjectKey, Problem, Target, Upstream, by_key,
    key_of,
};
use crate::annotations::Annotations;
use crate::endpoints::{Slice, resolve, service_port};
use crate::path_rules::{HostRules, PathKind, PathRule, RegexCache, Router};

type Headers = Vec<(http::HeaderName, http::HeaderValue)>;

impl Builder {
    /// The router over `effective` (oldest first) and the location of requests that match no
    /// host and no catch-all rule.
    pub(super) fn routes(
        &mut self,
        inputs: &Inputs,
        secrets: &HashMap<ObjectKey, &Secret>,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        problems: &mut Vec<Problem>,
    ) -> (Router<Arc<Location>>, Arc<Location>) {
        let configmaps = by_key(&inputs.configmaps);
        let mut backends = Backends::new(inputs, std::mem::take(&mut self.backends));
        let default_location =
            default_location(self.opts.default_backend_service.as_ref(), &mut backends);
        let mut routes = Routes::default();
        for (ing, annotations) in effective {
            let Some(spec) = ing.spec.as_ref() else {
                continue;
            };
            let settings = self.ingress_settings(ing, annotations, &configmaps, secrets, problems);
            routes.add(spec, &settings, &mut backends);
        }
        // Only what this build uses is kept for the next.
        self.backends = backends.made;
        routes.router(default_location, &mut self.regexes)
    }

    /// What every Location of `ing` shares; an unusable `custom-headers` ConfigMap or
    /// `auth-secret` is reported.
    fn ingress_settings(
        &mut self,
        ing: &Ingress,
        annotations: &Arc<Annotations>,
        configmaps: &HashMap<ObjectKey, &ConfigMap>,
        secrets: &HashMap<ObjectKey, &Secret>,
        problems: &mut Vec<Problem>,
    ) -> IngressSettings {
        let key = key_of(ing);
        let ns = key.namespace.as_str();
        let add_headers = match &annotations.custom_headers {
            None => Arc::default(),
            Some(reference) => match custom_headers(ns, reference, configmaps) {
                Ok(h) => Arc::new(h),
                Err(msg) => {
                    self.report(problems, ing, "InvalidCustomHeaders", msg);
                    Arc::default()
                }
            },
        };
        let auth =
            annotations
                .basic_auth
                .as_ref()
                .map(|basic| match auth_users(ns, basic, secrets) {
                    Ok(users) => AuthUsers::Users(Arc::new(users)),
                    Err(msg) => {
                        self.report(problems, ing, "InvalidAuthSecret", msg);
                        AuthUsers::Unavailable
                    }
                });
        IngressSettings {
            key,
            annotations: annotations.clone(),
            auth,
            add_headers,
        }
    }
}

/// The controller's default backend (`--default-backend-service`, else the built-in 404).
fn default_location(service: Option<&ObjectKey>, backends: &mut Backends) -> Arc<Location> {
    let target = match service {
        Some(k) => backends.target(
            &k.namespace,
            &IngressBackend {
                service: Some(IngressServiceBackend {
                    name: k.name.clone(),
                    port: None,
                }),
                resource: None,
            },
            false,
        ),
        None => Target::BuiltIn404,
    };
    Arc::new(Location {
        ingress: None,
        host: "_".into(),
        path: "/".into(),
        kind: PathKind::Prefix,
        target,
        annotations: Arc::default(),
        tls: false,
        auth: None,
        add_headers: Arc::default(),
        metrics: Default::default(),
    })
}

/// What every Location of one Ingress shares.
struct IngressSettings {
    key: ObjectKey,
    annotations: Arc<Annotations>,
    auth: Option<AuthUsers>,
    add_headers: Arc<Headers>,
}

impl IngressSettings {
    fn location(
        &self,
        host: String,
        path: String,
        kind: PathKind,
        target: Target,
        tls: bool,
    ) -> Arc<Location> {
        Arc::new(Location {
            ingress: Some(self.key.clone()),
            host,
            path,
            kind,
            target,
            annotations: self.annotations.clone(),
            tls,
            auth: self.auth.clone(),
            add_headers: self.add_headers.clone(),
            metrics: Default::default(),
        })
    }
}

/// Locations gathered from the Ingresses, oldest first (the first for a host and path wins).
#[derive(Default)]
struct Routes {
    host_rules: BTreeMap<String, Vec<PathRule<Arc<Location>>>>,
    /// Hosts matched by regular expression: one Ingress asking for it switches the whole host.
    regex_hosts: HashSet<String>,
    /// `spec.defaultBackend` of the oldest Ingress with a rule for the host.
    host_default: HashMap<String, Arc<Location>>,
    /// `spec.defaultBackend` of the oldest Ingress without rules.
    catch_all_default: Option<Arc<Location>>,
}

impl Routes {
    /// Adds one Ingress's default backend and paths.
    fn add(&mut self, spec: &IngressSpec, ingress: &IngressSettings, backends: &mut Backends) {
        let ns = ingress.key.namespace.as_str();
        let service_upstream = ingress.annotations.service_upstream;
        let rules = spec.rules.as_deref().unwrap_or_default();
        if let Some(b) = &spec.default_backend {
            let target = backends.target(ns, b, service_upstream);
            let loc = ingress.location("_".into(), "/".into(), PathKind::Prefix, target, false);
            if rules.is_empty() {
                self.catch_all_default.get_or_insert(loc);
            } else {
                for rule in rules {
                    let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
                    self.host_default.entry(host).or_insert(loc.clone());
                }
            }
        }
        let tls_hosts: HashSet<String> = spec
            .tls
            .iter()
            .flatten()
            .flat_map(|t| t.hosts.iter().flatten())
            .map(|h| h.to_ascii_lowercase())
            .collect();
        for rule in rules {
            let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
            if ingress.annotations.forces_regex() {
                self.regex_hosts.insert(host.clone());
            }
            for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
                let Some(kind) = PathKind::parse(Some(path.path_type.as_str())) else {
                    continue;
                };
                let p = path.path.clone().unwrap_or_else(|| "/".into());
                let target = backends.target(ns, &path.backend, service_upstream);
                let tls = tls_hosts.contains(&host);
                let loc = ingress.location(host.clone(), p.clone(), kind, target, tls);
                self.host_rules
                    .entry(host.clone())
                    .or_default()
                    .push(PathRule {
                        path: p,
                        kind,
                        target: loc,
                    });
            }
        }
    }

    /// The router, and the location of requests it matches nothing for. A host without a
    /// matching path falls back to its own default backend, then the catch-all Ingress's, then
    /// `default_location`. Regex hosts take their compiled paths from `regexes`.
    fn router(
        self,
        default_location: Arc<Location>,
        regexes: &mut RegexCache,
    ) -> (Router<Arc<Location>>, Arc<Location>) {
        let mut hosts = HashMap::new();
        let mut catch_all = None;
        for (host, rules) in self.host_rules {
            let default = self
                .host_default
                .get(&host)
                .cloned()
                .or_else(|| self.catch_all_default.clone())
                .unwrap_or_else(|| default_location.clone());
            let regex = self.regex_hosts.contains(&host);
            let (rules, errors) = HostRules::with_cache(rules, regex, Some(default), regexes);
            for e in errors {
                tracing::warn!(%host, error = %e, "path left out of regex matching");
            }
            if host == "_" {
                catch_all = Some(rules);
            } else {
                hosts.insert(host, rules);
            }
        }
        let fallback = self.catch_all_default.unwrap_or(default_location);
        let catch_all = catch_all
            .unwrap_or_else(|| HostRules::new(Vec::new(), false, Some(fallback.clone())).0);
        (Router::new(hosts, catch_all), fallback)
    }
}

/// Backends by Service and port (name, number, service-upstream).
pub(super) type BackendCache = HashMap<(ObjectKey, String), Arc<Backend>>;

/// Services and their endpoints by key, and the backends made so far: locations naming the
/// same Service port share one Backend (and its round-robin position).
struct Backends<'a> {
    services: HashMap<ObjectKey, &'a Service>,
    slices: HashMap<ObjectKey, Vec<&'a Slice>>,
    made: BackendCache,
    /// The previous build's: reused where the endpoints are the same.
    previous: BackendCache,
}

impl<'a> Backends<'a> {
    fn new(inputs: &'a Inputs, previous: BackendCache) -> Self {
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
        Self {
            services: by_key(&inputs.services),
            slices,
            made: HashMap::new(),
            previous,
        }
    }

    /// What serves `b`, a backend of an Ingress in `ns`.
    fn target(&mut self, ns: &str, b: &IngressBackend, service_upstream: bool) -> Target {
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
        if let Some(existing) = self.made.get(&(key.clone(), port_label.clone())) {
            return Target::Service(existing.clone());
        }
        let Some(upstreams) = self.upstreams(&key, port_name, port_number, service_upstream) else {
            return Target::Unavailable {
                namespace: ns.into(),
                service: svc_ref.name.clone(),
            };
        };
        let id = (key, port_label);
        let backend = match self.previous.remove(&id) {
            Some(kept) if kept.upstreams == upstreams => kept,
            _ => Arc::new(Backend::new(ns, &svc_ref.name, upstreams)),
        };
        self.made.insert(id, backend.clone());
        Target::Service(backend)
    }

    /// A Service port's ready endpoints, or its ClusterIP with `service-upstream`; None when
    /// the Service or the port is missing.
    fn upstreams(
        &self,
        key: &ObjectKey,
        port_name: Option<&str>,
        port_number: Option<i32>,
        service_upstream: bool,
    ) -> Option<Vec<Upstream>> {
        let service = self.services.get(key)?;
        let spec = service.spec.as_ref();
        if spec.and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            return Some(external_name(service, port_name, port_number));
        }
        let port = service_port(service, port_name, port_number)?;
        let upstreams = if service_upstream {
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
            resolve(port, self.slices.get(key).into_iter().flatten().copied())
                .into_iter()
                .map(Upstream::Addr)
                .collect()
        };
        Some(upstreams)
    }
}

/// An ExternalName Service's host, resolved when connecting; none without a port.
fn external_name(
    service: &Service,
    port_name: Option<&str>,
    port_number: Option<i32>,
) -> Vec<Upstream> {
    let host = service
        .spec
        .as_ref()
        .and_then(|s| s.external_name.clone())
        .unwrap_or_default();
    let port = port_number.and_then(|n| u16::try_from(n).ok()).or_else(|| {
        service_port(service, port_name, port_number).and_then(|p| u16::try_from(p.port).ok())
    });
    // Loopback targets are refused (as upstream): an ExternalName must not turn the
    // proxy into a way to reach the controller's own local ports.
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    match port {
        Some(port) if !host.is_empty() && !loopback => vec![Upstream::Dns { host, port }],
        _ => Vec::new(),
    }
}

/// Reads the headers of a `custom-headers` ConfigMap (same namespace only).
fn custom_headers(
    ns: &str,
    reference: &str,
    configmaps: &HashMap<ObjectKey, &ConfigMap>,
) -> Result<Headers, String> {
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
