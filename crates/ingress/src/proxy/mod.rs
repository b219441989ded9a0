//! The data plane: one request in, one request out, decided by the current [`Snapshot`].
//! Nothing here blocks or rebuilds: the snapshot is read with one atomic load.

pub(crate) mod forward;
mod phases;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::{Body as _, Incoming};
use kube_common::idle::InFlight;

use crate::annotations::BackendProtocol;
use crate::metrics::{Metrics, RequestLabels};
use crate::path_rules::{Match, normalize_host};
use crate::ratelimit::{ConnLimiter, ConnSlot, RateLimiter};
use crate::snapshot::{Location, Snapshot, Target, Upstream};
use crate::upstream::{PoolSettings, Upstreams, h1, pool};
use phases::{Ctx, Phase, Picked};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Per-connection facts the handler needs.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub tls: bool,
    /// The proxy worker serving the connection: its upstream pool is used.
    pub worker: usize,
    /// The peer's address and our port as header values, formatted once per session (the
    /// requests between two idle spells of a connection) rather than per request.
    remote_ip: HeaderValue,
    local_port: HeaderValue,
}

impl ConnInfo {
    pub fn new(remote: SocketAddr, local: SocketAddr, tls: bool, worker: usize) -> Self {
        let value = |s: String| HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""));
        Self {
            remote,
            local,
            tls,
            worker,
            remote_ip: value(remote.ip().to_string()),
            local_port: value(local.port().to_string()),
        }
    }
}

/// Shared proxy state: the current snapshot and each worker's upstream pools.
pub struct Proxy {
    snapshot: ArcSwap<Snapshot>,
    /// One per worker: a worker's requests never take another worker's pool lock.
    upstreams: Box<[Upstreams]>,
    metrics: Metrics,
    https_port: u16,
    request_ids: RequestIds,
    limits: Limits,
}

/// Limiter state per location, kept across configuration generations. Entries of locations
/// no request has used for [`LIMITS_IDLE`] go once the map reaches [`LIMITS_PRUNE_AT`], so
/// deleted Ingresses do not leave state behind for ever.
#[derive(Default)]
pub(crate) struct Limits {
    rate: Mutex<HashMap<String, (Arc<RateLimiter>, Instant)>>,
    conn: Mutex<HashMap<String, (Arc<ConnLimiter>, Instant)>>,
}

const LIMITS_PRUNE_AT: usize = 256;
/// Past this a rate bucket has refilled anyway, and an unused connection count is zero.
const LIMITS_IDLE: Duration = Duration::from_secs(600);

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
        let mut map = self.rate.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = || Arc::new(RateLimiter::new(rps, burst));
        let same = |l: &RateLimiter| l.same_settings(rps, burst);
        // A rate bucket idle for LIMITS_IDLE has refilled: nothing is lost by dropping it.
        let limiter = entry(&mut map, Self::key(location), fresh, same, |_| false);
        limiter.clone()
    }

    fn conn(&self, location: &Location, limit: u32) -> Arc<ConnLimiter> {
        let mut map = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = || Arc::new(ConnLimiter::new(limit));
        let limiter = entry(
            &mut map,
            Self::key(location),
            fresh,
            |l| l.limit() == limit,
            ConnLimiter::in_use,
        );
        limiter.clone()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.rate.lock().map_or(0, |m| m.len()) + self.conn.lock().map_or(0, |m| m.len())
    }
}

/// The limiter under `key`, replaced when its settings changed; marks it used now.
fn entry<T>(
    map: &mut HashMap<String, (Arc<T>, Instant)>,
    key: String,
    fresh: impl Fn() -> Arc<T>,
    same: impl Fn(&T) -> bool,
    in_use: impl Fn(&T) -> bool,
) -> &Arc<T> {
    let now = Instant::now();
    if map.len() >= LIMITS_PRUNE_AT && !map.contains_key(&key) {
        // Kept: entries requests hold right now, or used recently.
        map.retain(|_, (l, used)| {
            Arc::strong_count(l) > 1 || in_use(l) || now.duration_since(*used) < LIMITS_IDLE
        });
    }
    let slot = map.entry(key).or_insert_with(|| (fresh(), now));
    if !same(&slot.0) {
        slot.0 = fresh();
    }
    slot.1 = now;
    &slot.0
}

impl Proxy {
    /// A proxy for `workers` worker threads (each gets its own upstream pools).
    pub fn new(initial: Snapshot, metrics: Metrics, https_port: u16, workers: usize) -> Self {
        Self {
            snapshot: ArcSwap::from_pointee(initial),
            upstreams: (0..workers.max(1)).map(|_| Upstreams::default()).collect(),
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

    /// Handles one request; never fails (errors become 4xx/5xx responses). The phases before
    /// the upstream call run without awaiting: the request is held by this one future, not
    /// moved down a chain of them.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let snap = self.snapshot.load_full();
        let method = req.method().clone();
        if let Err(why) = check_head(req.version(), req.uri(), req.headers()) {
            let location = snap.default_location.clone();
            let response = plain(StatusCode::BAD_REQUEST, why);
            return Ok(self.record(&method, "", &location, response, started));
        }
        let host = request_host(req.uri(), req.headers())
            .map(normalize_host)
            .unwrap_or_default();
        let (location, rewrite) = route(&snap, &host, req.uri().path());
        let ctx = Ctx::new(
            &conn,
            &snap.config,
            &location,
            &host,
            req.headers(),
            self.https_port,
        );
        let response = match self.before_upstream(&ctx, req, rewrite) {
            Err(answer) => answer,
            Ok(outgoing) => match self.call(&ctx, outgoing).await {
                Ok(r) | Err(r) => r,
            },
        };
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

    /// The phases in nginx's order, then the request as the upstream is to get it.
    // The `Err` is the answer itself (as in `phases`): handed back once, not propagated.
    #[allow(clippy::result_large_err)]
    fn before_upstream(
        &self,
        ctx: &Ctx<'_>,
        req: Request<Incoming>,
        rewrite: Option<String>,
    ) -> Phase<Outgoing> {
        phases::rewrite(ctx, &req)?;
        let slot = phases::limits(ctx, &self.limits)?;
        phases::access(ctx, req.headers())?;
        let picked = phases::content(ctx, &req)?;
        let mut outgoing = self.outgoing(ctx, req, picked, rewrite)?;
        outgoing.slot = slot;
        Ok(outgoing)
    }

    /// The upstream's request: hop-by-hop fields removed, forwarded fields set, the target
    /// rewritten, the body capped and watched.
    #[allow(clippy::result_large_err)]
    fn outgoing(
        &self,
        ctx: &Ctx<'_>,
        req: Request<Incoming>,
        picked: Picked,
        rewrite: Option<String>,
    ) -> Phase<Outgoing> {
        let ann = &ctx.location.annotations;
        let mut req = req;
        let upgrade = forward::is_upgrade(req.headers());
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let tunnel_guard = req.extensions_mut().remove::<Arc<InFlight>>();
        // Only when CORS needs it on the response: no copy otherwise.
        let origin = ann
            .cors
            .as_ref()
            .and_then(|_| phases::origin(req.headers()).map(str::to_string));
        let (mut parts, body) = req.into_parts();
        let tls = matches!(
            ann.backend_protocol,
            BackendProtocol::Https | BackendProtocol::Grpcs
        );
        let grpc = matches!(
            ann.backend_protocol,
            BackendProtocol::Grpc | BackendProtocol::Grpcs
        );
        let authority = grpc.then(|| match &picked.upstream {
            Upstream::Addr(a) => a.to_string(),
            Upstream::Dns { host, port } => format!("{host}:{port}"),
        });
        if !grpc {
            parts.version = http::Version::HTTP_11;
        }
        let request_id = parts
            .headers
            .get(&forward::names::X_REQUEST_ID)
            .cloned()
            .unwrap_or_else(|| self.request_ids.next());
        // Headers first: they read the client's target (its authority) before it is replaced.
        forward::request_headers(ctx, &mut parts, upgrade, request_id);
        forward::target(&mut parts, rewrite, authority.as_deref().map(|a| (tls, a)))?;
        let (body, progress) = limited_body(body, phases::body_limit(ctx));
        Ok(Outgoing {
            req: Request::from_parts(parts, body),
            picked,
            tls,
            grpc,
            client_upgrade,
            tunnel_guard,
            origin,
            progress,
            slot: None,
        })
    }

    /// Sends the request upstream and rewrites the response for the client. What `outgoing`
    /// still holds when this returns (the `limit-connections` slot) is dropped then.
    async fn call(&self, ctx: &Ctx<'_>, outgoing: Outgoing) -> Phase<Response<Body>> {
        let o = outgoing;
        let sending = self.send(ctx, o.req, &o.picked.upstream, o.tls, o.grpc);
        // Pinned where it is: the timeout and select around it then move a pointer, not the
        // request's whole state.
        let sending = std::pin::pin!(sending);
        let resp = match self
            .await_upstream(ctx, sending, o.progress.as_deref(), &o.picked.upstream)
            .await?
        {
            Upstreamed::Response(r) => r,
            Upstreamed::Switched(head, upstream) => {
                let (parts, ()) = head.into_parts();
                if let Some(client_upgrade) = o.client_upgrade {
                    tunnel(upstream, client_upgrade, o.tunnel_guard);
                }
                // A 101 the client did not ask for goes to it as is; the connection closes.
                return Ok(Response::from_parts(parts, empty()));
            }
        };
        let (mut rparts, rbody) = resp.into_parts();
        forward::response_headers(
            ctx,
            &mut rparts.headers,
            o.origin.as_deref(),
            o.picked.set_cookie,
        );
        Ok(Response::from_parts(rparts, rbody))
    }

    /// One request to the upstream: HTTP/1 through this worker's pool (the connection goes
    /// back when the response body ends), gRPC through the HTTP/2 client.
    async fn send(
        &self,
        ctx: &Ctx<'_>,
        out: Request<Body>,
        upstream: &Upstream,
        tls: bool,
        grpc: bool,
    ) -> Result<Upstreamed, UpstreamError> {
        let settings = PoolSettings {
            keepalive_timeout: ctx.cfg.upstream_keepalive_timeout,
            keepalive_connections: ctx.cfg.upstream_keepalive_connections,
            keepalive_requests: ctx.cfg.upstream_keepalive_requests,
            keepalive_time: ctx.cfg.upstream_keepalive_time,
        };
        let connect_timeout = (ctx.location.annotations.proxy_connect_timeout)
            .unwrap_or(ctx.cfg.proxy_connect_timeout);
        let clients = self.upstreams(ctx.conn.worker).get(settings);
        let boxed = |b: Incoming| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync();
        if grpc {
            let resp = clients.request_h2(tls, connect_timeout, out).await?;
            return Ok(Upstreamed::Response(resp.map(boxed)));
        }
        let dest = pool::Dest::new(upstream, tls);
        Ok(
            match clients.http1.send(&dest, connect_timeout, out).await? {
                pool::Sent::Response(resp) => Upstreamed::Response(
                    resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
                ),
                pool::Sent::Switched(head, upgraded) => Upstreamed::Switched(head, upgraded),
            },
        )
    }

    /// The upstream's answer within `proxy-read-timeout`, unless the request body stalls for
    /// `proxy-send-timeout`; failures as nginx answers them.
    async fn await_upstream<T>(
        &self,
        ctx: &Ctx<'_>,
        sending: impl Future<Output = Result<T, UpstreamError>>,
        progress: Option<&crate::send_timeout::Progress>,
        upstream: &Upstream,
    ) -> Phase<T> {
        let ann = &ctx.location.annotations;
        let send_timeout = ann.proxy_send_timeout.unwrap_or(ctx.cfg.proxy_send_timeout);
        let read_timeout = ann.proxy_read_timeout.unwrap_or(ctx.cfg.proxy_read_timeout);
        let gateway_timeout = || plain(StatusCode::GATEWAY_TIMEOUT, "504 Gateway Time-out\n");
        let stalled = async {
            match progress {
                Some(p) => p.stalled(send_timeout).await,
                None => std::future::pending().await,
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout(read_timeout, sending) => r,
            () = stalled => return Err(gateway_timeout()),
        };
        match outcome {
            Err(_) => Err(gateway_timeout()),
            Ok(Ok(r)) => Ok(r),
            // nginx answers a connect timeout as any other upstream timeout.
            Ok(Err(UpstreamError::Pool(pool::Error::ConnectTimeout))) => Err(gateway_timeout()),
            Ok(Err(e)) => {
                tracing::debug!(?upstream, error = %e, "upstream request failed");
                if is_body_limit(&e) {
                    return Err(plain(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "413 Request Entity Too Large\n",
                    ));
                }
                // A malformed request body (an invalid chunk size, a length other than its
                // Content-Length) is the client's error, as nginx answers it, not a failed
                // upstream.
                if matches!(
                    e,
                    UpstreamError::Pool(pool::Error::Http(h1::Error::RequestLength))
                ) || progress.is_some_and(|p| p.client_failed())
                {
                    return Err(plain(StatusCode::BAD_REQUEST, "400 Bad Request\n"));
                }
                Err(plain(StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"))
            }
        }
    }

    fn upstreams(&self, worker: usize) -> &Upstreams {
        &self.upstreams[worker % self.upstreams.len()]
    }
}

/// The upstream's answer: a response, or a 101 with the connection it switched.
enum Upstreamed {
    Response(Response<Body>),
    Switched(Response<()>, h1::Upgraded),
}

/// The request as the upstream is to get it, and what the answer needs from the client's.
struct Outgoing {
    req: Request<Body>,
    picked: Picked,
    tls: bool,
    grpc: bool,
    /// The client's side of an upgrade it asked for.
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The connection's in-flight mark, kept by a tunnel for its life.
    tunnel_guard: Option<Arc<InFlight>>,
    /// The client's Origin, when CORS answers it.
    origin: Option<String>,
    progress: Option<Arc<crate::send_timeout::Progress>>,
    /// The `limit-connections` slot, held until the response is produced.
    slot: Option<ConnSlot>,
}

/// Why the upstream call failed (either client).
#[derive(Debug, thiserror::Error)]
enum UpstreamError {
    #[error(transparent)]
    Pool(#[from] pool::Error),
    #[error(transparent)]
    H2(#[from] hyper_util::client::legacy::Error),
}

/// The request body, capped at `proxy-body-size` and watched for `proxy-send-timeout`. A
/// request without a body (most are) needs neither: no wrapper, no watchdog timer.
fn limited_body(
    body: Incoming,
    limit: Option<u64>,
) -> (Body, Option<Arc<crate::send_timeout::Progress>>) {
    if body.is_end_stream() {
        return (empty(), None);
    }
    let body: Body = match limit {
        Some(l) => Limited::new(body, usize::try_from(l).unwrap_or(usize::MAX)).boxed_unsync(),
        None => body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
    };
    let progress = Arc::new(crate::send_timeout::Progress::default());
    let body = crate::send_timeout::Tracked::new(body, progress.clone()).boxed_unsync();
    (body, Some(progress))
}

/// A WebSocket (or other upgrade): once the client has the 101, both connections are joined,
/// the bytes the upstream sent after its 101 first. The tunnel keeps the client connection's
/// slot (`guard`) until it ends.
fn tunnel(upstream: h1::Upgraded, client: hyper::upgrade::OnUpgrade, guard: Option<Arc<InFlight>>) {
    tokio::spawn(async move {
        if let Ok(c) = client.await {
            let mut c = hyper_util::rt::TokioIo::new(c);
            let mut u = upstream.io;
            let ahead = async {
                tokio::io::AsyncWriteExt::write_all(&mut c, &upstream.read_ahead).await?;
                // A protocol where the server speaks first must not wait in rustls's buffer.
                tokio::io::AsyncWriteExt::flush(&mut c).await
            };
            if ahead.await.is_ok() {
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            }
        }
        drop(guard);
    });
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

fn is_body_limit(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(e);
    while let Some(s) = source {
        if s.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// The host a request names: its target's authority when it has one (absolute-form, where
/// RFC 9112 §3.2.2 says the Host field is ignored; HTTP/2's `:authority`), else the Host field.
fn request_host<'a>(uri: &'a Uri, headers: &'a HeaderMap) -> Option<&'a str> {
    uri.authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(header::HOST).and_then(|h| h.to_str().ok()))
}

/// RFC 9112 §3.2: a server MUST answer 400 to an HTTP/1.1 request without a Host field or with
/// more than one (nginx does). A repeated Content-Length is refused too: hyper's HTTP/1 server
/// has already folded equal repeats into one (RFC 9110 §8.6) and refused others, but HTTP/2
/// fields arrive as sent, and two would be two lengths upstream.
fn check_head(version: http::Version, uri: &Uri, headers: &HeaderMap) -> Result<(), &'static str> {
    let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
    if lengths.next().is_some() && lengths.next().is_some() {
        return Err("400 Bad Request: more than one Content-Length field\n");
    }
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

fn empty() -> Body {
    Empty::new().map_err(|e| match e {}).boxed_unsync()
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
    /// The random half, as hex digits once: only the counter is written per request.
    prefix: [u8; 16],
    counter: AtomicU64,
}

/// 16 lowercase hex digits written in place (no formatting machinery per request).
fn hex16(word: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    std::array::from_fn(|j| HEX[((word >> (60 - 4 * j)) & 0xf) as usize])
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
            prefix: hex16(u64::from_le_bytes(seed) ^ nanos),
            counter: AtomicU64::new(0),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        buf[..16].copy_from_slice(&self.prefix);
        buf[16..].copy_from_slice(&hex16(n));
        HeaderValue::from_bytes(&buf).unwrap_or(HeaderValue::from_static("0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn location(path: &str) -> Location {
        Location {
            ingress: None,
            host: "a.test".into(),
            path: path.to_string(),
            kind: crate::path_rules::PathKind::Prefix,
            target: Target::BuiltIn404,
            annotations: Arc::default(),
            tls: false,
            auth: None,
            add_headers: Arc::default(),
            metrics: crate::metrics::SeriesCache::default(),
        }
    }

    #[test]
    fn request_ids_are_32_hex_digits_a_random_half_then_a_counter() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        let (a, b) = (a.to_str().unwrap(), b.to_str().unwrap());
        assert_eq!(a.len(), 32);
        assert!(
            a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
        );
        assert_eq!(a[..16], b[..16]);
        assert_eq!(&a[16..], "0000000000000000");
        assert_eq!(&b[16..], "0000000000000001");
    }

    #[test]
    fn limiter_state_of_gone_locations_is_pruned() {
        let limits = Limits::default();
        let held = limits.conn(&location("/held"), 1);
        let slot = held.acquire(std::net::Ipv4Addr::LOCALHOST.into());
        drop(held);
        for i in 0..LIMITS_PRUNE_AT {
            limits.rate(&location(&format!("/r{i}")), 10, 5);
        }
        assert_eq!(limits.len(), LIMITS_PRUNE_AT + 1);
        // Age every entry past the idle limit, then add one more location.
        for (_, used) in limits.rate.lock().unwrap().values_mut() {
            *used -= LIMITS_IDLE;
        }
        limits.rate(&location("/new"), 10, 5);
        assert_eq!(
            limits.len(),
            2,
            "the new entry and the recently used one stay"
        );
        // An entry in use by a request is kept however old.
        for (_, used) in limits.conn.lock().unwrap().values_mut() {
            *used -= LIMITS_IDLE;
        }
        for i in 0..LIMITS_PRUNE_AT {
            limits.conn(&location(&format!("/c{i}")), 1);
        }
        // The slot a request holds keeps its limiter: the limit still counts it.
        assert!(slot.is_some());
        let again = limits.conn(&location("/held"), 1);
        assert!(
            again
                .acquire(std::net::Ipv4Addr::LOCALHOST.into())
                .is_none()
        );
    }

    #[test]
    fn a_changed_limit_replaces_its_limiter() {
        let limits = Limits::default();
        let a = limits.conn(&location("/a"), 1);
        assert!(Arc::ptr_eq(&a, &limits.conn(&location("/a"), 1)));
        assert!(!Arc::ptr_eq(&a, &limits.conn(&location("/a"), 2)));
    }

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
        assert!(check_head(v11, &origin, &headers(&["a.test"])).is_ok());
        assert!(check_head(v11, &origin, &headers(&[])).is_err());
        assert!(check_head(v11, &origin, &headers(&["a.test", "b.test"])).is_err());
        // HTTP/1.0 may leave Host out; absolute-form names the host itself.
        assert!(check_head(http::Version::HTTP_10, &origin, &headers(&[])).is_ok());
        let absolute: Uri = "http://a.test/a".parse().unwrap();
        assert!(check_head(v11, &absolute, &headers(&[])).is_ok());
        let userinfo: Uri = "http://public.test:x@admin.test/".parse().unwrap();
        assert!(check_head(v11, &userinfo, &headers(&["public.test"])).is_err());
        assert!(check_head(http::Version::HTTP_2, &userinfo, &headers(&[])).is_err());
        assert!(check_head(http::Version::HTTP_2, &absolute, &headers(&[])).is_ok());
    }

    #[test]
    fn a_repeated_content_length_is_refused_even_when_equal() {
        let origin: Uri = "/a".parse().unwrap();
        let mut h = headers(&["a.test"]);
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(check_head(http::Version::HTTP_11, &origin, &h).is_ok());
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        assert!(check_head(http::Version::HTTP_11, &origin, &h).is_err());
        assert!(check_head(http::Version::HTTP_2, &origin, &h).is_err());
    }

    #[test]
    fn the_target_authority_wins_over_the_host_field() {
        let absolute: Uri = "http://other.test/a".parse().unwrap();
        let bench = headers(&["bench.test"]);
        assert_eq!(request_host(&absolute, &bench), Some("other.test"));
        let origin: Uri = "/a".parse().unwrap();
        assert_eq!(request_host(&origin, &bench), Some("bench.test"));
    }
}
