//! Certificates phase: the SNI table from the default certificate and the Ingresses' TLS
//! Secrets (an unusable Secret is replaced by its last good certificate).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;

use super::{Builder, CertInfo, ObjectKey, Problem};
use crate::annotations::Annotations;
use crate::config::Config;
use crate::tls_store::{CertTable, LoadedCert, load_pem};

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
            let ns = ing.metadata.namespace.as_deref().unwrap_or_default();
            for tls in spec.tls.iter().flatten() {
                let Some(secret_name) = tls.secret_name.as_ref() else {
                    continue;
                };
                let secret = ObjectKey {
                    namespace: ns.to_owned(),
                    name: secret_name.clone(),
                };
                if let Some(cert) = self.load_secret(secrets, problems, &secret) {
                    let hosts = tls.hosts.as_deref().unwrap_or_default();
                    serve(&mut certs, &mut cert_info, &secret, &cert, hosts);
                }
            }
            // Hosts with a rule are known to `ssl-reject-handshake`, with or without TLS; the
            // set is only read with it on (10,000 hosts cost a build about 3 ms).
            if certs.reject_unknown {
                for rule in spec.rules.iter().flatten() {
                    let host = rule.host.as_deref().unwrap_or("_").to_ascii_lowercase();
                    certs.known_hosts.insert(host);
                }
            }
        }
        self.cert_cache.prune(self.generation);
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
            match self.cert_cache.load(key, secret, self.generation) {
                Ok(cert) => {
                    self.last_good_cert.insert(key.clone(), cert.clone());
                    return Some(cert);
                }
                // Reported again on every build: `report` keeps it to once per version.
                Err(message) => self.report(problems, *secret, "InvalidCertificate", message),
            }
        }
        self.last_good_cert.get(key).cloned()
    }
}

/// Certificates parsed from TLS Secrets, by Secret and the resourceVersion they were parsed
/// from. Without it every watch event (an endpoint change, say) would parse every PEM chain
/// and key again. Holds only the Secrets the latest build looked up.
#[derive(Default)]
pub(super) struct CertCache {
    entries: HashMap<ObjectKey, Parsed>,
    /// Cache misses (Secrets actually parsed), for tests.
    parses: u64,
}

/// One Secret version, parsed.
struct Parsed {
    resource_version: String,
    /// The certificate, or why the Secret is unusable (a bad version stays bad).
    outcome: Result<LoadedCert, String>,
    /// The build that last looked this Secret up.
    used: u64,
}

impl CertCache {
    /// The certificate in `secret` (named `key`), parsed only if this version of it was not.
    fn load(&mut self, key: &ObjectKey, secret: &Secret, build: u64) -> Result<LoadedCert, String> {
        let version = secret.metadata.resource_version.as_deref();
        if let Some(parsed) = self.entries.get_mut(key)
            && version == Some(parsed.resource_version.as_str())
        {
            parsed.used = build;
            return parsed.outcome.clone();
        }
        self.parses += 1;
        let outcome = parse(key, secret);
        match version {
            Some(v) => {
                let parsed = Parsed {
                    resource_version: v.to_owned(),
                    outcome: outcome.clone(),
                    used: build,
                };
                self.entries.insert(key.clone(), parsed);
            }
            // Without a version a change cannot be told apart: such a Secret is parsed each time.
            None => {
                self.entries.remove(key);
            }
        }
        outcome
    }

    /// Forgets the Secrets that build `build` did not look up: deleted, or no longer
    /// referenced, so the cache never outgrows the Secrets in use.
    fn prune(&mut self, build: u64) {
        self.entries.retain(|_, parsed| parsed.used == build);
    }
}

/// The certificate and key of a `kubernetes.io/tls` Secret, or why they are unusable.
fn parse(key: &ObjectKey, secret: &Secret) -> Result<LoadedCert, String> {
    let data = secret.data.as_ref();
    let crt = data.and_then(|d| d.get("tls.crt")).map(|b| b.0.as_slice());
    let k = data.and_then(|d| d.get("tls.key")).map(|b| b.0.as_slice());
    let (Some(crt), Some(k)) = (crt, k) else {
        return Err(format!("Secret {key} has no tls.crt and tls.key"));
    };
    load_pem(crt, k).map_err(|e| format!("Secret {key} is not a usable TLS certificate: {e}"))
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
            fingerprint: cert.fingerprint.to_string(),
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

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{class, inputs, tls_secret};
    use super::super::{Builder, Built, Options};

    fn secret(version: &str, crt: &str, key: &str) -> serde_json::Value {
        let mut secret = tls_secret("cert", crt, key);
        secret["metadata"]["resourceVersion"] = json!(version);
        secret
    }

    fn tls_ingress() -> serde_json::Value {
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"name": "i", "namespace": "ns"},
               "spec": {"ingressClassName": "nginx",
                        "tls": [{"hosts": ["a.example"], "secretName": "cert"}]}})
    }

    fn fingerprints(built: &Built) -> Vec<String> {
        built
            .cert_info
            .iter()
            .map(|c| c.fingerprint.clone())
            .collect()
    }

    /// A Secret is parsed once per resourceVersion; a bad version is still reported once and
    /// the last good certificate kept; a Secret no longer looked up leaves the cache.
    #[test]
    fn secrets_are_parsed_once_per_version() {
        let ca = integration_tests::pki::TestCa::new("cache test CA").expect("CA");
        let leaf = ca.leaf("a.example", &["a.example"]).expect("leaf");
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let good = inputs(json!([
            class(),
            tls_ingress(),
            secret("1", &leaf.cert_pem, &leaf.key_pem)
        ]));
        let served = fingerprints(&builder.build(&good));
        assert_eq!(served.len(), 1);
        assert_eq!(fingerprints(&builder.build(&good)), served);
        assert_eq!(
            builder.cert_cache.parses, 1,
            "unchanged Secret not parsed again"
        );

        let bad = inputs(json!([
            class(),
            tls_ingress(),
            secret("2", "not a cert", "no key")
        ]));
        let built = builder.build(&bad);
        assert_eq!(builder.cert_cache.parses, 2, "a new version is parsed");
        assert_eq!(built.problems.len(), 1);
        assert_eq!(fingerprints(&built), served, "last good certificate kept");
        let built = builder.build(&bad);
        assert!(built.problems.is_empty(), "reported once per version");
        assert_eq!(builder.cert_cache.parses, 2);
        assert_eq!(builder.cert_cache.entries.len(), 1, "version 1 superseded");

        builder.build(&inputs(json!([class(), tls_ingress()])));
        assert!(
            builder.cert_cache.entries.is_empty(),
            "deleted Secret dropped"
        );
    }
}
