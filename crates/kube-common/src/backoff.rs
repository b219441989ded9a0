//! Capped exponential backoff, shared by the controller error policy and by retry loops.

use std::time::Duration;

/// `base * factor^(attempt-1)`, capped at `max`. `attempt` counts failures, starting at 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub factor: f64,
    pub max: Duration,
}

impl Backoff {
    pub const fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            factor: 2.0,
            max,
        }
    }

    /// Delay before retry number `attempt` (1 = first retry after the first failure).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// An iterator of successive delays, for retry loops.
    pub fn iter(self) -> impl Iterator<Item = Duration> {
        (1u32..).map(move |n| self.delay(n))
    }
}

impl Default for Backoff {
    /// The controller default: 500 ms doubling up to 5 minutes (client-go's workqueue limiter
    /// starts at 5 ms; a slower start keeps a failing object from spinning).
    fn default() -> Self {
        Self::new(Duration::from_millis(500), Duration::from_secs(300))
    }
}

/// Delays between a watch's retries: 500 ms doubling to 5 s, back to the start once the watch
/// delivers anything.
///
/// kube-runtime's default (client-go's reflector: 0.8 s doubling to 30 s) is shared by all of a
/// `Controller`'s watches, so after an apiserver outage each watch's one "too old resource
/// version" answer cost the whole controller another 30 s: minutes before work resumed (with
/// leader election off; with it on, a leader that cannot renew restarts its controllers). A
/// controller's watches still share one delay, and a pause lets one error through, so with n
/// watches failing each is retried about every n x 5 s.
#[derive(Clone, Debug)]
pub struct WatchRetry {
    backoff: Backoff,
    failures: u32,
}

impl WatchRetry {
    pub const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(5));
}

impl Default for WatchRetry {
    fn default() -> Self {
        Self {
            backoff: Self::BACKOFF,
            failures: 0,
        }
    }
}

impl WatchRetry {
    /// The delay before the next retry (counts one more failure).
    pub fn delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        self.backoff.delay(self.failures)
    }
}

impl WatchRetry {
    /// Accounts for an event a watcher delivered: back to the first delay, except on a
    /// relist's `Init`, which comes before its list request (a failing list would otherwise
    /// be retried every 0.5 s).
    pub fn observe<K>(&mut self, event: &kube::runtime::watcher::Event<K>) {
        if !matches!(event, kube::runtime::watcher::Event::Init) {
            self.failures = 0;
        }
    }
}

impl Iterator for WatchRetry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        Some(self.delay())
    }
}

impl kube::runtime::utils::Backoff for WatchRetry {
    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_and_caps() {
        let b = Backoff::new(Duration::from_secs(1), Duration::from_secs(10));
        let d: Vec<u64> = b.iter().take(6).map(|d| d.as_secs()).collect();
        assert_eq!(d, vec![1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(0), Duration::from_secs(1));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
    }

    #[test]
    fn watch_retry_caps_and_resets() {
        use kube::runtime::utils::Backoff as _;
        let mut retry = WatchRetry::default();
        let first: Vec<u128> = retry.by_ref().take(6).map(|d| d.as_millis()).collect();
        assert_eq!(first, vec![500, 1000, 2000, 4000, 5000, 5000]);
        retry.reset();
        assert_eq!(retry.next(), Some(Duration::from_millis(500)));
    }

    #[test]
    fn watch_retry_resets_on_delivered_events_only() {
        use kube::runtime::watcher::Event;
        let mut retry = WatchRetry::default();
        assert_eq!(retry.delay(), Duration::from_millis(500));
        retry.observe(&Event::<()>::Init);
        assert_eq!(retry.delay(), Duration::from_secs(1));
        retry.observe(&Event::<()>::InitDone);
        assert_eq!(retry.delay(), Duration::from_millis(500));
    }

    #[test]
    fn cert_manager_issuance_backoff() {
        // 1h x 2^(n-1) capped at 32h, as cert-manager's issuing controller does.
        let b = Backoff::new(Duration::from_secs(3600), Duration::from_secs(32 * 3600));
        assert_eq!(b.delay(1), Duration::from_secs(3600));
        assert_eq!(b.delay(6), Duration::from_secs(32 * 3600));
        assert_eq!(b.delay(7), Duration::from_secs(32 * 3600));
    }
}
