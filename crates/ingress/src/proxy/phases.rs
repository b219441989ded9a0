//! The request's phases before the upstream call, in nginx's order: rewrite (redirects, CORS
//! preflight), preaccess (limits), access (source ranges, basic auth), content (the backend).
//! Each phase either answers the request (`Err(response)`) or passes it on.

// A phase's `Err` is the answer itself, a Response as large as what the call returns: it is
// handed back once, never propagated through layers of callers.
#![allow(clippy::result_large_err)]

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{Body, ConnInfo, Limits, plain, redirect, status_only};
use crate::config::Config;
use crate::ratelimit::ConnSlot;
use crate::snapshot::{AuthUsers, Backend, Location, Target, Upstream};

const ACME_PREFIX: &str = "/.well-known/acme-challenge";

/// A phase's outcome: pass on with a value, or answer now.
pub type Phase<T = ()> = Result<T, Response<Body>>;

/// What every phase reads, decided once per request.
pub struct Ctx<'a> {
    pub conn: &'a ConnInfo,
    pub cfg: &'a Config,
    pub location: &'a Location,
    pub host: &'a str,
    pub client_ip: IpAddr,
    /// HTTP-01 challenge locations skip redirects and access checks.
    pub acme: bool,
    pub https_port: u16,
}

impl<'a> Ctx<'a> {
    pub fn new(
        conn: &'a ConnInfo,
        cfg: &'a Config,
        location: &'a Location,
        host: &'a str,
        headers: &HeaderMap,
        https_port: u16,
    ) -> Self {
        Self {
            conn,
            cfg,
            location,
            host,
            client_ip: client_ip(headers, conn.remote.ip(), cfg.use_forwarded_headers),
            acme: location.path.starts_with(ACME_PREFIX),
            https_port,
        }
    }
}

/// CONNECT and TRACE refused, `block-cidrs`, redirects (`permanent-redirect`, `temporal-redirect`, HTTPS, `app-root`) and
/// CORS preflights.
pub fn rewrite(ctx: &Ctx<'_>, req: &Request<Incoming>) -> Phase {
    // nginx refuses both before any location applies: CONNECT would make the upstream
    // connection a tunnel, TRACE echoes headers (cookies included) back.
    if req.method() == Method::CONNECT || req.method() == Method::TRACE {
        return Err(plain(StatusCode::METHOD_NOT_ALLOWED, "405 Not Allowed\n"));
    }
    let (cfg, ann) = (ctx.cfg, &ctx.location.annotations);
    if cfg.block_cidrs.iter().any(|n| n.contains(&ctx.client_ip)) {
        return Err(plain(StatusCode::FORBIDDEN, "403 Forbidden\n"));
    }
    if let Some(r) = ann
        .permanent_redirect
        .as_ref()
        .or(ann.temporal_redirect.as_ref())
    {
        return Err(redirect(r.code, &r.url));
    }
    if !ctx.conn.tls && !ctx.acme {
        let force = ann.force_ssl_redirect.unwrap_or(cfg.force_ssl_redirect);
        let ssl = ctx.location.tls && ann.ssl_redirect.unwrap_or(cfg.ssl_redirect);
        if force || ssl {
            let port = if ctx.https_port == 443 {
                String::new()
            } else {
                format!(":{}", ctx.https_port)
            };
            let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
            let url = format!("https://{}{port}{pq}", ctx.host);
            return Err(redirect(cfg.http_redirect_code, &url));
        }
    }
    if let Some(root) = &ann.app_root
        && req.uri().path() == "/"
    {
        return Err(redirect(302, root));
    }
    if let Some(cors) = &ann.cors
        && req.method() == Method::OPTIONS
    {
        let mut r = plain(StatusCode::NO_CONTENT, "");
        cors.preflight_headers(origin(req.headers()), r.headers_mut());
        return Err(r);
    }
    Ok(())
}

/// `limit-connections` (a slot held until the response is produced) and `limit-rps`.
pub fn limits(ctx: &Ctx<'_>, limits: &Limits) -> Phase<Option<ConnSlot>> {
    let ann = &ctx.location.annotations;
    if ann
        .limit_whitelist
        .iter()
        .any(|n| n.contains(&ctx.client_ip))
    {
        return Ok(None);
    }
    let slot = match &ann.limit_connections {
        Some(limit) => match limits.conn(ctx.location, *limit).acquire(ctx.client_ip) {
            Some(slot) => Some(slot),
            None => return Err(status_only(ctx.cfg.limit_conn_status_code)),
        },
        None => None,
    };
    if let Some(rps) = ann.limit_rps {
        let burst = ann.limit_burst_multiplier.unwrap_or(5);
        if !limits
            .rate(ctx.location, rps, burst)
            .allow(ctx.client_ip, Instant::now())
        {
            return Err(status_only(ctx.cfg.limit_req_status_code));
        }
    }
    Ok(slot)
}

/// `whitelist-source-range`, `denylist-source-range` and basic auth.
pub fn access(ctx: &Ctx<'_>, headers: &HeaderMap) -> Phase {
    if ctx.acme {
        return Ok(());
    }
    let (cfg, ann) = (ctx.cfg, &ctx.location.annotations);
    let forbidden = || plain(StatusCode::FORBIDDEN, "403 Forbidden\n");
    let allow = ann
        .whitelist_source_range
        .as_ref()
        .unwrap_or(&cfg.whitelist_source_range);
    if !allow.is_empty() && !allow.iter().any(|n| n.contains(&ctx.client_ip)) {
        return Err(forbidden());
    }
    let deny = ann
        .denylist_source_range
        .as_ref()
        .unwrap_or(&cfg.denylist_source_range);
    if deny.iter().any(|n| n.contains(&ctx.client_ip)) {
        return Err(forbidden());
    }
    match &ctx.location.auth {
        None => Ok(()),
        Some(AuthUsers::Unavailable) => Err(unavailable()),
        Some(AuthUsers::Users(users)) => {
            let header = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            if users.check_header(header) {
                return Ok(());
            }
            let mut r = plain(StatusCode::UNAUTHORIZED, "401 Authorization Required\n");
            let realm = ann
                .basic_auth
                .as_ref()
                .map_or("Authentication Required", |b| b.realm.as_str());
            let challenge = format!("Basic realm=\"{}\"", realm.replace('"', ""));
            if let Ok(v) = HeaderValue::from_str(&challenge) {
                r.headers_mut().insert(header::WWW_AUTHENTICATE, v);
            }
            Err(r)
        }
    }
}

/// The endpoint a request goes to, and the affinity cookie to set if a new one was chosen.
pub struct Picked {
    pub upstream: Upstream,
    pub set_cookie: Option<String>,
}

/// The built-in backends, `proxy-body-size`, and the endpoint (round-robin or sticky).
pub fn content(ctx: &Ctx<'_>, req: &Request<Incoming>) -> Phase<Picked> {
    let backend: &Arc<Backend> = match &ctx.location.target {
        Target::BuiltIn404 => {
            return Err(if req.uri().path() == "/healthz" {
                plain(StatusCode::OK, "")
            } else {
                plain(StatusCode::NOT_FOUND, "default backend - 404\n")
            });
        }
        Target::Unavailable { .. } => return Err(unavailable()),
        Target::Service(b) => b,
    };
    if let Some(limit) = body_limit(ctx)
        && content_length(req.headers()).is_some_and(|len| len > limit)
    {
        return Err(plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            "413 Request Entity Too Large\n",
        ));
    }
    let picked = match &ctx.location.annotations.affinity {
        None => backend.pick().map(|u| Picked {
            upstream: u.clone(),
            set_cookie: None,
        }),
        Some(aff) => {
            let current = cookie_value(req.headers(), &aff.name);
            backend
                .pick_sticky(current.as_deref())
                .map(|(u, new_id)| Picked {
                    upstream: u.clone(),
                    set_cookie: new_id.map(|id| affinity_cookie(aff, id, ctx.conn.tls)),
                })
        }
    };
    picked.ok_or_else(unavailable)
}

/// `proxy-body-size` of the location, else of the ConfigMap (`None`: unlimited).
pub fn body_limit(ctx: &Ctx<'_>) -> Option<u64> {
    match ctx.location.annotations.proxy_body_size {
        Some(l) => l,
        None => ctx.cfg.proxy_body_size,
    }
}

pub fn unavailable() -> Response<Body> {
    plain(
        StatusCode::SERVICE_UNAVAILABLE,
        "503 Service Temporarily Unavailable\n",
    )
}

/// The request's `Origin`, for CORS.
pub fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|o| o.to_str().ok())
}

/// The client address: the socket peer, or the first X-Forwarded-For entry when
/// `use-forwarded-headers` trusts the proxy in front.
fn client_ip(headers: &HeaderMap, peer: IpAddr, trust_forwarded: bool) -> IpAddr {
    if trust_forwarded
        && let Some(first) = headers
            .get(&super::forward::names::X_FORWARDED_FOR)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return first;
    }
    peer
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
