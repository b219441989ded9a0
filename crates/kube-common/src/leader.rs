//! Leader election on a `coordination.k8s.io/v1` Lease with client-go's semantics, so our
//! components and Go controllers can share one Lease (e.g. during a migration back and forth).
//!
//! Written here rather than taken from a crate because the guarantee we need is client-go's
//! three-timer contract: a leader that has not renewed within `renew_deadline` stops acting, and
//! a candidate only takes over once the record has been unchanged for `lease_duration`
//! (> `renew_deadline`), measured on its own clock. The crates available model a single
//! duration plus grace and write the Lease by server-side apply, which client-go does not.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::args::LeaderElectionArgs;

/// Where the Lease lives, who we are, and the three client-go timers.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaseConfig {
    /// From the shared flags; `default_name` is the component's Lease name.
    pub fn from_args(args: &LeaderElectionArgs, default_name: &str) -> Result<Self, Error> {
        let cfg = Self {
            namespace: args.leader_election_namespace.clone(),
            name: args
                .leader_election_id
                .clone()
                .unwrap_or_else(|| default_name.to_string()),
            identity: default_identity(),
            lease_duration: args.leader_elect_lease_duration,
            renew_deadline: args.leader_elect_renew_deadline,
            retry_period: args.leader_elect_retry_period,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// client-go's checks: lease duration > renew deadline > 1.2 × retry period.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |m: &str| Err(Error::LeaderElectionConfig(m.to_string()));
        if self.name.is_empty() || self.namespace.is_empty() || self.identity.is_empty() {
            return bad("lease name, namespace and identity must not be empty");
        }
        if self.lease_duration <= self.renew_deadline {
            return bad("lease duration must be greater than renew deadline");
        }
        if self.renew_deadline.as_secs_f64() <= 1.2 * self.retry_period.as_secs_f64() {
            return bad("renew deadline must be greater than 1.2 x retry period");
        }
        if self.retry_period.is_zero() {
            return bad("retry period must be positive");
        }
        Ok(())
    }
}

/// `hostname_<unique suffix>`, the shape client-go based controllers use.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .or_else(|_| std::env::var("HOSTNAME"))
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{host}_{:x}{:08x}", std::process::id(), nanos)
}

/// Outcome of one acquire-or-renew attempt.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the Lease now.
    Held,
    /// Another holder's lease is still valid.
    HeldByOther(String),
    /// Someone wrote the Lease between our read and write; try again.
    Conflict,
}

/// Why [`LeaderElector::hold`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum HoldEnd {
    /// The shutdown token was cancelled while we still led.
    Shutdown,
    /// Renewal did not succeed within the renew deadline, or another holder took over.
    Lost,
}

/// One candidate for one Lease.
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The last record we saw and when (our clock): expiry is judged from this, never from the
    /// record's timestamps, so clock skew between candidates does not matter.
    observed: Option<(LeaseSpec, Instant)>,
    /// When our last successful write was *sent*: counting the renew deadline from the send,
    /// not the reply, keeps us on the safe side of what other candidates observed.
    last_write: Option<Instant>,
}

impl LeaderElector {
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            last_write: None,
        }
    }

    pub fn config(&self) -> &LeaseConfig {
        &self.cfg
    }

    /// Tries every retry period until we hold the Lease. Returns false if `shutdown` fired first.
    pub async fn acquire(&mut self, shutdown: &CancellationToken) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Held) => {
                    tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "acquired leadership");
                    return true;
                }
                Ok(Attempt::HeldByOther(holder)) => {
                    tracing::debug!(lease = %self.cfg.name, %holder, "lease held by another candidate");
                }
                Ok(Attempt::Conflict) => {}
                Err(e) => {
                    tracing::warn!(lease = %self.cfg.name, error = %e, "acquiring lease failed")
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(self.cfg.retry_period) => {}
            }
        }
    }

    /// Renews every retry period while leading. Returns [`HoldEnd::Lost`] no later than
    /// `renew_deadline` after the last successful renewal, so the caller stops acting before
    /// any other candidate may take over (`lease_duration` later).
    pub async fn hold(&mut self, shutdown: &CancellationToken) -> HoldEnd {
        loop {
            let last_renew = self.last_write.unwrap_or_else(Instant::now);
            let deadline = last_renew + self.cfg.renew_deadline;
            let next = (Instant::now() + self.cfg.retry_period).min(deadline);
            tokio::select! {
                _ = shutdown.cancelled() => return HoldEnd::Shutdown,
                _ = tokio::time::sleep_until(next) => {}
            }
            if Instant::now() >= deadline {
                tracing::error!(lease = %self.cfg.name, "failed to renew lease within the renew deadline");
                return HoldEnd::Lost;
            }
            // A hung request must not carry us past the deadline.
            let attempt = tokio::select! {
                _ = shutdown.cancelled() => return HoldEnd::Shutdown,
                r = tokio::time::timeout_at(deadline, self.try_acquire_or_renew()) => r,
            };
            match attempt {
                Ok(Ok(Attempt::Held)) => {}
                Ok(Ok(Attempt::HeldByOther(holder))) => {
                    tracing::error!(lease = %self.cfg.name, %holder, "lease taken over by another holder");
                    return HoldEnd::Lost;
                }
                Ok(Ok(Attempt::Conflict)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = %self.cfg.name, error = %e, "renewing lease failed")
                }
                Err(_) => {
                    tracing::error!(lease = %self.cfg.name, "lease renewal timed out at the renew deadline");
                    return HoldEnd::Lost;
                }
            }
        }
    }

    /// Gives the Lease up so another candidate can take it at once (client-go's
    /// ReleaseOnCancel): empty holder, 1 s duration, transitions kept.
    pub async fn release(&mut self) -> Result<(), Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return Ok(());
        }
        let now = MicroTime(Timestamp::now());
        lease.spec = Some(LeaseSpec {
            holder_identity: Some(String::new()),
            lease_duration_seconds: Some(1),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: spec.lease_transitions,
            ..Default::default()
        });
        self.api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await?;
        tracing::info!(lease = %self.cfg.name, "released leadership");
        Ok(())
    }

    /// client-go's tryAcquireOrRenew: create if absent; if another holder's record changed less
    /// than its lease duration ago, back off; else write ourselves in with optimistic concurrency.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let sent = Instant::now();
        let now = Timestamp::now();
        let Some(existing) = self.api.get_opt(&self.cfg.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.record(now, None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(created.spec.unwrap_or_default());
                    self.last_write = Some(sent);
                    Ok(Attempt::Held)
                }
                Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        let spec = existing.spec.clone().unwrap_or_default();
        self.observe(spec.clone());
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.cfg.identity;
        if !holder.is_empty() && !ours {
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.lease_duration);
            let seen_at = self
                .observed
                .as_ref()
                .map(|(_, t)| *t)
                .unwrap_or_else(Instant::now);
            if seen_at + duration > Instant::now() {
                return Ok(Attempt::HeldByOther(holder));
            }
        }
        let mut lease = existing;
        lease.spec = Some(self.record(now, Some((&spec, ours))));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(updated.spec.unwrap_or_default());
                self.last_write = Some(sent);
                Ok(Attempt::Held)
            }
            Err(e) if is_conflict(&e) => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// The record we write: acquire time and transitions carry over while we keep holding.
    fn record(&self, now: Timestamp, previous: Option<(&LeaseSpec, bool)>) -> LeaseSpec {
        let (acquire_time, transitions) = match previous {
            None => (MicroTime(now), 0),
            Some((prev, true)) => (
                prev.acquire_time.clone().unwrap_or(MicroTime(now)),
                prev.lease_transitions.unwrap_or(0),
            ),
            Some((prev, false)) => (MicroTime(now), prev.lease_transitions.unwrap_or(0) + 1),
        };
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquire_time),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn observe(&mut self, spec: LeaseSpec) {
        let changed = self.observed.as_ref().is_none_or(|(seen, _)| *seen != spec);
        if changed {
            self.observed = Some((spec, Instant::now()));
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Runs `work` only while this process holds the Lease.
///
/// `work` gets a token cancelled when leadership ends; it must stop writing when it fires. On
/// shutdown the work is stopped, then the Lease released, and `Ok` returned. On loss the work is
/// stopped and `Err(LeadershipLost)` returned: like client-go users, callers exit so that a fresh
/// process rejoins as a candidate with clean caches.
pub async fn run_leader_elected<F, Fut>(
    client: Client,
    cfg: LeaseConfig,
    shutdown: CancellationToken,
    work: F,
) -> Result<(), Error>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = ()>,
{
    cfg.validate()?;
    let mut elector = LeaderElector::new(client, cfg);
    if !elector.acquire(&shutdown).await {
        return Ok(());
    }
    let leading = CancellationToken::new();
    let work = work(leading.clone());
    tokio::pin!(work);
    let mut work_done = false;
    let end = tokio::select! {
        end = elector.hold(&shutdown) => end,
        () = &mut work => { work_done = true; HoldEnd::Shutdown }
    };
    leading.cancel();
    if !work_done {
        work.await;
    }
    match end {
        HoldEnd::Shutdown => {
            if let Err(e) = elector.release().await {
                tracing::warn!(error = %e, "releasing lease failed; others take over after it expires");
            }
            Ok(())
        }
        HoldEnd::Lost => Err(Error::LeadershipLost {
            namespace: elector.cfg.namespace.clone(),
            name: elector.cfg.name.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(lease: u64, renew: u64, retry: u64) -> LeaseConfig {
        LeaseConfig {
            namespace: "ns".into(),
            name: "l".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(lease),
            renew_deadline: Duration::from_secs(renew),
            retry_period: Duration::from_secs(retry),
        }
    }

    #[test]
    fn client_go_timer_rules() {
        assert!(cfg(15, 10, 2).validate().is_ok());
        assert!(cfg(10, 10, 2).validate().is_err());
        assert!(cfg(15, 2, 2).validate().is_err());
        assert!(cfg(15, 10, 0).validate().is_err());
    }

    #[test]
    fn identity_is_unique_per_process_start() {
        let id = default_identity();
        assert!(id.contains('_'));
    }
}
