//! Certificates phase: the SNI table from the default certificate and the Ingresses' TLS
//! Secrets (an unusable Secret is replaced by its last good certificate).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;

use super::{Builder, CertInfo, ObjectKey, Problem, key_of};
use crate::annotations::Annotations;
use crate::config::Config;
use crate::tls_store::{CertTable, LoadedCert, load_pem};

fn fingerprint(der: &[u8]) -> String {
    use sha1::Digest;
    sha1::Sha1::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Builder {
    /// The certificate table for `effective` (oldest first: the first certificate for a host
    /// wins) and the served certificates for the info metric.
    pub(super) fn certificates(
        &mut self,
        secrets: &HashMap<ObjectKey, &Secret>,
        effective: &[(Arc<Ingress>, Arc<Annotations>)],
        config: &Config,
        problems: &mut Vec<Problem>,
    ) -> (CertTable, Vec<CertInfo>) {
        let default_cert = self
            .opts
            .default_ssl_certificate
            .clone()
            .and_then(|k| self.load_secret(secrets, problems, &k))
            .unwrap_or_else(|| self.fake.clone());
        let mut certs = CertTable::new(default_cert.key.clone());
        certs.reject_unknown = config.ssl_reject_handshake;
        let mut cert_info = Vec::new();
        for (ing, _) in effective {
            let Some(spec) = ing.spec.as_ref() else {
                continue;
            };
            let ns = key_of(ing.as_ref()).namespace;
            for tls in spec.tls.iter().flatten() {
                let Some(secret_name) = tls.secret_name.as_ref() else {
                    continue;
                };
                let secret = ObjectKey {
                    namespace: ns.clone(),
                    name: secret_name.clone(),
                };
                if let Some(cert) = self.load_secret(secrets, problems, &secret) {
                    let hosts = tls.hosts.as_deref().unwrap_or_default();
                    serve(&mut certs, &mut cert_info, &secret, &cert, hosts);
                }
            }
            // Hosts with a rule are known to `ssl-reject-handshake`, with or without TLS.
            for rule in spec.rules.iter().flatten() {
                let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
                certs.known_hosts.insert(host);
            }
        }
        (certs, cert_info)
    }

    /// The certificate of a TLS Secret, or its last good one when the Secret is missing or
    /// unusable (reported).
    fn load_secret(
        &mut self,
        secrets: &HashMap<ObjectKey, &Secret>,
        problems: &mut Vec<Problem>,
        key: &ObjectKey,
    ) -> Option<LoadedCert> {
        if let Some(secret) = secrets.get(key) {
            let data = secret.data.as_ref();
            let crt = data.and_then(|d| d.get("tls.crt")).map(|b| b.0.as_slice());
            let k = data.and_then(|d| d.get("tls.key")).map(|b| b.0.as_slice());
            match (crt, k) {
                (Some(crt), Some(k)) => match load_pem(crt, k) {
                    Ok(cert) => {
                        self.last_good_cert.insert(key.clone(), cert.clone());
                        return Some(cert);
                    }
                    Err(e) => self.report(
                        problems,
                        *secret,
                        "InvalidCertificate",
                        format!("Secret {key} is not a usable TLS certificate: {e}"),
                    ),
                },
                _ => self.report(
                    problems,
                    *secret,
                    "InvalidCertificate",
                    format!("Secret {key} has no tls.crt and tls.key"),
                ),
            }
        }
        self.last_good_cert.get(key).cloned()
    }
}

/// Serves `cert` (from `secret`) for `hosts`, except where an older Ingress already serves one.
fn serve(
    certs: &mut CertTable,
    cert_info: &mut Vec<CertInfo>,
    secret: &ObjectKey,
    cert: &LoadedCert,
    hosts: &[String],
) {
    for host in hosts {
        let host = host.to_ascii_lowercase();
        cert_info.push(CertInfo {
            host: host.clone(),
            secret: secret.clone(),
            fingerprint: fingerprint(&cert.leaf_der),
        });
        match host.strip_prefix("*.") {
            Some(suffix) => {
                certs
                    .wildcard
                    .entry(suffix.into())
                    .or_insert(cert.key.clone());
            }
            None => {
                certs.exact.entry(host).or_insert(cert.key.clone());
            }
        }
    }
}
