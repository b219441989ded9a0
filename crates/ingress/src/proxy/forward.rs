//! What the upstream is told (target, Host, X-Forwarded-*, X-Request-ID; hop-by-hop headers
//! removed) and what the client gets back (hop-by-hop removed, CORS, `add-headers`, affinity
//! cookie, HSTS). Header values are reused (a clone shares the bytes) or static, never
//! formatted per request where the connection or the snapshot already has them.

// A phase's `Err` is the answer itself, a Response as large as what the call returns: it is
// handed back once, never propagated through layers of callers.
#![allow(clippy::result_large_err)]

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{StatusCode, Uri};

use super::phases::{Ctx, Phase};
use super::{ConnInfo, plain};

/// The header names the proxy sets or reads on every request, as constants: a name given as
/// `&str` is parsed and validated on each lookup, a constant only hashed.
pub(crate) mod names {
    use http::header::HeaderName;

    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_ORIGINAL_FORWARDED_FOR: HeaderName =
        HeaderName::from_static("x-original-forwarded-for");
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
    pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FORWARDED_SCHEME: HeaderName = HeaderName::from_static("x-forwarded-scheme");
    pub const X_SCHEME: HeaderName = HeaderName::from_static("x-scheme");
    pub const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
    pub const PROXY: HeaderName = HeaderName::from_static("proxy");
    pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
    pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
}
use names::*;

/// The upstream's request target: origin-form for HTTP/1 (hyper serialises the URI as given),
/// absolute for HTTP/2 (`:scheme` and `:authority`).
pub fn target(parts: &mut Parts, rewrite: Option<String>, absolute: Option<(bool, &str)>) -> Phase {
    let pq = match rewrite {
        // A rewrite must leave an origin-form target (`/...`); anything else is refused
        // rather than sent as a request line without one.
        Some(p) => match PathAndQuery::try_from(with_args(p, parts.uri.query())) {
            Ok(pq) if pq.path().starts_with('/') => pq,
            // A configuration error, as nginx answers a rewrite to nothing.
            _ => {
                return Err(plain(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "500 Internal Server Error\n",
                ));
            }
        },
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    let mut uri_parts = http::uri::Parts::default();
    if let Some((tls, authority)) = absolute {
        uri_parts.scheme = Some(if tls {
            http::uri::Scheme::HTTPS
        } else {
            http::uri::Scheme::HTTP
        });
        uri_parts.authority = http::uri::Authority::try_from(authority).ok();
        if uri_parts.authority.is_none() {
            return Err(bad_target());
        }
    }
    uri_parts.path_and_query = Some(pq);
    match Uri::from_parts(uri_parts) {
        Ok(u) if u.path_and_query().is_some() => {
            parts.uri = u;
            Ok(())
        }
        _ => Err(bad_target()),
    }
}

/// nginx's `rewrite`: the request's arguments follow the new target (after its own arguments,
/// if it has some), unless the target ends with `?`.
fn with_args(target: String, args: Option<&str>) -> String {
    if let Some(bare) = target.strip_suffix('?') {
        return bare.to_string();
    }
    match args {
        None | Some("") => target,
        Some(args) if target.contains('?') => format!("{target}&{args}"),
        Some(args) => format!("{target}?{args}"),
    }
}

fn bad_target() -> http::Response<super::Body> {
    plain(StatusCode::BAD_REQUEST, "bad request URI\n")
}

/// How many fields [`request_headers`] may add.
const FORWARDED_FIELDS: usize = 10;

/// The request headers as ingress-nginx sets them for the upstream.
pub fn request_headers(ctx: &Ctx<'_>, parts: &mut Parts, upgrade: bool, request_id: HeaderValue) {
    let (cfg, conn) = (ctx.cfg, ctx.conn);
    // The Host the upstream sees is the one the request was routed by: the target's
    // authority when it has one (absolute-form, HTTP/2), else the Host field.
    let original_host = match parts.uri.authority() {
        Some(a) => HeaderValue::from_str(a.as_str()).ok(),
        None => parts.headers.get(header::HOST).cloned(),
    }
    // An HTTP/1.0 request may name no host: the upstream is told an empty one.
    .or(Some(HeaderValue::from_static("")));
    let xff = forwarded_for(cfg, conn, &parts.headers);
    let (proto, port) = forwarded_proto_port(cfg.use_forwarded_headers, conn, &parts.headers);
    let headers = &mut parts.headers;
    // Room for the fields set below, made at once: a map sized for the client's few fields
    // would otherwise grow (and rehash) twice.
    let _ = headers.try_reserve(FORWARDED_FIELDS);
    let original_xff = headers.get(&X_FORWARDED_FOR).cloned();
    strip_hop_by_hop(headers, upgrade);
    // After the strip: a client naming it in Connection does not take it away.
    if let Some(xff) = original_xff {
        headers.insert(X_ORIGINAL_FORWARDED_FOR, xff);
    }
    headers.remove(PROXY);
    match &ctx.location.annotations.upstream_vhost {
        Some(vhost) => set(headers, header::HOST, vhost),
        None => {
            if let Some(v) = &original_host {
                headers.insert(header::HOST, v.clone());
            }
        }
    }
    headers.insert(X_REQUEST_ID, request_id);
    let real_ip = real_ip(conn, ctx.client_ip);
    headers.insert(X_REAL_IP, real_ip);
    if let Some(xff) = xff {
        headers.insert(X_FORWARDED_FOR, xff);
    }
    if let Some(v) = original_host {
        headers.insert(X_FORWARDED_HOST, v);
    }
    headers.insert(X_FORWARDED_PORT, port);
    headers.insert(X_FORWARDED_PROTO, proto.clone());
    headers.insert(X_FORWARDED_SCHEME, proto.clone());
    headers.insert(X_SCHEME, proto);
    if let Some(prefix) = &ctx.location.annotations.x_forwarded_prefix {
        set(headers, X_FORWARDED_PREFIX, prefix);
    }
}

/// X-Forwarded-For: the peer, or (`compute-full-forwarded-for` behind a trusted proxy) the
/// incoming list with the peer appended.
fn forwarded_for(
    cfg: &crate::config::Config,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> Option<HeaderValue> {
    let full = cfg.compute_full_forwarded_for && cfg.use_forwarded_headers;
    match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(existing) if full => {
            HeaderValue::from_str(&format!("{existing}, {}", conn.remote.ip())).ok()
        }
        _ => Some(conn.remote_ip.clone()),
    }
}

/// Behind a trusted load balancer (`use-forwarded-headers`), its scheme and port are passed
/// on, as ingress-nginx does.
fn forwarded_proto_port(
    trusted: bool,
    conn: &ConnInfo,
    headers: &HeaderMap,
) -> (HeaderValue, HeaderValue) {
    let own_proto = HeaderValue::from_static(if conn.tls { "https" } else { "http" });
    if !trusted {
        return (own_proto, conn.local_port.clone());
    }
    (
        headers
            .get(&X_FORWARDED_PROTO)
            .cloned()
            .unwrap_or(own_proto),
        headers
            .get(&X_FORWARDED_PORT)
            .cloned()
            .unwrap_or_else(|| conn.local_port.clone()),
    )
}

fn real_ip(conn: &ConnInfo, client_ip: IpAddr) -> HeaderValue {
    if client_ip == conn.remote.ip() {
        return conn.remote_ip.clone();
    }
    HeaderValue::from_str(&client_ip.to_string()).unwrap_or_else(|_| conn.remote_ip.clone())
}

/// The response headers the client gets.
pub fn response_headers(
    ctx: &Ctx<'_>,
    headers: &mut HeaderMap,
    origin: Option<&str>,
    set_cookie: Option<String>,
) {
    strip_hop_by_hop(headers, false);
    if let Some(cors) = &ctx.location.annotations.cors {
        cors.response_headers(origin, headers);
    }
    for (name, value) in ctx.location.add_headers.iter() {
        headers.insert(name.clone(), value.clone());
    }
    if let Some(cookie) = set_cookie
        && let Ok(v) = HeaderValue::from_str(&cookie)
    {
        headers.append(header::SET_COOKIE, v);
    }
    if ctx.conn.tls
        && let Some(hsts) = ctx.cfg.hsts_value()
    {
        headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
    }
}

pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Whether the Connection field lists `token` (read as bytes: a value with other bytes in it
/// still names its tokens).
pub(crate) fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// The hop-by-hop fields (RFC 9110 §7.6.1), and those HTTP/1.0 clients still send.
const HOP_BY_HOP: [HeaderName; HOP_COUNT] = [
    header::CONNECTION,
    header::UPGRADE,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];
const CONNECTION_BIT: u8 = 1;
const UPGRADE_BIT: u8 = 1 << 1;
const HOP_COUNT: usize = 7;
// One bit per name in a `u8`.
const _: () = assert!(HOP_COUNT <= 8);

/// Removes hop-by-hop headers (and those named in Connection); keeps Upgrade for WebSockets.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names present, then removals only of those: most messages carry
    // none, and a removal hashes its name even when it is absent.
    let mut present = 0u8;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present |= 1 << i;
        }
    }
    if present & CONNECTION_BIT != 0 {
        remove_named_in_connection(headers);
    }
    if keep_upgrade {
        present &= !UPGRADE_BIT;
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The fields Connection names, other than the hop-by-hop ones (the caller removes or keeps
/// those).
fn remove_named_in_connection(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !HOP_BY_HOP.contains(n))
        .collect();
    for name in named {
        headers.remove(name);
    }
}

fn set(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        headers.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_keeps_the_query_as_nginx_does() {
        let t = |target: &str, args: Option<&str>| with_args(target.to_string(), args);
        assert_eq!(t("/v1/items", Some("x=1")), "/v1/items?x=1");
        assert_eq!(t("/v1/items", None), "/v1/items");
        assert_eq!(t("/v1?a=b", Some("x=1")), "/v1?a=b&x=1");
        assert_eq!(t("/v1?", Some("x=1")), "/v1");
        assert_eq!(t("/v1?a=b?", Some("x=1")), "/v1?a=b");
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_removed() {
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = HeaderMap::new();
            for (n, v) in pairs {
                h.append(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    v.parse().unwrap(),
                );
            }
            h
        };
        let sent = [
            ("connection", "close, X-Private"),
            ("connection", "keep-alive"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "2"),
        ];
        let mut h = headers(&sent);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, headers(&[("x-kept", "2")]));
        let mut h = headers(&sent);
        strip_hop_by_hop(&mut h, true);
        let upgraded = [
            ("upgrade", "websocket"),
            ("x-kept", "2"),
            ("connection", "upgrade"),
        ];
        assert_eq!(h, headers(&upgraded));
        let mut h = headers(&[("x-kept", "2")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, headers(&[("x-kept", "2")]));
        // Tokens in any case; a value that is not text names nothing.
        let mut h = headers(&[
            ("connection", "Upgrade, X-Private"),
            ("upgrade", "websocket"),
            ("x-private", "1"),
        ]);
        h.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-kept\xff").unwrap(),
        );
        h.append("x-kept", "2".parse().unwrap());
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h, headers(&upgraded));
        assert_eq!(HOP_BY_HOP[0], header::CONNECTION);
        assert_eq!(HOP_BY_HOP[1], header::UPGRADE);
    }

    #[test]
    fn the_target_is_origin_form_for_http1_and_absolute_for_h2() {
        let req = http::Request::get("/api/v1?x=1").body(()).unwrap();
        let (mut parts, _) = req.into_parts();
        assert!(target(&mut parts, Some("/v1".into()), None).is_ok());
        assert_eq!(parts.uri.to_string(), "/v1?x=1");
        assert!(target(&mut parts, None, Some((true, "10.0.0.1:8443"))).is_ok());
        // An empty or relative rewrite result is refused, never sent without a target.
        for bad in ["", "v1", "$1"] {
            let (mut parts, _) = http::Request::get("/api").body(()).unwrap().into_parts();
            assert!(
                target(&mut parts, Some(bad.into()), None).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(parts.uri.to_string(), "https://10.0.0.1:8443/v1?x=1");
    }
}
