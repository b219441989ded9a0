//! Request manager (upstream's `certificates/requestmanager`): the CertificateRequest
//! `<name>-<revision + 1>` for the next key and the current spec. A request for another key or
//! an older spec is replaced; old revisions are pruned after issuance (upstream's
//! `revisionmanager`).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::Duration;

use base64::Engine;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use super::{CertificateError, Observed, fail};
use crate::api::{Certificate, CertificateRequest, CertificateRequestSpec, CertificateStatus};
use crate::pki::{Names, PrivateKey};
use crate::requests;

/// Annotation prefixes not copied from a Certificate to its requests (as upstream).
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/",
    "fluxcd.io/",
    "argocd.argoproj.io/",
];

/// Whether a request still asks for what the spec asks for (names, issuer, duration, key kind).
pub(super) fn matches_spec(cr: &CertificateRequest, cert: &Certificate) -> bool {
    let Some((names, _)) = requests::csr_of(cr).and_then(|pem| crate::pki::parse_csr(&pem).ok())
    else {
        return false;
    };
    Names::from_spec(&cert.spec).differences(&names).is_empty()
        && cr.spec.issuer_ref.name == cert.spec.issuer_ref.name
        && cr.spec.issuer_ref.kind() == cert.spec.issuer_ref.kind()
        && cr.spec.duration == cert.spec.duration
}

/// The next revision's request once it exists for this key and spec; creating or replacing
/// one breaks, since the request's own events bring the next pass.
pub(super) async fn next_request(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
    key: &PrivateKey,
    key_secret: &str,
) -> Result<ControlFlow<Action, CertificateRequest>, CertificateError> {
    let Some(cr) = seen.requests.get_opt(&seen.next_name()).await? else {
        return create(seen, status, key, key_secret)
            .await
            .map(ControlFlow::Break);
    };
    // A request for another key or an older spec is replaced.
    let cr_key = requests::csr_of(&cr)
        .and_then(|pem| crate::pki::parse_csr(&pem).ok())
        .map(|(_, pk)| pk);
    if cr_key != key.public_key_der().ok() || !matches_spec(&cr, seen.cert) {
        delete_request(&seen.requests, &cr).await?;
        return Ok(ControlFlow::Break(Action::requeue(Duration::from_millis(
            200,
        ))));
    }
    Ok(ControlFlow::Continue(cr))
}

async fn create(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
    key: &PrivateKey,
    key_secret: &str,
) -> Result<Action, CertificateError> {
    let csr = match crate::pki::csr_pem(&seen.cert.spec, key) {
        Ok(c) => c,
        Err(e) => return fail(seen, status, &format!("Failed to build the CSR: {e}")).await,
    };
    let next_name = seen.next_name();
    let cr = request(seen, &csr, key_secret);
    match seen.requests.create(&PostParams::default(), &cr).await {
        Ok(_) => {
            seen.event(
                EventType::Normal,
                "Requested",
                "Request",
                format!("Created new CertificateRequest resource {next_name:?}"),
            )
            .await;
        }
        // Created meanwhile by a concurrent pass: the request exists, which is all we need.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(Action::await_change())
}

/// The request of the next revision: the CSR, the spec's issuer, duration and usages, and the
/// annotations that tie it to its Certificate, revision and key.
fn request(seen: &Observed<'_>, csr: &str, key_secret: &str) -> CertificateRequest {
    let cert = seen.cert;
    let mut annotations: BTreeMap<String, String> = cert
        .annotations()
        .iter()
        .filter(|(k, _)| !NOT_COPIED.iter().any(|p| k.starts_with(p)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    annotations.insert("cert-manager.io/certificate-name".into(), seen.name.clone());
    annotations.insert(
        "cert-manager.io/certificate-revision".into(),
        (seen.revision + 1).to_string(),
    );
    annotations.insert(
        "cert-manager.io/private-key-secret-name".into(),
        key_secret.to_string(),
    );
    let mut cr =
        CertificateRequest::new(
            &seen.next_name(),
            CertificateRequestSpec {
                duration: cert.spec.duration.clone(),
                issuer_ref: cert.spec.issuer_ref.clone(),
                request: base64::engine::general_purpose::STANDARD.encode(csr.as_bytes()),
                is_ca: cert.spec.is_ca,
                usages: Some(cert.spec.usages.clone().unwrap_or_else(|| {
                    vec!["digital signature".into(), "key encipherment".into()]
                })),
                ..Default::default()
            },
        );
    cr.metadata.namespace = Some(seen.ns.clone());
    cr.metadata.annotations = Some(annotations);
    cr.metadata.labels = Some(cert.labels().clone());
    cr.metadata.owner_references = cert.controller_owner_ref(&()).map(|o| vec![o]);
    cr
}

pub(super) async fn delete_request(
    api: &Api<CertificateRequest>,
    cr: &CertificateRequest,
) -> Result<(), kube::Error> {
    match api
        .delete(&cr.name_any(), &DeleteParams::background())
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

/// Keeps the newest `revisionHistoryLimit` (default 1) requests of this Certificate.
pub(super) async fn prune_requests(
    api: &Api<CertificateRequest>,
    cert: &Certificate,
    current: i32,
) -> Result<(), kube::Error> {
    let limit = cert
        .spec
        .revision_history_limit
        .filter(|l| *l > 0)
        .unwrap_or(1);
    let uid = cert.uid().unwrap_or_default();
    let list = api.list(&ListParams::default()).await?;
    for cr in list {
        let owned = cr
            .owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true));
        let rev = cr
            .annotations()
            .get("cert-manager.io/certificate-revision")
            .and_then(|r| r.parse::<i32>().ok());
        if owned && rev.is_some_and(|r| r <= current - limit) {
            delete_request(api, &cr).await?;
        }
    }
    Ok(())
}
