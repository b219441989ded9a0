//! Trigger (upstream's `certificates/trigger`): whether a certificate needs issuing. A trigger
//! policy that fires sets Issuing=True, unless the backoff after a failed attempt still holds
//! and the spec has not changed since that attempt.

use std::ops::ControlFlow;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::events::EventType;

use super::{CertificateError, ISSUING, Observed, readiness, request_manager, set};
use crate::api::{CertificateStatus, new_condition};
use crate::policies::{self, TRIGGER_CHAIN};

/// When a failed issuance may be retried: `min(min·2^(n−1), max)` after the last failure.
pub fn backoff_until(status: &CertificateStatus, min: Duration, max: Duration) -> Option<i64> {
    let n = status.failed_issuance_attempts.filter(|n| *n > 0)?;
    let last = status
        .last_failure_time
        .as_deref()
        .and_then(crate::time::parse_secs)?;
    let factor = 2u32.saturating_pow((n - 1).min(30) as u32);
    let delay = min.saturating_mul(factor).min(max);
    Some(last + delay.as_secs() as i64)
}

/// Starts an issuance (Issuing=True, written) and breaks; or continues with the end of the
/// backoff that holds one back, if any.
pub(super) async fn check(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
) -> Result<ControlFlow<Action, Option<i64>>, CertificateError> {
    let Some(v) = policies::evaluate(TRIGGER_CHAIN, &seen.input()) else {
        return Ok(ControlFlow::Continue(None));
    };
    let next_cr = seen.requests.get_opt(&seen.next_name()).await?;
    let spec_unchanged = next_cr
        .as_ref()
        .is_some_and(|cr| request_manager::matches_spec(cr, seen.cert));
    let args = &seen.ctx.args;
    let until = backoff_until(
        status,
        args.certificate_request_minimum_backoff_duration,
        args.certificate_request_maximum_backoff_duration,
    );
    if let Some(t) = until
        && seen.now < t
        && spec_unchanged
    {
        return Ok(ControlFlow::Continue(Some(t)));
    }
    // A failed request of an earlier attempt makes way for a fresh one.
    if let Some(cr) = next_cr {
        request_manager::delete_request(&seen.requests, &cr).await?;
    }
    set(
        status,
        new_condition(ISSUING, true, v.reason, v.message.clone()),
        seen.generation(),
    );
    readiness::update(seen, status);
    seen.patch_status(status).await?;
    let (name, ns) = (&seen.name, &seen.ns);
    tracing::info!(certificate = %name, namespace = %ns, check = v.check, reason = v.reason, "issuing");
    seen.event(EventType::Normal, "Issuing", v.reason, v.message)
        .await;
    Ok(ControlFlow::Break(Action::requeue(Duration::from_millis(
        100,
    ))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap() {
        let min = Duration::from_secs(3600);
        let max = Duration::from_secs(32 * 3600);
        let at = |n: i32| {
            let s = CertificateStatus {
                failed_issuance_attempts: Some(n),
                last_failure_time: Some(crate::time::format_secs(0)),
                ..Default::default()
            };
            backoff_until(&s, min, max).unwrap() / 3600
        };
        assert_eq!(
            [at(1), at(2), at(3), at(6), at(7), at(40)],
            [1, 2, 4, 32, 32, 32]
        );
        assert_eq!(backoff_until(&CertificateStatus::default(), min, max), None);
    }
}
