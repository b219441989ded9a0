//! Key manager (upstream's `certificates/keymanager`): the private key of the next revision, kept
//! in a Secret of its own until issuance ends, so every retry of one issuance signs with the
//! same key.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::{CertificateError, Observed, fail};
use crate::api::{Certificate, CertificateStatus};
use crate::pki::{KeySpec, PrivateKey};

const NEXT_KEY_LABEL: &str = "cert-manager.io/next-private-key";

/// The next private key and the name of its Secret: the stored one while it fits the spec,
/// else a new one, stored and recorded in status. Breaks when the spec asks for no valid key.
pub(super) async fn next_key(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
) -> Result<ControlFlow<Action, (PrivateKey, String)>, CertificateError> {
    let cert = seen.cert;
    if let Some(stored) = stored_key(cert, &seen.secrets, status).await? {
        return Ok(ControlFlow::Continue(stored));
    }
    let kind = match KeySpec::from_spec(&cert.spec) {
        Ok(k) => k,
        Err(e) => {
            let message = format!("Failed to generate private key: {e}");
            return fail(seen, status, &message).await.map(ControlFlow::Break);
        }
    };
    let reuse = cert
        .spec
        .private_key
        .as_ref()
        .and_then(|p| p.rotation_policy.as_deref())
        == Some("Never");
    let existing = seen
        .secret
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
    let secret_name = store_next_key(&seen.secrets, cert, &key).await?;
    status.next_private_key_secret_name = Some(secret_name.clone());
    seen.patch_status(status).await?;
    Ok(ControlFlow::Continue((key, secret_name)))
}

/// The key in the Secret status names, if that Secret still exists and holds a key of the kind
/// the spec asks for.
async fn stored_key(
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

/// Removes the next key's Secret once its issuance has ended, either way.
pub(super) async fn delete_secret(api: &Api<Secret>, name: &str) -> Result<(), kube::Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
