//! Private keys, CSRs and certificate inspection, in the encodings upstream writes.
//!
//! Keys: RSA (default 2048, PKCS#1 `RSA PRIVATE KEY` unless PKCS8 is asked for), ECDSA P-256 /
//! P-384 (SEC1 `EC PRIVATE KEY` or PKCS#8) and Ed25519 (PKCS#8 only, as upstream). RSA keys
//! come from the `rsa` crate because ring cannot generate them; signing the CSR uses ring.

use std::net::IpAddr;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PublicKeyData, SanType};
use rsa::PrivateKey as RsaKey;
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey};
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::api::CertificateSpec;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("unsupported private key: {0}")]
    Unsupported(String),
    #[error("key generation failed: {0}")]
    Generate(String),
    #[error("invalid private key: {0}")]
    InvalidKey(String),
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("invalid CSR: {0}")]
    InvalidCsr(String),
    #[error("building the CSR failed: {0}")]
    Csr(#[from] rcgen::Error),
}

/// Key algorithm and size as the Certificate spec asks (defaults applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    Rsa(usize),
    Ecdsa(usize),
    Ed25519,
}

impl KeySpec {
    pub fn from_spec(spec: &CertificateSpec) -> Result<Self, PkiError> {
        let pk = spec.private_key.clone().unwrap_or_default();
        let size = pk.size.filter(|s| *s > 0).map(|s| s as usize);
        match pk.algorithm.as_deref().unwrap_or("RSA") {
            "" | "RSA" => match size.unwrap_or(2048) {
                s @ 2048..=8192 => Ok(Self::Rsa(s)),
                s => Err(PkiError::Unsupported(format!("RSA key size {s}"))),
            },
            "ECDSA" => match size.unwrap_or(256) {
                s @ (256 | 384) => Ok(Self::Ecdsa(s)),
                // ring signs with P-256 and P-384 only.
                s => Err(PkiError::Unsupported(format!(
                    "ECDSA key size {s} (256 and 384 are supported)"
                ))),
            },
            "Ed25519" => Ok(Self::Ed25519),
            other => Err(PkiError::Unsupported(format!("algorithm {other:?}"))),
        }
    }

    pub fn algorithm_name(self) -> &'static str {
        match self {
            Self::Rsa(_) => "RSA",
            Self::Ecdsa(_) => "ECDSA",
            Self::Ed25519 => "Ed25519",
        }
    }
}

/// `PKCS1` (default) or `PKCS8`.
pub fn pkcs8_requested(spec: &CertificateSpec) -> bool {
    spec.private_key
        .as_ref()
        .and_then(|p| p.encoding.as_deref())
        .is_some_and(|e| e == "PKCS8")
}

/// A private key: its PKCS#8 DER (what ring and rcgen use) and what it is.
pub struct PrivateKey {
    pub pkcs8: Vec<u8>,
    pub kind: KeySpec,
}

impl PrivateKey {
    pub fn generate(kind: KeySpec) -> Result<Self, PkiError> {
        let pkcs8 = match kind {
            KeySpec::Rsa(bits) => {
                let key = RsaKey::new(&mut getrandom::SysRng, bits)
                    .map_err(|e| PkiError::Generate(e.to_string()))?;
                key.to_pkcs8_der()
                    .map_err(|e| PkiError::Generate(e.to_string()))?
                    .as_bytes()
                    .to_vec()
            }
            KeySpec::Ecdsa(bits) => {
                let alg = if bits == 384 {
                    &rcgen::PKCS_ECDSA_P384_SHA384
                } else {
                    &rcgen::PKCS_ECDSA_P256_SHA256
                };
                KeyPair::generate_for(alg)?.serialize_der()
            }
            KeySpec::Ed25519 => KeyPair::generate_for(&rcgen::PKCS_ED25519)?.serialize_der(),
        };
        Ok(Self { pkcs8, kind })
    }

    /// Parses PKCS#1, SEC1 or PKCS#8 PEM.
    pub fn from_pem(pem: &[u8]) -> Result<Self, PkiError> {
        let der =
            PrivateKeyDer::from_pem_slice(pem).map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        let pkcs8 = match der {
            PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
            PrivateKeyDer::Pkcs1(k) => RsaKey::from_pkcs1_der(k.secret_pkcs1_der())
                .map_err(|e| PkiError::InvalidKey(e.to_string()))?
                .to_pkcs8_der()
                .map_err(|e| PkiError::InvalidKey(e.to_string()))?
                .as_bytes()
                .to_vec(),
            // ring reads PKCS#8 only: wrap the SEC1 key with its curve.
            PrivateKeyDer::Sec1(k) => pkcs8_from_sec1(k.secret_sec1_der())
                .ok_or_else(|| PkiError::InvalidKey("unsupported EC private key".into()))?,
            _ => return Err(PkiError::InvalidKey("unknown key encoding".into())),
        };
        let kind = Self::classify(&pkcs8)?;
        Ok(Self { pkcs8, kind })
    }

    fn classify(pkcs8: &[u8]) -> Result<KeySpec, PkiError> {
        if let Ok(rsa) = RsaKey::from_pkcs8_der(pkcs8) {
            use rsa::traits::PublicKeyParts;
            return Ok(KeySpec::Rsa(rsa.n().bit_width() as usize));
        }
        let kp = self::key_pair(pkcs8)?;
        let alg = kp.algorithm();
        if alg == &rcgen::PKCS_ECDSA_P256_SHA256 {
            Ok(KeySpec::Ecdsa(256))
        } else if alg == &rcgen::PKCS_ECDSA_P384_SHA384 {
            Ok(KeySpec::Ecdsa(384))
        } else if alg == &rcgen::PKCS_ED25519 {
            Ok(KeySpec::Ed25519)
        } else {
            Err(PkiError::Unsupported("key algorithm".into()))
        }
    }

    /// PEM in the encoding the spec asks for (upstream: PKCS#1 for RSA, SEC1 for EC by default).
    pub fn to_pem(&self, pkcs8: bool) -> Result<String, PkiError> {
        let pkcs8_pem = || pem_block("PRIVATE KEY", &self.pkcs8);
        match self.kind {
            KeySpec::Rsa(_) if !pkcs8 => {
                let key = RsaKey::from_pkcs8_der(&self.pkcs8)
                    .map_err(|e| PkiError::InvalidKey(e.to_string()))?;
                let der = key
                    .to_pkcs1_der()
                    .map_err(|e| PkiError::InvalidKey(e.to_string()))?;
                Ok(pem_block("RSA PRIVATE KEY", der.as_bytes()))
            }
            KeySpec::Ecdsa(_) if !pkcs8 => match sec1_from_pkcs8(&self.pkcs8) {
                Some(sec1) => Ok(pem_block("EC PRIVATE KEY", &sec1)),
                None => Ok(pkcs8_pem()),
            },
            _ => Ok(pkcs8_pem()),
        }
    }

    pub fn key_pair(&self) -> Result<KeyPair, PkiError> {
        key_pair(&self.pkcs8)
    }

    /// SubjectPublicKeyInfo DER, to compare with a certificate's.
    pub fn public_key_der(&self) -> Result<Vec<u8>, PkiError> {
        Ok(self.key_pair()?.subject_public_key_info())
    }
}

fn key_pair(pkcs8: &[u8]) -> Result<KeyPair, PkiError> {
    let der = PrivateKeyDer::Pkcs8(pkcs8.to_vec().into());
    if let Ok(rsa) = RsaKey::from_pkcs8_der(pkcs8) {
        let _ = rsa;
        return KeyPair::from_der_and_sign_algo(&der, &rcgen::PKCS_RSA_SHA256)
            .map_err(|e| PkiError::InvalidKey(e.to_string()));
    }
    KeyPair::try_from(&der).map_err(|e| PkiError::InvalidKey(e.to_string()))
}

/// The SEC1 `ECPrivateKey` inside a PKCS#8 EC key, with the curve added as `[0] parameters`
/// (PKCS#8 carries the curve outside; SEC1 files as upstream writes them carry it inside).
fn sec1_from_pkcs8(pkcs8: &[u8]) -> Option<Vec<u8>> {
    let info = rsa::pkcs8::PrivateKeyInfoRef::try_from(pkcs8).ok()?;
    let curve_oid: &[u8] = match info.algorithm.parameters_oid().ok()?.to_string().as_str() {
        "1.2.840.10045.3.1.7" => &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07],
        "1.3.132.0.34" => &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x22],
        _ => return None,
    };
    let inner = info.private_key.as_bytes();
    let (tag, content, _) = der_tlv(inner)?;
    if tag != 0x30 {
        return None;
    }
    // version INTEGER, privateKey OCTET STRING, then optional [0] and [1].
    let (_, _, after_version) = der_tlv(content)?;
    let (_, _, after_key) = der_tlv(after_version)?;
    let head_len = content.len() - after_key.len();
    let mut body = content[..head_len].to_vec();
    if after_key.first() != Some(&0xA0) {
        body.push(0xA0);
        der_len(&mut body, curve_oid.len());
        body.extend_from_slice(curve_oid);
    }
    body.extend_from_slice(after_key);
    let mut out = vec![0x30];
    der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Some(out)
}

/// PKCS#8 `PrivateKeyInfo` around a SEC1 key whose `[0] parameters` name P-256 or P-384.
fn pkcs8_from_sec1(sec1: &[u8]) -> Option<Vec<u8>> {
    const EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
    let (tag, content, _) = der_tlv(sec1)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, rest) = der_tlv(content)?;
    let (_, _, mut rest) = der_tlv(rest)?;
    let mut curve = None;
    while !rest.is_empty() {
        let (tag, inner, next) = der_tlv(rest)?;
        if tag == 0xA0 {
            curve = Some(&rest[2..2 + inner.len()]);
        }
        rest = next;
    }
    let curve = curve?;
    let mut alg = EC_PUBLIC_KEY.to_vec();
    alg.extend_from_slice(curve);
    let mut body = vec![0x02, 0x01, 0x00, 0x30];
    der_len(&mut body, alg.len());
    body.extend_from_slice(&alg);
    body.push(0x04);
    der_len(&mut body, sec1.len());
    body.extend_from_slice(sec1);
    let mut out = vec![0x30];
    der_len(&mut out, body.len());
    out.extend_from_slice(&body);
    Some(out)
}

/// Splits one DER TLV off `data`: (tag, content, rest).
fn der_tlv(data: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *data.first()?;
    let first = *data.get(1)? as usize;
    let (len, header) = match first {
        l if l < 0x80 => (l, 2),
        0x81 => (*data.get(2)? as usize, 3),
        0x82 => (((*data.get(2)? as usize) << 8) | *data.get(3)? as usize, 4),
        _ => return None,
    };
    let content = data.get(header..header + len)?;
    Some((tag, content, &data[header + len..]))
}

fn der_len(out: &mut Vec<u8>, len: usize) {
    match len {
        l if l < 0x80 => out.push(l as u8),
        l if l < 0x100 => out.extend_from_slice(&[0x81, l as u8]),
        l => out.extend_from_slice(&[0x82, (l >> 8) as u8, l as u8]),
    }
}

pub fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// What a CSR or certificate names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Names {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub uris: Vec<String>,
    pub emails: Vec<String>,
}

impl Names {
    pub fn from_spec(spec: &CertificateSpec) -> Self {
        Self {
            common_name: spec.common_name.clone().filter(|c| !c.is_empty()),
            dns_names: spec.dns_names.clone().unwrap_or_default(),
            ip_addresses: spec.ip_addresses.clone().unwrap_or_default(),
            uris: spec.uris.clone().unwrap_or_default(),
            emails: spec.email_addresses.clone().unwrap_or_default(),
        }
    }

    /// Which fields differ (order-insensitive for lists), as `spec.<field>` names.
    pub fn differences(&self, other: &Names) -> Vec<&'static str> {
        let set = |v: &[String]| {
            let mut v: Vec<String> = v.iter().map(|s| s.to_ascii_lowercase()).collect();
            v.sort();
            v.dedup();
            v
        };
        let ips = |v: &[String]| {
            let mut v: Vec<String> = v
                .iter()
                .map(|s| {
                    s.parse::<IpAddr>()
                        .map(|ip| ip.to_string())
                        .unwrap_or_else(|_| s.clone())
                })
                .collect();
            v.sort();
            v.dedup();
            v
        };
        let mut out = Vec::new();
        if self.common_name != other.common_name {
            out.push("spec.commonName");
        }
        if set(&self.dns_names) != set(&other.dns_names) {
            out.push("spec.dnsNames");
        }
        if ips(&self.ip_addresses) != ips(&other.ip_addresses) {
            out.push("spec.ipAddresses");
        }
        if set(&self.uris) != set(&other.uris) {
            out.push("spec.uris");
        }
        if set(&self.emails) != set(&other.emails) {
            out.push("spec.emailAddresses");
        }
        out
    }
}

/// A PEM CSR for the Certificate's names, signed by `key`.
pub fn csr_pem(spec: &CertificateSpec, key: &PrivateKey) -> Result<String, PkiError> {
    let names = Names::from_spec(spec);
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    if let Some(cn) = &names.common_name {
        dn.push(DnType::CommonName, cn.as_str());
    }
    if let Some(subject) = &spec.subject {
        for o in subject.organizations.iter().flatten() {
            dn.push(DnType::OrganizationName, o.as_str());
        }
        for ou in subject.organizational_units.iter().flatten() {
            dn.push(DnType::OrganizationalUnitName, ou.as_str());
        }
        for c in subject.countries.iter().flatten() {
            dn.push(DnType::CountryName, c.as_str());
        }
        for l in subject.localities.iter().flatten() {
            dn.push(DnType::LocalityName, l.as_str());
        }
        for p in subject.provinces.iter().flatten() {
            dn.push(DnType::StateOrProvinceName, p.as_str());
        }
    }
    params.distinguished_name = dn;
    let mut sans = Vec::new();
    for d in &names.dns_names {
        sans.push(SanType::DnsName(d.clone().try_into()?));
    }
    for ip in &names.ip_addresses {
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| PkiError::InvalidCsr(format!("invalid IP address {ip:?}")))?;
        sans.push(SanType::IpAddress(ip));
    }
    for u in &names.uris {
        sans.push(SanType::URI(u.clone().try_into()?));
    }
    for e in &names.emails {
        sans.push(SanType::Rfc822Name(e.clone().try_into()?));
    }
    params.subject_alt_names = sans;
    let kp = key.key_pair()?;
    Ok(params.serialize_request(&kp)?.pem()?)
}

/// Names and public key requested by a PEM CSR.
pub fn parse_csr(pem: &[u8]) -> Result<(Names, Vec<u8>), PkiError> {
    use x509_parser::certification_request::X509CertificationRequest;
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(pem)
        .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
    let (_, csr) = X509CertificationRequest::from_der(der.as_ref())
        .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
    let info = &csr.certification_request_info;
    let mut names = Names {
        common_name: info
            .subject
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        ..Default::default()
    };
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                add_general_names(&mut names, &san.general_names);
            }
        }
    }
    Ok((names, info.subject_pki.raw.to_vec()))
}

fn add_general_names(names: &mut Names, general: &[GeneralName<'_>]) {
    for n in general {
        match n {
            GeneralName::DNSName(d) => names.dns_names.push(d.to_string()),
            GeneralName::IPAddress(b) => {
                let ip = match b.len() {
                    4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                    16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                    _ => None,
                };
                if let Some(ip) = ip {
                    names.ip_addresses.push(ip.to_string());
                }
            }
            GeneralName::URI(u) => names.uris.push(u.to_string()),
            GeneralName::RFC822Name(e) => names.emails.push(e.to_string()),
            _ => {}
        }
    }
}

/// The leaf of a PEM chain, decoded.
#[derive(Clone, Debug)]
pub struct LeafInfo {
    pub names: Names,
    pub not_before: i64,
    pub not_after: i64,
    pub public_key_der: Vec<u8>,
    pub serial: Vec<u8>,
    pub authority_key_id: Option<Vec<u8>>,
    pub is_ca: bool,
}

/// Splits a PEM bundle into DER certificates.
pub fn pem_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem).collect();
    let certs = certs.map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(PkiError::InvalidCertificate(
            "no certificate in PEM data".into(),
        ));
    }
    Ok(certs)
}

pub fn leaf_info(pem: &[u8]) -> Result<LeafInfo, PkiError> {
    let certs = pem_certs(pem)?;
    let (_, cert) = X509Certificate::from_der(certs[0].as_ref())
        .map_err(|e| PkiError::InvalidCertificate(e.to_string()))?;
    let mut names = Names {
        common_name: cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string),
        ..Default::default()
    };
    let mut authority_key_id = None;
    let mut is_ca = false;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                add_general_names(&mut names, &san.general_names)
            }
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                authority_key_id = aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
            _ => {}
        }
    }
    Ok(LeafInfo {
        names,
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        public_key_der: cert.public_key().raw.to_vec(),
        serial: cert.tbs_certificate.raw_serial().to_vec(),
        authority_key_id,
        is_ca,
    })
}

/// A stand-in certificate for `key`, signed by a throw-away CA `CN=cert-manager.local`, as
/// upstream writes when a Certificate asks for `cert-manager.io/issue-temporary-certificate`
/// (upstream's CA key is P-521, which ring cannot sign with; P-256 here). Leaf then CA.
pub fn temporary_certificate(spec: &CertificateSpec, key: &PrivateKey) -> Result<String, PkiError> {
    let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "cert-manager.local");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key)?;
    let names = Names::from_spec(spec);
    let mut leaf = CertificateParams::new(names.dns_names.clone())?;
    if let Some(cn) = &names.common_name {
        leaf.distinguished_name
            .push(DnType::CommonName, cn.as_str());
    }
    for ip in &names.ip_addresses {
        if let Ok(ip) = ip.parse::<IpAddr>() {
            leaf.subject_alt_names.push(SanType::IpAddress(ip));
        }
    }
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = leaf.signed_by(&key.key_pair()?, &issuer)?;
    Ok(format!("{}{}", cert.pem(), ca_cert.pem()))
}

/// SHA-256 of a byte string, base64 (upstream's `lastPrivateKeyHash` style).
pub fn sha256_b64(data: &[u8]) -> String {
    use base64::Engine;
    let digest = ring_digest(data);
    base64::engine::general_purpose::STANDARD.encode(digest)
}

fn ring_digest(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CertificatePrivateKey, IssuerRef};

    fn spec(alg: &str, size: Option<i32>) -> CertificateSpec {
        CertificateSpec {
            secret_name: "s".into(),
            issuer_ref: IssuerRef {
                name: "i".into(),
                ..Default::default()
            },
            common_name: Some("example.test".into()),
            dns_names: Some(vec!["example.test".into(), "www.example.test".into()]),
            ip_addresses: Some(vec!["10.0.0.1".into()]),
            private_key: Some(CertificatePrivateKey {
                algorithm: Some(alg.into()),
                size,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rsa_default_is_2048_pkcs1_and_round_trips() {
        let s = spec("RSA", None);
        let kind = KeySpec::from_spec(&s).unwrap();
        assert_eq!(kind, KeySpec::Rsa(2048));
        let key = PrivateKey::generate(kind).unwrap();
        let pem = key.to_pem(false).unwrap();
        assert!(pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "{pem}");
        let back = PrivateKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back.kind, KeySpec::Rsa(2048));
        assert_eq!(
            back.public_key_der().unwrap(),
            key.public_key_der().unwrap()
        );
        let csr = csr_pem(&s, &key).unwrap();
        let (names, spki) = parse_csr(csr.as_bytes()).unwrap();
        assert_eq!(spki, key.public_key_der().unwrap());
        assert!(
            Names::from_spec(&s).differences(&names).is_empty(),
            "{names:?}"
        );
    }

    #[test]
    fn ecdsa_and_ed25519_encodings() {
        for (alg, size, label, kind) in [
            ("ECDSA", None, "EC PRIVATE KEY", KeySpec::Ecdsa(256)),
            ("ECDSA", Some(384), "EC PRIVATE KEY", KeySpec::Ecdsa(384)),
            ("Ed25519", None, "PRIVATE KEY", KeySpec::Ed25519),
        ] {
            let s = spec(alg, size);
            assert_eq!(KeySpec::from_spec(&s).unwrap(), kind);
            let key = PrivateKey::generate(kind).unwrap();
            let pem = key.to_pem(false).unwrap();
            assert!(
                pem.starts_with(&format!("-----BEGIN {label}-----")),
                "{pem}"
            );
            let back = PrivateKey::from_pem(pem.as_bytes()).unwrap();
            assert_eq!(back.kind, kind);
            assert_eq!(
                back.public_key_der().unwrap(),
                key.public_key_der().unwrap()
            );
            let pkcs8 = key.to_pem(true).unwrap();
            assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
            csr_pem(&s, &key).unwrap();
        }
        assert!(KeySpec::from_spec(&spec("ECDSA", Some(521))).is_err());
        assert!(KeySpec::from_spec(&spec("RSA", Some(1024))).is_err());
        assert!(KeySpec::from_spec(&spec("DSA", None)).is_err());
    }

    #[test]
    fn temporary_certificate_carries_the_key_and_names() {
        let s = spec("RSA", None);
        let key = PrivateKey::generate(KeySpec::Ecdsa(256)).unwrap();
        let chain = temporary_certificate(&s, &key).unwrap();
        let leaf = leaf_info(chain.as_bytes()).unwrap();
        assert_eq!(leaf.public_key_der, key.public_key_der().unwrap());
        assert!(
            Names::from_spec(&s).differences(&leaf.names).is_empty(),
            "{:?}",
            leaf.names
        );
        assert_eq!(pem_certs(chain.as_bytes()).unwrap().len(), 2);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(PrivateKey::from_pem(b"nonsense").is_err());
        assert!(
            leaf_info(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
        assert!(parse_csr(b"").is_err());
    }
}
