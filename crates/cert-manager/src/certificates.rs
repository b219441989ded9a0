//! Certificates: trigger (policy chain + failure backoff), key manager (next private key
//! Secret), request manager (`<name>-<revision>` CertificateRequest), issuing (the Secret) and
//! readiness (Ready condition, renewal time), in one reconcile, as upstream's five controllers
//! do between them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::api::{
    Certificate, CertificateRequest, CertificateRequestSpec, CertificateStatus, Condition,
    condition, new_condition, set_condition,
};
use crate::context::Context;
use crate::pki::{KeySpec, Names, PrivateKey};
use crate::policies::{self, Input, READINESS_CHAIN, TRIGGER_CHAIN};
use crate::requests;
use crate::secrets::{self, SecretError};

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("private key: {0}")]
    Key(#[from] crate::pki::PkiError),
    #[error("key generation task failed")]
    Join,
}

pub const ISSUING: &str = "Issuing";
pub const READY: &str = "Ready";
const NEXT_KEY_LABEL: &str = "cert-manager.io/next-private-key";
/// Annotation prefixes not copied from a Certificate to its requests (as upstream).
const NOT_COPIED: &[&str] = &[
    "kubectl.kubernetes.io/",
    "fluxcd.io/",
    "argocd.argoproj.io/",
];

fn conditions(status: &CertificateStatus) -> &[Condition] {
    status.conditions.as_deref().unwrap_or(&[])
}

async fn patch_status(
    ctx: &Context,
    cert: &Certificate,
    status: &CertificateStatus,
) -> Result<(), kube::Error> {
    crate::status::apply(&ctx.client, cert, status).await
}

async fn event(
    ctx: &Context,
    cert: &Certificate,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    kube_common::events::publish(
        &ctx.recorder,
        &cert.object_ref(&()),
        type_,
        reason,
        action,
        note,
    )
    .await;
}

fn set(status: &mut CertificateStatus, c: Condition, generation: Option<i64>) {
    let mut conds = status.conditions.take().unwrap_or_default();
    let mut c = c;
    c.observed_generation = generation;
    set_condition(&mut conds, c, &crate::time::now());
    status.conditions = Some(conds);
}

fn remove(status: &mut CertificateStatus, type_: &str) {
    if let Some(c) = status.conditions.as_mut() {
        c.retain(|c| c.type_ != type_);
    }
}

/// When a failed issuance may be retried: `min(min·2^(n−1), max)` after the last failure.
pub fn backoff_until(status: &CertificateStatus, min: Duration, max: Duration) -> Option<i64> {
    let n = status.failed_issuance_attempts.filter(|n| *n > 0)?;
    let last = status
        .last_failure_time
        .as_deref()
        .and_then(crate::time::parse_secs)?;
    let factor = 2u32.saturating_pow((n - 1).min(30) as u32);
    let delay = min.saturating_mul(factor).min(max);
    Some(last + delay.as_secs() as i64)
}

/// Whether a request still asks for what the spec asks for (names, issuer, duration, key kind).
fn request_matches_spec(cr: &CertificateRequest, cert: &Certificate) -> bool {
    let Some((names, _)) = requests::csr_of(cr).and_then(|pem| crate::pki::parse_csr(&pem).ok())
    else {
        return false;
    };
    Names::from_spec(&cert.spec).differences(&names).is_empty()
        && cr.spec.issuer_ref.name == cert.spec.issuer_ref.name
        && cr.spec.issuer_ref.kind() == cert.spec.issuer_ref.kind()
        && cr.spec.duration == cert.spec.duration
}

pub async fn reconcile(
    cert: Arc<Certificate>,
    ctx: Arc<Context>,
) -> Result<Action, CertificateError> {
    ctx.metrics.sync_call("certificates");
    // Work from the stored object, not the cache: an owned object's event can arrive before
    // our own last status write is in the cache, and acting on that would repeat work.
    let api: Api<Certificate> =
        Api::namespaced(ctx.client.clone(), &cert.namespace().unwrap_or_default());
    let Some(cert) = api.get_opt(&cert.name_any()).await? else {
        ctx.metrics.forget_certificate(&cert);
        return Ok(Action::await_change());
    };
    let result = sync(&cert, &ctx).await;
    if result.is_err() {
        ctx.metrics.sync_error("certificates");
    }
    result
}

async fn sync(cert: &Certificate, ctx: &Context) -> Result<Action, CertificateError> {
    let ns = cert.namespace().unwrap_or_default();
    let name = cert.name_any();
    if cert.meta().deletion_timestamp.is_some() {
        ctx.metrics.forget_certificate(cert);
        return Ok(Action::await_change());
    }
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let crs: Api<CertificateRequest> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = secrets_api.get_opt(&cert.spec.secret_name).await?;
    let sdata = secret.as_ref().map(secrets::secret_data);
    let mut status = cert.status.clone().unwrap_or_default();
    let revision = status.revision.unwrap_or(0);
    let current_cr = match status.revision {
        Some(r) => crs.get_opt(&format!("{name}-{r}")).await?,
        None => None,
    };
    let now = crate::time::now_secs();
    let leaf = sdata
        .as_ref()
        .and_then(|s| s.tls_crt.as_deref())
        .and_then(|c| crate::pki::leaf_info(c).ok());
    let issuing = condition(conditions(&status), ISSUING).is_some_and(Condition::is_true);
    let mut renewal = leaf.as_ref().map(|l| policies::renewal_time(cert, l));
    if let (Some(l), Some(r), false) = (&leaf, renewal, issuing)
        && cert.spec.issuer_ref.group() == crate::api::GROUP
        && let Some(suggested) = ctx.ari.suggested_renewal(ctx, cert, l).await
    {
        renewal = Some(r.min(suggested));
    }
    let input = Input {
        cert,
        secret: sdata.as_ref(),
        current_request: current_cr.as_ref(),
        now,
        renewal_time: renewal,
    };
    let generation = cert.metadata.generation;
    let next_name = format!("{name}-{}", revision + 1);

    if !issuing {
        let mut requeue_at = None;
        if let Some(v) = policies::evaluate(TRIGGER_CHAIN, &input) {
            let next_cr = crs.get_opt(&next_name).await?;
            let spec_unchanged = next_cr
                .as_ref()
                .is_some_and(|cr| request_matches_spec(cr, cert));
            let until = backoff_until(
                &status,
                ctx.args.certificate_request_minimum_backoff_duration,
                ctx.args.certificate_request_maximum_backoff_duration,
            );
            match until {
                Some(t) if now < t && spec_unchanged => requeue_at = Some(t),
                _ => {
                    // A failed request of an earlier attempt makes way for a fresh one.
                    if let Some(cr) = next_cr {
                        delete_request(&crs, &cr).await?;
                    }
                    set(
                        &mut status,
                        new_condition(ISSUING, true, v.reason, v.message.clone()),
                        generation,
                    );
                    readiness(&input, &mut status, leaf.as_ref(), renewal, generation);
                    patch_status(ctx, cert, &status).await?;
                    tracing::info!(certificate = %name, namespace = %ns, check = v.check, reason = v.reason, "issuing");
                    event(ctx, cert, EventType::Normal, "Issuing", v.reason, v.message).await;
                    return Ok(Action::requeue(Duration::from_millis(100)));
                }
            }
        }
        readiness(&input, &mut status, leaf.as_ref(), renewal, generation);
        if cert.status.as_ref() != Some(&status) {
            patch_status(ctx, cert, &status).await?;
        }
        let mut c = cert.clone();
        c.status = Some(status);
        ctx.metrics.observe_certificate(&c);
        let wake = [renewal, leaf.as_ref().map(|l| l.not_after), requeue_at]
            .into_iter()
            .flatten()
            .filter(|t| *t > now)
            .min();
        return Ok(match wake {
            // Re-check a little after the moment, and at least daily (clock changes, ARI).
            Some(t) => Action::requeue(Duration::from_secs(((t - now) as u64 + 1).min(86_400))),
            None => Action::requeue(Duration::from_secs(86_400)),
        });
    }

    // Issuing: the next private key.
    let (key, key_secret) = match next_key(cert, &secrets_api, &status).await? {
        Some(k) => k,
        None => {
            let kind = match KeySpec::from_spec(&cert.spec) {
                Ok(k) => k,
                Err(e) => {
                    return fail(
                        ctx,
                        cert,
                        status,
                        &format!("Failed to generate private key: {e}"),
                        generation,
                    )
                    .await;
                }
            };
            let reuse = cert
                .spec
                .private_key
                .as_ref()
                .and_then(|p| p.rotation_policy.as_deref())
                == Some("Never");
            let existing = sdata
                .as_ref()
                .and_then(|s| s.tls_key.as_deref())
                .and_then(|k| PrivateKey::from_pem(k).ok())
                .filter(|k| k.kind == kind);
            let key = match (reuse, existing) {
                (true, Some(k)) => k,
                _ => tokio::task::spawn_blocking(move || PrivateKey::generate(kind))
                    .await
                    .map_err(|_| CertificateError::Join)??,
            };
            let secret_name = store_next_key(&secrets_api, cert, &key).await?;
            status.next_private_key_secret_name = Some(secret_name.clone());
            patch_status(ctx, cert, &status).await?;
            (key, secret_name)
        }
    };

    // Upstream's edit-in-place asks for a stand-in certificate while the real one is issued,
    // written only where there is no usable pair (never over a valid certificate).
    let temporary = cert
        .annotations()
        .get("cert-manager.io/issue-temporary-certificate")
        .map(String::as_str)
        == Some("true");
    let usable = sdata.as_ref().is_some_and(|s| {
        let key = s
            .tls_key
            .as_deref()
            .and_then(|k| PrivateKey::from_pem(k).ok());
        let crt = s
            .tls_crt
            .as_deref()
            .and_then(|c| String::from_utf8(c.to_vec()).ok());
        matches!((key, crt), (Some(k), Some(c)) if secrets::validate_pair(&k, &c).is_ok())
    });
    if temporary && !usable {
        let chain = crate::pki::temporary_certificate(&cert.spec, &key)?;
        match secrets::write(
            &ctx.client,
            cert,
            &key,
            &chain,
            None,
            ctx.args.enable_certificate_owner_ref,
        )
        .await
        {
            Ok(()) => {
                event(
                    ctx,
                    cert,
                    EventType::Normal,
                    "Issuing",
                    "Temporary",
                    "Issued temporary certificate".into(),
                )
                .await;
            }
            Err(SecretError::Kube(e)) => return Err(e.into()),
            Err(SecretError::Invalid(e)) => {
                tracing::warn!(certificate = %name, error = %e, "temporary certificate not written")
            }
        }
    }

    // The request for the next revision.
    let Some(cr) = crs.get_opt(&next_name).await? else {
        let csr = match crate::pki::csr_pem(&cert.spec, &key) {
            Ok(c) => c,
            Err(e) => {
                return fail(
                    ctx,
                    cert,
                    status,
                    &format!("Failed to build the CSR: {e}"),
                    generation,
                )
                .await;
            }
        };
        let mut annotations: BTreeMap<String, String> = cert
            .annotations()
            .iter()
            .filter(|(k, _)| !NOT_COPIED.iter().any(|p| k.starts_with(p)))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        annotations.insert("cert-manager.io/certificate-name".into(), name.clone());
        annotations.insert(
            "cert-manager.io/certificate-revision".into(),
            (revision + 1).to_string(),
        );
        annotations.insert(
            "cert-manager.io/private-key-secret-name".into(),
            key_secret.clone(),
        );
        let mut cr = CertificateRequest::new(
            &next_name,
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
        cr.metadata.namespace = Some(ns.clone());
        cr.metadata.annotations = Some(annotations);
        cr.metadata.labels = Some(cert.labels().clone());
        cr.metadata.owner_references = cert.controller_owner_ref(&()).map(|o| vec![o]);
        match crs.create(&PostParams::default(), &cr).await {
            Ok(_) => {
                event(
                    ctx,
                    cert,
                    EventType::Normal,
                    "Requested",
                    "Request",
                    format!("Created new CertificateRequest resource {next_name:?}"),
                )
                .await;
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(Action::await_change());
    };

    // A request for another key or an older spec is replaced.
    let cr_key = requests::csr_of(&cr)
        .and_then(|pem| crate::pki::parse_csr(&pem).ok())
        .map(|(_, pk)| pk);
    if cr_key != key.public_key_der().ok() || !request_matches_spec(&cr, cert) {
        delete_request(&crs, &cr).await?;
        return Ok(Action::requeue(Duration::from_millis(200)));
    }

    if requests::is_issued(&cr) {
        let chain = cr
            .status
            .as_ref()
            .and_then(|s| s.certificate.as_deref())
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok())
            .unwrap_or_default();
        let ca = cr
            .status
            .as_ref()
            .and_then(|s| s.ca.as_deref())
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        match secrets::write(
            &ctx.client,
            cert,
            &key,
            &chain,
            ca.as_deref(),
            ctx.args.enable_certificate_owner_ref,
        )
        .await
        {
            Ok(()) => {}
            Err(SecretError::Invalid(e)) => {
                return fail(
                    ctx,
                    cert,
                    status,
                    &format!("The issued certificate is not usable: {e}"),
                    generation,
                )
                .await;
            }
            Err(SecretError::Kube(e)) => return Err(e.into()),
        }
        delete_secret(&secrets_api, &key_secret).await?;
        let issued_leaf = crate::pki::leaf_info(chain.as_bytes()).ok();
        status.revision = Some(revision + 1);
        status.next_private_key_secret_name = None;
        status.failed_issuance_attempts = None;
        status.last_failure_time = None;
        remove(&mut status, ISSUING);
        if let Some(l) = &issued_leaf {
            let renewal = policies::renewal_time(cert, l);
            status.not_before = Some(crate::time::format_secs(l.not_before));
            status.not_after = Some(crate::time::format_secs(l.not_after));
            status.renewal_time = Some(crate::time::format_secs(renewal));
        }
        set(
            &mut status,
            new_condition(
                READY,
                true,
                "Ready",
                "Certificate is up to date and has not expired",
            ),
            generation,
        );
        patch_status(ctx, cert, &status).await?;
        tracing::info!(certificate = %name, namespace = %ns, revision = revision + 1, "issued");
        event(
            ctx,
            cert,
            EventType::Normal,
            "Issuing",
            "Issued",
            "The certificate has been successfully issued".into(),
        )
        .await;
        prune_requests(&crs, cert, revision + 1).await?;
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    if requests::is_final(&cr) {
        let msg = requests::failure_message(&cr).unwrap_or_default();
        delete_secret(&secrets_api, &key_secret).await?;
        status.next_private_key_secret_name = None;
        return fail(
            ctx,
            cert,
            status,
            &format!("The certificate request has failed to complete and will be retried: {msg}"),
            generation,
        )
        .await;
    }
    Ok(Action::await_change())
}

/// Records a failed issuance: Issuing=False, one more failed attempt, backoff from now.
async fn fail(
    ctx: &Context,
    cert: &Certificate,
    mut status: CertificateStatus,
    message: &str,
    generation: Option<i64>,
) -> Result<Action, CertificateError> {
    tracing::warn!(certificate = %cert.name_any(), namespace = ?cert.namespace(), message, "issuance failed");
    status.failed_issuance_attempts = Some(status.failed_issuance_attempts.unwrap_or(0) + 1);
    status.last_failure_time = Some(crate::time::now());
    set(
        &mut status,
        new_condition(ISSUING, false, "Failed", message),
        generation,
    );
    patch_status(ctx, cert, &status).await?;
    event(
        ctx,
        cert,
        EventType::Warning,
        "Failed",
        "Fail",
        message.to_string(),
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// The Ready condition and the timestamps in status, from the readiness chain.
fn readiness(
    input: &Input<'_>,
    status: &mut CertificateStatus,
    leaf: Option<&crate::pki::LeafInfo>,
    renewal: Option<i64>,
    generation: Option<i64>,
) {
    match policies::evaluate(READINESS_CHAIN, input) {
        Some(v) => set(
            status,
            new_condition(READY, false, v.reason, v.message),
            generation,
        ),
        None => set(
            status,
            new_condition(
                READY,
                true,
                "Ready",
                "Certificate is up to date and has not expired",
            ),
            generation,
        ),
    }
    if let Some(l) = leaf {
        status.not_before = Some(crate::time::format_secs(l.not_before));
        status.not_after = Some(crate::time::format_secs(l.not_after));
        status.renewal_time = renewal.map(crate::time::format_secs);
    }
}

async fn next_key(
    cert: &Certificate,
    secrets_api: &Api<Secret>,
    status: &CertificateStatus,
) -> Result<Option<(PrivateKey, String)>, CertificateError> {
    let Some(name) = status.next_private_key_secret_name.as_deref() else {
        return Ok(None);
    };
    let Some(secret) = secrets_api.get_opt(name).await? else {
        return Ok(None);
    };
    let key = secret
        .data
        .as_ref()
        .and_then(|d| d.get("tls.key"))
        .and_then(|k| PrivateKey::from_pem(&k.0).ok());
    // A key of the wrong kind (spec changed) is replaced.
    Ok(key
        .filter(|k| KeySpec::from_spec(&cert.spec).is_ok_and(|want| want == k.kind))
        .map(|k| (k, name.to_string())))
}

async fn store_next_key(
    secrets_api: &Api<Secret>,
    cert: &Certificate,
    key: &PrivateKey,
) -> Result<String, CertificateError> {
    let secret = Secret {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", cert.name_any())),
            labels: Some(BTreeMap::from([
                (NEXT_KEY_LABEL.to_string(), "true".to_string()),
                (
                    "controller.cert-manager.io/fao".to_string(),
                    "true".to_string(),
                ),
            ])),
            owner_references: cert.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "tls.key".to_string(),
            ByteString(key.to_pem(true)?.into_bytes()),
        )])),
        ..Default::default()
    };
    let created = secrets_api.create(&PostParams::default(), &secret).await?;
    Ok(created.name_any())
}

async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}

async fn delete_request(
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
async fn prune_requests(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let min = Duration::from_secs(3600);
        let max = Duration::from_secs(32 * 3600);
        let at = |n: i32| {
            let s = CertificateStatus {
                failed_issuance_attempts: Some(n),
                last_failure_time: Some(crate::time::format_secs(0)),
                ..Default::default()
            };
            backoff_until(&s, min, max).unwrap() / 3600
        };
        assert_eq!(
            [at(1), at(2), at(3), at(6), at(7), at(40)],
            [1, 2, 4, 32, 32, 32]
        );
        assert_eq!(backoff_until(&CertificateStatus::default(), min, max), None);
    }
}
