//! Builds one immutable routing snapshot from the cluster's objects, off the request path.
//!
//! Ingresses of our class are merged per host in creationTimestamp order (the oldest wins a
//! conflict, as upstream). Bad input never takes effect: an Ingress that fails validation is
//! replaced by its last good version, a bad ConfigMap by the last good configuration, an
//! invalid TLS Secret by the last good certificate; each problem is reported once per object
//! version so the controller can raise an Event.
//!
//! A build runs in phases, one module each: [`configuration`], [`ingresses`] (validation),
//! [`certificates`] (the SNI table) and [`routes`] (locations and the router).

mod certificates;
mod configuration;
mod ingresses;
mod routes;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::Resource;

pub use self::ingresses::validate;
use crate::annotations::Annotations;
use crate::config::Config;
use crate::endpoints::Slice;
use crate::ingress_class::ClassSelector;
use crate::path_rules::{PathKind, RegexCache, Router};
use crate::tls_store::{CertTable, LoadedCert};

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
    /// Ingresses in effect (the objects: their keys would be 20,000 strings to allocate per
    /// build at 10,000 Ingresses), for status.
    pub ingresses: Vec<Arc<Ingress>>,
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
    cert_cache: certificates::CertCache,
    /// Path regexes of the validation and the router, kept for the next build.
    regexes: RegexCache,
    /// Each Ingress's validation, kept while the object is unchanged.
    validated: ingresses::Validated,
    /// The problems reported per object version (reason, message); only versions still in
    /// the cluster are kept.
    reported: HashMap<ObjectVersion, HashSet<(&'static str, String)>>,
    /// The last build's backends by Service port: one whose endpoints are unchanged is kept,
    /// round-robin position and all (as ingress-nginx's balancer keeps its own across
    /// syncs), so an edit elsewhere does not send the next requests to the first endpoint.
    backends: routes::BackendCache,
    /// Hosts and defaults of earlier builds, kept while their inputs are unchanged.
    route_cache: routes::RouteCache,
}

/// One version of one object: problems are reported once per version.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct ObjectVersion {
    kind: String,
    key: ObjectKey,
    resource_version: String,
}

impl ObjectVersion {
    fn of<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        Self {
            kind: K::kind(&()).into_owned(),
            key: key_of(obj),
            resource_version: obj.meta().resource_version.clone().unwrap_or_default(),
        }
    }
}

/// `namespace/name` of `obj`.
pub(crate) fn key_of<K: Resource>(obj: &K) -> ObjectKey {
    ObjectKey {
        namespace: obj.meta().namespace.clone().unwrap_or_default(),
        name: obj.meta().name.clone().unwrap_or_default(),
    }
}

/// Objects by `namespace/name`.
fn by_key<K: Resource>(objects: &[Arc<K>]) -> HashMap<ObjectKey, &K> {
    objects
        .iter()
        .map(|o| (key_of(o.as_ref()), o.as_ref()))
        .collect()
}

/// An [`ObjectVersion`] borrowed from the object: (kind, namespace, name, resourceVersion).
type VersionRef<'a> = (&'a str, &'a str, &'a str, &'a str);

/// The kinds' names, made once per pruning.
struct Kinds {
    ingress: String,
    class: String,
    service: String,
    secret: String,
    configmap: String,
}

impl Default for Kinds {
    fn default() -> Self {
        Kinds {
            ingress: Ingress::kind(&()).into_owned(),
            class: IngressClass::kind(&()).into_owned(),
            service: Service::kind(&()).into_owned(),
            secret: Secret::kind(&()).into_owned(),
            configmap: ConfigMap::kind(&()).into_owned(),
        }
    }
}

fn version_ref<'a, K: Resource>(kind: &'a str, obj: &'a K) -> VersionRef<'a> {
    let meta = obj.meta();
    (
        kind,
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.resource_version.as_deref().unwrap_or_default(),
    )
}

fn version_refs<'a, K: Resource>(
    kind: &'a str,
    objects: &'a [Arc<K>],
) -> impl Iterator<Item = VersionRef<'a>> + 'a {
    objects.iter().map(move |o| version_ref(kind, o.as_ref()))
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
            cert_cache: certificates::CertCache::default(),
            regexes: RegexCache::default(),
            validated: ingresses::Validated::default(),
            reported: HashMap::new(),
            backends: routes::BackendCache::default(),
            route_cache: routes::RouteCache::default(),
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
        let seen = self.reported.entry(ObjectVersion::of(obj)).or_default();
        if seen.insert((reason, message.clone())) {
            problems.push(Problem {
                object: obj.object_ref(&()),
                reason,
                message,
            });
        }
    }

    /// Forgets the problems of object versions no longer in the cluster (deleted or updated
    /// objects): a version that is gone cannot be reported again, so remembering it only grows
    /// the set. Ingress versions in effect as the last good one count as present.
    fn forget_stale_problems(
        &mut self,
        inputs: &Inputs,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
    ) {
        if self.reported.is_empty() {
            return;
        }
        // Borrowed (kind, namespace, name, version) tuples: with 10,000 Ingresses, owned
        // versions were 44,000 allocations on every build while any problem was recorded.
        let kinds = Kinds::default();
        let mut present: HashSet<VersionRef<'_>> = HashSet::new();
        present.extend(version_refs(&kinds.ingress, &inputs.ingresses));
        present.extend(version_refs(&kinds.class, &inputs.classes));
        present.extend(version_refs(&kinds.service, &inputs.services));
        present.extend(version_refs(&kinds.secret, &inputs.secrets));
        present.extend(version_refs(&kinds.configmap, &inputs.configmaps));
        present.extend(version_refs(&kinds.configmap, inputs.configmap.as_slice()));
        present.extend(
            effective
                .iter()
                .map(|(ing, _)| version_ref(&kinds.ingress, ing.as_ref())),
        );
        self.reported.retain(|v, _| {
            let key = (
                v.kind.as_str(),
                v.key.namespace.as_str(),
                v.key.name.as_str(),
                v.resource_version.as_str(),
            );
            present.contains(&key)
        });
    }

    /// One generation, phase by phase: the ConfigMap, our Ingresses, their certificates, their
    /// routes. Later phases see only the Ingresses the second one let through.
    pub fn build(&mut self, inputs: &Inputs) -> Built {
        self.generation += 1;
        let mut problems = Vec::new();
        let config_ok = self.configuration(inputs.configmap.as_deref(), &mut problems);
        let config = Arc::new(self.last_good_config.clone());
        let effective = self.ingresses(inputs, &mut problems);
        let secrets = by_key(&inputs.secrets);
        let (certs, cert_info) = self.certificates(&secrets, &effective, &config, &mut problems);
        let (router, default_location) = self.routes(inputs, &secrets, &effective, &mut problems);
        self.regexes.prune();
        self.forget_stale_problems(inputs, &effective);
        Built {
            snapshot: Snapshot {
                router,
                config,
                default_location,
                generation: self.generation,
                ingresses: effective.iter().map(|(ing, _)| ing.clone()).collect(),
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
        let fake = crate::tls_store::fake_certificate().expect("fake");
        Builder::new(Options::default(), fake).build(&inputs(objects))
    }

    pub(super) fn inputs(objects: serde_json::Value) -> Inputs {
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
                Some("Secret") => inputs
                    .secrets
                    .push(Arc::new(serde_json::from_value(o.clone()).expect("secret"))),
                _ => panic!("unexpected {o}"),
            }
        }
        inputs
    }

    pub(super) fn ingress(service: &str, annotations: serde_json::Value) -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "i", "namespace": "ns", "annotations": annotations},
               "spec": {"ingressClassName": "nginx", "rules": [{"host": "a.example", "http": {"paths": [
                   {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": service, "port": {"number": 80}}}}]}}]}})
    }

    pub(super) fn class() -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
               "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}})
    }

    fn backend(built: &Built) -> Option<Arc<Backend>> {
        match built.snapshot.router.lookup("a.example", "/") {
            crate::path_rules::Match::Rule(r, _) => match &r.target.target {
                Target::Service(b) => Some(b.clone()),
                _ => None,
            },
            _ => None,
        }
    }

    #[test]
    fn an_unchanged_backend_keeps_its_round_robin_position_across_builds() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let upstream = json!({"nginx.ingress.kubernetes.io/service-upstream": "true"});
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let objects = json!([class(), svc.clone(), ingress("web", upstream.clone())]);
        let first = backend(&builder.build(&inputs(objects.clone()))).expect("backend");
        let _ = first.pick();
        let again = backend(&builder.build(&inputs(objects))).expect("backend");
        assert!(
            Arc::ptr_eq(&first, &again),
            "same endpoints: the same backend"
        );

        let moved = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                           "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}});
        let changed =
            backend(&builder.build(&inputs(json!([class(), moved, ingress("web", upstream)]))))
                .expect("backend");
        assert!(
            !Arc::ptr_eq(&first, &changed),
            "new endpoints: a new backend"
        );
        assert_eq!(
            changed.upstreams,
            vec![Upstream::Addr("10.96.0.11:80".parse().expect("addr"))]
        );
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

    pub(super) fn tls_secret(name: &str, crt: &str, key: &str) -> serde_json::Value {
        use base64::Engine;
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": name, "namespace": "ns"},
               "data": {"tls.crt": b64(crt), "tls.key": b64(key)}})
    }

    fn location_of<'a>(m: crate::path_rules::Match<'a, Arc<Location>>) -> &'a Location {
        match m {
            crate::path_rules::Match::Rule(r, _) => &r.target,
            crate::path_rules::Match::HostDefault(d) => d.expect("a host default"),
        }
    }

    fn ingress_name(loc: &Location) -> &str {
        loc.ingress.as_ref().map_or("", |k| k.name.as_str())
    }

    /// Every phase in one build: conflicts between Ingresses (the oldest wins), certificates,
    /// per-host and catch-all default backends, shared backends, problems reported once.
    #[test]
    fn phases_together() {
        let ca = integration_tests::pki::TestCa::new("snapshot test CA").expect("CA");
        let leaf = ca
            .leaf("a.example", &["a.example", "*.wild.example"])
            .expect("leaf");
        let backend = |name: &str| json!({"service": {"name": name, "port": {"number": 80}}});
        let path = |p: &str, kind: &str, svc: &str| json!({"path": p, "pathType": kind, "backend": backend(svc)});
        let ing =
            |name: &str, created: &str, annotations: serde_json::Value, spec: serde_json::Value| {
                let mut spec = spec;
                spec["ingressClassName"] = json!("nginx");
                json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                   "metadata": {"name": name, "namespace": "ns", "creationTimestamp": created,
                                "annotations": annotations},
                   "spec": spec})
            };
        let svc = |name: &str| {
            json!({"apiVersion": "v1", "kind": "Service",
                                      "metadata": {"name": name, "namespace": "ns"},
                                      "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}})
        };
        let objects = json!([
            class(),
            svc("web"),
            svc("other"),
            tls_secret("good", &leaf.cert_pem, &leaf.key_pem),
            tls_secret("broken", "not a certificate", "not a key"),
            // Listed first, created last: order comes from creationTimestamp.
            ing(
                "catch",
                "2022-01-01T00:00:00Z",
                json!({}),
                json!({"defaultBackend": backend("other")})
            ),
            ing(
                "new",
                "2021-01-01T00:00:00Z",
                json!({}),
                json!({
                "tls": [{"hosts": ["a.example"], "secretName": "broken"}],
                "rules": [{"host": "A.Example", "http": {"paths": [
                    path("/app", "Prefix", "other"), path("/new", "Exact", "other")]}}]})
            ),
            ing(
                "old",
                "2020-01-01T00:00:00Z",
                json!({}),
                json!({
                "tls": [{"hosts": ["a.example", "*.wild.example"], "secretName": "good"}],
                "defaultBackend": backend("web"),
                "rules": [{"host": "a.example", "http": {"paths": [path("/app", "Prefix", "web")]}}]})
            ),
            ing(
                "bad",
                "2019-01-01T00:00:00Z",
                json!({"nginx.ingress.kubernetes.io/ssl-redirect": "sometimes"}),
                json!({"defaultBackend": backend("web")})
            ),
        ]);
        let inputs = inputs(objects);
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let built = builder.build(&inputs);

        let mut reasons: Vec<_> = built.problems.iter().map(|p| p.reason).collect();
        reasons.sort();
        assert_eq!(reasons, ["InvalidCertificate", "InvalidIngress"]);
        let served: Vec<_> = built
            .snapshot
            .ingresses
            .iter()
            .map(|i| i.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(served, ["old", "new", "catch"]);

        let certs = &built.certs;
        assert!(certs.exact.contains_key("a.example"));
        assert!(certs.wildcard.contains_key("wild.example"));
        assert!(
            certs.known_hosts.is_empty(),
            "hosts are only collected for ssl-reject-handshake"
        );
        let info: Vec<_> = built
            .cert_info
            .iter()
            .map(|c| (c.host.as_str(), c.secret.name.as_str()))
            .collect();
        assert_eq!(info, [("a.example", "good"), ("*.wild.example", "good")]);

        let router = &built.snapshot.router;
        let app = location_of(router.lookup("a.example", "/app"));
        assert_eq!((ingress_name(app), app.tls), ("old", true));
        let new = location_of(router.lookup("a.example", "/new"));
        assert_eq!((ingress_name(new), new.tls), ("new", true));
        let host_default = location_of(router.lookup("a.example", "/elsewhere"));
        assert_eq!(ingress_name(host_default), "old");
        match (&app.target, &host_default.target) {
            (Target::Service(a), Target::Service(b)) => {
                assert!(Arc::ptr_eq(a, b), "one Backend per Service port")
            }
            other => panic!("expected Services, got {other:?}"),
        }
        let unknown = location_of(router.lookup("unknown.example", "/"));
        assert_eq!(ingress_name(unknown), "catch");
        assert_eq!(ingress_name(&built.snapshot.default_location), "catch");

        let again = builder.build(&inputs);
        assert!(again.problems.is_empty(), "each problem is reported once");
        assert_eq!(again.snapshot.generation, 2);
    }

    fn named(name: &str, host: &str, path: &str, created: &str) -> Arc<Ingress> {
        let mut ing = ingress("web", json!({}));
        ing["metadata"]["name"] = json!(name);
        ing["metadata"]["creationTimestamp"] = json!(created);
        ing["spec"]["rules"][0]["host"] = json!(host);
        ing["spec"]["rules"][0]["http"]["paths"][0]["path"] = json!(path);
        Arc::new(serde_json::from_value(ing).expect("ingress"))
    }

    pub(super) fn same_objects(inputs: &Inputs) -> Inputs {
        Inputs {
            ingresses: inputs.ingresses.clone(),
            classes: inputs.classes.clone(),
            services: inputs.services.clone(),
            ..Default::default()
        }
    }

    /// An edit rebuilds the hosts of the edited Ingress only; a Service change rebuilds the
    /// hosts whose backends name it.
    #[test]
    fn an_edit_rebuilds_only_its_hosts() {
        let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "ns"},
                         "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}});
        let mut first = inputs(json!([class(), svc]));
        first.ingresses = ["a", "b", "c"]
            .iter()
            .map(|n| named(n, &format!("{n}.example"), "/", "2020-01-01T00:00:00Z"))
            .collect();
        // c's backend is another Service.
        let mut c = (*first.ingresses[2]).clone();
        if let Some(rule) = c
            .spec
            .as_mut()
            .and_then(|s| s.rules.as_mut())
            .and_then(|r| r.first_mut())
            && let Some(path) = rule.http.as_mut().and_then(|h| h.paths.first_mut())
            && let Some(svc) = path.backend.service.as_mut()
        {
            svc.name = "other".into();
        }
        first.ingresses[2] = Arc::new(c);
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let one = builder.build(&first);
        let mut second = same_objects(&first);
        second.ingresses[1] = named("b", "b.example", "/new", "2020-01-01T00:00:00Z");
        let two = builder.build(&second);
        let (r1, r2) = (&one.snapshot.router, &two.snapshot.router);
        for host in ["a.example", "c.example"] {
            assert!(
                std::ptr::eq(r1.server(host), r2.server(host)),
                "{host} kept"
            );
        }
        assert!(!std::ptr::eq(
            r1.server("b.example"),
            r2.server("b.example")
        ));
        assert!(matches!(r2.lookup("b.example", "/new/x"),
            crate::path_rules::Match::Rule(r, _) if r.path == "/new"));
        assert!(matches!(
            r2.lookup("b.example", "/"),
            crate::path_rules::Match::HostDefault(_)
        ));

        let mut third = same_objects(&second);
        third.services = inputs(json!([{"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 80}]}}]))
        .services;
        let three = builder.build(&third);
        let r3 = &three.snapshot.router;
        for host in ["a.example", "b.example"] {
            assert!(
                !std::ptr::eq(r2.server(host), r3.server(host)),
                "{host} rebuilt"
            );
        }
        assert!(
            std::ptr::eq(r2.server("c.example"), r3.server("c.example")),
            "c names another Service: kept"
        );
    }

    /// Objects of the previous build keep their order and new ones are placed among them: an
    /// older Ingress added later still wins the path it shares.
    #[test]
    fn a_new_older_ingress_takes_its_place_in_the_order() {
        let mut first = inputs(json!([class()]));
        first.ingresses = vec![
            named("late", "a.example", "/app", "2022-01-01T00:00:00Z"),
            named("mid", "b.example", "/", "2021-01-01T00:00:00Z"),
        ];
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        builder.build(&first);
        let mut second = same_objects(&first);
        second
            .ingresses
            .push(named("early", "a.example", "/app", "2020-01-01T00:00:00Z"));
        second
            .ingresses
            .push(named("last", "c.example", "/", "2023-01-01T00:00:00Z"));
        let built = builder.build(&second);
        let order: Vec<_> = built
            .snapshot
            .ingresses
            .iter()
            .map(|i| i.metadata.name.as_deref().unwrap_or_default())
            .collect();
        assert_eq!(order, ["early", "mid", "late", "last"]);
        let app = location_of(built.snapshot.router.lookup("a.example", "/app"));
        assert_eq!(ingress_name(app), "early");
    }

    /// What a snapshot answers for a grid of hosts and paths.
    fn answers(built: &Built) -> Vec<String> {
        let hosts = ["a.example", "b.example", "c.example", "unknown.example"];
        let paths = ["/", "/x", "/y", "/d", "/d/e"];
        let mut out = Vec::new();
        for host in hosts {
            for path in paths {
                let loc = location_of(built.snapshot.router.lookup(host, path));
                let target = match &loc.target {
                    Target::Service(b) => {
                        format!("{}/{} {:?}", b.namespace, b.service, b.upstreams)
                    }
                    other => format!("{other:?}"),
                };
                out.push(format!(
                    "{host}{path} -> {} {} {:?} {target} tls={}",
                    ingress_name(loc),
                    loc.path,
                    loc.kind,
                    loc.tls
                ));
            }
        }
        out
    }

    /// After every change in a sequence (edits, an older Ingress added, a Service moved, a
    /// deletion, an invalid version), the builder that reuses its earlier work answers
    /// exactly as one that builds the same inputs from scratch (after the same previous
    /// inputs, so both know the same last good versions).
    #[test]
    fn reuse_answers_as_a_fresh_build() {
        let svc = |name: &str, ip: &str| -> Arc<Service> {
            Arc::new(
                serde_json::from_value(json!({"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": name, "namespace": "ns"},
                    "spec": {"clusterIP": ip, "ports": [{"port": 80}]}}))
                .expect("service"),
            )
        };
        let ing =
            |name: &str, created: &str, annotations: serde_json::Value, spec: serde_json::Value| {
                let mut spec = spec;
                spec["ingressClassName"] = json!("nginx");
                Arc::new(
                    serde_json::from_value::<Ingress>(json!({"apiVersion": "networking.k8s.io/v1",
                    "kind": "Ingress", "metadata": {"name": name, "namespace": "ns",
                    "creationTimestamp": created, "annotations": annotations}, "spec": spec}))
                    .expect("ingress"),
                )
            };
        let upstream = json!({"nginx.ingress.kubernetes.io/service-upstream": "true"});
        let backend = |s: &str| json!({"service": {"name": s, "port": {"number": 80}}});
        let rule = |host: &str, path: &str, s: &str| json!({"host": host, "http": {"paths": [{"path": path, "pathType": "Prefix", "backend": backend(s)}]}});
        let a = ing(
            "a",
            "2020-01-02T00:00:00Z",
            upstream.clone(),
            json!({"rules": [rule("a.example", "/", "web")], "tls": [{"hosts": ["A.example"]}]}),
        );
        let b = ing(
            "b",
            "2020-01-03T00:00:00Z",
            upstream.clone(),
            json!({"rules": [rule("b.example", "/x", "other"), rule("c.example", "/d", "web")],
                   "defaultBackend": backend("web")}),
        );
        let c = ing(
            "c",
            "2020-01-04T00:00:00Z",
            upstream.clone(),
            json!({"defaultBackend": backend("other")}),
        );
        let d = ing(
            "d",
            "2020-01-05T00:00:00Z",
            upstream.clone(),
            json!({"rules": [rule("a.example", "/d", "other")]}),
        );
        let mut steps: Vec<Inputs> = Vec::new();
        let mut now = inputs(json!([class()]));
        now.services = vec![svc("web", "10.96.0.10"), svc("other", "10.96.0.20")];
        now.ingresses = vec![a.clone(), b, c, d];
        let next = |i: &Inputs| Inputs {
            slices: i.slices.clone(),
            ..same_objects(i)
        };
        steps.push(next(&now));
        // An edit of b: another path on b.example.
        now.ingresses[1] = ing(
            "b",
            "2020-01-03T00:00:00Z",
            upstream.clone(),
            json!({"rules": [rule("b.example", "/y", "other"), rule("c.example", "/d", "web")],
                   "defaultBackend": backend("web")}),
        );
        steps.push(next(&now));
        // An older Ingress for b.example's path: it wins.
        now.ingresses.push(ing(
            "older",
            "2019-01-01T00:00:00Z",
            upstream.clone(),
            json!({"rules": [rule("b.example", "/y", "web")]}),
        ));
        steps.push(next(&now));
        // A Service moves.
        now.services[0] = svc("web", "10.96.0.11");
        steps.push(next(&now));
        // a is deleted; b's new version is invalid (its last good version stays).
        now.ingresses.retain(|i| !Arc::ptr_eq(i, &a));
        let bad = json!({"nginx.ingress.kubernetes.io/ssl-redirect": "sometimes"});
        now.ingresses[0] = ing(
            "b",
            "2020-01-03T00:00:00Z",
            bad,
            json!({"rules": [rule("b.example", "/z", "web")]}),
        );
        steps.push(next(&now));

        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut reusing = Builder::new(Options::default(), fake.clone());
        for (n, step) in steps.iter().enumerate() {
            let got = answers(&reusing.build(step));
            // Copies of the objects: nothing of the fresh builder's first build is reused.
            let copies = |i: &Inputs| Inputs {
                ingresses: i
                    .ingresses
                    .iter()
                    .map(|o| Arc::new((**o).clone()))
                    .collect(),
                classes: i.classes.iter().map(|o| Arc::new((**o).clone())).collect(),
                services: i.services.iter().map(|o| Arc::new((**o).clone())).collect(),
                ..Default::default()
            };
            let mut fresh = Builder::new(Options::default(), fake.clone());
            if n > 0 {
                fresh.build(&copies(&steps[n - 1]));
            }
            assert_eq!(got, answers(&fresh.build(step)), "step {n}");
        }
    }

    /// Problems are remembered per object version only while that version is in the cluster:
    /// an update or a deletion drops the old version's entries.
    #[test]
    fn reported_problems_of_gone_versions_are_forgotten() {
        let bad = |version: &str| {
            let mut ing = ingress(
                "web",
                json!({"nginx.ingress.kubernetes.io/ssl-redirect": "sometimes"}),
            );
            ing["metadata"]["resourceVersion"] = json!(version);
            ing
        };
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let v1 = inputs(json!([class(), bad("1")]));
        assert_eq!(builder.build(&v1).problems.len(), 1);
        assert!(builder.build(&v1).problems.is_empty(), "once per version");
        assert_eq!(builder.reported.len(), 1);

        let v2 = inputs(json!([class(), bad("2")]));
        assert_eq!(builder.build(&v2).problems.len(), 1, "a new version");
        assert_eq!(builder.reported.len(), 1, "version 1 forgotten");

        builder.build(&inputs(json!([class()])));
        assert!(builder.reported.is_empty(), "deleted Ingress forgotten");
    }
}
