//! `enable-cors` and `cors-*`: preflights answered by the proxy, CORS headers added to
//! responses, with ingress-nginx's defaults.

use http::HeaderMap;
use http::header::{self, HeaderValue};

/// CORS settings of one Ingress.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cors {
    /// `*`, or origins such as `https://example.com` and `https://*.example.com`.
    pub allow_origin: Vec<String>,
    pub allow_methods: String,
    pub allow_headers: String,
    pub expose_headers: String,
    pub allow_credentials: bool,
    pub max_age: u32,
}

impl Default for Cors {
    fn default() -> Self {
        Self {
            allow_origin: vec!["*".into()],
            allow_methods: "GET, PUT, POST, DELETE, PATCH, OPTIONS".into(),
            allow_headers: "DNT,Keep-Alive,User-Agent,X-Requested-With,If-Modified-Since,Cache-Control,Content-Type,Range,Authorization".into(),
            expose_headers: String::new(),
            allow_credentials: true,
            max_age: 1_728_000,
        }
    }
}

impl Cors {
    /// The `Access-Control-Allow-Origin` value for a request `Origin`, if allowed.
    pub fn allowed_origin(&self, origin: Option<&str>) -> Option<String> {
        if self.allow_origin.iter().any(|o| o == "*") {
            return Some("*".into());
        }
        let origin = origin?;
        self.allow_origin
            .iter()
            .any(|allowed| origin_matches(allowed, origin))
            .then(|| origin.to_string())
    }

    /// Headers for a preflight (OPTIONS) answer.
    pub fn preflight_headers(&self, origin: Option<&str>, out: &mut HeaderMap) {
        self.response_headers(origin, out);
        set(out, "access-control-allow-methods", &self.allow_methods);
        set(out, "access-control-allow-headers", &self.allow_headers);
        set(out, "access-control-max-age", &self.max_age.to_string());
        out.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    }

    /// Headers added to every proxied response.
    pub fn response_headers(&self, origin: Option<&str>, out: &mut HeaderMap) {
        let Some(allowed) = self.allowed_origin(origin) else {
            return;
        };
        set(out, "access-control-allow-origin", &allowed);
        if self.allow_credentials {
            set(out, "access-control-allow-credentials", "true");
        }
        if !self.expose_headers.is_empty() {
            set(out, "access-control-expose-headers", &self.expose_headers);
        }
    }
}

/// `https://*.example.com` matches `https://a.example.com` (and deeper); others exactly.
fn origin_matches(allowed: &str, origin: &str) -> bool {
    match allowed.split_once("://*.") {
        Some((scheme, suffix)) => origin
            .strip_prefix(scheme)
            .and_then(|o| o.strip_prefix("://"))
            .is_some_and(|host| host.ends_with(&format!(".{suffix}"))),
        None => allowed.eq_ignore_ascii_case(origin),
    }
}

fn set(out: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        out.insert(name, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let any = Cors::default();
        assert_eq!(
            any.allowed_origin(Some("https://x.org")).as_deref(),
            Some("*")
        );
        let list = Cors {
            allow_origin: vec![
                "https://app.example.com".into(),
                "https://*.example.org".into(),
            ],
            ..Cors::default()
        };
        assert_eq!(
            list.allowed_origin(Some("https://app.example.com"))
                .as_deref(),
            Some("https://app.example.com")
        );
        assert!(
            list.allowed_origin(Some("https://a.b.example.org"))
                .is_some()
        );
        assert!(list.allowed_origin(Some("https://example.org")).is_none());
        assert!(list.allowed_origin(Some("http://a.example.org")).is_none());
        assert!(list.allowed_origin(None).is_none());
    }

    #[test]
    fn preflight() {
        let mut h = HeaderMap::new();
        Cors::default().preflight_headers(Some("https://x"), &mut h);
        assert_eq!(h["access-control-allow-origin"], "*");
        assert_eq!(h["access-control-max-age"], "1728000");
        assert_eq!(h["access-control-allow-credentials"], "true");
    }
}
