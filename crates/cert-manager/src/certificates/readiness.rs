//! Readiness (upstream's `certificates/readiness`): the Ready condition and the not-before,
//! not-after and renewal times in status, and when to look at the certificate again.

use std::time::Duration;

use kube::runtime::controller::Action;

use super::{CertificateError, Observed, READY, set};
use crate::api::{CertificateStatus, Condition, new_condition};
use crate::pki::LeafInfo;
use crate::policies::{self, READINESS_CHAIN};

/// Not issuing: writes status if readiness changed it, and sleeps until the next moment that
/// matters (renewal, expiry, the end of a backoff).
pub(super) async fn sync(
    seen: &Observed<'_>,
    mut status: CertificateStatus,
    backoff_end: Option<i64>,
) -> Result<Action, CertificateError> {
    update(seen, &mut status);
    if seen.cert.status.as_ref() != Some(&status) {
        seen.patch_status(&status).await?;
    }
    seen.ctx.metrics.observe_certificate(seen.cert, &status);
    let now = seen.now;
    let wake = [
        seen.renewal,
        seen.leaf.as_ref().map(|l| l.not_after),
        backoff_end,
    ]
    .into_iter()
    .flatten()
    .filter(|t| *t > now)
    .min();
    Ok(match wake {
        // Re-check a little after the moment, and at least daily (clock changes, ARI).
        Some(t) => Action::requeue(Duration::from_secs(((t - now) as u64 + 1).min(86_400))),
        None => Action::requeue(Duration::from_secs(86_400)),
    })
}

/// The Ready condition and the timestamps in status, from the readiness chain.
pub(super) fn update(seen: &Observed<'_>, status: &mut CertificateStatus) {
    let ready = match policies::evaluate(READINESS_CHAIN, &seen.input()) {
        Some(v) => new_condition(READY, false, v.reason, v.message),
        None => up_to_date(),
    };
    set(status, ready, seen.generation());
    if let Some(l) = &seen.leaf {
        record_times(status, l, seen.renewal);
    }
}

/// Ready=True, as after a successful issuance.
pub(super) fn up_to_date() -> Condition {
    new_condition(
        READY,
        true,
        "Ready",
        "Certificate is up to date and has not expired",
    )
}

/// The certificate's validity and renewal time, as status shows them.
pub(super) fn record_times(status: &mut CertificateStatus, leaf: &LeafInfo, renewal: Option<i64>) {
    status.not_before = Some(crate::time::format_secs(leaf.not_before));
    status.not_after = Some(crate::time::format_secs(leaf.not_after));
    status.renewal_time = renewal.map(crate::time::format_secs);
}
