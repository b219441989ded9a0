//! The controller ConfigMap (`--configmap`), with ingress-nginx's key names and defaults.
//! Unknown keys are warned about once and ignored; a bad value rejects the whole new ConfigMap
//! and the last good configuration stays in force.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;

use crate::values::{
    ValueError, err, parse_bool, parse_cidrs, parse_nginx_time, parse_seconds, parse_size,
    parse_u32,
};

/// Global settings; `Default` is upstream's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub ssl_redirect: bool,
    pub force_ssl_redirect: bool,
    pub http_redirect_code: u16,
    pub hsts: bool,
    pub hsts_max_age: u64,
    pub hsts_include_subdomains: bool,
    pub hsts_preload: bool,
    pub ssl_protocols: Vec<String>,
    pub ssl_reject_handshake: bool,
    pub use_http2: bool,
    /// Streams one HTTP/2 client connection may have open at once (`http2-max-concurrent-streams`,
    /// nginx's `http2_max_concurrent_streams`); hyper's own default is 200.
    pub http2_max_concurrent_streams: u32,
    /// None: unlimited.
    pub proxy_body_size: Option<u64>,
    pub proxy_connect_timeout: Duration,
    pub proxy_read_timeout: Duration,
    pub proxy_send_timeout: Duration,
    pub client_header_timeout: Duration,
    pub keep_alive: Duration,
    /// Requests one client connection serves before it is closed (HTTP/1: `Connection:
    /// close` on the last; HTTP/2: GOAWAY), nginx's `keepalive_requests`.
    pub keep_alive_requests: u32,
    pub upstream_keepalive_connections: u32,
    pub upstream_keepalive_timeout: Duration,
    /// Requests one upstream connection serves before it is closed.
    pub upstream_keepalive_requests: u32,
    /// How long one upstream connection is kept at most.
    pub upstream_keepalive_time: Duration,
    pub use_forwarded_headers: bool,
    pub compute_full_forwarded_for: bool,
    pub whitelist_source_range: Vec<IpNet>,
    pub denylist_source_range: Vec<IpNet>,
    pub block_cidrs: Vec<IpNet>,
    pub limit_req_status_code: u16,
    pub limit_conn_status_code: u16,
    /// Total bytes of request line + headers (`large-client-header-buffers` "4 8k" → 32 KiB).
    pub max_header_bytes: usize,
    /// `worker-processes`: proxy worker threads; `None` is `auto` (one per CPU this process
    /// may run on). Read when the controller starts, as nginx reads it when it starts.
    pub worker_processes: Option<usize>,
    /// The `Strict-Transport-Security` value (from the `hsts*` keys), built once per
    /// configuration rather than per response.
    hsts_value: Option<http::HeaderValue>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ssl_redirect: true,
            force_ssl_redirect: false,
            http_redirect_code: 308,
            hsts: true,
            hsts_max_age: 31_536_000,
            hsts_include_subdomains: true,
            hsts_preload: false,
            ssl_protocols: vec!["TLSv1.2".into(), "TLSv1.3".into()],
            ssl_reject_handshake: false,
            use_http2: true,
            http2_max_concurrent_streams: 128,
            proxy_body_size: Some(1 << 20),
            proxy_connect_timeout: Duration::from_secs(5),
            proxy_read_timeout: Duration::from_secs(60),
            proxy_send_timeout: Duration::from_secs(60),
            client_header_timeout: Duration::from_secs(60),
            keep_alive: Duration::from_secs(75),
            keep_alive_requests: 1000,
            upstream_keepalive_connections: 320,
            upstream_keepalive_timeout: Duration::from_secs(60),
            upstream_keepalive_requests: 10_000,
            upstream_keepalive_time: Duration::from_secs(3600),
            use_forwarded_headers: false,
            compute_full_forwarded_for: false,
            whitelist_source_range: Vec::new(),
            denylist_source_range: Vec::new(),
            block_cidrs: Vec::new(),
            limit_req_status_code: 503,
            limit_conn_status_code: 503,
            max_header_bytes: 4 * 8 * 1024,
            worker_processes: None,
            hsts_value: None,
        }
        .with_hsts_value()
    }
}

/// Result of reading a ConfigMap.
#[derive(Debug)]
pub struct Parsed {
    pub config: Config,
    /// Keys we do not know (warned about, ignored).
    pub unknown: Vec<String>,
}

/// Keys upstream has that do not change our behaviour (nginx internals); accepted silently.
const NGINX_ONLY: &[&str] = &[
    "worker-shutdown-timeout",
    "max-worker-connections",
    "ssl-session-cache",
    "ssl-ciphers",
    "server-tokens",
    "log-format-upstream",
    "log-format-escape-json",
    "enable-access-log-for-default-backend",
    "allow-snippet-annotations",
    "annotations-risk-level",
    "strict-validate-path-type",
    "proxy-buffering",
    "proxy-request-buffering",
    "client-body-buffer-size",
    // Deprecated upstream and obsolete since nginx 1.19.7, which ignores them:
    // `large-client-header-buffers` and `keep-alive-requests` apply to HTTP/2 instead.
    "http2-max-field-size",
    "http2-max-header-size",
    "http2-max-requests",
];

impl Config {
    /// Parses ConfigMap data over upstream defaults. Any bad value fails the whole map.
    pub fn parse(data: Option<&BTreeMap<String, String>>) -> Result<Parsed, Vec<ValueError>> {
        let mut c = Config::default();
        let mut unknown = Vec::new();
        let mut errors = Vec::new();
        for (k, v) in data.into_iter().flatten() {
            match c.set(k, v) {
                Ok(true) => {}
                Ok(false) => unknown.push(k.clone()),
                Err(e) => errors.push(e),
            }
        }
        if errors.is_empty() {
            Ok(Parsed {
                config: c.with_hsts_value(),
                unknown,
            })
        } else {
            Err(errors)
        }
    }

    /// Ok(false) for an unknown key.
    fn set(&mut self, k: &str, v: &str) -> Result<bool, ValueError> {
        match k {
            "ssl-redirect" => self.ssl_redirect = parse_bool(k, v)?,
            "force-ssl-redirect" => self.force_ssl_redirect = parse_bool(k, v)?,
            "http-redirect-code" => {
                self.http_redirect_code = match v.trim().parse() {
                    Ok(c @ (301 | 302 | 307 | 308)) => c,
                    _ => return Err(err(k, v, "expected 301, 302, 307 or 308")),
                }
            }
            "hsts" => self.hsts = parse_bool(k, v)?,
            "hsts-max-age" => {
                self.hsts_max_age = v
                    .trim()
                    .parse()
                    .map_err(|_| err(k, v, "expected seconds"))?
            }
            "hsts-include-subdomains" => self.hsts_include_subdomains = parse_bool(k, v)?,
            "hsts-preload" => self.hsts_preload = parse_bool(k, v)?,
            "ssl-protocols" => {
                let protocols: Vec<String> = v.split_whitespace().map(str::to_string).collect();
                if protocols.is_empty()
                    || protocols
                        .iter()
                        .any(|p| !matches!(p.as_str(), "TLSv1" | "TLSv1.1" | "TLSv1.2" | "TLSv1.3"))
                {
                    return Err(err(k, v, "expected TLS versions like \"TLSv1.2 TLSv1.3\""));
                }
                if !protocols.iter().any(|p| p == "TLSv1.2" || p == "TLSv1.3") {
                    return Err(err(
                        k,
                        v,
                        "TLS 1.0 and 1.1 are not supported; list TLSv1.2 or TLSv1.3",
                    ));
                }
                self.ssl_protocols = protocols;
            }
            "ssl-reject-handshake" => self.ssl_reject_handshake = parse_bool(k, v)?,
            "use-http2" => self.use_http2 = parse_bool(k, v)?,
            // 0 refuses every stream, as nginx's 0 does.
            "http2-max-concurrent-streams" => self.http2_max_concurrent_streams = parse_u32(k, v)?,
            "proxy-body-size" => self.proxy_body_size = parse_size(k, v)?,
            "proxy-connect-timeout" => self.proxy_connect_timeout = parse_seconds(k, v)?,
            "proxy-read-timeout" => self.proxy_read_timeout = parse_seconds(k, v)?,
            "proxy-send-timeout" => self.proxy_send_timeout = parse_seconds(k, v)?,
            "client-header-timeout" => self.client_header_timeout = parse_seconds(k, v)?,
            "keep-alive" => self.keep_alive = parse_seconds(k, v)?,
            "keep-alive-requests" => self.keep_alive_requests = parse_u32(k, v)?,
            "upstream-keepalive-connections" => {
                self.upstream_keepalive_connections = parse_u32(k, v)?
            }
            "upstream-keepalive-timeout" => self.upstream_keepalive_timeout = parse_seconds(k, v)?,
            "upstream-keepalive-requests" => self.upstream_keepalive_requests = parse_u32(k, v)?,
            "upstream-keepalive-time" => self.upstream_keepalive_time = parse_nginx_time(k, v)?,
            "use-forwarded-headers" => self.use_forwarded_headers = parse_bool(k, v)?,
            "compute-full-forwarded-for" => self.compute_full_forwarded_for = parse_bool(k, v)?,
            "whitelist-source-range" => self.whitelist_source_range = parse_cidrs(k, v)?,
            "denylist-source-range" => self.denylist_source_range = parse_cidrs(k, v)?,
            "block-cidrs" => self.block_cidrs = parse_cidrs(k, v)?,
            "limit-req-status-code" => self.limit_req_status_code = status(k, v)?,
            "limit-conn-status-code" => self.limit_conn_status_code = status(k, v)?,
            "large-client-header-buffers" => {
                let mut parts = v.split_whitespace();
                let n = parts.next().map(|n| parse_u32(k, n)).transpose()?;
                let size = parts
                    .next()
                    .map(|s| parse_size(k, s))
                    .transpose()?
                    .flatten();
                match (n, size) {
                    (Some(n), Some(size)) if n > 0 => {
                        self.max_header_bytes = (n as usize).saturating_mul(size as usize)
                    }
                    _ => return Err(err(k, v, "expected \"<count> <size>\", e.g. \"4 8k\"")),
                }
            }
            "worker-processes" => {
                self.worker_processes = match v.trim() {
                    "auto" => None,
                    n => match n.parse::<usize>() {
                        Ok(n) if (1..=1024).contains(&n) => Some(n),
                        _ => return Err(err(k, v, "expected \"auto\" or a count 1-1024")),
                    },
                }
            }
            k if NGINX_ONLY.contains(&k) => {}
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn with_hsts_value(mut self) -> Self {
        self.hsts_value = self
            .hsts_header()
            .and_then(|v| http::HeaderValue::from_str(&v).ok());
        self
    }

    /// The `Strict-Transport-Security` header value, if HSTS is on.
    pub fn hsts_value(&self) -> Option<&http::HeaderValue> {
        self.hsts_value.as_ref()
    }

    /// The proxy worker count: `worker-processes`, else one per CPU this process may use.
    pub fn workers(&self) -> usize {
        self.worker_processes.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        })
    }

    /// The `Strict-Transport-Security` value, if HSTS is on.
    pub fn hsts_header(&self) -> Option<String> {
        if !self.hsts {
            return None;
        }
        let mut v = format!("max-age={}", self.hsts_max_age);
        if self.hsts_include_subdomains {
            v.push_str("; includeSubDomains");
        }
        if self.hsts_preload {
            v.push_str("; preload");
        }
        Some(v)
    }
}

fn status(k: &str, v: &str) -> Result<u16, ValueError> {
    match v.trim().parse::<u16>() {
        Ok(c) if (400..=599).contains(&c) => Ok(c),
        _ => Err(err(k, v, "expected an HTTP error status 400-599")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Parsed, Vec<ValueError>> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::parse(Some(&map))
    }

    #[test]
    fn upstream_defaults() {
        let c = Config::default();
        assert!(c.ssl_redirect && !c.force_ssl_redirect && c.use_http2 && !c.ssl_reject_handshake);
        assert_eq!(c.proxy_body_size, Some(1 << 20));
        assert_eq!(c.proxy_connect_timeout, Duration::from_secs(5));
        assert_eq!(c.proxy_read_timeout, Duration::from_secs(60));
        assert_eq!(c.limit_req_status_code, 503);
        assert_eq!(
            c.hsts_header().as_deref(),
            Some("max-age=31536000; includeSubDomains")
        );
    }

    #[test]
    fn worker_processes_and_the_hsts_value() {
        let p = parse(&[
            ("worker-processes", "3"),
            ("hsts-preload", "true"),
            ("upstream-keepalive-requests", "100"),
            ("upstream-keepalive-time", "30m"),
            ("keep-alive-requests", "50"),
        ])
        .expect("valid");
        assert_eq!(p.config.upstream_keepalive_requests, 100);
        assert_eq!(p.config.keep_alive_requests, 50);
        assert_eq!(Config::default().keep_alive_requests, 1000);
        assert_eq!(p.config.upstream_keepalive_time, Duration::from_secs(1800));
        assert_eq!(p.config.worker_processes, Some(3));
        assert_eq!(p.config.workers(), 3);
        assert_eq!(
            p.config.hsts_value().map(|v| v.to_str().unwrap()),
            Some("max-age=31536000; includeSubDomains; preload")
        );
        assert!(Config::default().workers() >= 1);
        for bad in ["0", "many", "-1"] {
            assert!(parse(&[("worker-processes", bad)]).is_err(), "{bad}");
        }
        let off = parse(&[("hsts", "false")]).expect("valid");
        assert!(off.config.hsts_value().is_none());
    }

    #[test]
    fn overrides_unknown_and_errors() {
        let p = parse(&[
            ("ssl-redirect", "false"),
            ("proxy-body-size", "10m"),
            ("large-client-header-buffers", "4 16k"),
            ("ssl-reject-handshake", "true"),
            ("made-up-key", "1"),
            ("worker-processes", "auto"),
        ])
        .expect("valid");
        assert!(!p.config.ssl_redirect && p.config.ssl_reject_handshake);
        assert_eq!(p.config.proxy_body_size, Some(10 << 20));
        assert_eq!(p.config.max_header_bytes, 64 * 1024);
        assert_eq!(p.unknown, vec!["made-up-key".to_string()]);
        let errs = parse(&[("ssl-protocols", "TLSv1"), ("limit-req-status-code", "200")])
            .expect_err("invalid");
        assert_eq!(errs.len(), 2);
    }

    #[test]
    fn http2_keys() {
        assert_eq!(Config::default().http2_max_concurrent_streams, 128);
        let p = parse(&[
            ("http2-max-concurrent-streams", "16"),
            // Deprecated upstream, ignored by nginx since 1.19.7: accepted, not unknown.
            ("http2-max-field-size", "4k"),
            ("http2-max-header-size", "16k"),
            ("http2-max-requests", "10"),
        ])
        .expect("valid");
        assert_eq!(p.config.http2_max_concurrent_streams, 16);
        assert!(p.unknown.is_empty(), "{:?}", p.unknown);
        for bad in ["-1", "many"] {
            assert!(
                parse(&[("http2-max-concurrent-streams", bad)]).is_err(),
                "{bad}"
            );
        }
    }
}
