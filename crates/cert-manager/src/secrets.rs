//! The TLS Secret exactly as upstream writes it: type kubernetes.io/tls, `tls.crt` (leaf then
//! chain), `tls.key`, `ca.crt` only when the issuer returned a CA, the `cert-manager.io/*`
//! annotations and the `controller.cert-manager.io/fao` label, by server-side apply with
//! upstream's field manager. Nothing is written unless the pair is valid.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use crate::api::Certificate;
use crate::pki::{LeafInfo, PrivateKey};
use crate::policies::SecretData;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("refusing to write an invalid Secret: {0}")]
    Invalid(String),
}

/// Reads the parts of a TLS Secret the policy checks need.
pub fn secret_data(secret: &Secret) -> SecretData {
    let data = secret.data.clone().unwrap_or_default();
    SecretData {
        tls_crt: data.get("tls.crt").map(|b| b.0.clone()),
        tls_key: data.get("tls.key").map(|b| b.0.clone()),
        annotations: secret.annotations().clone(),
    }
}

/// CSV as upstream's `JoinWithEscapeCSV`: values with commas or quotes are quoted.
fn join_csv(values: &[String]) -> String {
    values
        .iter()
        .map(|v| {
            if v.contains([',', '"', '\n']) {
                format!("\"{}\"", v.replace('"', "\"\""))
            } else {
                v.clone()
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Annotations describing the issued certificate and its issuer.
pub fn annotations(cert: &Certificate, leaf: &LeafInfo) -> BTreeMap<String, String> {
    let r = &cert.spec.issuer_ref;
    let mut a = BTreeMap::from([
        (
            "cert-manager.io/certificate-name".to_string(),
            cert.name_any(),
        ),
        ("cert-manager.io/issuer-name".to_string(), r.name.clone()),
        (
            "cert-manager.io/issuer-kind".to_string(),
            r.kind().to_string(),
        ),
        (
            "cert-manager.io/issuer-group".to_string(),
            r.group().to_string(),
        ),
        (
            "cert-manager.io/common-name".to_string(),
            leaf.names.common_name.clone().unwrap_or_default(),
        ),
        (
            "cert-manager.io/alt-names".to_string(),
            join_csv(&leaf.names.dns_names),
        ),
        (
            "cert-manager.io/ip-sans".to_string(),
            join_csv(&leaf.names.ip_addresses),
        ),
        (
            "cert-manager.io/uri-sans".to_string(),
            join_csv(&leaf.names.uris),
        ),
    ]);
    if !leaf.names.emails.is_empty() {
        a.insert(
            "cert-manager.io/email-sans".into(),
            join_csv(&leaf.names.emails),
        );
    }
    if let Some(t) = cert
        .spec
        .secret_template
        .as_ref()
        .and_then(|t| t.annotations.clone())
    {
        for (k, v) in t {
            a.entry(k).or_insert(v);
        }
    }
    a
}

/// The leaf of `chain_pem` if it parses and carries `key`'s public key: the gate every write
/// passes, so a valid Secret is never replaced by a broken pair.
pub fn validate_pair(key: &PrivateKey, chain_pem: &str) -> Result<LeafInfo, SecretError> {
    let leaf = crate::pki::leaf_info(chain_pem.as_bytes())
        .map_err(|e| SecretError::Invalid(e.to_string()))?;
    let public = key
        .public_key_der()
        .map_err(|e| SecretError::Invalid(e.to_string()))?;
    if public != leaf.public_key_der {
        return Err(SecretError::Invalid(
            "the certificate does not match the private key".into(),
        ));
    }
    Ok(leaf)
}

/// Writes the issued pair into the Certificate's Secret.
pub async fn write(
    client: &Client,
    cert: &Certificate,
    key: &PrivateKey,
    chain_pem: &str,
    ca_pem: Option<&str>,
    owner_ref: bool,
) -> Result<(), SecretError> {
    let leaf = validate_pair(key, chain_pem)?;
    let key_pem = key
        .to_pem(crate::pki::pkcs8_requested(&cert.spec))
        .map_err(|e| SecretError::Invalid(e.to_string()))?;
    let ns = cert.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let existing = api.get_opt(&cert.spec.secret_name).await?;

    let mut labels = BTreeMap::from([(
        "controller.cert-manager.io/fao".to_string(),
        "true".to_string(),
    )]);
    if let Some(t) = cert
        .spec
        .secret_template
        .as_ref()
        .and_then(|t| t.labels.clone())
    {
        for (k, v) in t {
            labels.entry(k).or_insert(v);
        }
    }
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let mut data = serde_json::Map::new();
    data.insert("tls.crt".into(), json!(b64(chain_pem)));
    data.insert("tls.key".into(), json!(b64(&key_pem)));
    if let Some(ca) = ca_pem.filter(|c| !c.is_empty()) {
        data.insert("ca.crt".into(), json!(b64(ca)));
    }
    let mut body = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": cert.spec.secret_name,
            "namespace": ns,
            "labels": labels,
            "annotations": annotations(cert, &leaf),
        },
        "data": data,
    });
    // type is immutable: set it only when creating, and keep an existing Secret's type.
    match &existing {
        None => body["type"] = json!("kubernetes.io/tls"),
        Some(s) => {
            if let Some(t) = &s.type_ {
                body["type"] = json!(t);
            }
        }
    }
    if owner_ref && let Some(o) = crate::http01::owner_ref(cert) {
        body["metadata"]["ownerReferences"] = json!([o]);
    }
    api.patch(
        &cert.spec.secret_name,
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::KeySpec;

    #[test]
    fn only_matching_parseable_pairs_pass() {
        let key = PrivateKey::generate(KeySpec::Ecdsa(256)).unwrap();
        let other = PrivateKey::generate(KeySpec::Ecdsa(256)).unwrap();
        let params = rcgen::CertificateParams::new(vec!["a.test".to_string()]).unwrap();
        let cert = params.self_signed(&key.key_pair().unwrap()).unwrap().pem();
        assert!(validate_pair(&key, &cert).is_ok());
        assert!(matches!(
            validate_pair(&other, &cert),
            Err(SecretError::Invalid(_))
        ));
        assert!(matches!(
            validate_pair(&key, "garbage"),
            Err(SecretError::Invalid(_))
        ));
        assert!(matches!(
            validate_pair(&key, ""),
            Err(SecretError::Invalid(_))
        ));
    }

    #[test]
    fn csv_escaping() {
        assert_eq!(super::join_csv(&["a".into(), "b".into()]), "a,b");
        assert_eq!(super::join_csv(&["a,b".into(), "c".into()]), "\"a,b\",c");
        assert_eq!(super::join_csv(&[]), "");
    }
}
