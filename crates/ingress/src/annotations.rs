//! `nginx.ingress.kubernetes.io/*` annotations of one Ingress, parsed and validated up front.
//! A bad value is an error for the whole Ingress (the builder then keeps its last good version
//! and raises an Event); snippet annotations are refused, never interpreted.

use std::collections::BTreeMap;
use std::time::Duration;

use ipnet::IpNet;

use crate::values::{
    ValueError, err, parse_bool, parse_cidrs, parse_seconds, parse_size, parse_u32,
};

pub const PREFIX: &str = "nginx.ingress.kubernetes.io/";

/// Upstream protocol (`backend-protocol`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendProtocol {
    #[default]
    Http,
    Https,
    Grpc,
    Grpcs,
}

/// A redirect answered by the proxy itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    pub url: String,
    pub code: u16,
}

/// Parsed annotations; `None` means "not set, use the ConfigMap/global value".
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Annotations {
    pub ssl_redirect: Option<bool>,
    pub force_ssl_redirect: Option<bool>,
    pub use_regex: bool,
    pub rewrite_target: Option<String>,
    pub app_root: Option<String>,
    /// `Some(None)`: explicitly unlimited.
    pub proxy_body_size: Option<Option<u64>>,
    pub proxy_connect_timeout: Option<Duration>,
    pub proxy_read_timeout: Option<Duration>,
    pub proxy_send_timeout: Option<Duration>,
    pub whitelist_source_range: Option<Vec<IpNet>>,
    pub denylist_source_range: Option<Vec<IpNet>>,
    pub backend_protocol: BackendProtocol,
    pub permanent_redirect: Option<Redirect>,
    pub temporal_redirect: Option<Redirect>,
    pub upstream_vhost: Option<String>,
    pub x_forwarded_prefix: Option<String>,
    pub service_upstream: bool,
    pub limit_rps: Option<u32>,
    /// Burst = rate × this; upstream's default is 5.
    pub limit_burst_multiplier: Option<u32>,
    pub limit_connections: Option<u32>,
    /// Clients exempt from limit-rps / limit-connections.
    pub limit_whitelist: Vec<IpNet>,
    /// Some when `enable-cors` is true.
    pub cors: Option<crate::cors::Cors>,
    /// `auth-type: basic` with its Secret (`name` or `namespace/name`) and realm.
    pub basic_auth: Option<BasicAuth>,
    /// `affinity: cookie` and its `session-cookie-*` settings.
    pub affinity: Option<CookieAffinity>,
    /// `custom-headers`: a ConfigMap (`name` or `namespace/name`) of response headers.
    pub custom_headers: Option<String>,
}

/// Sticky sessions by cookie (ingress-nginx's `affinity: cookie`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieAffinity {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub max_age: Option<u64>,
    pub expires: Option<u64>,
    pub samesite: Option<String>,
    pub secure: bool,
    /// `affinity-mode: persistent` keeps clients on their upstream even when it is busy;
    /// both modes behave the same here (no load-based rebalancing yet).
    pub persistent: bool,
}

/// `auth-type: basic` settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BasicAuth {
    pub secret: String,
    pub realm: String,
    /// `auth-file` (key `auth` holds an htpasswd file) or `auth-map` (user → hash keys).
    pub map: bool,
}

impl Annotations {
    /// Parses every `nginx.ingress.kubernetes.io/` annotation; returns all problems at once.
    pub fn parse(all: Option<&BTreeMap<String, String>>) -> Result<Self, Vec<ValueError>> {
        let mut a = Annotations::default();
        let mut errors = Vec::new();
        let Some(all) = all else {
            return Ok(a);
        };
        let get = |k: &str| lookup(all, k);
        for (full_key, value) in all {
            let Some(key) = full_key.strip_prefix(PREFIX) else {
                continue;
            };
            if let Err(e) = a.set(key, value) {
                errors.push(e);
            }
        }
        // Grouped annotations: read together once the switches are known.
        if a.cors.is_some()
            && let Err(e) = a.set_cors(all)
        {
            errors.push(e);
        }
        match get("affinity") {
            None => {}
            Some("cookie") => {
                let num = |k: &str| -> Result<Option<u64>, ValueError> {
                    get(k)
                        .map(|v| {
                            v.trim()
                                .parse::<u64>()
                                .map_err(|_| err(k, v, "expected seconds"))
                        })
                        .transpose()
                };
                let samesite = match get("session-cookie-samesite") {
                    None => None,
                    Some(v @ ("Strict" | "Lax" | "None")) => Some(v.to_string()),
                    Some(v) => {
                        errors.push(err(
                            "session-cookie-samesite",
                            v,
                            "expected Strict, Lax or None",
                        ));
                        None
                    }
                };
                let secure = match get("session-cookie-secure")
                    .map(|v| parse_bool("session-cookie-secure", v))
                {
                    Some(Err(e)) => {
                        errors.push(e);
                        false
                    }
                    Some(Ok(b)) => b,
                    None => false,
                };
                let cookie_name = get("session-cookie-name").unwrap_or("INGRESSCOOKIE");
                if cookie_name.is_empty()
                    || !cookie_name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    errors.push(err(
                        "session-cookie-name",
                        cookie_name,
                        "expected a cookie name",
                    ));
                }
                match (num("session-cookie-max-age"), num("session-cookie-expires")) {
                    (Ok(max_age), Ok(expires)) => {
                        a.affinity = Some(CookieAffinity {
                            name: cookie_name.to_string(),
                            path: get("session-cookie-path").unwrap_or("/").to_string(),
                            domain: get("session-cookie-domain").map(str::to_string),
                            max_age,
                            expires,
                            samesite,
                            secure,
                            persistent: get("affinity-mode") == Some("persistent"),
                        })
                    }
                    (Err(e), _) | (_, Err(e)) => errors.push(e),
                }
            }
            Some(other) => errors.push(err("affinity", other, "only cookie is supported")),
        }
        match get("auth-type") {
            None => {}
            Some("basic") => match get("auth-secret") {
                Some(secret) if !secret.trim().is_empty() => {
                    let map = match get("auth-secret-type").unwrap_or("auth-file") {
                        "auth-file" => false,
                        "auth-map" => true,
                        other => {
                            errors.push(err(
                                "auth-secret-type",
                                other,
                                "expected auth-file or auth-map",
                            ));
                            false
                        }
                    };
                    a.basic_auth = Some(BasicAuth {
                        secret: secret.trim().to_string(),
                        realm: get("auth-realm")
                            .unwrap_or("Authentication Required")
                            .to_string(),
                        map,
                    });
                }
                _ => errors.push(err("auth-secret", "", "auth-type basic needs auth-secret")),
            },
            Some(other) => errors.push(err(
                "auth-type",
                other,
                "only basic is supported (digest is not)",
            )),
        }
        if errors.is_empty() {
            Ok(a)
        } else {
            Err(errors)
        }
    }

    fn set(&mut self, key: &str, v: &str) -> Result<(), ValueError> {
        match key {
            "ssl-redirect" => self.ssl_redirect = Some(parse_bool(key, v)?),
            "force-ssl-redirect" => self.force_ssl_redirect = Some(parse_bool(key, v)?),
            "use-regex" => self.use_regex = parse_bool(key, v)?,
            "rewrite-target" => self.rewrite_target = Some(path_like(key, v)?),
            "app-root" => self.app_root = Some(path_like(key, v)?),
            "proxy-body-size" => self.proxy_body_size = Some(parse_size(key, v)?),
            "proxy-connect-timeout" => self.proxy_connect_timeout = Some(parse_seconds(key, v)?),
            "proxy-read-timeout" => self.proxy_read_timeout = Some(parse_seconds(key, v)?),
            "proxy-send-timeout" => self.proxy_send_timeout = Some(parse_seconds(key, v)?),
            "whitelist-source-range" | "allowlist-source-range" => {
                self.whitelist_source_range = Some(parse_cidrs(key, v)?)
            }
            "denylist-source-range" => self.denylist_source_range = Some(parse_cidrs(key, v)?),
            "backend-protocol" => {
                self.backend_protocol = match v.trim().to_ascii_uppercase().as_str() {
                    "HTTP" | "AUTO_HTTP" => BackendProtocol::Http,
                    "HTTPS" => BackendProtocol::Https,
                    "GRPC" => BackendProtocol::Grpc,
                    "GRPCS" => BackendProtocol::Grpcs,
                    _ => return Err(err(key, v, "expected HTTP, HTTPS, GRPC or GRPCS")),
                }
            }
            "permanent-redirect" => {
                let code = self.permanent_redirect.as_ref().map_or(301, |r| r.code);
                self.permanent_redirect = Some(Redirect {
                    url: url_like(key, v)?,
                    code,
                })
            }
            "permanent-redirect-code" => {
                let code = redirect_code(key, v)?;
                let url = self
                    .permanent_redirect
                    .take()
                    .map(|r| r.url)
                    .unwrap_or_default();
                self.permanent_redirect = Some(Redirect { url, code });
            }
            "temporal-redirect" => {
                let code = self.temporal_redirect.as_ref().map_or(302, |r| r.code);
                self.temporal_redirect = Some(Redirect {
                    url: url_like(key, v)?,
                    code,
                })
            }
            "temporal-redirect-code" => {
                let code = redirect_code(key, v)?;
                let url = self
                    .temporal_redirect
                    .take()
                    .map(|r| r.url)
                    .unwrap_or_default();
                self.temporal_redirect = Some(Redirect { url, code });
            }
            "upstream-vhost" => self.upstream_vhost = Some(header_value(key, v)?),
            "x-forwarded-prefix" => self.x_forwarded_prefix = Some(header_value(key, v)?),
            "custom-headers" => self.custom_headers = Some(path_like(key, v)?),
            "service-upstream" => self.service_upstream = parse_bool(key, v)?,
            "limit-rps" => self.limit_rps = Some(parse_u32(key, v)?),
            "limit-connections" => self.limit_connections = Some(parse_u32(key, v)?),
            "limit-burst-multiplier" => self.limit_burst_multiplier = Some(parse_u32(key, v)?),
            "limit-whitelist" | "limit-allowlist" => self.limit_whitelist = parse_cidrs(key, v)?,
            "enable-cors" => {
                self.cors = parse_bool(key, v)?.then(crate::cors::Cors::default);
            }
            // Read in `set_cors` / with auth-type once the switch is known.
            "cors-allow-origin"
            | "cors-allow-methods"
            | "cors-allow-headers"
            | "cors-expose-headers"
            | "cors-allow-credentials"
            | "cors-max-age" => {}
            "auth-type" | "auth-secret" | "auth-realm" | "auth-secret-type" => {}
            "affinity" | "affinity-mode" => {}
            k if k.starts_with("session-cookie-") => {}
            k if k.ends_with("-snippet") || k == "configuration-snippet" => {
                return Err(err(
                    key,
                    v,
                    "snippet annotations carry raw nginx configuration and are refused",
                ));
            }
            // Annotations we do not implement yet are ignored, as upstream ignores unknown ones.
            _ => {}
        }
        Ok(())
    }

    fn set_cors(&mut self, all: &BTreeMap<String, String>) -> Result<(), ValueError> {
        let get = |k: &str| lookup(all, k);
        let Some(cors) = self.cors.as_mut() else {
            return Ok(());
        };
        if let Some(v) = get("cors-allow-origin") {
            cors.allow_origin = v
                .split(',')
                .map(|o| o.trim().to_string())
                .filter(|o| !o.is_empty())
                .collect();
            if cors.allow_origin.is_empty() {
                return Err(err(
                    "cors-allow-origin",
                    v,
                    "expected * or a list of origins",
                ));
            }
        }
        if let Some(v) = get("cors-allow-methods") {
            cors.allow_methods = header_value("cors-allow-methods", v)?;
        }
        if let Some(v) = get("cors-allow-headers") {
            cors.allow_headers = header_value("cors-allow-headers", v)?;
        }
        if let Some(v) = get("cors-expose-headers") {
            cors.expose_headers = header_value("cors-expose-headers", v)?;
        }
        if let Some(v) = get("cors-allow-credentials") {
            cors.allow_credentials = parse_bool("cors-allow-credentials", v)?;
        }
        if let Some(v) = get("cors-max-age") {
            cors.max_age = parse_u32("cors-max-age", v)?;
        }
        Ok(())
    }

    /// Whether the Ingress's Locations depend on objects other than Services and
    /// EndpointSlices (`auth-secret`, `custom-headers`).
    pub fn reads_other_objects(&self) -> bool {
        self.basic_auth.is_some() || self.custom_headers.is_some()
    }

    /// Whether this Ingress switches its hosts to regex matching.
    pub fn forces_regex(&self) -> bool {
        self.use_regex || self.rewrite_target.is_some()
    }
}

/// An annotation value by its short name.
fn lookup<'a>(all: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    all.get(&format!("{PREFIX}{key}")).map(String::as_str)
}

fn path_like(key: &str, v: &str) -> Result<String, ValueError> {
    let v = v.trim();
    if v.is_empty() || v.chars().any(|c| c.is_control() || c == ' ') {
        return Err(err(
            key,
            v,
            "expected a path without spaces or control characters",
        ));
    }
    Ok(v.to_string())
}

fn url_like(key: &str, v: &str) -> Result<String, ValueError> {
    let v = path_like(key, v)?;
    if !(v.starts_with("http://") || v.starts_with("https://") || v.starts_with('/')) {
        return Err(err(key, &v, "expected an http(s) URL or an absolute path"));
    }
    Ok(v)
}

fn header_value(key: &str, v: &str) -> Result<String, ValueError> {
    let v = v.trim();
    http::HeaderValue::from_str(v).map_err(|_| err(key, v, "not a valid header value"))?;
    Ok(v.to_string())
}

fn redirect_code(key: &str, v: &str) -> Result<u16, ValueError> {
    match v.trim().parse::<u16>() {
        Ok(c) if (300..=308).contains(&c) => Ok(c),
        _ => Err(err(key, v, "expected a redirect status 300-308")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Annotations, Vec<ValueError>> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (format!("{PREFIX}{k}"), v.to_string()))
            .collect();
        Annotations::parse(Some(&map))
    }

    #[test]
    fn parses_known_annotations() {
        let a = parse(&[
            ("ssl-redirect", "false"),
            ("proxy-body-size", "8m"),
            ("proxy-read-timeout", "120"),
            ("whitelist-source-range", "10.0.0.0/8,192.168.0.1"),
            ("backend-protocol", "GRPC"),
            ("permanent-redirect", "https://example.org/"),
            ("permanent-redirect-code", "308"),
            ("rewrite-target", "/$1"),
        ])
        .expect("valid");
        assert_eq!(a.ssl_redirect, Some(false));
        assert_eq!(a.proxy_body_size, Some(Some(8 << 20)));
        assert_eq!(a.proxy_read_timeout, Some(Duration::from_secs(120)));
        assert_eq!(a.whitelist_source_range.as_ref().map(Vec::len), Some(2));
        assert_eq!(a.backend_protocol, BackendProtocol::Grpc);
        assert_eq!(
            a.permanent_redirect,
            Some(Redirect {
                url: "https://example.org/".into(),
                code: 308
            })
        );
        assert!(a.forces_regex());
    }

    #[test]
    fn cors_and_basic_auth() {
        let a = parse(&[
            ("enable-cors", "true"),
            (
                "cors-allow-origin",
                "https://a.example, https://*.b.example",
            ),
            ("cors-max-age", "60"),
            ("auth-type", "basic"),
            ("auth-secret", "users"),
        ])
        .expect("valid");
        let cors = a.cors.expect("cors on");
        assert_eq!(cors.allow_origin.len(), 2);
        assert_eq!(cors.max_age, 60);
        assert_eq!(
            a.basic_auth,
            Some(BasicAuth {
                secret: "users".into(),
                realm: "Authentication Required".into(),
                map: false
            })
        );
        assert!(parse(&[("auth-type", "basic")]).is_err());
        assert!(parse(&[("auth-type", "digest"), ("auth-secret", "x")]).is_err());
        // cors-* without enable-cors changes nothing.
        assert_eq!(
            parse(&[("cors-max-age", "junk")]).expect("ignored").cors,
            None
        );
    }

    #[test]
    fn reports_every_bad_value_and_refuses_snippets() {
        let errs = parse(&[
            ("ssl-redirect", "sometimes"),
            ("proxy-body-size", "huge"),
            ("configuration-snippet", "more_set_headers \"x: y\";"),
            ("server-snippet", "return 200;"),
            ("whitelist-source-range", "10.0.0.0/99"),
        ])
        .expect_err("invalid");
        assert_eq!(errs.len(), 5, "{errs:?}");
        assert!(errs.iter().any(|e| e.message.contains("snippet")));
    }

    #[test]
    fn other_prefixes_are_ignored() {
        let mut map = BTreeMap::new();
        map.insert(
            "cert-manager.io/cluster-issuer".to_string(),
            "x".to_string(),
        );
        assert_eq!(Annotations::parse(Some(&map)), Ok(Annotations::default()));
    }
}
