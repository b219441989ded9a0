//! Server certificates by SNI, as ingress-nginx picks them: exact host → one-label wildcard →
//! the default certificate (`--default-ssl-certificate`, else a generated "Kubernetes Ingress
//! Controller Fake Certificate"), or no certificate at all for unknown names when
//! `ssl-reject-handshake` is on. The table is swapped atomically, so a Secret change rotates the
//! certificate for new handshakes without touching open connections.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.crt holds no PEM certificate")]
    NoCertificate,
    #[error("tls.crt is not valid PEM: {0}")]
    BadCertificate(String),
    #[error("tls.key is not a valid PEM private key: {0}")]
    BadKey(String),
    #[error("tls.key is not a supported key type: {0}")]
    UnsupportedKey(String),
    #[error("tls.key does not match the certificate in tls.crt")]
    KeyMismatch,
    #[error("generating the fake certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate chain and key loaded from a `kubernetes.io/tls` Secret.
#[derive(Clone, Debug)]
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// SHA-1 of the leaf's DER (hex), for the certificate info metric; computed once per
    /// Secret version rather than on every build.
    pub fingerprint: Arc<str>,
}

/// Parses `tls.crt` (leaf first, then chain) and `tls.key`, and checks they belong together.
pub fn load_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<LoadedCert, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    let key =
        PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::BadKey(e.to_string()))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key)
        .map_err(|e| TlsError::UnsupportedKey(e.to_string()))?;
    let fingerprint = fingerprint(&chain[0]);
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) => {}
        // Keys whose public half rustls cannot extract are let through: the handshake fails
        // loudly if they are wrong.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => return Err(TlsError::KeyMismatch),
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        fingerprint,
    })
}

fn fingerprint(der: &[u8]) -> Arc<str> {
    use sha1::Digest;
    let hex: String = sha1::Sha1::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    hex.into()
}

/// ingress-nginx's default certificate: self-signed, `O=Acme Co`, `CN=Kubernetes Ingress
/// Controller Fake Certificate`, SAN `ingress.local`, one year. (Upstream uses RSA-2048; ring
/// cannot generate RSA keys, so ours is ECDSA P-256; clients only ever see it as untrusted.)
pub fn fake_certificate() -> Result<LoadedCert, TlsError> {
    let mut params = rcgen::CertificateParams::new(vec!["ingress.local".to_string()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Acme Co");
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        "Kubernetes Ingress Controller Fake Certificate",
    );
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now;
    params.not_after = now + time::Duration::days(365);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    load_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
}

/// The certificate table of one configuration generation.
#[derive(Clone)]
pub struct CertTable {
    pub exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the suffix after `*.`.
    pub wildcard: HashMap<String, Arc<CertifiedKey>>,
    pub default: Arc<CertifiedKey>,
    /// Hosts that have a server (an Ingress rule), for `ssl-reject-handshake`.
    pub known_hosts: HashSet<String>,
    pub reject_unknown: bool,
}

impl CertTable {
    pub fn new(default: Arc<CertifiedKey>) -> Self {
        Self {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default,
            known_hosts: HashSet::new(),
            reject_unknown: false,
        }
    }

    /// The certificate for `sni` (None: reject the handshake).
    pub fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni.map(str::to_ascii_lowercase) else {
            return (!self.reject_unknown).then(|| self.default.clone());
        };
        if let Some(k) = self.exact.get(&name) {
            return Some(k.clone());
        }
        let suffix = name.split_once('.').map(|(_, s)| s);
        if let Some(k) = suffix.and_then(|s| self.wildcard.get(s)) {
            return Some(k.clone());
        }
        if self.reject_unknown {
            let known = self.known_hosts.contains(&name)
                || suffix.is_some_and(|s| self.known_hosts.contains(&format!("*.{s}")));
            if !known {
                return None;
            }
        }
        Some(self.default.clone())
    }
}

/// The rustls resolver: reads the current table without locking.
pub struct TlsStore {
    table: ArcSwap<CertTable>,
}

impl std::fmt::Debug for TlsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStore").finish_non_exhaustive()
    }
}

impl TlsStore {
    pub fn new(table: CertTable) -> Self {
        Self {
            table: ArcSwap::from_pointee(table),
        }
    }

    pub fn swap(&self, table: CertTable) {
        self.table.store(Arc::new(table));
    }

    pub fn current(&self) -> Arc<CertTable> {
        self.table.load_full()
    }
}

impl ResolvesServerCert for TlsStore {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.table.load().pick(hello.server_name())
    }
}

/// A rustls server config: TLS 1.2 and 1.3 (or as `ssl-protocols` says), ALPN h2 (when
/// `use-http2`) and http/1.1, certificates from `store`.
pub fn server_config(
    store: Arc<TlsStore>,
    protocols: &[String],
    http2: bool,
) -> Arc<rustls::ServerConfig> {
    let mut versions: Vec<&'static rustls::SupportedProtocolVersion> = Vec::new();
    if protocols.iter().any(|p| p == "TLSv1.3") {
        versions.push(&rustls::version::TLS13);
    }
    if protocols.iter().any(|p| p == "TLSv1.2") {
        versions.push(&rustls::version::TLS12);
    }
    if versions.is_empty() {
        versions = vec![&rustls::version::TLS13, &rustls::version::TLS12];
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .unwrap_or_else(|_| {
            rustls::ServerConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
        });
    let mut config = builder.with_no_client_auth().with_cert_resolver(store);
    // The server's cipher order (strongest first), as ingress-nginx's
    // `ssl_prefer_server_ciphers on`; testssl.sh rates a client-chosen order HIGH.
    config.ignore_client_order = true;
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn loads_pairs_and_rejects_mismatch() {
        let (c1, k1) = self_signed("a.example");
        let (_, k2) = self_signed("b.example");
        assert!(load_pem(c1.as_bytes(), k1.as_bytes()).is_ok());
        assert!(matches!(
            load_pem(c1.as_bytes(), k2.as_bytes()),
            Err(TlsError::KeyMismatch)
        ));
        assert!(matches!(
            load_pem(b"", k1.as_bytes()),
            Err(TlsError::NoCertificate)
        ));
        assert!(load_pem(c1.as_bytes(), b"garbage").is_err());
    }

    #[test]
    fn sni_order_and_reject_handshake() {
        let fake = fake_certificate().expect("fake").key;
        let (c, k) = self_signed("a.example");
        let a = load_pem(c.as_bytes(), k.as_bytes()).expect("a").key;
        let (c, k) = self_signed("*.wild.example");
        let w = load_pem(c.as_bytes(), k.as_bytes()).expect("w").key;
        let mut t = CertTable::new(fake.clone());
        t.exact.insert("a.example".into(), a.clone());
        t.wildcard.insert("wild.example".into(), w.clone());
        t.known_hosts.insert("notls.example".into());
        let same = |x: Option<Arc<CertifiedKey>>, y: &Arc<CertifiedKey>| {
            x.is_some_and(|x| Arc::ptr_eq(&x, y))
        };
        assert!(same(t.pick(Some("A.example")), &a));
        assert!(same(t.pick(Some("x.wild.example")), &w));
        assert!(same(t.pick(Some("y.x.wild.example")), &fake));
        assert!(same(t.pick(Some("unknown.example")), &fake));
        assert!(same(t.pick(None), &fake));
        t.reject_unknown = true;
        assert!(t.pick(Some("unknown.example")).is_none());
        assert!(t.pick(None).is_none());
        assert!(same(t.pick(Some("notls.example")), &fake));
        assert!(same(t.pick(Some("a.example")), &a));
    }
}
