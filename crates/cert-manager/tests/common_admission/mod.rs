//! Shared pieces of the webhook and cainjector tests: CRD installation, polling with a deadline,
//! and a throwaway CA.

#![allow(dead_code)]

use std::time::Duration;

use kube::Client;

pub use integration_tests::poll::wait_for as eventually;

/// Generous: the shared apiserver is busy with other tests on 2 cores.
pub const WAIT: Duration = Duration::from_secs(60);

/// Applies the six cert-manager CRDs (server-side, idempotent) and waits until each is
/// Established.
pub async fn install_crds(client: &Client) {
    integration_tests::kube::install_crds(client, &cert_manager::crds::all())
        .await
        .expect("cert-manager CRDs");
}

/// A self-signed CA certificate, PEM.
pub fn test_ca(name: &str) -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.self_signed(&key).expect("CA").pem()
}

/// DER of every certificate in a PEM bundle.
pub fn ders(pem: &[u8]) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem)
        .filter_map(Result::ok)
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

/// Whether `bundle` (PEM) holds every certificate of `ca` (PEM).
pub fn bundle_contains(bundle: &[u8], ca: &[u8]) -> bool {
    let have = ders(bundle);
    let want = ders(ca);
    !want.is_empty() && want.iter().all(|d| have.contains(d))
}
