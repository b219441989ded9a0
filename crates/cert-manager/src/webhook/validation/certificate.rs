//! Certificate (`ValidateCertificate`): the Secret name, the issuer, the subject and names, the
//! private key and signature algorithm, durations, usages and the Secret template.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use super::{
    BadValue, ErrorList, ErrorType, FieldError, dns1123_subdomain_errors, invalid, not_supported,
    parse_duration_field, required, s, validate_issuer_ref, validate_usages,
};
use crate::api::CertificateSpec;
use crate::duration::format_go_duration;

/// Upstream's `MinimumCertificateDuration`.
pub const MIN_DURATION: Duration = Duration::from_secs(3600);
/// Upstream's `MinimumRenewBefore`.
pub const MIN_RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Upstream's `DefaultCertificateDuration` (90 days).
pub const DEFAULT_DURATION: Duration = Duration::from_secs(2160 * 3600);

/// `ValidateCertificateSpec` (CREATE and UPDATE alike).
pub fn validate_certificate_spec(spec: &CertificateSpec) -> ErrorList {
    let mut el = ErrorList::new();
    validate_secret_name(&spec.secret_name, &mut el);
    el.extend(validate_issuer_ref(&spec.issuer_ref, "spec"));
    let common_name = validate_subject(spec, &mut el);
    validate_names(spec, &common_name, &mut el);
    validate_other_names(spec, &mut el);
    let key_algorithm = validate_private_key(spec, &mut el);
    validate_signature_algorithm(spec, key_algorithm, &mut el);
    if spec.duration.is_some()
        || spec.renew_before.is_some()
        || spec.renew_before_percentage.is_some()
    {
        el.extend(validate_duration(spec));
    }
    el.extend(validate_usages(spec.usages.as_deref().unwrap_or(&[])));
    if let Some(limit) = spec.revision_history_limit
        && limit < 1
    {
        el.push(invalid(
            "spec.revisionHistoryLimit",
            BadValue::Int(limit.into()),
            "must not be less than 1",
        ));
    }
    validate_secret_template(spec, &mut el);
    validate_output_formats(spec, &mut el);
    el
}

fn validate_secret_name(name: &str, el: &mut ErrorList) {
    if name.is_empty() {
        el.push(required("spec.secretName", "must be specified"));
    } else {
        for msg in dns1123_subdomain_errors(name) {
            el.push(invalid("spec.secretName", s(name), msg));
        }
    }
}

/// A literalSubject excludes commonName and the subject fields. Returns the common name the
/// certificate will carry: the literal subject's CN if it has one, else commonName.
fn validate_subject(spec: &CertificateSpec, el: &mut ErrorList) -> String {
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
    common_name
}

/// At least one name of some kind, a common name that fits in 64 bytes, and IP and email SANs
/// that parse.
fn validate_names(spec: &CertificateSpec, common_name: &str, el: &mut ErrorList) {
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
            value: Some(s(common_name)),
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
}

/// Each otherName needs a well-formed OID and a non-empty UTF-8 value.
fn validate_other_names(spec: &CertificateSpec, el: &mut ErrorList) {
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
}

/// A signature algorithm, if set, must be one the key algorithm can make.
fn validate_signature_algorithm(spec: &CertificateSpec, key_algorithm: &str, el: &mut ErrorList) {
    let Some(sig) = spec
        .signature_algorithm
        .as_deref()
        .filter(|a| !a.is_empty())
    else {
        return;
    };
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

fn validate_secret_template(spec: &CertificateSpec, el: &mut ErrorList) {
    let Some(template) = &spec.secret_template else {
        return;
    };
    for key in template.annotations.iter().flat_map(|a| a.keys()) {
        // allow-direct-injection is the one cert-manager.io annotation a user may template:
        // it is how a Certificate's Secret opts in to cainjector's inject-ca-from-secret.
        if key.starts_with("cert-manager.io/") && key != "cert-manager.io/allow-direct-injection" {
            el.push(invalid(
                "spec.secretTemplate.annotations",
                s(key),
                "cert-manager.io/* annotations are not allowed",
            ));
        }
    }
}

/// Each additional output format type at most once.
fn validate_output_formats(spec: &CertificateSpec, el: &mut ErrorList) {
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
}

fn empty<T>(v: &Option<Vec<T>>) -> bool {
    v.as_ref().is_none_or(Vec::is_empty)
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
        validate_renew_before(rb, duration, &mut el);
    }
    if let Some(pct) = spec.renew_before_percentage {
        validate_renew_before_percentage(pct, duration, &mut el);
    }
    el
}

/// renewBefore must be at least 5m and less than the duration.
fn validate_renew_before(rb: Duration, duration: Duration, el: &mut ErrorList) {
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

/// The renewBefore a percentage gives must be at least 5m and less than the duration.
fn validate_renew_before_percentage(pct: i32, duration: Duration, el: &mut ErrorList) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CertificatePrivateKey, IssuerRef};
    use crate::webhook::validation::aggregate;
    use crate::webhook::validation::tests::messages;

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
}
