//! The data plane: one request in, one request out, decided by the current [`Snapshot`].
//! Nothing here blocks or rebuilds: the snapshot is read with one atomic load.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;

use crate::annotations::BackendProtocol;
use crate::metrics::{Metrics, RequestLabels};
use crate::path_rules::{Match, normalize_host};
use crate::ratelimit::{ConnLimiter, RateLimiter};
use crate::snapshot::{AuthUsers, Location, Snapshot, Target, Upstream};
use crate::upstream::{PoolSettings, Upstreams};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

const ACME_PREFIX: &str = "/.well-known/acme-challenge";

/// Per-connection facts the handler needs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// The peer's address and our port as header values, formatted once per connection
    /// rather than per request.
    remote_ip: HeaderValue,
    local_port: HeaderValue,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, local: SocketAddr, tls: bool) -> Self {
        let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
        Self {
            remote,
            local,
            tls,
            remote_ip: value(remote.ip().to_string()),
            local_port: value(local.port().to_string()),
        }
    }
}

/// Shared proxy state: the current snapshot and pooled upstream clients.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    upstreams: Upstreams,
    metrics: Metrics,
    https_port: u16,
    request_ids: RequestIds,
    limits: Limits,
}

/// Limiter state per location, kept across configuration generations.
#[derive(Default)]
struct Limits {
    rate: std::sync::Mutex<std::collections::HashMap<String, Arc<RateLimiter>>>,
    conn: std::sync::Mutex<std::collections::HashMap<String, Arc<ConnLimiter>>>,
}

impl Limits {
    fn key(location: &Location) -> String {
        let ingress = location
            .ingress
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_default();
        format!("{ingress}|{}|{}", location.host, location.path)
    }

    fn rate(&self, location: &Location, rps: u32, burst: u32) -> Arc<RateLimiter> {
        let mut map = self
            .rate
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry(Self::key(location))
            .or_insert_with(|| Arc::new(RateLimiter::new(rps, burst)));
        if !entry.same_settings(rps, burst) {
            *entry = Arc::new(RateLimiter::new(rps, burst));
        }
        entry.clone()
    }

    fn conn(&self, location: &Location, limit: u32) -> Arc<ConnLimiter> {
        let mut map = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = map
            .entry(Self::key(location))
            .or_insert_with(|| Arc::new(ConnLimiter::new(limit)));
        if entry.limit() != limit {
            *entry = Arc::new(ConnLimiter::new(limit));
        }
        entry.clone()
    }
}

impl Proxy {
    pub fn new(initial: Snapshot, metrics: Metrics, https_port: u16) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(initial),
            upstreams: Upstreams::default(),
            metrics,
            https_port,
            request_ids: RequestIds::new(),
            limits: Limits::default(),
        }
    }

    /// Installs a new configuration generation for all following requests.
    pub fn swap(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Handles one request; never fails (errors become 4xx/5xx responses).
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let snap = self.snapshot.load_full();
        let method = req.method().clone();
        if let Err(why) = check_host(req.version(), req.uri(), req.headers()) {
            let location = snap.default_location.clone();
            let response = plain(StatusCode::BAD_REQUEST, why);
            return Ok(self.record(&method, "", &location, response, started));
        }
        let host = request_host(req.uri(), req.headers())
            .map(|h| normalize_host(&h))
            .unwrap_or_default();
        let (location, rewrite) = route(&snap, &host, req.uri().path());
        let response = self
            .serve(req, conn, &snap, &host, &location, rewrite)
            .await;
        Ok(self.record(&method, &host, &location, response, started))
    }

    /// Counts the request now and measures duration and size when the response body ends,
    /// as nginx's `$request_time` and `$bytes_sent` do.
    fn record(
        &self,
        method: &Method,
        host: &str,
        location: &Location,
        response: Response<Body>,
        started: Instant,
    ) -> Response<Body> {
        let status = response.status().as_u16();
        let host = crate::metrics::host_label(&location.host, location.ingress.is_some(), host);
        let method = crate::metrics::method_label(method);
        let series = location.metrics.get_or_insert(status, method, host, || {
            let (namespace, ingress) = location
                .ingress
                .as_ref()
                .map(|k| (k.namespace.clone(), k.name.clone()))
                .unwrap_or_default();
            let service = match &location.target {
                Target::Service(b) => b.service.clone(),
                Target::Unavailable { service, .. } => service.clone(),
                Target::BuiltIn404 => String::new(),
            };
            self.metrics.series(&RequestLabels {
                status: status.to_string(),
                method: method.to_string(),
                path: location.path.clone(),
                namespace,
                ingress,
                service,
                host: host.to_string(),
                canary: String::new(),
            })
        });
        series.requests.inc();
        let (parts, body) = response.into_parts();
        let metered = crate::metrics::Metered::new(body, started, series.duration, series.size);
        Response::from_parts(parts, metered.boxed_unsync())
    }

    async fn serve(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        snap: &Snapshot,
        host: &str,
        location: &Location,
        rewrite: Option<String>,
    ) -> Response<Body> {
        let cfg = &snap.config;
        let ann = &location.annotations;
        let path = req.uri().path();
        let client_ip = client_ip(req.headers(), conn.remote.ip(), cfg.use_forwarded_headers);

        // Conflicting Content-Length + Transfer-Encoding was refused before this (`framing`:
        // hyper drops Content-Length before the handler sees the request).
        if cfg.block_cidrs.iter().any(|n| n.contains(&client_ip)) {
            return plain(StatusCode::FORBIDDEN, "403 Forbidden\n");
        }
        // nginx's phase order: rewrite (redirects, CORS preflight), preaccess (limits), access
        // (source ranges, basic auth). HTTP-01 challenge locations skip redirects and access.
        let acme = location.path.starts_with(ACME_PREFIX);
        if let Some(r) = ann
            .permanent_redirect
            .as_ref()
            .or(ann.temporal_redirect.as_ref())
        {
            return redirect(r.code, &r.url);
        }
        if !conn.tls && !acme {
            let force = ann.force_ssl_redirect.unwrap_or(cfg.force_ssl_redirect);
            let ssl = location.tls && ann.ssl_redirect.unwrap_or(cfg.ssl_redirect);
            if force || ssl {
                let port = if self.https_port == 443 {
                    String::new()
                } else {
                    format!(":{}", self.https_port)
                };
                let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
                return redirect(cfg.http_redirect_code, &format!("https://{host}{port}{pq}"));
            }
        }
        if let Some(root) = &ann.app_root
            && path == "/"
        {
            return redirect(302, root);
        }
        let origin = req
            .headers()
            .get(header::ORIGIN)
            .and_then(|o| o.to_str().ok())
            .map(str::to_string);
        if let Some(cors) = &ann.cors
            && req.method() == Method::OPTIONS
        {
            let mut r = plain(StatusCode::NO_CONTENT, "");
            cors.preflight_headers(origin.as_deref(), r.headers_mut());
            return r;
        }
        let exempt = ann.limit_whitelist.iter().any(|n| n.contains(&client_ip));
        let _conn_slot = match (&ann.limit_connections, exempt) {
            (Some(limit), false) => match self.limits.conn(location, *limit).acquire(client_ip) {
                Some(slot) => Some(slot),
                None => return status_only(cfg.limit_conn_status_code),
            },
            _ => None,
        };
        if let (Some(rps), false) = (ann.limit_rps, exempt) {
            let limiter = self
                .limits
                .rate(location, rps, ann.limit_burst_multiplier.unwrap_or(5));
            if !limiter.allow(client_ip, Instant::now()) {
                return status_only(cfg.limit_req_status_code);
            }
        }
        if !acme {
            let allow = ann
                .whitelist_source_range
                .as_ref()
                .unwrap_or(&cfg.whitelist_source_range);
            if !allow.is_empty() && !allow.iter().any(|n| n.contains(&client_ip)) {
                return plain(StatusCode::FORBIDDEN, "403 Forbidden\n");
            }
            let deny = ann
                .denylist_source_range
                .as_ref()
                .unwrap_or(&cfg.denylist_source_range);
            if deny.iter().any(|n| n.contains(&client_ip)) {
                return plain(StatusCode::FORBIDDEN, "403 Forbidden\n");
            }
            match &location.auth {
                None => {}
                Some(AuthUsers::Unavailable) => {
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "503 Service Temporarily Unavailable\n",
                    );
                }
                Some(AuthUsers::Users(users)) => {
                    let header = req
                        .headers()
                        .get(header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    if !users.check_header(header) {
                        let mut r = plain(StatusCode::UNAUTHORIZED, "401 Authorization Required\n");
                        let realm = ann
                            .basic_auth
                            .as_ref()
                            .map_or("Authentication Required", |b| b.realm.as_str());
                        if let Ok(v) = HeaderValue::from_str(&format!(
                            "Basic realm=\"{}\"",
                            realm.replace('"', "")
                        )) {
                            r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
                        }
                        return r;
                    }
                }
            }
        }
        let backend = match &location.target {
            Target::BuiltIn404 => {
                return if path == "/healthz" {
                    plain(StatusCode::OK, "")
                } else {
                    plain(StatusCode::NOT_FOUND, "default backend - 404\n")
                };
            }
            Target::Unavailable { .. } => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "503 Service Temporarily Unavailable\n",
                );
            }
            Target::Service(b) => b.clone(),
        };
        let limit = match ann.proxy_body_size {
            Some(l) => l,
            None => cfg.proxy_body_size,
        };
        if let Some(limit) = limit
            && content_length(req.headers()).is_some_and(|len| len > limit)
        {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "413 Request Entity Too Large\n",
            );
        }
        let mut set_cookie = None;
        let picked = match &ann.affinity {
            None => backend.pick().cloned(),
            Some(aff) => {
                let current = cookie_value(req.headers(), &aff.name);
                backend.pick_sticky(current.as_deref()).map(|(u, new_id)| {
                    set_cookie = new_id.map(|id| affinity_cookie(aff, id, conn.tls));
                    u.clone()
                })
            }
        };
        let Some(upstream) = picked else {
            return plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "503 Service Temporarily Unavailable\n",
            );
        };

        let mut req = req;
        let upgrade = is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let tunnel_guard = req
            .extensions_mut()
            .remove::<Arc<kube_common::idle::InFlight>>();
        let (mut parts, body) = req.into_parts();
        let original_host = request_host(&parts.uri, &parts.headers).unwrap_or_default();
        // The Host the upstream sees is the one the request was routed by: the target's
        // authority when it has one (absolute-form, HTTP/2), else the Host field.
        let host_value = match parts.uri.authority() {
            Some(a) => HeaderValue::from_str(a.as_str()).ok(),
            None => parts.headers.get(header::HOST).cloned(),
        };
        let scheme = if matches!(
            ann.backend_protocol,
            BackendProtocol::Https | BackendProtocol::Grpcs
        ) {
            "https"
        } else {
            "http"
        };
        let authority = match &upstream {
            Upstream::Addr(a) => a.to_string(),
            Upstream::Dns { host, port } => format!("{host}:{port}"),
        };
        // From parts: the request's path and query are reused as they are (no re-parse).
        let pq = match rewrite {
            Some(p) => http::uri::PathAndQuery::try_from(p).ok(),
            None => Some(
                parts
                    .uri
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
            ),
        };
        let mut uri_parts = http::uri::Parts::default();
        uri_parts.scheme = Some(if scheme == "https" {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        uri_parts.authority = http::uri::Authority::try_from(authority.as_str()).ok();
        uri_parts.path_and_query = pq;
        let uri = match Uri::from_parts(uri_parts) {
            Ok(u) if u.authority().is_some() && u.path_and_query().is_some() => u,
            _ => return plain(StatusCode::BAD_REQUEST, "bad request URI\n"),
        };
        parts.uri = uri;
        let grpc = matches!(
            ann.backend_protocol,
            BackendProtocol::Grpc | BackendProtocol::Grpcs
        );
        if !grpc {
            parts.version = http::Version::HTTP_11;
        }
        let request_id = parts
            .headers
            .get("x-request-id")
            .cloned()
            .unwrap_or_else(|| self.request_ids.next());
        let full_xff = cfg.compute_full_forwarded_for && cfg.use_forwarded_headers;
        let xff = if full_xff && parts.headers.contains_key("x-forwarded-for") {
            HeaderValue::from_str(&forwarded_for(&parts.headers, conn.remote.ip(), true)).ok()
        } else {
            Some(conn.remote_ip.clone())
        };
        // Behind a trusted load balancer (`use-forwarded-headers`), its scheme and port are
        // passed on, as ingress-nginx does.
        let incoming = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let original_xff = incoming("x-forwarded-for");
        let own_proto = HeaderValue::from_static(if conn.tls { "https" } else { "http" });
        let (proto, port) = if cfg.use_forwarded_headers {
            (
                parts
                    .headers
                    .get("x-forwarded-proto")
                    .cloned()
                    .unwrap_or(own_proto),
                parts
                    .headers
                    .get("x-forwarded-port")
                    .cloned()
                    .unwrap_or_else(|| conn.local_port.clone()),
            )
        } else {
            (own_proto, conn.local_port.clone())
        };
        let headers = &mut parts.headers;
        if let Some(xff) = &original_xff {
            set(
                headers,
                HeaderName::from_static("x-original-forwarded-for"),
                xff,
            );
        }
        strip_hop_by_hop(headers, upgrade);
        headers.remove("proxy");
        // Header values are reused (a clone shares the bytes) rather than re-formatted and
        // re-validated from strings.
        let original_host_value = match &host_value {
            Some(v) => Some(v.clone()),
            None => HeaderValue::from_str(&original_host).ok(),
        };
        match &ann.upstream_vhost {
            Some(vhost) => set(headers, header::HOST, vhost),
            None => {
                if let Some(v) = &original_host_value {
                    headers.insert(header::HOST, v.clone());
                }
            }
        }
        headers.insert(HeaderName::from_static("x-request-id"), request_id);
        if client_ip == conn.remote.ip() {
            headers.insert(HeaderName::from_static("x-real-ip"), conn.remote_ip.clone());
        } else {
            set(
                headers,
                HeaderName::from_static("x-real-ip"),
                &client_ip.to_string(),
            );
        }
        if let Some(xff) = xff {
            headers.insert(HeaderName::from_static("x-forwarded-for"), xff);
        }
        if let Some(v) = original_host_value {
            headers.insert(HeaderName::from_static("x-forwarded-host"), v);
        }
        headers.insert(HeaderName::from_static("x-forwarded-port"), port);
        headers.insert(HeaderName::from_static("x-forwarded-proto"), proto.clone());
        headers.insert(HeaderName::from_static("x-forwarded-scheme"), proto.clone());
        headers.insert(HeaderName::from_static("x-scheme"), proto);
        if let Some(prefix) = &ann.x_forwarded_prefix {
            set(
                headers,
                HeaderName::from_static("x-forwarded-prefix"),
                prefix,
            );
        }
        let body: Body = match limit {
            Some(l) => Limited::new(body, usize::try_from(l).unwrap_or(usize::MAX)).boxed_unsync(),
            None => body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        };
        let progress = Arc::new(crate::send_timeout::Progress::default());
        let body = crate::send_timeout::Tracked::new(body, progress.clone()).boxed_unsync();
        let send_timeout = ann.proxy_send_timeout.unwrap_or(cfg.proxy_send_timeout);
        let out = Request::from_parts(parts, body);
        let read_timeout = ann.proxy_read_timeout.unwrap_or(cfg.proxy_read_timeout);
        let clients = self.upstreams.get(PoolSettings {
            connect_timeout: ann
                .proxy_connect_timeout
                .unwrap_or(cfg.proxy_connect_timeout),
            keepalive_timeout: cfg.upstream_keepalive_timeout,
            keepalive_connections: cfg.upstream_keepalive_connections,
        });
        let fut = clients.request(scheme == "https", grpc, out);
        let sending = tokio::time::timeout(read_timeout, fut);
        let outcome = tokio::select! {
            r = sending => r,
            () = progress.stalled(send_timeout) => {
                return plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Time-out\n");
            }
        };
        let mut resp = match outcome {
            Err(_) => return plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Time-out\n"),
            Ok(Err(e)) => {
                tracing::debug!(upstream = %authority, error = %e, "upstream request failed");
                if is_body_limit(&e) {
                    return plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "413 Request Entity Too Large\n",
                    );
                }
                // A malformed request body (an invalid chunk size, say) is the client's error,
                // as nginx answers it, not a failed upstream.
                if progress.client_failed() {
                    return plain(StatusCode::BAD_REQUEST, "400 Bad Request\n");
                }
                return plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n");
            }
            Ok(Ok(r)) => r,
        };
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS
            && let Some(client_upgrade) = client_upgrade
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                    let mut c = hyper_util::rt::TokioIo::new(c);
                    let mut u = hyper_util::rt::TokioIo::new(u);
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                }
                drop(tunnel_guard);
            });
            let (rparts, _) = resp.into_parts();
            return Response::from_parts(
                rparts,
                Empty::new().map_err(|e| match e {}).boxed_unsync(),
            );
        }
        let (mut rparts, rbody) = resp.into_parts();
        strip_hop_by_hop(&mut rparts.headers, false);
        if let Some(cors) = &ann.cors {
            cors.response_headers(origin.as_deref(), &mut rparts.headers);
        }
        for (name, value) in location.add_headers.iter() {
            rparts.headers.insert(name.clone(), value.clone());
        }
        if let Some(cookie) = set_cookie
            && let Ok(v) = HeaderValue::from_str(&cookie)
        {
            rparts.headers.append(header::SET_COOKIE, v);
        }
        if conn.tls
            && let Some(hsts) = cfg.hsts_header()
            && let Ok(v) = HeaderValue::from_str(&hsts)
        {
            rparts.headers.insert(header::STRICT_TRANSPORT_SECURITY, v);
        }
        Response::from_parts(
            rparts,
            rbody.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        )
    }
}

/// The location for `host` + `path`, and the rewritten path+query if `rewrite-target` applies.
pub fn route(snap: &Snapshot, host: &str, path: &str) -> (Arc<Location>, Option<String>) {
    match snap.router.lookup(host, path) {
        Match::Rule(rule, server) => {
            let loc = rule.target.clone();
            let rewrite = loc.annotations.rewrite_target.as_ref().and_then(|target| {
                let re = server.regex_for(&rule.path)?;
                let caps = re.captures(path)?;
                let mut out = String::new();
                caps.expand(target, &mut out);
                Some(out)
            });
            (loc, rewrite)
        }
        Match::HostDefault(Some(d)) => (d.clone(), None),
        Match::HostDefault(None) => (snap.default_location.clone(), None),
    }
}

fn is_body_limit(e: &hyper_util::client::legacy::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

/// The host a request names: its target's authority when it has one (absolute-form, where
/// RFC 9112 §3.2.2 says the Host field is ignored; HTTP/2's `:authority`), else the Host field.
fn request_host(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    uri.authority().map(|a| a.to_string()).or_else(|| {
        headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(str::to_string)
    })
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host field or with
/// more than one (nginx does).
fn check_host(version: http::Version, uri: &Uri, headers: &HeaderMap) -> Result<(), &'static str> {
    // Userinfo (`user:pass@host`) has no place in a request's authority (RFC 9110 §4.2.4,
    // RFC 9113 §8.3.1); nginx refuses it. Accepted, it would split routing (the part after
    // the last `:`) from what the upstream is told.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("400 Bad Request: userinfo in the request target\n");
    }
    if version > http::Version::HTTP_11 {
        return Ok(());
    }
    let mut hosts = headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => Err("400 Bad Request: more than one Host field\n"),
        (None, _) if version == http::Version::HTTP_11 && uri.authority().is_none() => {
            Err("400 Bad Request: no Host field\n")
        }
        _ => Ok(()),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Removes hop-by-hop headers (and those named in Connection); keeps Upgrade for WebSockets.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        if !(keep_upgrade && name == header::UPGRADE) {
            headers.remove(name);
        }
    }
    for name in [
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
}

/// The client address: the socket peer, or the first X-Forwarded-For entry when
/// `use-forwarded-headers` trusts the proxy in front.
fn client_ip(headers: &HeaderMap, peer: IpAddr, trust_forwarded: bool) -> IpAddr {
    if trust_forwarded
        && let Some(first) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return first;
    }
    peer
}

fn forwarded_for(headers: &HeaderMap, peer: IpAddr, full: bool) -> String {
    match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(existing) if full => format!("{existing}, {peer}"),
        _ => peer.to_string(),
    }
}

pub fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The value of cookie `name` in the request, if any.
fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn affinity_cookie(aff: &crate::annotations::CookieAffinity, id: &str, tls: bool) -> String {
    let mut c = format!("{}={id}; Path={}", aff.name, aff.path);
    if let Some(d) = &aff.domain {
        c.push_str(&format!("; Domain={d}"));
    }
    if let Some(m) = aff.max_age {
        c.push_str(&format!("; Max-Age={m}"));
    }
    if let Some(e) = aff.expires {
        let at = std::time::SystemTime::now() + std::time::Duration::from_secs(e);
        c.push_str(&format!("; Expires={}", httpdate::fmt_http_date(at)));
    }
    if let Some(s) = &aff.samesite {
        c.push_str(&format!("; SameSite={s}"));
    }
    if aff.secure || (tls && aff.samesite.as_deref() == Some("None")) {
        c.push_str("; Secure");
    }
    c.push_str("; HttpOnly");
    c
}

fn status_only(code: u16) -> Response<Body> {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, "");
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    r
}

fn redirect(code: u16, location: &str) -> Response<Body> {
    let mut r = plain(
        StatusCode::from_u16(code).unwrap_or(StatusCode::PERMANENT_REDIRECT),
        "",
    );
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Unique request IDs without a syscall per request: a random per-process prefix + a counter.
struct RequestIds {
    prefix: u64,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        let mut seed = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed));
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            prefix: u64::from_le_bytes(seed) ^ nanos,
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        // 32 lowercase hex digits written in place (no formatting machinery per request).
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; 32];
        for (i, word) in [self.prefix, n].into_iter().enumerate() {
            for j in 0..16 {
                buf[i * 16 + j] = HEX[((word >> (60 - 4 * j)) & 0xf) as usize];
            }
        }
        HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(hosts: &[&'static str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for host in hosts {
            h.append(header::HOST, HeaderValue::from_static(host));
        }
        h
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        let origin: Uri = "/a".parse().unwrap();
        let v11 = http::Version::HTTP_11;
        assert!(check_host(v11, &origin, &headers(&["a.test"])).is_ok());
        assert!(check_host(v11, &origin, &headers(&[])).is_err());
        assert!(check_host(v11, &origin, &headers(&["a.test", "b.test"])).is_err());
        // HTTP/1.0 may leave Host out; absolute-form names the host itself.
        assert!(check_host(http::Version::HTTP_10, &origin, &headers(&[])).is_ok());
        let absolute: Uri = "http://a.test/a".parse().unwrap();
        assert!(check_host(v11, &absolute, &headers(&[])).is_ok());
        let userinfo: Uri = "http://public.test:x@admin.test/".parse().unwrap();
        assert!(check_host(v11, &userinfo, &headers(&["public.test"])).is_err());
        assert!(check_host(http::Version::HTTP_2, &userinfo, &headers(&[])).is_err());
        assert!(check_host(http::Version::HTTP_2, &absolute, &headers(&[])).is_ok());
    }

    #[test]
    fn the_target_authority_wins_over_the_host_field() {
        let absolute: Uri = "http://other.test/a".parse().unwrap();
        let host = request_host(&absolute, &headers(&["bench.test"]));
        assert_eq!(host.as_deref(), Some("other.test"));
        let origin: Uri = "/a".parse().unwrap();
        let host = request_host(&origin, &headers(&["bench.test"]));
        assert_eq!(host.as_deref(), Some("bench.test"));
    }
}
