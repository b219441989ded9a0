//! Issuing (upstream's `certificates/issuing`): a temporary certificate while the real one is on
//! its way, if asked for; then the issued chain and the next key into the target Secret and the
//! revision bump, or a failed attempt recorded for the trigger's backoff.

use std::time::Duration;

use base64::Engine;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::{
    CertificateError, ISSUING, Observed, fail, key_manager, readiness, remove, request_manager, set,
};
use crate::api::{CertificateRequest, CertificateStatus};
use crate::pki::PrivateKey;
use crate::policies::{self, SecretData};
use crate::requests;
use crate::secrets::{self, SecretError};

/// Upstream's edit-in-place asks for a stand-in certificate while the real one is issued,
/// written only where there is no usable pair (never over a valid certificate).
pub(super) async fn temporary_certificate(
    seen: &Observed<'_>,
    key: &PrivateKey,
) -> Result<(), CertificateError> {
    let cert = seen.cert;
    let temporary = cert
        .annotations()
        .get("cert-manager.io/issue-temporary-certificate")
        .map(String::as_str)
        == Some("true");
    if !temporary || usable(seen.secret.as_ref()) {
        return Ok(());
    }
    let chain = crate::pki::temporary_certificate(&cert.spec, key)?;
    let owner_ref = seen.ctx.args.enable_certificate_owner_ref;
    match secrets::write(&seen.ctx.client, cert, key, &chain, None, owner_ref).await {
        Ok(()) => {
            seen.event(
                EventType::Normal,
                "Issuing",
                "Temporary",
                "Issued temporary certificate".into(),
            )
            .await;
        }
        Err(SecretError::Kube(e)) => return Err(e.into()),
        Err(SecretError::Invalid(e)) => {
            tracing::warn!(certificate = %seen.name, error = %e, "temporary certificate not written")
        }
    }
    Ok(())
}

/// Whether the Secret holds a key and a certificate that belong together.
fn usable(secret: Option<&SecretData>) -> bool {
    secret.is_some_and(|s| {
        let key = s
            .tls_key
            .as_deref()
            .and_then(|k| PrivateKey::from_pem(k).ok());
        let crt = s
            .tls_crt
            .as_deref()
            .and_then(|c| String::from_utf8(c.to_vec()).ok());
        matches!((key, crt), (Some(k), Some(c)) if secrets::validate_pair(&k, &c).is_ok())
    })
}

/// Ends the issuance once the request has ended: issued, the Secret and the revision bump;
/// failed, a failed attempt. Otherwise waits for the request to change.
pub(super) async fn complete(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
    key: &PrivateKey,
    key_secret: &str,
    cr: &CertificateRequest,
) -> Result<Action, CertificateError> {
    if requests::is_issued(cr) {
        return issued(seen, status, key, key_secret, cr).await;
    }
    if requests::is_final(cr) {
        let msg = requests::failure_message(cr).unwrap_or_default();
        key_manager::delete_secret(&seen.secrets, key_secret).await?;
        status.next_private_key_secret_name = None;
        let message =
            format!("The certificate request has failed to complete and will be retried: {msg}");
        return fail(seen, status, &message).await;
    }
    Ok(Action::await_change())
}

async fn issued(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
    key: &PrivateKey,
    key_secret: &str,
    cr: &CertificateRequest,
) -> Result<Action, CertificateError> {
    let (chain, ca) = issued_pem(cr);
    let owner_ref = seen.ctx.args.enable_certificate_owner_ref;
    match secrets::write(
        &seen.ctx.client,
        seen.cert,
        key,
        &chain,
        ca.as_deref(),
        owner_ref,
    )
    .await
    {
        Ok(()) => {}
        Err(SecretError::Invalid(e)) => {
            let message = format!("The issued certificate is not usable: {e}");
            return fail(seen, status, &message).await;
        }
        Err(SecretError::Kube(e)) => return Err(e.into()),
    }
    key_manager::delete_secret(&seen.secrets, key_secret).await?;
    bump_revision(seen, status, &chain);
    seen.patch_status(status).await?;
    // Ready is written here, before the next readiness pass: the metrics say so now.
    seen.ctx.metrics.observe_certificate(seen.cert, status);
    let revision = seen.revision + 1;
    tracing::info!(certificate = %seen.name, namespace = %seen.ns, revision, "issued");
    seen.event(
        EventType::Normal,
        "Issuing",
        "Issued",
        "The certificate has been successfully issued".into(),
    )
    .await;
    request_manager::prune_requests(&seen.requests, seen.cert, revision).await?;
    Ok(Action::requeue(Duration::from_millis(100)))
}

/// The chain and CA a request was issued with (base64 PEM in its status).
fn issued_pem(cr: &CertificateRequest) -> (String, Option<String>) {
    let decode = |b: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(b)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
    };
    let status = cr.status.as_ref();
    let chain = status
        .and_then(|s| s.certificate.as_deref())
        .and_then(decode)
        .unwrap_or_default();
    let ca = status.and_then(|s| s.ca.as_deref()).and_then(decode);
    (chain, ca)
}

/// Status after a successful issuance: the next revision, no key pending, the failure count
/// cleared, Issuing gone and Ready=True with the new certificate's times.
fn bump_revision(seen: &Observed<'_>, status: &mut CertificateStatus, chain: &str) {
    status.revision = Some(seen.revision + 1);
    status.next_private_key_secret_name = None;
    status.failed_issuance_attempts = None;
    status.last_failure_time = None;
    remove(status, ISSUING);
    if let Ok(l) = crate::pki::leaf_info(chain.as_bytes()) {
        let renewal = policies::renewal_time(seen.cert, &l);
        readiness::record_times(status, &l, Some(renewal));
    }
    set(status, readiness::up_to_date(), seen.generation());
}
