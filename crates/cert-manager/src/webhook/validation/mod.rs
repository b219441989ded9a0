//! Field rules of the six kinds, as upstream's webhook applies them
//! (`internal/apis/certmanager/validation`, `internal/apis/acme/validation`), over the types in
//! [`crate::api`]: one file per kind, each kind's rules re-exported here, and
//! [`super::admission`] picking them by the request's group and kind. Pure functions: no API
//! calls. Errors print like apimachinery's `field.Error`
//! (`spec.duration: Invalid value: "30m0s": certificate duration must be ...`) because users and
//! tools grep for those strings. This file holds what the kinds share: the error type and its
//! printing, and the rules of fields several kinds have (issuerRef, usages, durations).

mod certificate;
mod certificate_request;
mod challenge;
mod issuer;
mod order;

use std::fmt;
use std::time::Duration;

use crate::api::IssuerRef;
use crate::duration::{format_go_duration, parse_go_duration};

pub use certificate::{
    DEFAULT_DURATION, MIN_DURATION, MIN_RENEW_BEFORE, validate_certificate_spec, validate_duration,
};
pub use certificate_request::{
    Requester, validate_approval_conditions, validate_certificate_request_create,
    validate_certificate_request_spec, validate_certificate_request_update,
};
pub use challenge::validate_challenge_update;
pub use issuer::{validate_acme_issuer, validate_issuer_config, validate_solver};
pub use order::validate_order_update;

/// The 23 key usages upstream accepts (`KeyUsage` enum in `types.go`).
pub const KEY_USAGES: [&str; 23] = [
    "signing",
    "digital signature",
    "content commitment",
    "key encipherment",
    "key agreement",
    "data encipherment",
    "cert sign",
    "crl sign",
    "encipher only",
    "decipher only",
    "any",
    "server auth",
    "client auth",
    "code signing",
    "email protection",
    "s/mime",
    "ipsec end system",
    "ipsec tunnel",
    "ipsec user",
    "timestamping",
    "ocsp signing",
    "microsoft sgc",
    "netscape sgc",
];

/// apimachinery's `field.ErrorType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Required,
    Invalid,
    Forbidden,
    TooLong,
    NotSupported,
    Duplicate,
}

impl ErrorType {
    fn as_str(self) -> &'static str {
        match self {
            ErrorType::Required => "Required value",
            ErrorType::Invalid => "Invalid value",
            ErrorType::Forbidden => "Forbidden",
            ErrorType::TooLong => "Too long",
            ErrorType::NotSupported => "Unsupported value",
            ErrorType::Duplicate => "Duplicate value",
        }
    }
}

/// The offending value, printed the way Go's `%q` / `%v` / `Duration.String()` would.
#[derive(Debug, Clone, PartialEq)]
pub enum BadValue {
    Str(String),
    Int(i64),
    Bool(bool),
    Duration(Duration),
}

impl fmt::Display for BadValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // Debug of a Rust string quotes and escapes much like Go's %q.
            BadValue::Str(s) => write!(f, "{s:?}"),
            BadValue::Int(i) => write!(f, "{i}"),
            BadValue::Bool(b) => write!(f, "{b}"),
            BadValue::Duration(d) => f.write_str(&format_go_duration(*d)),
        }
    }
}

/// One field error (apimachinery's `field.Error`).
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    pub field: String,
    pub type_: ErrorType,
    pub value: Option<BadValue>,
    pub detail: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.type_.as_str())?;
        // Go prints the value for every type except Required, Forbidden and TooLong.
        if let Some(v) = &self.value
            && !matches!(
                self.type_,
                ErrorType::Required | ErrorType::Forbidden | ErrorType::TooLong
            )
        {
            write!(f, ": {v}")?;
        }
        if !self.detail.is_empty() {
            write!(f, ": {}", self.detail)?;
        }
        Ok(())
    }
}

/// What a validation returns; empty means valid.
pub type ErrorList = Vec<FieldError>;

/// The message of an error list as `ErrorList.ToAggregate().Error()` prints it.
pub fn aggregate(errors: &[FieldError]) -> String {
    match errors {
        [] => String::new(),
        [one] => one.to_string(),
        many => format!(
            "[{}]",
            many.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn required(field: impl Into<String>, detail: &str) -> FieldError {
    FieldError {
        field: field.into(),
        type_: ErrorType::Required,
        value: None,
        detail: detail.into(),
    }
}

fn invalid(field: impl Into<String>, value: BadValue, detail: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        type_: ErrorType::Invalid,
        value: Some(value),
        detail: detail.into(),
    }
}

fn forbidden(field: impl Into<String>, detail: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        type_: ErrorType::Forbidden,
        value: None,
        detail: detail.into(),
    }
}

fn not_supported(field: impl Into<String>, value: BadValue, supported: &[&str]) -> FieldError {
    let list = supported
        .iter()
        .map(|s| format!("{s:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    FieldError {
        field: field.into(),
        type_: ErrorType::NotSupported,
        value: Some(value),
        detail: format!("supported values: {list}"),
    }
}

fn s(v: &str) -> BadValue {
    BadValue::Str(v.to_string())
}

const DNS1123_SUBDOMAIN_MSG: &str = "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')";

/// apimachinery's `IsDNS1123Subdomain`: error messages, empty when valid.
pub fn dns1123_subdomain_errors(value: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if value.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    let label_ok = |l: &str| {
        let b = l.as_bytes();
        let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
        !b.is_empty()
            && b.first().is_some_and(alnum)
            && b.last().is_some_and(alnum)
            && b.iter().all(|c| alnum(c) || *c == b'-')
    };
    if !value.split('.').all(label_ok) {
        errs.push(DNS1123_SUBDOMAIN_MSG.to_string());
    }
    errs
}

fn parse_duration_field(path: &str, value: &str, errs: &mut ErrorList) -> Option<Duration> {
    match parse_go_duration(value) {
        Ok(d) => Some(d),
        Err(e) => {
            errs.push(invalid(path, s(value), e.to_string()));
            None
        }
    }
}

/// Every usage must be one of [`KEY_USAGES`] (Certificate and CertificateRequest alike).
fn validate_usages(usages: &[String]) -> ErrorList {
    usages
        .iter()
        .enumerate()
        .filter(|(_, usage)| !KEY_USAGES.contains(&usage.as_str()))
        .map(|(i, usage)| invalid(format!("spec.usages[{i}]"), s(usage), "unknown keyusage"))
        .collect()
}

/// `validateIssuerRef`: name required; within cert-manager.io only Issuer or ClusterIssuer.
pub fn validate_issuer_ref(issuer_ref: &IssuerRef, parent: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let path = format!("{parent}.issuerRef");
    if issuer_ref.name.is_empty() {
        el.push(required(format!("{path}.name"), "must be specified"));
    }
    let group = issuer_ref.group.as_deref().unwrap_or("");
    let kind = issuer_ref.kind.as_deref().unwrap_or("");
    if (group.is_empty() || group == crate::api::GROUP)
        && !["", "Issuer", "ClusterIssuer"].contains(&kind)
    {
        let mut msg = "must be one of Issuer or ClusterIssuer".to_string();
        if group.is_empty() {
            msg.push_str(&format!(" (did you forget to set {path}.kind.group?)"));
        }
        el.push(invalid(format!("{path}.kind"), s(kind), msg));
    }
    el
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The errors as the apiserver would show them; shared by every kind's tests.
    pub(super) fn messages(el: &ErrorList) -> Vec<String> {
        el.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn field_errors_print_like_go() {
        let el = vec![
            required("spec.a", "must be specified"),
            invalid("spec.b", s("x"), "bad"),
            forbidden("spec.c", "no"),
            not_supported("spec.d", BadValue::Int(1), &["2", "3"]),
            FieldError {
                field: "spec.e".into(),
                type_: ErrorType::TooLong,
                value: Some(s("long")),
                detail: "too long".into(),
            },
            FieldError {
                field: "spec.f".into(),
                type_: ErrorType::Duplicate,
                value: Some(BadValue::Bool(true)),
                detail: String::new(),
            },
            invalid(
                "spec.g",
                BadValue::Duration(Duration::from_secs(90)),
                "short",
            ),
        ];
        // Go prints no value for Required, Forbidden and TooLong, and no empty detail.
        assert_eq!(
            messages(&el),
            [
                "spec.a: Required value: must be specified",
                "spec.b: Invalid value: \"x\": bad",
                "spec.c: Forbidden: no",
                "spec.d: Unsupported value: 1: supported values: \"2\", \"3\"",
                "spec.e: Too long: too long",
                "spec.f: Duplicate value: true",
                "spec.g: Invalid value: 1m30s: short",
            ]
        );
        assert_eq!(aggregate(&[]), "");
        assert_eq!(
            aggregate(&el[..1]),
            "spec.a: Required value: must be specified"
        );
        assert_eq!(
            aggregate(&el[..2]),
            "[spec.a: Required value: must be specified, spec.b: Invalid value: \"x\": bad]"
        );
    }

    #[test]
    fn unknown_usages() {
        let usages = ["server auth".to_string(), "teleport".to_string()];
        assert_eq!(
            messages(&validate_usages(&usages)),
            ["spec.usages[1]: Invalid value: \"teleport\": unknown keyusage"]
        );
    }

    #[test]
    fn dns_subdomains() {
        for ok in ["a", "tls", "my-cert.example", "a1"] {
            assert!(dns1123_subdomain_errors(ok).is_empty(), "{ok}");
        }
        for bad in ["", "A", "-a", "a-", "a..b", "a_b", &"a".repeat(254)] {
            assert!(!dns1123_subdomain_errors(bad).is_empty(), "{bad}");
        }
    }
}
