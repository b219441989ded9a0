//! The webhook's serving certificate, as upstream's `DynamicAuthority` + `DynamicSource`: a
//! self-managed CA kept in a Secret (created when missing, regenerated when invalid or 2/3
//! through its life) signs a short-lived leaf for the Service's DNS names. cainjector copies the
//! Secret's `ca.crt` into the webhook configurations, so the apiserver trusts the leaf.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

pub const CA_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
pub const LEAF_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const CA_COMMON_NAME: &str = "cert-manager-webhook-ca";
pub const ALLOW_DIRECT_INJECTION: &str = "cert-manager.io/allow-direct-injection";
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "cert-manager-webhook";

/// How often to look again when nothing else wakes the loop (a missed watch event, a clock jump).
const RECHECK: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("TLS key: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("CA Secret {0} keeps changing under us")]
    Contended(String),
}

/// The CA as stored in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

/// A rustls resolver whose certificate is swapped in place; handshakes read the current one.
#[derive(Debug, Default)]
pub struct DynamicCert {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl DynamicCert {
    pub fn set(&self, key: Arc<CertifiedKey>) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Some(key);
    }

    /// The certificate handshakes get now (chain: leaf, CA).
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn is_ready(&self) -> bool {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }
}

impl ResolvesServerCert for DynamicCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current()
    }
}

/// Why the stored CA cannot be used, or None when it can (upstream's caRequiresRegeneration).
pub fn ca_problem(secret: &Secret, now: OffsetDateTime) -> Option<&'static str> {
    let Some(data) = secret.data.as_ref() else {
        return Some("Missing data in CA secret.");
    };
    let get = |k: &str| data.get(k).map(|b| b.0.as_slice()).unwrap_or_default();
    let (ca, key, cert) = (get("ca.crt"), get("tls.key"), get("tls.crt"));
    if ca.is_empty() || key.is_empty() || cert.is_empty() {
        return Some("Missing data in CA secret.");
    }
    if ca != cert {
        return Some("Different data in ca.crt and tls.crt.");
    }
    let Ok((_, pem)) = x509_parser::pem::parse_x509_pem(cert) else {
        return Some("Failed to parse data in CA secret.");
    };
    let Ok(x509) = pem.parse_x509() else {
        return Some("Failed to parse data in CA secret.");
    };
    let key_ok = std::str::from_utf8(key)
        .ok()
        .and_then(|k| KeyPair::from_pem(k).ok())
        .is_some_and(|k| k.public_key_raw() == x509.public_key().subject_public_key.data.as_ref());
    if !key_ok {
        return Some("Failed to parse data in CA secret.");
    }
    if !x509.is_ca() {
        return Some("Stored certificate is not marked as a CA.");
    }
    let (nb, na) = (
        x509.validity().not_before.to_datetime(),
        x509.validity().not_after.to_datetime(),
    );
    if na - now < (na - nb) / 3 {
        return Some("CA certificate is nearing expiry.");
    }
    None
}

/// A fresh CA: ECDSA P-384, 365 days (upstream's parameters).
pub fn generate_ca(now: OffsetDateTime) -> Result<CaPair, rcgen::Error> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
        KeyUsagePurpose::KeyCertSign,
    ];
    params.not_before = now;
    params.not_after = now + CA_DURATION;
    let cert = params.self_signed(&key)?;
    Ok(CaPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A serving leaf for `names` (IP literals become IP SANs), never outliving the CA.
pub fn sign_leaf(
    ca: &CaPair,
    names: &[String],
    now: OffsetDateTime,
) -> Result<(CertifiedKey, OffsetDateTime), AuthorityError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)?;
    let ca_not_after = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
        .ok()
        .and_then(|(_, p)| {
            p.parse_x509()
                .ok()
                .map(|c| c.validity().not_after.to_datetime())
        });
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(first) = names.first() {
        dn.push(DnType::CommonName, first.as_str());
    }
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = now;
    let mut not_after = now + LEAF_DURATION;
    if let Some(limit) = ca_not_after
        && limit < not_after
    {
        not_after = limit;
    }
    params.not_after = not_after;
    let cert = params.signed_by(&key, &issuer)?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
    let ca_der = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes())
        .map(|(_, p)| p.contents)
        .unwrap_or_default();
    let chain = vec![cert.der().clone(), CertificateDer::from(ca_der)];
    Ok((CertifiedKey::new(chain, signing), not_after))
}

fn ca_from_secret(secret: &Secret) -> Option<CaPair> {
    let data = secret.data.as_ref()?;
    let text = |k: &str| {
        data.get(k)
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
    };
    Some(CaPair {
        cert_pem: text("tls.crt")?,
        key_pem: text("tls.key")?,
    })
}

fn ca_data(ca: &CaPair) -> BTreeMap<String, ByteString> {
    [
        ("tls.crt", ca.cert_pem.as_bytes()),
        ("tls.key", ca.key_pem.as_bytes()),
        ("ca.crt", ca.cert_pem.as_bytes()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
    .collect()
}

/// Keeps the CA Secret valid and the leaf fresh.
pub struct Authority {
    pub secrets: Api<Secret>,
    pub namespace: String,
    pub name: String,
    pub dns_names: Vec<String>,
    pub cert: Arc<DynamicCert>,
}

impl Authority {
    pub fn new(client: Client, namespace: &str, name: &str, dns_names: Vec<String>) -> Self {
        Self {
            secrets: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            dns_names,
            cert: Arc::default(),
        }
    }

    /// Returns a usable CA, creating or regenerating the Secret as needed. When two replicas
    /// race, the loser's create or update conflicts and it re-reads the winner's CA.
    pub async fn ensure_ca(&self) -> Result<CaPair, AuthorityError> {
        for _ in 0..5 {
            let now = OffsetDateTime::now_utc();
            match self.secrets.get_opt(&self.name).await? {
                None => {
                    let ca = generate_ca(now)?;
                    let secret = Secret {
                        metadata: ObjectMeta {
                            name: Some(self.name.clone()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some([(MANAGED_BY_LABEL.into(), MANAGED_BY.into())].into()),
                            annotations: Some(
                                [(ALLOW_DIRECT_INJECTION.into(), "true".into())].into(),
                            ),
                            ..Default::default()
                        },
                        data: Some(ca_data(&ca)),
                        ..Default::default()
                    };
                    match self.secrets.create(&PostParams::default(), &secret).await {
                        Ok(_) => {
                            tracing::info!(secret = %self.name, "created new root CA Secret");
                            return Ok(ca);
                        }
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                Some(mut secret) => {
                    let Some(reason) = ca_problem(&secret, now) else {
                        if let Some(ca) = ca_from_secret(&secret) {
                            return Ok(ca);
                        }
                        continue;
                    };
                    tracing::info!(secret = %self.name, reason, "regenerating root CA");
                    let ca = generate_ca(now)?;
                    secret
                        .data
                        .get_or_insert_with(Default::default)
                        .extend(ca_data(&ca));
                    // The update carries the resourceVersion we read, so a concurrent writer
                    // makes it conflict rather than overwrite.
                    match self
                        .secrets
                        .replace(&self.name, &PostParams::default(), &secret)
                        .await
                    {
                        Ok(_) => return Ok(ca),
                        Err(kube::Error::Api(s)) if s.code == 409 => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
        Err(AuthorityError::Contended(format!(
            "{}/{}",
            self.namespace, self.name
        )))
    }

    /// Runs until `stop`: re-checks on every change of the Secret and re-signs the leaf at 2/3
    /// of its life or when the CA changes.
    pub async fn run(self, stop: CancellationToken) {
        let wc = watcher::Config::default().fields(&format!("metadata.name={}", self.name));
        let mut events = watcher(self.secrets.clone(), wc).boxed();
        let mut signed_by: Option<CaPair> = None;
        let mut renew_at = OffsetDateTime::now_utc();
        let mut retry = kube_common::backoff::WatchRetry::default();
        loop {
            let now = OffsetDateTime::now_utc();
            match self.ensure_ca().await {
                Ok(ca) => {
                    if signed_by.as_ref() != Some(&ca) || now >= renew_at {
                        match sign_leaf(&ca, &self.dns_names, now) {
                            Ok((key, not_after)) => {
                                self.cert.set(Arc::new(key));
                                renew_at = now + (not_after - now) * 2 / 3;
                                signed_by = Some(ca);
                                tracing::info!(renew_at = %renew_at, "serving certificate signed");
                            }
                            Err(e) => tracing::error!(error = %e, "signing serving certificate"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "ensuring webhook CA"),
            }
            let until_renewal = (renew_at - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO);
            let wait = until_renewal.clamp(Duration::from_secs(1), RECHECK);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                ev = events.next() => match ev {
                    Some(Ok(ev)) => retry.observe(&ev),
                    Some(Err(e)) => {
                        // Not spinning on a failing watch; the timer still re-checks.
                        let delay = retry.delay();
                        tracing::debug!(error = %e, retry_in = ?delay, "CA Secret watch");
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    // A watcher never ends; if one did, the timer alone drives re-checks.
                    None => events = futures::stream::pending().boxed(),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(ca: &CaPair) -> Secret {
        Secret {
            data: Some(ca_data(ca)),
            ..Default::default()
        }
    }

    #[test]
    fn fresh_ca_is_valid_and_ages_out_at_two_thirds() {
        let now = OffsetDateTime::now_utc();
        let ca = generate_ca(now).expect("ca");
        assert_eq!(ca_problem(&secret(&ca), now), None);
        let later = now + CA_DURATION * 2 / 3 + Duration::from_secs(3600);
        assert_eq!(
            ca_problem(&secret(&ca), later),
            Some("CA certificate is nearing expiry.")
        );
    }

    #[test]
    fn broken_secrets_are_regenerated() {
        let now = OffsetDateTime::now_utc();
        let ca = generate_ca(now).expect("ca");
        assert_eq!(
            ca_problem(&Secret::default(), now),
            Some("Missing data in CA secret.")
        );
        let mut s = secret(&ca);
        s.data
            .as_mut()
            .expect("data")
            .insert("ca.crt".into(), ByteString(b"other".to_vec()));
        assert_eq!(
            ca_problem(&s, now),
            Some("Different data in ca.crt and tls.crt.")
        );
        let other = generate_ca(now).expect("ca");
        let mismatched = CaPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem,
        };
        assert_eq!(
            ca_problem(&secret(&mismatched), now),
            Some("Failed to parse data in CA secret.")
        );
    }

    #[test]
    fn leaf_chains_to_the_ca_and_carries_the_names() {
        let now = OffsetDateTime::now_utc();
        let ca = generate_ca(now).expect("ca");
        let names = vec![
            "cert-manager-webhook.cert-manager.svc".into(),
            "127.0.0.1".into(),
        ];
        let (key, not_after) = sign_leaf(&ca, &names, now).expect("leaf");
        assert_eq!(not_after, now + LEAF_DURATION);
        let (_, leaf) = x509_parser::parse_x509_certificate(&key.cert[0]).expect("parse");
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).expect("pem");
        let ca_cert = ca_pem.parse_x509().expect("ca");
        assert_eq!(leaf.issuer(), ca_cert.subject());
        leaf.verify_signature(Some(ca_cert.public_key()))
            .expect("signed by the CA");
        let sans = leaf
            .subject_alternative_name()
            .expect("ext")
            .expect("sans")
            .value
            .general_names
            .len();
        assert_eq!(sans, 2);
    }
}
