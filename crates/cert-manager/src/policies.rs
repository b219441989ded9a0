//! The re-issue policy chain: named checks run in order; the first that fires says why the
//! Certificate needs issuing (its reason and message go into the `Issuing` condition, or into
//! `Ready=False` for the readiness chain), as upstream's `NewTriggerPolicyChain`.

use crate::api::{Certificate, CertificateRequest};
use crate::pki::{KeySpec, LeafInfo, Names, PrivateKey};

pub const DOES_NOT_EXIST: &str = "DoesNotExist";
pub const MISSING_DATA: &str = "MissingData";
pub const INVALID_KEY_PAIR: &str = "InvalidKeyPair";
pub const SECRET_MISMATCH: &str = "SecretMismatch";
pub const INCORRECT_ISSUER: &str = "IncorrectIssuer";
pub const INCORRECT_CERTIFICATE: &str = "IncorrectCertificate";
pub const REQUEST_CHANGED: &str = "RequestChanged";
pub const RENEWING: &str = "Renewing";
pub const EXPIRED: &str = "Expired";
pub const INVALID_CERTIFICATE: &str = "InvalidCertificate";

/// Why a Certificate needs (re-)issuing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// The check that fired (for logs and tests).
    pub check: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// What the checks look at.
pub struct Input<'a> {
    pub cert: &'a Certificate,
    /// `None`: the Secret does not exist.
    pub secret: Option<&'a SecretData>,
    /// The CertificateRequest of the current revision, if it still exists.
    pub current_request: Option<&'a CertificateRequest>,
    pub now: i64,
    /// `status.renewalTime` as computed for the current certificate.
    pub renewal_time: Option<i64>,
}

/// The parts of the TLS Secret the checks need.
#[derive(Clone, Debug, Default)]
pub struct SecretData {
    pub tls_crt: Option<Vec<u8>>,
    pub tls_key: Option<Vec<u8>>,
    pub annotations: std::collections::BTreeMap<String, String>,
}

type Check = fn(&Input<'_>) -> Option<Violation>;

/// The trigger chain, in upstream's order.
pub const TRIGGER_CHAIN: &[(&str, Check)] = &[
    ("SecretDoesNotExist", secret_does_not_exist),
    ("SecretIsMissingData", secret_is_missing_data),
    ("SecretPublicKeysDiffer", secret_public_keys_differ),
    (
        "SecretIssuerAnnotationsNotUpToDate",
        secret_issuer_annotations_not_up_to_date,
    ),
    (
        "SecretCertificateNameAnnotationsMismatch",
        secret_certificate_name_mismatch,
    ),
    (
        "SecretPrivateKeyMatchesSpec",
        secret_private_key_matches_spec,
    ),
    (
        "CurrentCertificateRequestNotValidForSpec",
        current_request_not_valid_for_spec,
    ),
    (
        "CurrentCertificateNearingExpiry",
        current_certificate_nearing_expiry,
    ),
];

/// The readiness chain: the same checks, but an expired certificate is reported as such and a
/// merely due renewal still counts as Ready.
pub const READINESS_CHAIN: &[(&str, Check)] = &[
    ("SecretDoesNotExist", secret_does_not_exist),
    ("SecretIsMissingData", secret_is_missing_data),
    ("SecretPublicKeysDiffer", secret_public_keys_differ),
    (
        "SecretIssuerAnnotationsNotUpToDate",
        secret_issuer_annotations_not_up_to_date,
    ),
    (
        "SecretCertificateNameAnnotationsMismatch",
        secret_certificate_name_mismatch,
    ),
    (
        "SecretPrivateKeyMatchesSpec",
        secret_private_key_matches_spec,
    ),
    (
        "CurrentCertificateRequestNotValidForSpec",
        current_request_not_valid_for_spec,
    ),
    (
        "CurrentCertificateHasExpired",
        current_certificate_has_expired,
    ),
];

/// The first violation of `chain`, if any.
pub fn evaluate(chain: &[(&'static str, Check)], input: &Input<'_>) -> Option<Violation> {
    chain.iter().find_map(|(name, check)| {
        check(input).map(|mut v| {
            v.check = name;
            v
        })
    })
}

fn violation(reason: &'static str, message: impl Into<String>) -> Option<Violation> {
    Some(Violation {
        check: "",
        reason,
        message: message.into(),
    })
}

fn leaf(input: &Input<'_>) -> Option<LeafInfo> {
    input
        .secret?
        .tls_crt
        .as_deref()
        .and_then(|c| crate::pki::leaf_info(c).ok())
}

fn key(input: &Input<'_>) -> Option<PrivateKey> {
    input
        .secret?
        .tls_key
        .as_deref()
        .and_then(|k| PrivateKey::from_pem(k).ok())
}

fn secret_does_not_exist(input: &Input<'_>) -> Option<Violation> {
    input.secret.is_none().then_some(()).and_then(|_| {
        violation(
            DOES_NOT_EXIST,
            "Issuing certificate as Secret does not exist",
        )
    })
}

fn secret_is_missing_data(input: &Input<'_>) -> Option<Violation> {
    let s = input.secret?;
    if s.tls_key.as_deref().is_none_or(<[u8]>::is_empty) {
        return violation(
            MISSING_DATA,
            "Issuing certificate as Secret does not contain a private key",
        );
    }
    if s.tls_crt.as_deref().is_none_or(<[u8]>::is_empty) {
        return violation(
            MISSING_DATA,
            "Issuing certificate as Secret does not contain a certificate",
        );
    }
    None
}

fn secret_public_keys_differ(input: &Input<'_>) -> Option<Violation> {
    let s = input.secret?;
    let Some(key) = key(input) else {
        return violation(
            INVALID_KEY_PAIR,
            "Issuing certificate as Secret contains an invalid private key",
        );
    };
    let Some(leaf) = s
        .tls_crt
        .as_deref()
        .and_then(|c| crate::pki::leaf_info(c).ok())
    else {
        return violation(
            INVALID_CERTIFICATE,
            "Issuing certificate as Secret contains an invalid certificate",
        );
    };
    match key.public_key_der() {
        Ok(pk) if pk == leaf.public_key_der => None,
        _ => violation(
            INVALID_KEY_PAIR,
            "Issuing certificate as Secret contains a private key that does not match the certificate",
        ),
    }
}

fn secret_issuer_annotations_not_up_to_date(input: &Input<'_>) -> Option<Violation> {
    let a = &input.secret?.annotations;
    let r = &input.cert.spec.issuer_ref;
    let get = |k: &str| a.get(k).map(String::as_str).unwrap_or("");
    let (name, kind, group) = (
        get("cert-manager.io/issuer-name"),
        get("cert-manager.io/issuer-kind"),
        get("cert-manager.io/issuer-group"),
    );
    // Upstream treats empty kind/group annotations as the defaults.
    let kind_ok = kind == r.kind() || (kind.is_empty() && r.kind() == "Issuer");
    let group_ok = group == r.group() || (group.is_empty() && r.group() == crate::api::GROUP);
    if name != r.name || !kind_ok || !group_ok {
        return violation(
            INCORRECT_ISSUER,
            format!("Issuing certificate as Secret was previously issued by {kind}.{group}/{name}"),
        );
    }
    None
}

fn secret_certificate_name_mismatch(input: &Input<'_>) -> Option<Violation> {
    let a = &input.secret?.annotations;
    let name = kube::ResourceExt::name_any(input.cert);
    match a.get("cert-manager.io/certificate-name") {
        Some(n) if *n != name => violation(
            INCORRECT_CERTIFICATE,
            format!(
                "Secret was issued for \"{n}\". If this message is not transient, you might have two conflicting Certificates pointing to the same secret."
            ),
        ),
        _ => None,
    }
}

fn secret_private_key_matches_spec(input: &Input<'_>) -> Option<Violation> {
    let key = key(input)?;
    let wanted = KeySpec::from_spec(&input.cert.spec).ok()?;
    let mut wrong = Vec::new();
    if key.kind.algorithm_name() != wanted.algorithm_name() {
        wrong.push("spec.privateKey.algorithm");
    } else if key.kind != wanted {
        wrong.push("spec.privateKey.size");
    }
    if wrong.is_empty() {
        None
    } else {
        violation(
            SECRET_MISMATCH,
            format!(
                "Existing private key is not up to date for spec: [{}]",
                wrong.join(" ")
            ),
        )
    }
}

fn current_request_not_valid_for_spec(input: &Input<'_>) -> Option<Violation> {
    let spec = &input.cert.spec;
    let want = Names::from_spec(spec);
    let mut diff: Vec<&str> = match input.current_request {
        Some(cr) => {
            let mut d = match crate::requests::csr_of(cr)
                .and_then(|pem| crate::pki::parse_csr(&pem).ok())
            {
                Some((names, _)) => want.differences(&names),
                None => vec!["spec.request"],
            };
            if cr.spec.issuer_ref.name != spec.issuer_ref.name
                || cr.spec.issuer_ref.kind() != spec.issuer_ref.kind()
            {
                d.push("spec.issuerRef");
            }
            if cr.spec.duration.as_deref().unwrap_or("") != spec.duration.as_deref().unwrap_or("")
                && !(cr.spec.duration.is_some() && spec.duration.is_none())
            {
                d.push("spec.duration");
            }
            if cr.spec.is_ca.unwrap_or(false) != spec.is_ca.unwrap_or(false) {
                d.push("spec.isCA");
            }
            d
        }
        // No request for this revision: compare with the certificate itself (upstream does too).
        None => match leaf(input) {
            Some(leaf) => {
                let mut have = leaf.names.clone();
                // ACME servers may add the CN as a SAN and drop the CN; only compare what the
                // spec pins down.
                if want.common_name.is_none() {
                    have.common_name = None;
                }
                let mut d = want.differences(&have);
                if want.common_name.is_none() {
                    d.retain(|f| *f != "spec.commonName");
                }
                if want.dns_names.is_empty() {
                    d.retain(|f| *f != "spec.dnsNames");
                }
                d
            }
            None => Vec::new(),
        },
    };
    diff.dedup();
    if diff.is_empty() {
        None
    } else {
        violation(
            REQUEST_CHANGED,
            format!(
                "Fields on existing CertificateRequest resource not up to date: [{}]",
                diff.join(" ")
            ),
        )
    }
}

fn current_certificate_nearing_expiry(input: &Input<'_>) -> Option<Violation> {
    let leaf = leaf(input)?;
    if leaf.not_after <= input.now {
        return violation(
            EXPIRED,
            format!(
                "Certificate expired on {}",
                crate::time::format_secs(leaf.not_after)
            ),
        );
    }
    let renewal = input
        .renewal_time
        .unwrap_or_else(|| renewal_time(input.cert, &leaf));
    if renewal <= input.now {
        return violation(
            RENEWING,
            format!(
                "Renewing certificate as renewal was scheduled at {}",
                crate::time::format_secs(renewal)
            ),
        );
    }
    None
}

fn current_certificate_has_expired(input: &Input<'_>) -> Option<Violation> {
    let leaf = leaf(input)?;
    (leaf.not_after <= input.now).then_some(()).and_then(|_| {
        violation(
            EXPIRED,
            format!(
                "Certificate expired on {}",
                crate::time::format_secs(leaf.not_after)
            ),
        )
    })
}

/// When to renew: `renewBefore` if set and shorter than the lifetime, else
/// `renewBeforePercentage`, else when a third of the actual lifetime remains.
pub fn renewal_time(cert: &Certificate, leaf: &LeafInfo) -> i64 {
    let lifetime = (leaf.not_after - leaf.not_before).max(0);
    let renew_before = cert
        .spec
        .renew_before
        .as_deref()
        .and_then(|d| crate::time::parse_go_duration(d).ok())
        .map(|d| d.as_secs() as i64)
        .filter(|rb| *rb > 0 && *rb < lifetime)
        .or_else(|| {
            cert.spec
                .renew_before_percentage
                .filter(|p| *p > 0 && *p < 100)
                .map(|p| lifetime * i64::from(p) / 100)
        })
        .unwrap_or(lifetime / 3);
    leaf.not_after - renew_before
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CertificateSpec, IssuerRef};
    use std::collections::BTreeMap;

    fn cert(spec: CertificateSpec) -> Certificate {
        let mut c = Certificate::new("web", spec);
        c.metadata.namespace = Some("ns".into());
        c
    }

    fn spec() -> CertificateSpec {
        CertificateSpec {
            secret_name: "web-tls".into(),
            issuer_ref: IssuerRef {
                name: "le".into(),
                kind: Some("ClusterIssuer".into()),
                group: None,
            },
            dns_names: Some(vec!["a.test".into()]),
            ..Default::default()
        }
    }

    /// A self-signed certificate for the names with a key of the given kind, valid [nb, na].
    fn issued(names: &[&str], kind: KeySpec, nb: i64, na: i64) -> (Vec<u8>, Vec<u8>) {
        let key = PrivateKey::generate(kind).unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.not_before = time::OffsetDateTime::from_unix_timestamp(nb).unwrap();
        params.not_after = time::OffsetDateTime::from_unix_timestamp(na).unwrap();
        let c = params.self_signed(&key.key_pair().unwrap()).unwrap();
        (
            c.pem().into_bytes(),
            key.to_pem(false).unwrap().into_bytes(),
        )
    }

    fn annotations(name: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("cert-manager.io/issuer-name".to_string(), name.to_string()),
            (
                "cert-manager.io/issuer-kind".to_string(),
                "ClusterIssuer".to_string(),
            ),
            (
                "cert-manager.io/issuer-group".to_string(),
                "cert-manager.io".to_string(),
            ),
            (
                "cert-manager.io/certificate-name".to_string(),
                "web".to_string(),
            ),
        ])
    }

    fn run(c: &Certificate, s: Option<&SecretData>, now: i64) -> Option<Violation> {
        evaluate(
            TRIGGER_CHAIN,
            &Input {
                cert: c,
                secret: s,
                current_request: None,
                now,
                renewal_time: None,
            },
        )
    }

    #[test]
    fn chain_in_order() {
        let now = 1_800_000_000;
        let c = cert(spec());
        let ec = KeySpec::Ecdsa(256);
        assert_eq!(run(&c, None, now).unwrap().check, "SecretDoesNotExist");

        let empty = SecretData::default();
        assert_eq!(run(&c, Some(&empty), now).unwrap().reason, MISSING_DATA);

        let (crt, key) = issued(&["a.test"], ec, now - 100, now + 9000);
        let (_, other_key) = issued(&["a.test"], ec, now - 100, now + 9000);
        let mismatched = SecretData {
            tls_crt: Some(crt.clone()),
            tls_key: Some(other_key),
            annotations: annotations("le"),
        };
        assert_eq!(
            run(&c, Some(&mismatched), now).unwrap().check,
            "SecretPublicKeysDiffer"
        );

        let wrong_issuer = SecretData {
            tls_crt: Some(crt.clone()),
            tls_key: Some(key.clone()),
            annotations: annotations("other"),
        };
        let v = run(&c, Some(&wrong_issuer), now).unwrap();
        assert_eq!(v.reason, INCORRECT_ISSUER);
        assert!(
            v.message.contains("ClusterIssuer.cert-manager.io/other"),
            "{}",
            v.message
        );

        // Default spec asks for RSA; this key is ECDSA.
        let good = SecretData {
            tls_crt: Some(crt.clone()),
            tls_key: Some(key.clone()),
            annotations: annotations("le"),
        };
        assert_eq!(
            run(&c, Some(&good), now).unwrap().check,
            "SecretPrivateKeyMatchesSpec"
        );

        let mut ec_spec = spec();
        ec_spec.private_key = Some(crate::api::CertificatePrivateKey {
            algorithm: Some("ECDSA".into()),
            ..Default::default()
        });
        let c = cert(ec_spec.clone());
        assert_eq!(run(&c, Some(&good), now), None);

        let mut more_names = ec_spec.clone();
        more_names.dns_names = Some(vec!["a.test".into(), "b.test".into()]);
        let v = run(&cert(more_names), Some(&good), now).unwrap();
        assert_eq!(
            (v.check, v.reason),
            ("CurrentCertificateRequestNotValidForSpec", REQUEST_CHANGED)
        );
        assert!(v.message.contains("spec.dnsNames"));

        // Two thirds through the 9100 s lifetime → renewing.
        let v = run(&c, Some(&good), now + 6100).unwrap();
        assert_eq!(v.reason, RENEWING);
        let v = run(&c, Some(&good), now + 9001).unwrap();
        assert_eq!(v.reason, EXPIRED);
        // Readiness: due renewal is still Ready; expiry is not.
        let input = Input {
            cert: &c,
            secret: Some(&good),
            current_request: None,
            now: now + 6100,
            renewal_time: None,
        };
        assert_eq!(evaluate(READINESS_CHAIN, &input), None);
    }

    #[test]
    fn renewal_time_rules() {
        let leaf = LeafInfo {
            names: Names::default(),
            not_before: 0,
            not_after: 90 * 86400,
            public_key_der: vec![],
            serial: vec![],
            authority_key_id: None,
            is_ca: false,
        };
        let mut s = spec();
        assert_eq!(renewal_time(&cert(s.clone()), &leaf), 60 * 86400);
        s.renew_before = Some("240h".into());
        assert_eq!(renewal_time(&cert(s.clone()), &leaf), 80 * 86400);
        // Longer than the lifetime: ignored.
        s.renew_before = Some("3000h".into());
        assert_eq!(renewal_time(&cert(s.clone()), &leaf), 60 * 86400);
        s.renew_before = None;
        s.renew_before_percentage = Some(50);
        assert_eq!(renewal_time(&cert(s), &leaf), 45 * 86400);
    }
}
