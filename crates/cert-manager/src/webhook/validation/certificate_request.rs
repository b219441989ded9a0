//! CertificateRequest (`ValidateCertificateRequest`, `ValidateUpdateCertificateRequest`): the
//! issuer, a CSR whose signature verifies, usages, the Approved/Denied conditions, and the
//! requester's identity, which the mutating webhook stamps on CREATE.

use std::collections::BTreeSet;

use base64::Engine;
use x509_parser::prelude::FromDer;

use super::{
    ErrorList, forbidden, invalid, parse_duration_field, required, s, validate_issuer_ref,
    validate_usages,
};
use crate::api::{CertificateRequestSpec, CertificateRequestStatus, Condition};

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
    el.extend(validate_usages(spec.usages.as_deref().unwrap_or(&[])));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IssuerRef;
    use crate::webhook::validation::tests::messages;

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
}
