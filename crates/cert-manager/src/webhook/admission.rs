//! AdmissionReview v1 handling: `/validate` runs the field rules of [`super::validation`] for the
//! six kinds (chosen by the request's group and kind); `/mutate` stamps the requester's identity
//! into new CertificateRequests, as upstream's `certificaterequest/identity` plugin does.

use base64::Engine;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionReview, Operation};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::validation::{self, ErrorList, Requester};
use crate::api::{self, Certificate, CertificateRequest, Challenge, ClusterIssuer, Issuer, Order};

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("AdmissionReview without a request")]
    NoRequest,
}

/// What the apiserver gets back for one request.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    pub denied: Option<String>,
    /// JSON Patch operations (mutation only).
    pub patch: Vec<Value>,
}

/// Parses an AdmissionReview and answers it; `mutate` selects `/mutate` over `/validate`.
pub fn review(body: &[u8], mutate: bool) -> Result<Value, ReviewError> {
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)?;
    let request: AdmissionRequest<DynamicObject> =
        review.try_into().map_err(|_| ReviewError::NoRequest)?;
    let verdict = if mutate {
        mutate_request(&request)
    } else {
        validate_request(&request)
    };
    let mut response = json!({ "uid": request.uid, "allowed": verdict.denied.is_none() });
    if let Some(message) = verdict.denied {
        // 403 Forbidden as controller-runtime's admission.Denied answers.
        response["status"] = json!({
            "status": "Failure", "code": 403, "reason": "Forbidden", "message": message,
        });
    }
    if !verdict.patch.is_empty() {
        let patch = serde_json::to_vec(&verdict.patch)?;
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

fn decode<T: DeserializeOwned>(obj: &DynamicObject) -> Result<T, String> {
    serde_json::to_value(obj)
        .and_then(serde_json::from_value)
        .map_err(|e| format!("failed to decode object: {e}"))
}

fn requester(request: &AdmissionRequest<DynamicObject>) -> Requester {
    let info = &request.user_info;
    Requester {
        username: info.username.clone().unwrap_or_default(),
        uid: info.uid.clone().unwrap_or_default(),
        groups: info.groups.clone().unwrap_or_default(),
        extra: info.extra.clone().unwrap_or_default(),
    }
}

/// Runs the rules for the request's kind. Kinds we do not know are admitted, as upstream does.
pub fn validate_request(request: &AdmissionRequest<DynamicObject>) -> Verdict {
    let errors = match check(request) {
        Ok(errors) => errors,
        Err(message) => {
            return Verdict {
                denied: Some(message),
                patch: vec![],
            };
        }
    };
    Verdict {
        denied: (!errors.is_empty()).then(|| validation::aggregate(&errors)),
        patch: vec![],
    }
}

fn check(request: &AdmissionRequest<DynamicObject>) -> Result<ErrorList, String> {
    let update = match request.operation {
        Operation::Create => false,
        Operation::Update => true,
        _ => return Ok(vec![]),
    };
    let Some(obj) = &request.object else {
        return Ok(vec![]);
    };
    let old = || {
        request
            .old_object
            .as_ref()
            .ok_or_else(|| "oldObject missing from UPDATE request".to_string())
    };
    let kind = (request.kind.group.as_str(), request.kind.kind.as_str());
    Ok(match kind {
        (api::GROUP, "Certificate") => {
            validation::validate_certificate_spec(&decode::<Certificate>(obj)?.spec)
        }
        (api::GROUP, "CertificateRequest") => {
            let new: CertificateRequest = decode(obj)?;
            if update {
                let before: CertificateRequest = decode(old()?)?;
                validation::validate_certificate_request_update(&before, &new)
            } else {
                validation::validate_certificate_request_create(
                    &new.spec,
                    new.status.as_ref(),
                    Some(&requester(request)),
                )
            }
        }
        (api::GROUP, "Issuer") => {
            validation::validate_issuer_config(&decode::<Issuer>(obj)?.spec.config)
        }
        (api::GROUP, "ClusterIssuer") => {
            validation::validate_issuer_config(&decode::<ClusterIssuer>(obj)?.spec.config)
        }
        (api::ACME_GROUP, "Order") if update => {
            let (before, after): (Order, Order) = (decode(old()?)?, decode(obj)?);
            validation::validate_order_update(
                &before.spec,
                &after.spec,
                before.status.as_ref(),
                after.status.as_ref(),
            )
        }
        (api::ACME_GROUP, "Challenge") if update => {
            let (before, after): (Challenge, Challenge) = (decode(old()?)?, decode(obj)?);
            validation::validate_challenge_update(&before.spec, &after.spec)
        }
        _ => vec![],
    })
}

/// CertificateRequest CREATE: spec.username/uid/groups/extra become the requester's.
pub fn mutate_request(request: &AdmissionRequest<DynamicObject>) -> Verdict {
    let is_cr = request.kind.group == api::GROUP && request.kind.kind == "CertificateRequest";
    if !is_cr || request.operation != Operation::Create {
        return Verdict::default();
    }
    let Some(obj) = &request.object else {
        return Verdict::default();
    };
    let who = requester(request);
    let mut patch = vec![
        json!({"op": "add", "path": "/spec/uid", "value": who.uid}),
        json!({"op": "add", "path": "/spec/username", "value": who.username}),
        json!({"op": "add", "path": "/spec/groups", "value": who.groups}),
    ];
    let has_extra = obj.data.get("spec").and_then(|s| s.get("extra")).is_some();
    if !who.extra.is_empty() {
        patch.push(json!({"op": "add", "path": "/spec/extra", "value": who.extra}));
    } else if has_extra {
        // A client may not claim extra identity attributes it does not have.
        patch.push(json!({"op": "remove", "path": "/spec/extra"}));
    }
    Verdict {
        denied: None,
        patch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review_body(kind: &str, group: &str, op: &str, object: Value, old: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {
                "uid": "u-1",
                "kind": {"group": group, "version": "v1", "kind": kind},
                "resource": {"group": group, "version": "v1", "resource": "x"},
                "operation": op,
                "userInfo": {"username": "alice", "uid": "a-1", "groups": ["devs"]},
                "object": object,
                "oldObject": old,
            }
        }))
        .expect("json")
    }

    fn cert(duration: &str) -> Value {
        json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": "c", "namespace": "ns"},
            "spec": {"secretName": "c", "issuerRef": {"name": "le"}, "dnsNames": ["a.example"],
                     "duration": duration}
        })
    }

    #[test]
    fn validate_answers_per_kind() {
        let ok = review(
            &review_body(
                "Certificate",
                "cert-manager.io",
                "CREATE",
                cert("2h"),
                Value::Null,
            ),
            false,
        )
        .expect("review");
        assert_eq!(ok["response"]["uid"], "u-1");
        assert_eq!(ok["response"]["allowed"], true);

        let bad = review(
            &review_body(
                "Certificate",
                "cert-manager.io",
                "CREATE",
                cert("30m"),
                Value::Null,
            ),
            false,
        )
        .expect("review");
        assert_eq!(bad["response"]["allowed"], false);
        assert_eq!(
            bad["response"]["status"]["message"],
            "spec.duration: Invalid value: 30m0s: certificate duration must be greater than 1h0m0s"
        );

        // DELETE and unknown kinds are not ours to judge.
        let del = review(
            &review_body(
                "Certificate",
                "cert-manager.io",
                "DELETE",
                cert("30m"),
                Value::Null,
            ),
            false,
        )
        .expect("review");
        assert_eq!(del["response"]["allowed"], true);
        let other = review(
            &review_body("Widget", "cert-manager.io", "CREATE", json!({"apiVersion": "cert-manager.io/v1", "kind": "Widget", "metadata": {"name": "w"}}), Value::Null),
            false,
        )
        .expect("review");
        assert_eq!(other["response"]["allowed"], true);
    }

    #[test]
    fn challenge_spec_is_immutable() {
        let ch = |token: &str| {
            json!({
                "apiVersion": "acme.cert-manager.io/v1", "kind": "Challenge",
                "metadata": {"name": "c", "namespace": "ns"},
                "spec": {"url": "u", "authorizationURL": "a", "dnsName": "d", "type": "HTTP-01",
                         "token": token, "key": "k", "solver": {}, "issuerRef": {"name": "le"}}
            })
        };
        let out = review(
            &review_body(
                "Challenge",
                "acme.cert-manager.io",
                "UPDATE",
                ch("b"),
                ch("a"),
            ),
            false,
        )
        .expect("review");
        assert_eq!(
            out["response"]["status"]["message"],
            "spec: Forbidden: challenge spec is immutable after creation"
        );
    }

    #[test]
    fn mutate_sets_identity_on_certificate_request_create() {
        let cr = json!({
            "apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
            "metadata": {"name": "r", "namespace": "ns"},
            "spec": {"request": "eA==", "issuerRef": {"name": "le"}, "username": "mallory",
                     "extra": {"k": ["v"]}}
        });
        let out = review(
            &review_body(
                "CertificateRequest",
                "cert-manager.io",
                "CREATE",
                cr,
                Value::Null,
            ),
            true,
        )
        .expect("review");
        assert_eq!(out["response"]["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(out["response"]["patch"].as_str().expect("patch"))
            .expect("b64");
        let ops: Value = serde_json::from_slice(&patch).expect("json");
        assert_eq!(
            ops,
            json!([
                {"op": "add", "path": "/spec/uid", "value": "a-1"},
                {"op": "add", "path": "/spec/username", "value": "alice"},
                {"op": "add", "path": "/spec/groups", "value": ["devs"]},
                {"op": "remove", "path": "/spec/extra"},
            ])
        );
        let cert = review(
            &review_body(
                "Certificate",
                "cert-manager.io",
                "CREATE",
                cert("2h"),
                Value::Null,
            ),
            true,
        )
        .expect("review");
        assert!(cert["response"].get("patch").is_none());
    }
}
