//! CA bundle merging, as upstream's `AppendCertificatesToBundle` (feature gate
//! `CAInjectorMerging`, GA and on by default): the new CA is appended to what the target already
//! trusts, duplicates are dropped and expired certificates pruned. During a CA rotation the
//! apiserver keeps trusting serving certificates from the old CA until it expires.

use base64::Engine;
use time::OffsetDateTime;

/// DER certificates of a PEM bundle with their expiry; None unless every PEM block is a
/// parseable certificate and there is at least one.
fn parse(bundle: &[u8]) -> Option<Vec<(Vec<u8>, OffsetDateTime)>> {
    let mut out = Vec::new();
    for pem in x509_parser::pem::Pem::iter_from_buffer(bundle) {
        let pem = pem.ok()?;
        if pem.label != "CERTIFICATE" {
            continue;
        }
        let not_after = pem.parse_x509().ok()?.validity().not_after.to_datetime();
        out.push((pem.contents, not_after));
    }
    (!out.is_empty()).then_some(out)
}

/// `existing` plus the certificates of `additional` not already in it, without expired ones.
/// If either side cannot be parsed the result is `additional` as given (upstream's fallback).
pub fn merge(existing: &[u8], additional: &[u8], now: OffsetDateTime) -> Vec<u8> {
    let old = if existing.is_empty() {
        Vec::new()
    } else {
        match parse(existing) {
            Some(certs) => certs,
            None => return additional.to_vec(),
        }
    };
    let Some(new) = parse(additional) else {
        return additional.to_vec();
    };
    let mut seen: Vec<&[u8]> = Vec::new();
    let mut out = Vec::new();
    for (der, not_after) in old.iter().chain(new.iter()) {
        if seen.contains(&der.as_slice()) || now > *not_after {
            continue;
        }
        seen.push(der);
        out.extend_from_slice(pem_encode(der).as_bytes());
    }
    out
}

/// PEM `CERTIFICATE` block with 64-column base64, as Go's `pem.Encode` writes it.
pub fn pem_encode(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ca(days: i64) -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.not_before = OffsetDateTime::now_utc() - time::Duration::days(400);
        params.not_after = OffsetDateTime::now_utc() + time::Duration::days(days);
        params.self_signed(&key).expect("cert").pem()
    }

    fn count(bundle: &[u8]) -> usize {
        parse(bundle).map_or(0, |c| c.len())
    }

    #[test]
    fn merges_dedupes_and_prunes() {
        let now = OffsetDateTime::now_utc();
        let (a, b, expired) = (ca(30), ca(30), ca(-1));
        let cases: &[(&str, String, &str, usize)] = &[
            ("empty target takes the CA", String::new(), &a, 1),
            ("same CA is not duplicated", a.clone(), &a, 1),
            ("new CA is appended", a.clone(), &b, 2),
            ("expired ones are pruned", format!("{expired}{a}"), &b, 2),
        ];
        for (name, existing, additional, want) in cases {
            let merged = merge(existing.as_bytes(), additional.as_bytes(), now);
            assert_eq!(count(&merged), *want, "{name}");
            let again = merge(&merged, additional.as_bytes(), now);
            assert_eq!(again, merged, "{name}: merging again changes nothing");
        }
        // Order: what the target had comes first.
        let merged = merge(a.as_bytes(), b.as_bytes(), now);
        let first = parse(&merged).expect("merged")[0].0.clone();
        assert_eq!(first, parse(a.as_bytes()).expect("a")[0].0);
    }

    #[test]
    fn unparseable_input_falls_back_to_the_new_data() {
        let now = OffsetDateTime::now_utc() + Duration::ZERO;
        let a = ca(30);
        assert_eq!(merge(b"garbage", a.as_bytes(), now), a.as_bytes());
        assert_eq!(merge(a.as_bytes(), b"garbage", now), b"garbage");
    }
}
