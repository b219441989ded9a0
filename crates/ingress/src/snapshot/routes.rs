//! Routes phase: a Location per host and path of the Ingresses, each host's default backend,
//! and the router over them.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressBackend, IngressServiceBackend};

use super::{
    AuthUsers, Backend, Builder, Inputs, Location, ObjectKey, Problem, Target, Upstream, by_key,
    key_of,
};
use crate::annotations::Annotations;
use crate::endpoints::{Slice, resolve, service_port};
use crate::path_rules::{HostRules, PathKind, PathRule, Router};

type Headers = Vec<(http::HeaderName, http::HeaderValue)>;

impl Builder {
    /// The router over `effective` (oldest first) and the location of requests that match no
    /// host and no catch-all rule. Hosts are built one by one; a host whose inputs are the
    /// same objects as in the previous build keeps its rules (see [`RouteCache`]).
    pub(super) fn routes(
        &mut self,
        inputs: &Inputs,
        secrets: &HashMap<ObjectKey, &Secret>,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        problems: &mut Vec<Problem>,
    ) -> (Router<Arc<Location>>, Arc<Location>) {
        let configmaps = by_key(&inputs.configmaps);
        let deps = Deps {
            configmaps: &configmaps,
            secrets,
        };
        let ids = std::mem::take(&mut self.route_cache.service_ids);
        let changed = self.route_cache.observe(inputs, &ids);
        let mut backends = Backends::new(inputs, std::mem::take(&mut self.backends), ids);
        let default_service = self.opts.default_backend_service.as_ref();
        let default_location = match &self.route_cache.default_location {
            Some(loc)
                if !default_service
                    .and_then(|k| backends.ids.get(k))
                    .is_some_and(|id| changed.contains(id)) =>
            {
                loc.clone()
            }
            _ => default_location(default_service, &mut backends),
        };
        self.route_cache.default_location = Some(default_location.clone());
        let (groups, catch_all_ingress) = host_groups(effective);
        // Each Ingress's shared settings, made at most once per build; those that read other
        // objects are made for every such Ingress, so their problems are reported even when
        // none of their hosts is rebuilt.
        let mut settings = Settings::new();
        for (i, (ing, annotations)) in effective.iter().enumerate() {
            if annotations.reads_other_objects() {
                let made = self.ingress_settings(ing, annotations, &deps, problems);
                settings.insert(i, made);
            }
        }
        let catch_all_default = catch_all_ingress.map(|i| {
            self.catch_all_default(
                effective,
                i,
                &changed,
                &deps,
                &mut settings,
                &mut backends,
                problems,
            )
        });
        let fallback = catch_all_default.unwrap_or(default_location);
        let round = self.route_cache.start_round();
        let mut hosts = Vec::with_capacity(groups.len());
        let mut catch_all = None;
        for (host, group) in groups {
            let host = HostInput {
                name: host,
                group: &group,
                fallback: &fallback,
                changed: &changed,
                round,
            };
            let (host, rules) = self.kept_or_built(
                host,
                effective,
                &deps,
                &mut settings,
                &mut backends,
                problems,
            );
            match rules {
                Some(rules) if &*host == "_" => catch_all = Some(rules),
                Some(rules) => hosts.push((host, rules)),
                None => {}
            }
        }
        self.route_cache.hosts.retain(|_, e| e.seen == round);
        // Only what this build uses is kept for the next, and what kept hosts and defaults
        // still hold (the map's own reference aside); a held one whose Service changed is
        // compared with the new endpoints before any reuse.
        self.route_cache.service_ids = backends.ids;
        self.route_cache.bound_ids(inputs.services.len());
        self.backends = backends.made;
        let held = backends
            .previous
            .into_iter()
            .filter(|(_, b)| Arc::strong_count(b) > 1);
        for (id, b) in held {
            self.backends.entry(id).or_insert(b);
        }
        let catch_all = catch_all.unwrap_or_else(|| {
            Arc::new(HostRules::new(Vec::new(), false, Some(fallback.clone())).0)
        });
        (Router::new(hosts.into_iter(), catch_all), fallback)
    }

    /// One host's rules: kept from the previous build when made from the same inputs, else
    /// built (and cached unless its Ingresses read Secrets or ConfigMaps).
    fn kept_or_built(
        &mut self,
        host: HostInput<'_, '_>,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        deps: &Deps<'_>,
        settings: &mut Settings,
        backends: &mut Backends<'_>,
        problems: &mut Vec<Problem>,
    ) -> (Arc<str>, Option<SharedRules>) {
        let HostInput {
            name,
            group,
            fallback,
            changed,
            round,
        } = host;
        let volatile = group
            .iter()
            .any(|&(i, _)| effective[i].1.reads_other_objects());
        if let Some(entry) = self.route_cache.hosts.get_mut(name.as_ref())
            && !volatile
            && entry.built_from(group, effective, fallback, changed)
        {
            entry.seen = round;
            if let Some(r) = &entry.rules {
                r.touch(&mut self.regexes);
            }
            return (entry.host.clone(), entry.rules.clone());
        }
        backends.take_used();
        let rules = self
            .host_rules(
                &name, group, effective, fallback, deps, settings, backends, problems,
            )
            .map(Arc::new);
        let host: Arc<str> = name.into();
        if !volatile {
            let entry = CachedHost {
                host: host.clone(),
                ingresses: ingresses_of(group)
                    .map(|i| effective[i].0.clone())
                    .collect(),
                fallback: fallback.clone(),
                services: backends.take_used(),
                rules: rules.clone(),
                seen: round,
            };
            self.route_cache.hosts.insert(host.clone(), entry);
        }
        (host, rules)
    }

    /// `spec.defaultBackend` of the oldest Ingress without rules (`effective[i]`), kept while
    /// that Ingress and its Service are unchanged.
    #[allow(clippy::too_many_arguments)]
    fn catch_all_default(
        &mut self,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        i: usize,
        changed: &HashSet<u32>,
        deps: &Deps<'_>,
        settings: &mut Settings,
        backends: &mut Backends<'_>,
        problems: &mut Vec<Problem>,
    ) -> Arc<Location> {
        let (ing, annotations) = &effective[i];
        if let Some((from, services, loc)) = &self.route_cache.catch_all
            && Arc::ptr_eq(from, ing)
            && !services.iter().any(|s| changed.contains(s))
            && !annotations.reads_other_objects()
        {
            return loc.clone();
        }
        backends.take_used();
        let settings = self.settings(effective, i, deps, settings, problems);
        let ns = settings.key.namespace.as_str();
        let target = match ing.spec.as_ref().and_then(|s| s.default_backend.as_ref()) {
            Some(b) => backends.target(ns, b, annotations.service_upstream),
            None => Target::BuiltIn404,
        };
        let loc = settings.location("_".into(), "/".into(), PathKind::Prefix, target, false);
        self.route_cache.catch_all = Some((ing.clone(), backends.take_used(), loc.clone()));
        loc
    }

    /// `effective[i]`'s settings, made on first use in this build.
    fn settings<'s>(
        &mut self,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        i: usize,
        deps: &Deps<'_>,
        settings: &'s mut Settings,
        problems: &mut Vec<Problem>,
    ) -> &'s IngressSettings {
        let (ing, annotations) = &effective[i];
        settings
            .entry(i)
            .or_insert_with(|| self.ingress_settings(ing, annotations, deps, problems))
    }

    /// One host's rules from its rules in `group` ((Ingress, rule) indexes, oldest Ingress
    /// first: the first for a path wins); its default is the oldest of those Ingresses'
    /// `spec.defaultBackend`s, else `fallback`. None when no rule has a path.
    #[allow(clippy::too_many_arguments)]
    fn host_rules(
        &mut self,
        host: &str,
        group: &[(usize, usize)],
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        fallback: &Arc<Location>,
        deps: &Deps<'_>,
        settings: &mut Settings,
        backends: &mut Backends<'_>,
        problems: &mut Vec<Problem>,
    ) -> Option<HostRules<Arc<Location>>> {
        let mut rules = Vec::new();
        let mut default = None;
        let mut regex = false;
        // Entries are in `effective`'s order, so each Ingress's rules are one run.
        for run in group.chunk_by(|a, b| a.0 == b.0) {
            let i = run[0].0;
            let (ing, annotations) = &effective[i];
            let Some(spec) = ing.spec.as_ref() else {
                continue;
            };
            let settings = self.settings(effective, i, deps, settings, problems);
            let ns = settings.key.namespace.as_str();
            let service_upstream = annotations.service_upstream;
            if default.is_none()
                && let Some(b) = &spec.default_backend
            {
                let target = backends.target(ns, b, service_upstream);
                let loc =
                    settings.location("_".into(), "/".into(), PathKind::Prefix, target, false);
                default = Some(loc);
            }
            regex |= annotations.forces_regex();
            let tls = settings.tls_hosts.contains(host);
            let own = run.iter().filter_map(|&(_, r)| spec.rules.as_ref()?.get(r));
            for path in own.flat_map(|r| r.http.iter().flat_map(|h| h.paths.iter())) {
                let Some(kind) = PathKind::parse(Some(path.path_type.as_str())) else {
                    continue;
                };
                let p = path.path.clone().unwrap_or_else(|| "/".into());
                let target = backends.target(ns, &path.backend, service_upstream);
                let loc = settings.location(host.to_owned(), p.clone(), kind, target, tls);
                rules.push(PathRule {
                    path: p,
                    kind,
                    target: loc,
                });
            }
        }
        if rules.is_empty() {
            return None;
        }
        let default = default.unwrap_or_else(|| fallback.clone());
        let (rules, errors) = HostRules::with_cache(rules, regex, Some(default), &mut self.regexes);
        for e in errors {
            tracing::warn!(%host, error = %e, "path left out of regex matching");
        }
        Some(rules)
    }

    /// What every Location of `ing` shares; an unusable `custom-headers` ConfigMap or
    /// `auth-secret` is reported.
    fn ingress_settings(
        &mut self,
        ing: &Ingress,
        annotations: &Arc<Annotations>,
        deps: &Deps<'_>,
        problems: &mut Vec<Problem>,
    ) -> IngressSettings {
        let key = key_of(ing);
        let ns = key.namespace.as_str();
        let add_headers = match &annotations.custom_headers {
            None => Arc::default(),
            Some(reference) => match custom_headers(ns, reference, deps.configmaps) {
                Ok(h) => Arc::new(h),
                Err(msg) => {
                    self.report(problems, ing, "InvalidCustomHeaders", msg);
                    Arc::default()
                }
            },
        };
        let auth = annotations.basic_auth.as_ref().map(|basic| {
            match auth_users(ns, basic, deps.secrets) {
                Ok(users) => AuthUsers::Users(Arc::new(users)),
                Err(msg) => {
                    self.report(problems, ing, "InvalidAuthSecret", msg);
                    AuthUsers::Unavailable
                }
            }
        });
        let tls_hosts = ing
            .spec
            .iter()
            .flat_map(|s| s.tls.iter().flatten())
            .flat_map(|t| t.hosts.iter().flatten())
            .map(|h| h.to_ascii_lowercase())
            .collect();
        IngressSettings {
            key,
            annotations: annotations.clone(),
            auth,
            add_headers,
            tls_hosts,
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
    /// The hosts its `tls` section lists, lowercase (ssl-redirect applies to them).
    tls_hosts: HashSet<String>,
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

/// A host's compiled rules, shared by the routers of successive builds.
type SharedRules = Arc<HostRules<Arc<Location>>>;

/// One host of a build and what its cached rules are checked against.
struct HostInput<'g, 'a> {
    name: Cow<'a, str>,
    group: &'g [(usize, usize)],
    fallback: &'g Arc<Location>,
    changed: &'g HashSet<u32>,
    round: u64,
}

/// The settings made in one build, by index in `effective` (only those of Ingresses whose
/// hosts are rebuilt, or that read other objects).
type Settings = HashMap<usize, IngressSettings>;

/// The objects besides Ingresses that `custom-headers` and `auth-secret` read.
struct Deps<'a> {
    configmaps: &'a HashMap<ObjectKey, &'a ConfigMap>,
    secrets: &'a HashMap<ObjectKey, &'a Secret>,
}

/// The rules of each host (lowercase; `_` for rules without a host), as (Ingress, rule)
/// indexes in `effective`'s order, and the oldest Ingress without rules that has a
/// `spec.defaultBackend` (the catch-all default).
fn host_groups(effective: &[(Arc<Ingress>, Arc<Annotations>)]) -> (Groups<'_>, Option<usize>) {
    let mut groups: Groups<'_> = HashMap::with_capacity(effective.len());
    let mut catch_all = None;
    for (i, (ing, _)) in effective.iter().enumerate() {
        let Some(spec) = ing.spec.as_ref() else {
            continue;
        };
        let rules = spec.rules.as_deref().unwrap_or_default();
        if rules.is_empty() {
            if spec.default_backend.is_some() {
                catch_all.get_or_insert(i);
            }
            continue;
        }
        for (r, rule) in rules.iter().enumerate() {
            let host = lowercase(rule.host.as_deref().unwrap_or("_"));
            groups.entry(host).or_default().push((i, r));
        }
    }
    (groups, catch_all)
}

type Groups<'a> = HashMap<Cow<'a, str>, Vec<(usize, usize)>>;

/// The Ingresses of a group, each once, in order.
fn ingresses_of(group: &[(usize, usize)]) -> impl Iterator<Item = usize> + '_ {
    group.chunk_by(|a, b| a.0 == b.0).map(|run| run[0].0)
}

/// `s` in lowercase, borrowed when it already is (host names nearly always are).
fn lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// A host's rules and what they were built from: its Ingresses (the objects, oldest first),
/// the fallback location and the Services its backends name. The same inputs, the same rules.
struct CachedHost {
    host: Arc<str>,
    /// Held, not only compared: an address must not be taken by a new object meanwhile.
    ingresses: Vec<Arc<Ingress>>,
    fallback: Arc<Location>,
    /// Ids of the Services its backends name.
    services: Box<[u32]>,
    rules: Option<SharedRules>,
    /// The last build that had this host.
    seen: u64,
}

impl CachedHost {
    fn built_from(
        &self,
        group: &[(usize, usize)],
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        fallback: &Arc<Location>,
        changed: &HashSet<u32>,
    ) -> bool {
        let mut held = self.ingresses.iter();
        Arc::ptr_eq(&self.fallback, fallback)
            && !self.services.iter().any(|s| changed.contains(s))
            && ingresses_of(group)
                .all(|i| held.next().is_some_and(|h| Arc::ptr_eq(&effective[i].0, h)))
            && held.next().is_none()
    }
}

/// What earlier builds made, kept while its inputs are the same objects: the reflector hands
/// out an unchanged object as the same `Arc`, so an edit of one Ingress among 10,000
/// rebuilds one host instead of all (a full build took about 90 ms there; the goal
/// is 50 ms from edit to served), and an endpoint change rebuilds the hosts whose backends
/// name that Service. Hosts whose Ingresses read Secrets or ConfigMaps (`auth-secret`,
/// `custom-headers`) are rebuilt every time.
#[derive(Default)]
pub(super) struct RouteCache {
    /// The previous build's Services and EndpointSlices, as given and by Service.
    services: Vec<Arc<Service>>,
    slices: Vec<Slice>,
    by_service: HashMap<ObjectKey, ServiceInputs>,
    default_location: Option<Arc<Location>>,
    /// The Ingress the catch-all default came from, the Services it names, and the default.
    catch_all: Option<CatchAll>,
    /// Service ids (see `Backends::ids`), between builds.
    service_ids: HashMap<ObjectKey, u32>,
    hosts: HashMap<Arc<str>, CachedHost>,
    round: u64,
}

impl RouteCache {
    fn start_round(&mut self) -> u64 {
        self.round += 1;
        self.round
    }

    /// Ids are handed out to every Service name an Ingress names, existing or not; when
    /// they outnumber the cached hosts and the cluster's Services by far, all are dropped
    /// with the hosts that list them (the next build rebuilds every host once).
    fn bound_ids(&mut self, services: usize) {
        if self.service_ids.len() > 4 * (self.hosts.len() + services) + 64 {
            self.service_ids.clear();
            self.hosts.clear();
            self.catch_all = None;
            self.default_location = None;
        }
    }

    /// The ids of the Services whose object or EndpointSlices differ from the previous
    /// build's (every cached host was checked in that build, so this build's changes are all
    /// it needs; a Service without an id is named by no cached host).
    fn observe(&mut self, inputs: &Inputs, ids: &HashMap<ObjectKey, u32>) -> HashSet<u32> {
        let same_services = inputs.services.len() == self.services.len()
            && inputs
                .services
                .iter()
                .zip(&self.services)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same_services && inputs.slices == self.slices {
            return HashSet::new();
        }
        self.services = inputs.services.clone();
        self.slices = inputs.slices.clone();
        let mut now: HashMap<ObjectKey, ServiceInputs> = HashMap::new();
        for s in &inputs.services {
            now.entry(key_of(s.as_ref())).or_default().service = Some(s.clone());
        }
        for sl in &inputs.slices {
            let key = ObjectKey {
                namespace: sl.namespace.clone(),
                name: sl.service.clone(),
            };
            now.entry(key).or_default().slices.push(sl.clone());
        }
        let before = std::mem::replace(&mut self.by_service, now);
        let now = &self.by_service;
        let gone = before.keys().filter(|k| !now.contains_key(*k));
        let differ = now
            .iter()
            .filter(|(k, v)| before.get(*k).is_none_or(|b| !b.same(v)));
        gone.chain(differ.map(|(k, _)| k))
            .filter_map(|k| ids.get(k).copied())
            .collect()
    }
}

/// The catch-all default: the Ingress it came from, the ids of the Services it names, and
/// the location.
type CatchAll = (Arc<Ingress>, Box<[u32]>, Arc<Location>);

/// One Service's object and EndpointSlices.
#[derive(Default)]
struct ServiceInputs {
    service: Option<Arc<Service>>,
    slices: Vec<Slice>,
}

impl ServiceInputs {
    fn same(&self, other: &ServiceInputs) -> bool {
        let service = match (&self.service, &other.service) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        service && self.slices == other.slices
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
    /// The Services asked for since [`Backends::take_used`] last ran, by id.
    used: Vec<u32>,
    /// A small id per Service key, kept across builds: a cached host lists its Services as
    /// ids (10,000 hosts listing owned keys cost 2 MiB).
    ids: HashMap<ObjectKey, u32>,
}

impl<'a> Backends<'a> {
    fn new(inputs: &'a Inputs, previous: BackendCache, ids: HashMap<ObjectKey, u32>) -> Self {
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
            used: Vec::new(),
            ids,
        }
    }

    /// The Services asked for since the last call.
    fn take_used(&mut self) -> Box<[u32]> {
        std::mem::take(&mut self.used).into_boxed_slice()
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
        let next = u32::try_from(self.ids.len()).unwrap_or(u32::MAX);
        let id = *self.ids.entry(key.clone()).or_insert(next);
        if !self.used.contains(&id) {
            self.used.push(id);
        }
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
