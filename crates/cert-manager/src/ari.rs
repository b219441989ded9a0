//! ACME Renewal Information (RFC 9773): when the issuer's server offers `renewalInfo`, renew
//! inside the window it suggests (a uniformly random instant in it, as upstream's ACMEUseARI),
//! unless the spec's own renewal time comes first. Servers without ARI (Debian's pebble 2.4
//! among them) are asked once a day whether they have gained it.

use std::collections::HashMap;
use std::sync::Mutex;

use instant_acme::CertificateIdentifier;
use kube::ResourceExt;

use crate::api::Certificate;
use crate::context::Context;
use crate::pki::LeafInfo;

#[derive(Default)]
pub struct Ari(Mutex<HashMap<String, Entry>>);

#[derive(Clone)]
struct Entry {
    serial: Vec<u8>,
    pick: Option<i64>,
    next_check: i64,
}

/// A renewal instant inside `[start, end]`, or none for a window that starts before the
/// certificate's notBefore (a stale answer about an older certificate).
pub fn choose(start: i64, end: i64, not_before: i64, random: u64) -> Option<i64> {
    if start < not_before || end < start {
        return None;
    }
    let span = (end - start) as u64 + 1;
    Some(start + (random % span) as i64)
}

impl Ari {
    /// The server's suggested renewal instant for the certificate in `leaf`, if it offers one.
    pub async fn suggested_renewal(
        &self,
        ctx: &Context,
        cert: &Certificate,
        leaf: &LeafInfo,
    ) -> Option<i64> {
        let key = format!(
            "{}/{}",
            cert.namespace().unwrap_or_default(),
            cert.name_any()
        );
        let now = crate::time::now_secs();
        if let Some(e) = self.0.lock().unwrap_or_else(|e| e.into_inner()).get(&key)
            && e.serial == leaf.serial
            && now < e.next_check
        {
            return e.pick;
        }
        let aki = leaf.authority_key_id.as_ref()?;
        let ns = cert.namespace().unwrap_or_default();
        let issuer = crate::issuers::resolve(ctx, &ns, &cert.spec.issuer_ref)
            .await
            .ok()??;
        let acme = issuer.acme()?;
        if acme.renewal_information_source.as_deref() == Some("None") {
            return None;
        }
        let account = crate::issuers::account(ctx, &issuer).await.ok()?;
        let id = CertificateIdentifier::new(
            rustls_pki_types::Der::from(aki.as_slice()),
            rustls_pki_types::Der::from(leaf.serial.as_slice()),
        );
        let (pick, next_check) = match account.renewal_info(&id).await {
            Ok((info, retry_after)) => {
                let w = info.suggested_window;
                let pick = choose(
                    w.start.unix_timestamp(),
                    w.end.unix_timestamp(),
                    leaf.not_before,
                    getrandom::u64().unwrap_or(0),
                );
                (pick, now + retry_after.as_secs().clamp(3600, 86_400) as i64)
            }
            Err(instant_acme::Error::Unsupported(_)) => (None, now + 86_400),
            Err(e) => {
                tracing::debug!(certificate = %key, error = %e, "renewal information unavailable");
                (None, now + 3600)
            }
        };
        let entry = Entry {
            serial: leaf.serial.clone(),
            pick,
            next_check,
        };
        let mut entries = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Answers past their re-check time are asked again anyway: dropping them here is what
        // keeps deleted Certificates from staying in the map for good.
        entries.retain(|_, e| e.next_check > now);
        entries.insert(key, entry);
        pick
    }
}

#[cfg(test)]
mod tests {
    use super::choose;

    #[test]
    fn picks_inside_the_window_and_ignores_stale_windows() {
        for r in [0, 1, 7, 99, u64::MAX] {
            let t = choose(1000, 1100, 500, r).unwrap();
            assert!((1000..=1100).contains(&t));
        }
        assert_eq!(choose(1000, 1000, 500, 12345), Some(1000));
        assert_eq!(
            choose(400, 1100, 500, 1),
            None,
            "window about an older certificate"
        );
        assert_eq!(choose(1100, 1000, 500, 1), None, "inverted window");
    }
}
