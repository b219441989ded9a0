//! Field rules of the six kinds, as upstream's webhook applies them
//! (`internal/apis/certmanager/validation`, `internal/apis/acme/validation`), over the types in
//! [`crate::api`]. Pure functions: no API calls. Errors print like apimachinery's
//! `field.Error` (`spec.duration: Invalid value: "30m0s": certificate duration must be ...`)
//! because users and tools grep for those strings.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use x509_parser::prelude::FromDer;

use crate::api::{
    AcmeChallengeSolver, AcmeChallengeSolverHttp01Ingress, AcmeIssuer, CertificateRequestSpec,
    CertificateRequestStatus, CertificateSpec, ChallengeSpec, Condition, IssuerConfig, IssuerRef,
    OrderSpec, OrderStatus,
};
use crate::duration::{DurationError, format_go_duration, parse_go_duration};

/// Upstream's `MinimumCertificateDuration`.
pub const MIN_DURATION: Duration = Duration::from_secs(3600);
/// Upstream's `MinimumRenewBefore`.
pub const MIN_RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Upstream's `DefaultCertificateDuration` (90 days).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(2160 * 3600);

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

fn empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_none_or(Vec::is_empty)
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

// ---------------------------------------------------------------------------------------------
// Certificate

/// `ValidateCertificateSpec` (CREATE and UPDATE alike).
pub fn validate_certificate_spec(spec: &CertificateSpec) -> ErrorList {
    let mut el = ErrorList::new();
    if spec.secret_name.is_empty() {
        el.push(required("spec.secretName", "must be specified"));
    } else {
        for msg in dns1123_subdomain_errors(&spec.secret_name) {
            el.push(invalid("spec.secretName", s(&spec.secret_name), msg));
        }
    }
    el.extend(validate_issuer_ref(&spec.issuer_ref, "spec"));

    let mut common_name = spec.common_name.clone().unwrap_or_default();
    if let Some(literal) = spec.literal_subject.as_deref().filter(|l| !l.is_empty()) {
        if !common_name.is_empty() {
            el.push(invalid(
                "spec.commonName",
                s(&common_name),
                "When providing a `LiteralSubject` no `commonName` may be provided.",
            ));
        }
        if spec.subject.as_ref().is_some_and(subject_has_fields) {
            el.push(FieldError {
                field: "spec.subject".into(),
                type_: ErrorType::Invalid,
                value: None,
                detail:
                    "When providing a `LiteralSubject` no `Subject` properties may be provided."
                        .into(),
            });
        }
        if let Some(cn) = literal_subject_common_name(literal) {
            common_name = cn;
        }
    }
    if common_name.is_empty()
        && empty(&spec.dns_names)
        && empty(&spec.uris)
        && empty(&spec.email_addresses)
        && empty(&spec.ip_addresses)
        && empty(&spec.other_names)
    {
        el.push(invalid(
            "spec",
            s(""),
            "at least one of commonName (from the commonName field or from a literalSubject), dnsNames, emailSANs, ipAddresses, otherNames, or uriSANs must be set",
        ));
    }
    if common_name.len() > 64 {
        el.push(FieldError {
            field: "spec.commonName".into(),
            type_: ErrorType::TooLong,
            value: Some(s(&common_name)),
            detail: "may not be more than 64 bytes".into(),
        });
    }
    for (i, ip) in spec.ip_addresses.iter().flatten().enumerate() {
        if ip.parse::<std::net::IpAddr>().is_err() {
            el.push(invalid(
                format!("spec.ipAddresses[{i}]"),
                s(ip),
                "invalid IP address",
            ));
        }
    }
    for (i, email) in spec.email_addresses.iter().flatten().enumerate() {
        if !plausible_email(email) {
            el.push(invalid(
                format!("spec.emailAddresses[{i}]"),
                s(email),
                "invalid email address: make sure the supplied value only contains the email address itself",
            ));
        }
    }
    for (i, other) in spec.other_names.iter().flatten().enumerate() {
        let oid = other.get("oid").and_then(Value::as_str).unwrap_or_default();
        if oid.is_empty() {
            el.push(required(
                format!("spec.otherNames[{i}].oid"),
                "must be specified",
            ));
        } else if !valid_oid(oid) {
            el.push(invalid(
                format!("spec.otherNames[{i}].oid"),
                s(oid),
                "invalid oid syntax",
            ));
        }
        let utf8 = other
            .get("utf8Value")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if utf8.is_empty() {
            el.push(required(
                format!("spec.otherNames[{i}].utf8Value"),
                "must be set to a valid non-empty UTF8 string",
            ));
        }
    }
    let key_algorithm = validate_private_key(spec, &mut el);
    if let Some(sig) = spec
        .signature_algorithm
        .as_deref()
        .filter(|a| !a.is_empty())
    {
        let allowed: &[&str] = match key_algorithm {
            "ECDSA" => &["ECDSAWithSHA256", "ECDSAWithSHA384", "ECDSAWithSHA512"],
            "Ed25519" => &["PureEd25519"],
            _ => &["SHA256WithRSA", "SHA384WithRSA", "SHA512WithRSA"],
        };
        if !allowed.contains(&sig) {
            el.push(invalid(
                "spec.signatureAlgorithm",
                s(sig),
                format!(
                    "for key algorithm {key_algorithm} the allowed signature algorithms are [{}]",
                    allowed.join(" ")
                ),
            ));
        }
    }
    if spec.duration.is_some()
        || spec.renew_before.is_some()
        || spec.renew_before_percentage.is_some()
    {
        el.extend(validate_duration(spec));
    }
    for (i, usage) in spec.usages.iter().flatten().enumerate() {
        if !KEY_USAGES.contains(&usage.as_str()) {
            el.push(invalid(
                format!("spec.usages[{i}]"),
                s(usage),
                "unknown keyusage",
            ));
        }
    }
    if let Some(limit) = spec.revision_history_limit
        && limit < 1
    {
        el.push(invalid(
            "spec.revisionHistoryLimit",
            BadValue::Int(limit.into()),
            "must not be less than 1",
        ));
    }
    if let Some(template) = &spec.secret_template {
        for key in template.annotations.iter().flat_map(|a| a.keys()) {
            // allow-direct-injection is the one cert-manager.io annotation a user may template:
            // it is how a Certificate's Secret opts in to cainjector's inject-ca-from-secret.
            if key.starts_with("cert-manager.io/")
                && key != "cert-manager.io/allow-direct-injection"
            {
                el.push(invalid(
                    "spec.secretTemplate.annotations",
                    s(key),
                    "cert-manager.io/* annotations are not allowed",
                ));
            }
        }
    }
    let mut formats = BTreeSet::new();
    for format in spec.additional_output_formats.iter().flatten() {
        let t = format
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !formats.insert(t.to_string()) {
            el.push(FieldError {
                field: "spec.additionalOutputFormats[type]".into(),
                type_: ErrorType::Duplicate,
                value: Some(s(t)),
                detail: String::new(),
            });
        }
    }
    el
}

fn subject_has_fields(subject: &crate::api::X509Subject) -> bool {
    [
        &subject.organizations,
        &subject.countries,
        &subject.organizational_units,
        &subject.localities,
        &subject.provinces,
        &subject.street_addresses,
        &subject.postal_codes,
    ]
    .iter()
    .any(|v| !empty(v))
        || subject
            .serial_number
            .as_deref()
            .is_some_and(|s| !s.is_empty())
}

/// The CN of an RFC 4514 subject string (`CN=foo,O=bar`), enough to tell whether one is set.
fn literal_subject_common_name(literal: &str) -> Option<String> {
    literal
        .split([',', '+'])
        .filter_map(|rdn| rdn.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("CN"))
        .map(|(_, v)| v.trim().to_string())
}

/// Go's `mail.ParseAddress` accepts more; this keeps to what a certificate SAN can hold:
/// a bare `local@domain` with no display name or spaces.
fn plausible_email(email: &str) -> bool {
    match email.rsplit_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !email.contains(|c: char| c.is_whitespace() || "<>(),;:\"[]".contains(c))
        }
        None => false,
    }
}

fn valid_oid(oid: &str) -> bool {
    let parts: Vec<&str> = oid.split('.').collect();
    parts.len() >= 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Checks `privateKey` and returns the effective algorithm (RSA when unset).
fn validate_private_key<'a>(spec: &'a CertificateSpec, el: &mut ErrorList) -> &'a str {
    let Some(key) = &spec.private_key else {
        return "RSA";
    };
    let algorithm = key.algorithm.as_deref().unwrap_or("");
    let size = key.size.unwrap_or(0);
    match algorithm {
        "" | "RSA" => {
            if size > 0 && !(2048..=8192).contains(&size) {
                el.push(invalid(
                    "spec.privateKey.size",
                    BadValue::Int(size.into()),
                    "must be between 2048 and 8192 for rsa keyAlgorithm",
                ));
            }
        }
        "ECDSA" => {
            if size > 0 && ![256, 384, 521].contains(&size) {
                el.push(not_supported(
                    "spec.privateKey.size",
                    BadValue::Int(size.into()),
                    &["256", "384", "521"],
                ));
            }
        }
        "Ed25519" => {}
        other => el.push(invalid(
            "spec.privateKey.algorithm",
            s(other),
            "must be either empty or one of rsa, ecdsa or ed25519",
        )),
    }
    // Upstream leaves these two to the CRD schema's enums; ours has none, so check here.
    if let Some(encoding) = key.encoding.as_deref()
        && !["", "PKCS1", "PKCS8"].contains(&encoding)
    {
        el.push(not_supported(
            "spec.privateKey.encoding",
            s(encoding),
            &["PKCS1", "PKCS8"],
        ));
    }
    if let Some(policy) = key.rotation_policy.as_deref()
        && !["", "Never", "Always"].contains(&policy)
    {
        el.push(not_supported(
            "spec.privateKey.rotationPolicy",
            s(policy),
            &["Never", "Always"],
        ));
    }
    if algorithm.is_empty() {
        "RSA"
    } else {
        algorithm
    }
}

/// `ValidateDuration`: duration ≥ 1h, renewBefore ≥ 5m and < duration, renewBefore and
/// renewBeforePercentage exclusive, and the percentage must give a renewBefore in [5m, duration).
pub fn validate_duration(spec: &CertificateSpec) -> ErrorList {
    let mut el = ErrorList::new();
    let duration = match spec.duration.as_deref() {
        Some(d) => match parse_duration_field("spec.duration", d, &mut el) {
            Some(d) => d,
            None => return el,
        },
        None => DEFAULT_DURATION,
    };
    if duration < MIN_DURATION {
        el.push(invalid(
            "spec.duration",
            BadValue::Duration(duration),
            format!(
                "certificate duration must be greater than {}",
                format_go_duration(MIN_DURATION)
            ),
        ));
    }
    let renew_before = match spec.renew_before.as_deref() {
        Some(r) => match parse_duration_field("spec.renewBefore", r, &mut el) {
            Some(r) => Some(r),
            None => return el,
        },
        None => None,
    };
    if let (Some(rb), Some(pct)) = (renew_before, spec.renew_before_percentage) {
        const MSG: &str =
            "renewBefore and renewBeforePercentage are mutually exclusive and cannot both be set";
        el.push(invalid("spec.renewBefore", BadValue::Duration(rb), MSG));
        el.push(invalid(
            "spec.renewBeforePercentage",
            BadValue::Int(pct.into()),
            MSG,
        ));
    }
    if let Some(rb) = renew_before {
        if rb < MIN_RENEW_BEFORE {
            el.push(invalid(
                "spec.renewBefore",
                BadValue::Duration(rb),
                format!(
                    "certificate renewBefore must be greater than {}",
                    format_go_duration(MIN_RENEW_BEFORE)
                ),
            ));
        }
        if rb >= duration {
            el.push(invalid(
                "spec.renewBefore",
                BadValue::Duration(rb),
                format!(
                    "certificate duration {} must be greater than renewBefore {}",
                    format_go_duration(duration),
                    format_go_duration(rb)
                ),
            ));
        }
    }
    if let Some(pct) = spec.renew_before_percentage {
        // renewBefore = duration × (100 − pct) / 100, in signed nanoseconds as Go computes it.
        let nanos = duration.as_nanos() as f64 * f64::from(100 - pct) / 100.0;
        let too_small = nanos < MIN_RENEW_BEFORE.as_nanos() as f64;
        let too_large = nanos >= duration.as_nanos() as f64;
        if too_small {
            el.push(invalid(
                "spec.renewBeforePercentage",
                BadValue::Int(pct.into()),
                format!(
                    "certificate renewBeforePercentage must result in a renewBefore greater than {}",
                    format_go_duration(MIN_RENEW_BEFORE)
                ),
            ));
        }
        if too_large {
            el.push(invalid(
                "spec.renewBeforePercentage",
                BadValue::Int(pct.into()),
                "certificate renewBeforePercentage must result in a renewBefore less than duration",
            ));
        }
    }
    el
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

// ---------------------------------------------------------------------------------------------
// CertificateRequest

/// The requester, from the AdmissionRequest's userInfo.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Requester {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

/// CREATE: spec rules, approval conditions, and the identity the mutating webhook set.
pub fn validate_certificate_request_create(
    spec: &CertificateRequestSpec,
    status: Option<&CertificateRequestStatus>,
    requester: Option<&Requester>,
) -> ErrorList {
    let mut el = validate_certificate_request_spec(spec);
    el.extend(validate_approval_conditions(conditions_of(status)));
    if let Some(who) = requester {
        el.extend(validate_identity_create(spec, who));
    }
    el
}

fn conditions_of(status: Option<&CertificateRequestStatus>) -> &[Condition] {
    status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[])
}

/// `ValidateCertificateRequestSpec`: issuerRef, request present and a parseable CSR, usages.
pub fn validate_certificate_request_spec(spec: &CertificateRequestSpec) -> ErrorList {
    let mut el = validate_issuer_ref(&spec.issuer_ref, "spec");
    for (i, usage) in spec.usages.iter().flatten().enumerate() {
        if !KEY_USAGES.contains(&usage.as_str()) {
            el.push(invalid(
                format!("spec.usages[{i}]"),
                s(usage),
                "unknown keyusage",
            ));
        }
    }
    if spec.request.is_empty() {
        el.push(required("spec.request", "must be specified"));
        return el;
    }
    if let Err(reason) = check_csr(&spec.request) {
        el.push(invalid("spec.request", s(&truncate(&spec.request)), reason));
    }
    if let Some(d) = spec.duration.as_deref() {
        parse_duration_field("spec.duration", d, &mut el);
    }
    el
}

fn truncate(v: &str) -> String {
    const MAX: usize = 100;
    if v.len() <= MAX {
        return v.to_string();
    }
    let mut end = MAX - 3;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &v[..end])
}

/// The request is base64 (Go `[]byte`) of a PEM CSR whose signature verifies.
fn check_csr(request_b64: &str) -> Result<(), String> {
    let pem = base64::engine::general_purpose::STANDARD
        .decode(request_b64.trim())
        .map_err(|e| format!("request is not valid base64: {e}"))?;
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|_| "error decoding certificate request PEM block".to_string())?;
    if block.label != "CERTIFICATE REQUEST" && block.label != "NEW CERTIFICATE REQUEST" {
        return Err("error decoding certificate request PEM block".into());
    }
    let (_, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&block.contents)
            .map_err(|e| format!("failed to parse CSR: {e}"))?;
    csr.verify_signature()
        .map_err(|e| format!("CSR signature does not verify: {e}"))
}

/// UPDATE: the spec (identity included) and cert-manager annotations are immutable, and the
/// Approved/Denied conditions may not change once set.
pub fn validate_certificate_request_update(
    old: &crate::api::CertificateRequest,
    new: &crate::api::CertificateRequest,
) -> ErrorList {
    let mut el = ErrorList::new();
    let (old_ann, new_ann) = (
        old.metadata.annotations.clone().unwrap_or_default(),
        new.metadata.annotations.clone().unwrap_or_default(),
    );
    let mut keys: BTreeSet<&String> = old_ann.keys().collect();
    keys.extend(new_ann.keys());
    for k in keys {
        if (k.starts_with(crate::api::GROUP) || k.starts_with(crate::api::ACME_GROUP))
            && old_ann.get(k) != new_ann.get(k)
        {
            el.push(forbidden(
                format!("metadata.annotations.{k}"),
                "cannot change cert-manager annotation after creation",
            ));
        }
    }
    let (old_conds, new_conds) = (
        conditions_of(old.status.as_ref()),
        conditions_of(new.status.as_ref()),
    );
    for type_ in ["Approved", "Denied"] {
        if let Some(before) = crate::api::condition(old_conds, type_)
            && crate::api::condition(new_conds, type_) != Some(before)
        {
            el.push(forbidden(
                "status.conditions",
                format!("'{type_}' condition may not be modified once set"),
            ));
        }
    }
    el.extend(validate_approval_conditions(new_conds));
    if old.spec != new.spec {
        el.push(forbidden("spec", "cannot change spec after creation"));
    }
    el
}

/// `ValidateCertificateRequestApprovalCondition`: at most one of each, only True, never both.
pub fn validate_approval_conditions(conditions: &[Condition]) -> ErrorList {
    let mut el = ErrorList::new();
    let path = "status.conditions";
    let approved: Vec<_> = conditions
        .iter()
        .filter(|c| c.type_ == "Approved")
        .collect();
    let denied: Vec<_> = conditions.iter().filter(|c| c.type_ == "Denied").collect();
    for (type_, found) in [("Approved", &approved), ("Denied", &denied)] {
        match found.as_slice() {
            [] => {}
            [one] => {
                if one.status != "True" {
                    el.push(invalid(
                        format!("{path}.{type_}"),
                        s(&one.status),
                        format!("{type_:?} condition may only be set to True"),
                    ));
                }
            }
            _ => el.push(forbidden(
                path,
                format!("multiple {type_:?} conditions present"),
            )),
        }
    }
    if !approved.is_empty() && !denied.is_empty() {
        el.push(forbidden(
            path,
            "both 'Denied' and 'Approved' conditions cannot coexist",
        ));
    }
    el
}

/// The identity fields must be the requester's (the mutating webhook set them on CREATE).
fn validate_identity_create(spec: &CertificateRequestSpec, who: &Requester) -> ErrorList {
    let mut el = ErrorList::new();
    if spec.uid.as_deref().unwrap_or("") != who.uid {
        el.push(forbidden(
            "spec.uid",
            "uid identity must be that of the requester",
        ));
    }
    if spec.username.as_deref().unwrap_or("") != who.username {
        el.push(forbidden(
            "spec.username",
            "username identity must be that of the requester",
        ));
    }
    let sorted = |v: &[String]| {
        let mut v = v.to_vec();
        v.sort();
        v
    };
    if sorted(spec.groups.as_deref().unwrap_or(&[])) != sorted(&who.groups) {
        el.push(forbidden(
            "spec.groups",
            "groups identity must be that of the requester",
        ));
    }
    let extra = spec.extra.clone().unwrap_or_default();
    let same_extra = extra.len() == who.extra.len()
        && extra
            .iter()
            .all(|(k, v)| who.extra.get(k).is_some_and(|w| sorted(v) == sorted(w)));
    if !same_extra {
        el.push(forbidden(
            "spec.extra",
            "extra identity must be that of the requester",
        ));
    }
    el
}

// ---------------------------------------------------------------------------------------------
// Issuer and ClusterIssuer

/// `ValidateIssuerConfig`: exactly one issuer type, then that type's rules.
pub fn validate_issuer_config(config: &IssuerConfig) -> ErrorList {
    let mut el = ErrorList::new();
    let types: [(&str, bool); 5] = [
        ("acme", config.acme.is_some()),
        ("ca", config.ca.is_some()),
        ("selfSigned", config.self_signed.is_some()),
        ("vault", config.vault.is_some()),
        ("venafi", config.venafi.is_some()),
    ];
    let mut seen = 0;
    for (name, set) in types {
        if !set {
            continue;
        }
        if seen > 0 {
            el.push(forbidden(
                format!("spec.{name}"),
                "may not specify more than one issuer type",
            ));
            continue;
        }
        seen += 1;
        match name {
            "acme" => {
                if let Some(acme) = &config.acme {
                    el.extend(validate_acme_issuer(acme));
                }
            }
            "ca" => {
                let secret = config
                    .ca
                    .as_ref()
                    .and_then(|v| v.get("secretName"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if secret.is_empty() {
                    el.push(required("spec.ca.secretName", ""));
                }
            }
            _ => {}
        }
    }
    if seen == 0 {
        el.push(required("spec", "at least one issuer must be configured"));
    }
    el
}

/// `ValidateACMEIssuerConfig`.
pub fn validate_acme_issuer(acme: &AcmeIssuer) -> ErrorList {
    let mut el = ErrorList::new();
    let bundle = acme.ca_bundle.as_deref().unwrap_or("");
    if !bundle.is_empty() && acme.skip_tls_verify == Some(true) {
        const MSG: &str =
            "caBundle and skipTLSVerify are mutually exclusive and cannot both be set";
        el.push(invalid("spec.acme.caBundle", s(""), MSG));
        el.push(invalid(
            "spec.acme.skipTLSVerify",
            BadValue::Bool(true),
            MSG,
        ));
    }
    if !bundle.is_empty() && !bundle_has_certificate(bundle) {
        el.push(invalid(
            "spec.acme.caBundle",
            s(""),
            "cert bundle didn't contain any valid certificates",
        ));
    }
    if acme.private_key_secret_ref.name.is_empty() {
        el.push(required(
            "spec.acme.privateKeySecretRef.name",
            "private key secret name is a required field",
        ));
    }
    if acme.server.is_empty() {
        el.push(required(
            "spec.acme.server",
            "acme server URL is a required field",
        ));
    }
    if let Some(eab) = &acme.external_account_binding {
        if eab.key_id.is_empty() {
            el.push(required(
                "spec.acme.externalAccountBinding.keyID",
                "the keyID field is required when using externalAccountBinding",
            ));
        }
        if eab.key_secret_ref.name.is_empty() {
            el.push(required(
                "spec.acme.externalAccountBinding.keySecretRef.name",
                "secret name is required",
            ));
        }
    }
    for (i, solver) in acme.solvers.iter().flatten().enumerate() {
        el.extend(validate_solver(solver, &format!("spec.acme.solvers[{i}]")));
    }
    el
}

fn bundle_has_certificate(bundle_b64: &str) -> bool {
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(bundle_b64.trim()) else {
        return false;
    };
    x509_parser::pem::Pem::iter_from_buffer(&pem)
        .filter_map(Result::ok)
        .any(|p| p.label == "CERTIFICATE" && p.parse_x509().is_ok())
}

/// `ValidateACMEIssuerChallengeSolverConfig`.
pub fn validate_solver(solver: &AcmeChallengeSolver, path: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let mut providers = 0;
    if let Some(http01) = &solver.http01 {
        providers += 1;
        let http_path = format!("{path}.http01");
        let defined = usize::from(http01.ingress.is_some())
            + usize::from(http01.gateway_http_route.is_some());
        if let Some(ingress) = &http01.ingress {
            el.extend(validate_http01_ingress(
                ingress,
                &format!("{http_path}.ingress"),
            ));
        }
        if let Some(service_type) = http01
            .gateway_http_route
            .as_ref()
            .and_then(|g| g.get("serviceType"))
            .and_then(Value::as_str)
        {
            el.extend(validate_service_type(
                service_type,
                &format!("{http_path}.gateway.serviceType"),
            ));
        }
        match defined {
            0 => el.push(required(http_path, "no HTTP01 solver type configured")),
            1 => {}
            _ => el.push(required(
                http_path,
                "only 1 HTTP01 solver type may be configured",
            )),
        }
    }
    if solver.dns01.is_some() {
        if providers > 0 {
            el.push(forbidden(
                path,
                "may not specify more than one solver type in a single solver",
            ));
        } else {
            providers += 1;
        }
    }
    if providers == 0 {
        el.push(required(path, "no solver type configured"));
    }
    if let Some(wait) = solver.wait_instead_of_self_check.as_deref() {
        let field = format!("{path}.waitInsteadOfSelfCheck");
        match parse_go_duration(wait) {
            Ok(_) => {}
            Err(DurationError::Negative(_)) => el.push(invalid(
                field,
                s(wait),
                "waitInsteadOfSelfCheck must not be negative",
            )),
            Err(e) => el.push(invalid(field, s(wait), e.to_string())),
        }
    }
    el
}

fn validate_service_type(service_type: &str, path: &str) -> ErrorList {
    match service_type {
        "" | "ClusterIP" | "NodePort" => vec![],
        other => vec![invalid(
            path,
            s(other),
            r#"must be empty, "ClusterIP" or "NodePort""#,
        )],
    }
}

fn validate_http01_ingress(ingress: &AcmeChallengeSolverHttp01Ingress, path: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let specified = usize::from(ingress.class.is_some())
        + usize::from(ingress.ingress_class_name.is_some())
        + usize::from(ingress.name.as_deref().is_some_and(|n| !n.is_empty()));
    if specified > 1 {
        el.push(forbidden(
            path,
            "only one of 'ingressClassName', 'name' or 'class' should be specified",
        ));
    }
    if let Some(class_name) = &ingress.ingress_class_name {
        let errs = dns1123_subdomain_errors(class_name);
        if !errs.is_empty() {
            el.push(invalid(
                format!("{path}.ingressClassName"),
                s(class_name),
                format!("must be a valid IngressClass name: {}", errs.join(", ")),
            ));
        }
    }
    el.extend(validate_service_type(
        ingress.service_type.as_deref().unwrap_or(""),
        &format!("{path}.serviceType"),
    ));
    el
}

// ---------------------------------------------------------------------------------------------
// Order and Challenge

/// Order UPDATE: the spec is immutable, and status fields upstream freezes once set stay put.
pub fn validate_order_update(
    old: &OrderSpec,
    new: &OrderSpec,
    old_status: Option<&OrderStatus>,
    new_status: Option<&OrderStatus>,
) -> ErrorList {
    let mut el = ErrorList::new();
    if !old.request.is_empty() && old.request != new.request {
        el.push(forbidden("spec.request", "field is immutable once set"));
    } else if old != new {
        el.push(forbidden("spec", "field is immutable once set"));
    }
    let default = OrderStatus::default();
    let (o, n) = (
        old_status.unwrap_or(&default),
        new_status.unwrap_or(&default),
    );
    let frozen = |field: &str, before: &Option<String>, after: &Option<String>| {
        let set = before.as_deref().is_some_and(|v| !v.is_empty());
        (set && before != after)
            .then(|| forbidden(format!("status.{field}"), "field is immutable once set"))
    };
    el.extend(frozen("url", &o.url, &n.url));
    el.extend(frozen("finalizeURL", &o.finalize_url, &n.finalize_url));
    el.extend(frozen("certificate", &o.certificate, &n.certificate));
    if let Some(before) = o.authorizations.as_ref().filter(|a| !a.is_empty())
        && n.authorizations.as_ref() != Some(before)
    {
        el.push(forbidden(
            "status.authorizations",
            "field is immutable once set",
        ));
    }
    el
}

/// Challenge UPDATE: the spec is immutable.
pub fn validate_challenge_update(old: &ChallengeSpec, new: &ChallengeSpec) -> ErrorList {
    if old == new {
        vec![]
    } else {
        vec![forbidden(
            "spec",
            "challenge spec is immutable after creation",
        )]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CertificatePrivateKey, ExternalAccountBinding, SecretKeySelector};

    fn cert() -> CertificateSpec {
        CertificateSpec {
            secret_name: "tls".into(),
            issuer_ref: IssuerRef {
                name: "letsencrypt".into(),
                kind: Some("ClusterIssuer".into()),
                group: None,
            },
            dns_names: Some(vec!["example.com".into()]),
            ..Default::default()
        }
    }

    fn messages(el: &ErrorList) -> Vec<String> {
        el.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn certificate_rules() {
        type Case = (
            &'static str,
            fn(&mut CertificateSpec),
            &'static [&'static str],
        );
        let cases: &[Case] = &[
            ("valid", |_| {}, &[]),
            (
                "missing secretName",
                |c| c.secret_name.clear(),
                &["spec.secretName: Required value: must be specified"],
            ),
            (
                "secretName not a DNS subdomain",
                |c| c.secret_name = "Bad_Name".into(),
                &["spec.secretName: Invalid value: \"Bad_Name\": a lowercase RFC 1123 subdomain"],
            ),
            (
                "missing issuer name",
                |c| c.issuer_ref.name.clear(),
                &["spec.issuerRef.name: Required value: must be specified"],
            ),
            (
                "foreign kind without group",
                |c| c.issuer_ref.kind = Some("Vault".into()),
                &[
                    "spec.issuerRef.kind: Invalid value: \"Vault\": must be one of Issuer or ClusterIssuer (did you forget to set spec.issuerRef.kind.group?)",
                ],
            ),
            (
                "foreign kind with group is fine",
                |c| {
                    c.issuer_ref.kind = Some("Vault".into());
                    c.issuer_ref.group = Some("example.io".into());
                },
                &[],
            ),
            (
                "duration 30m",
                |c| c.duration = Some("30m".into()),
                &[
                    "spec.duration: Invalid value: 30m0s: certificate duration must be greater than 1h0m0s",
                ],
            ),
            (
                "duration 1h exactly",
                |c| c.duration = Some("1h".into()),
                &[],
            ),
            (
                "duration unparseable",
                |c| c.duration = Some("90d".into()),
                &[
                    "spec.duration: Invalid value: \"90d\": time: unknown unit \"d\" in duration \"90d\"",
                ],
            ),
            (
                "renewBefore >= duration",
                |c| {
                    c.duration = Some("2h".into());
                    c.renew_before = Some("2h".into());
                },
                &[
                    "spec.renewBefore: Invalid value: 2h0m0s: certificate duration 2h0m0s must be greater than renewBefore 2h0m0s",
                ],
            ),
            (
                "renewBefore below 5m",
                |c| c.renew_before = Some("1m".into()),
                &[
                    "spec.renewBefore: Invalid value: 1m0s: certificate renewBefore must be greater than 5m0s",
                ],
            ),
            (
                "renewBefore with default duration",
                |c| c.renew_before = Some("720h".into()),
                &[],
            ),
            (
                "renewBefore and percentage",
                |c| {
                    c.renew_before = Some("1h".into());
                    c.renew_before_percentage = Some(50);
                },
                &[
                    "spec.renewBefore: Invalid value: 1h0m0s: renewBefore and renewBeforePercentage are mutually exclusive",
                    "spec.renewBeforePercentage: Invalid value: 50: renewBefore and renewBeforePercentage are mutually exclusive",
                ],
            ),
            (
                "percentage 50",
                |c| c.renew_before_percentage = Some(50),
                &[],
            ),
            (
                "percentage 100",
                |c| c.renew_before_percentage = Some(100),
                &[
                    "spec.renewBeforePercentage: Invalid value: 100: certificate renewBeforePercentage must result in a renewBefore greater than 5m0s",
                ],
            ),
            (
                "percentage 0",
                |c| c.renew_before_percentage = Some(0),
                &[
                    "spec.renewBeforePercentage: Invalid value: 0: certificate renewBeforePercentage must result in a renewBefore less than duration",
                ],
            ),
            (
                "rsa too small",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        size: Some(1024),
                        ..Default::default()
                    })
                },
                &[
                    "spec.privateKey.size: Invalid value: 1024: must be between 2048 and 8192 for rsa keyAlgorithm",
                ],
            ),
            (
                "rsa 8192 ok",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        algorithm: Some("RSA".into()),
                        size: Some(8192),
                        ..Default::default()
                    })
                },
                &[],
            ),
            (
                "ecdsa 512",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        algorithm: Some("ECDSA".into()),
                        size: Some(512),
                        ..Default::default()
                    })
                },
                &[
                    "spec.privateKey.size: Unsupported value: 512: supported values: \"256\", \"384\", \"521\"",
                ],
            ),
            (
                "ecdsa 521 ok",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        algorithm: Some("ECDSA".into()),
                        size: Some(521),
                        ..Default::default()
                    })
                },
                &[],
            ),
            (
                "unknown algorithm",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        algorithm: Some("DSA".into()),
                        ..Default::default()
                    })
                },
                &[
                    "spec.privateKey.algorithm: Invalid value: \"DSA\": must be either empty or one of rsa, ecdsa or ed25519",
                ],
            ),
            (
                "bad encoding and rotation policy",
                |c| {
                    c.private_key = Some(CertificatePrivateKey {
                        encoding: Some("DER".into()),
                        rotation_policy: Some("Sometimes".into()),
                        ..Default::default()
                    })
                },
                &[
                    "spec.privateKey.encoding: Unsupported value: \"DER\"",
                    "spec.privateKey.rotationPolicy: Unsupported value: \"Sometimes\"",
                ],
            ),
            (
                "signature algorithm must fit the key",
                |c| c.signature_algorithm = Some("ECDSAWithSHA256".into()),
                &[
                    "spec.signatureAlgorithm: Invalid value: \"ECDSAWithSHA256\": for key algorithm RSA",
                ],
            ),
            (
                "unknown usage",
                |c| c.usages = Some(vec!["server auth".into(), "teleport".into()]),
                &["spec.usages[1]: Invalid value: \"teleport\": unknown keyusage"],
            ),
            (
                "no names",
                |c| c.dns_names = None,
                &["spec: Invalid value: \"\": at least one of commonName"],
            ),
            (
                "common name only",
                |c| {
                    c.dns_names = None;
                    c.common_name = Some("example.com".into());
                },
                &[],
            ),
            (
                "literal subject CN counts",
                |c| {
                    c.dns_names = None;
                    c.literal_subject = Some("CN=example.com,O=Home".into());
                },
                &[],
            ),
            (
                "literal subject and common name",
                |c| {
                    c.common_name = Some("x".into());
                    c.literal_subject = Some("O=Home".into());
                },
                &[
                    "spec.commonName: Invalid value: \"x\": When providing a `LiteralSubject` no `commonName` may be provided.",
                ],
            ),
            (
                "common name too long",
                |c| c.common_name = Some("a".repeat(65)),
                &["spec.commonName: Too long: may not be more than 64 bytes"],
            ),
            (
                "bad ip",
                |c| c.ip_addresses = Some(vec!["10.0.0.300".into()]),
                &["spec.ipAddresses[0]: Invalid value: \"10.0.0.300\": invalid IP address"],
            ),
            (
                "bad email",
                |c| c.email_addresses = Some(vec!["Me <me@example.com>".into()]),
                &["spec.emailAddresses[0]: Invalid value: \"Me <me@example.com>\""],
            ),
            (
                "secretTemplate cert-manager annotation",
                |c| {
                    c.secret_template = Some(crate::api::SecretTemplate {
                        annotations: Some(
                            [
                                ("cert-manager.io/issuer-name".to_string(), "x".to_string()),
                                (
                                    "cert-manager.io/allow-direct-injection".to_string(),
                                    "true".to_string(),
                                ),
                            ]
                            .into(),
                        ),
                        labels: None,
                    })
                },
                &[
                    "spec.secretTemplate.annotations: Invalid value: \"cert-manager.io/issuer-name\": cert-manager.io/* annotations are not allowed",
                ],
            ),
            (
                "revisionHistoryLimit 0",
                |c| c.revision_history_limit = Some(0),
                &["spec.revisionHistoryLimit: Invalid value: 0: must not be less than 1"],
            ),
        ];
        for (name, mutate, want) in cases {
            let mut spec = cert();
            mutate(&mut spec);
            let got = messages(&validate_certificate_spec(&spec));
            assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.starts_with(w), "{name}: got {g:?}, want prefix {w:?}");
            }
        }
    }

    #[test]
    fn aggregate_prints_like_go() {
        let mut spec = cert();
        spec.duration = Some("30m".into());
        spec.secret_name.clear();
        let el = validate_certificate_spec(&spec);
        assert_eq!(
            aggregate(&el),
            "[spec.secretName: Required value: must be specified, spec.duration: Invalid value: 30m0s: certificate duration must be greater than 1h0m0s]"
        );
        assert_eq!(
            aggregate(&el[..1]),
            "spec.secretName: Required value: must be specified"
        );
    }

    fn acme() -> IssuerConfig {
        IssuerConfig {
            acme: Some(AcmeIssuer {
                server: "https://acme.example/dir".into(),
                private_key_secret_ref: SecretKeySelector {
                    name: "account".into(),
                    key: None,
                },
                solvers: Some(vec![AcmeChallengeSolver {
                    http01: Some(crate::api::AcmeChallengeSolverHttp01 {
                        ingress: Some(AcmeChallengeSolverHttp01Ingress {
                            ingress_class_name: Some("nginx".into()),
                            ..Default::default()
                        }),
                        gateway_http_route: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn test_ca_b64() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("cert");
        base64::engine::general_purpose::STANDARD.encode(cert.pem())
    }

    #[test]
    fn issuer_rules() {
        type Case = (&'static str, fn(&mut IssuerConfig), &'static [&'static str]);
        let cases: &[Case] = &[
            ("valid", |_| {}, &[]),
            (
                "no type",
                |c| c.acme = None,
                &["spec: Required value: at least one issuer must be configured"],
            ),
            (
                "two types",
                |c| c.self_signed = Some(serde_json::json!({})),
                &["spec.selfSigned: Forbidden: may not specify more than one issuer type"],
            ),
            (
                "server and key required",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.server.clear();
                    a.private_key_secret_ref.name.clear();
                },
                &[
                    "spec.acme.privateKeySecretRef.name: Required value: private key secret name is a required field",
                    "spec.acme.server: Required value: acme server URL is a required field",
                ],
            ),
            (
                "caBundle and skipTLSVerify",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.ca_bundle = Some(test_ca_b64());
                    a.skip_tls_verify = Some(true);
                },
                &[
                    "spec.acme.caBundle: Invalid value: \"\": caBundle and skipTLSVerify are mutually exclusive",
                    "spec.acme.skipTLSVerify: Invalid value: true: caBundle and skipTLSVerify are mutually exclusive",
                ],
            ),
            (
                "caBundle alone",
                |c| c.acme.as_mut().expect("acme").ca_bundle = Some(test_ca_b64()),
                &[],
            ),
            (
                "caBundle without certificates",
                |c| c.acme.as_mut().expect("acme").ca_bundle = Some("aGVsbG8=".into()),
                &[
                    "spec.acme.caBundle: Invalid value: \"\": cert bundle didn't contain any valid certificates",
                ],
            ),
            (
                "eab needs keyID and secret",
                |c| {
                    c.acme.as_mut().expect("acme").external_account_binding =
                        Some(ExternalAccountBinding::default())
                },
                &[
                    "spec.acme.externalAccountBinding.keyID: Required value",
                    "spec.acme.externalAccountBinding.keySecretRef.name: Required value",
                ],
            ),
            (
                "solver without type",
                |c| {
                    c.acme.as_mut().expect("acme").solvers =
                        Some(vec![AcmeChallengeSolver::default()])
                },
                &["spec.acme.solvers[0]: Required value: no solver type configured"],
            ),
            (
                "solver with two types",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].dns01 = Some(serde_json::json!({}));
                },
                &[
                    "spec.acme.solvers[0]: Forbidden: may not specify more than one solver type in a single solver",
                ],
            ),
            (
                "http01 without ingress",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].http01 = Some(Default::default());
                },
                &["spec.acme.solvers[0].http01: Required value: no HTTP01 solver type configured"],
            ),
            (
                "class and ingressClassName",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    let s = &mut a.solvers.as_mut().expect("solvers")[0];
                    if let Some(i) = s.http01.as_mut().and_then(|h| h.ingress.as_mut()) {
                        i.class = Some("nginx".into());
                    }
                },
                &[
                    "spec.acme.solvers[0].http01.ingress: Forbidden: only one of 'ingressClassName', 'name' or 'class' should be specified",
                ],
            ),
            (
                "serviceType LoadBalancer",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    let s = &mut a.solvers.as_mut().expect("solvers")[0];
                    if let Some(i) = s.http01.as_mut().and_then(|h| h.ingress.as_mut()) {
                        i.service_type = Some("LoadBalancer".into());
                    }
                },
                &[
                    "spec.acme.solvers[0].http01.ingress.serviceType: Invalid value: \"LoadBalancer\": must be empty, \"ClusterIP\" or \"NodePort\"",
                ],
            ),
            (
                "negative wait",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].wait_instead_of_self_check =
                        Some("-5s".into());
                },
                &[
                    "spec.acme.solvers[0].waitInsteadOfSelfCheck: Invalid value: \"-5s\": waitInsteadOfSelfCheck must not be negative",
                ],
            ),
            (
                "zero wait",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].wait_instead_of_self_check =
                        Some("0s".into());
                },
                &[],
            ),
        ];
        for (name, mutate, want) in cases {
            let mut config = acme();
            mutate(&mut config);
            let got = messages(&validate_issuer_config(&config));
            assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.starts_with(w), "{name}: got {g:?}, want prefix {w:?}");
            }
        }
    }

    fn csr_b64() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let params =
            rcgen::CertificateParams::new(vec!["example.com".to_string()]).expect("params");
        let csr = params.serialize_request(&key).expect("csr");
        base64::engine::general_purpose::STANDARD.encode(csr.pem().expect("pem"))
    }

    fn cr_spec() -> CertificateRequestSpec {
        CertificateRequestSpec {
            issuer_ref: IssuerRef {
                name: "ca".into(),
                ..Default::default()
            },
            request: csr_b64(),
            ..Default::default()
        }
    }

    fn cond(type_: &str, status: &str) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            ..Default::default()
        }
    }

    #[test]
    fn certificate_request_rules() {
        assert!(validate_certificate_request_spec(&cr_spec()).is_empty());
        let mut spec = cr_spec();
        spec.request.clear();
        assert_eq!(
            messages(&validate_certificate_request_spec(&spec)),
            ["spec.request: Required value: must be specified"]
        );
        spec.request = base64::engine::general_purpose::STANDARD.encode("not a csr");
        let got = messages(&validate_certificate_request_spec(&spec));
        assert!(
            got[0].starts_with("spec.request: Invalid value:"),
            "{got:?}"
        );

        let table: &[(&[Condition], &[&str])] = &[
            (&[], &[]),
            (
                &[Condition {
                    ..cond("Approved", "True")
                }],
                &[],
            ),
            (
                &[cond("Approved", "False")],
                &[
                    "status.conditions.Approved: Invalid value: \"False\": \"Approved\" condition may only be set to True",
                ],
            ),
            (
                &[cond("Approved", "True"), cond("Denied", "True")],
                &[
                    "status.conditions: Forbidden: both 'Denied' and 'Approved' conditions cannot coexist",
                ],
            ),
            (
                &[cond("Denied", "True"), cond("Denied", "True")],
                &["status.conditions: Forbidden: multiple \"Denied\" conditions present"],
            ),
        ];
        for (conds, want) in table {
            assert_eq!(&messages(&validate_approval_conditions(conds)), want);
        }
    }

    #[test]
    fn certificate_request_identity_and_immutability() {
        let who = Requester {
            username: "admin".into(),
            uid: "u1".into(),
            groups: vec!["system:masters".into(), "system:authenticated".into()],
            extra: Default::default(),
        };
        let mut spec = cr_spec();
        spec.username = Some("admin".into());
        spec.uid = Some("u1".into());
        spec.groups = Some(vec!["system:authenticated".into(), "system:masters".into()]);
        assert!(validate_certificate_request_create(&spec, None, Some(&who)).is_empty());
        spec.username = Some("mallory".into());
        assert_eq!(
            messages(&validate_certificate_request_create(
                &spec,
                None,
                Some(&who)
            )),
            ["spec.username: Forbidden: username identity must be that of the requester"]
        );

        let old = crate::api::CertificateRequest::new("cr", cr_spec());
        let mut new = old.clone();
        assert!(validate_certificate_request_update(&old, &new).is_empty());
        new.spec.duration = Some("2h".into());
        assert_eq!(
            messages(&validate_certificate_request_update(&old, &new)),
            ["spec: Forbidden: cannot change spec after creation"]
        );
        let mut approved = old.clone();
        approved.status = Some(CertificateRequestStatus {
            conditions: Some(vec![cond("Approved", "True")]),
            ..Default::default()
        });
        let mut denied = approved.clone();
        denied.status = Some(CertificateRequestStatus {
            conditions: Some(vec![cond("Denied", "True")]),
            ..Default::default()
        });
        assert!(validate_certificate_request_update(&old, &approved).is_empty());
        assert_eq!(
            messages(&validate_certificate_request_update(&approved, &denied)),
            ["status.conditions: Forbidden: 'Approved' condition may not be modified once set"]
        );
    }

    #[test]
    fn order_and_challenge_immutability() {
        let spec = OrderSpec {
            request: "Y3Ny".into(),
            issuer_ref: IssuerRef {
                name: "le".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(validate_order_update(&spec, &spec, None, None).is_empty());
        let mut changed = spec.clone();
        changed.request = "b3RoZXI=".into();
        assert_eq!(
            messages(&validate_order_update(&spec, &changed, None, None)),
            ["spec.request: Forbidden: field is immutable once set"]
        );
        let mut changed = spec.clone();
        changed.dns_names = Some(vec!["x".into()]);
        assert_eq!(
            messages(&validate_order_update(&spec, &changed, None, None)),
            ["spec: Forbidden: field is immutable once set"]
        );
        let with_url = OrderStatus {
            url: Some("https://acme/order/1".into()),
            ..Default::default()
        };
        assert_eq!(
            messages(&validate_order_update(
                &spec,
                &spec,
                Some(&with_url),
                Some(&OrderStatus::default())
            )),
            ["status.url: Forbidden: field is immutable once set"]
        );

        let ch = ChallengeSpec {
            token: "t".into(),
            ..Default::default()
        };
        assert!(validate_challenge_update(&ch, &ch).is_empty());
        let mut other = ch.clone();
        other.token = "u".into();
        assert_eq!(
            messages(&validate_challenge_update(&ch, &other)),
            ["spec: Forbidden: challenge spec is immutable after creation"]
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
