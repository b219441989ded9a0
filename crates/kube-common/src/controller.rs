//! Controller scaffolding over kube-runtime: one [`Manager`] per process holds the client, the
//! metrics registry, readiness and the shutdown token; [`Manager::run`] drives a
//! `kube::runtime::Controller` with the shared error policy (per-object capped exponential
//! backoff), reconcile metrics and cache-sync readiness.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::events::Recorder;
use futures::StreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::health::{self, HealthState, Readiness};
use crate::{Error, args::CommonArgs, client, leader, telemetry};

/// How often a controller's cache-sync state is re-checked for `/readyz`.
const READY_POLL: std::time::Duration = std::time::Duration::from_millis(100);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    controller: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ControllerLabels {
    controller: String,
}

/// `controller_reconcile_total{controller,result}` and
/// `controller_reconcile_duration_seconds{controller}`.
#[derive(Clone)]
pub struct ReconcileMetrics {
    total: Family<ResultLabels, Counter>,
    duration: Family<ControllerLabels, Histogram>,
}

impl ReconcileMetrics {
    fn register(registry: &mut Registry) -> Self {
        let total = Family::<ResultLabels, Counter>::default();
        let duration = Family::<ControllerLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            "controller_reconcile",
            "Reconciliations by controller and result",
            total.clone(),
        );
        registry.register(
            "controller_reconcile_duration_seconds",
            "Time taken by one reconciliation",
            duration.clone(),
        );
        Self { total, duration }
    }

    fn observe(&self, controller: &str, ok: bool, seconds: f64) {
        self.total
            .get_or_create(&ResultLabels {
                controller: controller.to_string(),
                result: if ok { "success" } else { "error" }.to_string(),
            })
            .inc();
        self.duration
            .get_or_create(&ControllerLabels {
                controller: controller.to_string(),
            })
            .observe(seconds);
    }
}

/// Sets `ready` once `store` has its first full list.
fn mark_ready_when_synced<K>(store: kube::runtime::reflector::Store<K>, ready: crate::ReadyHandle)
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + Hash + Send + Sync,
{
    tokio::spawn(async move {
        if wait_synced(&store).await {
            ready.set(true);
        }
    });
}

/// Waits until `store` has its first full list; false if its writer went away first.
pub async fn wait_synced<K>(store: &kube::runtime::reflector::Store<K>) -> bool
where
    K: Resource + Clone + 'static,
    K::DynamicType: Clone + Eq + Hash,
{
    // Re-poll on a timer: kube-runtime's ready signal keeps a single waker, and a controller's
    // own runner waits on it too, so one of two concurrent waiters is never woken. A fresh
    // poll after the store is ready always completes.
    loop {
        match tokio::time::timeout(READY_POLL, store.wait_until_ready()).await {
            Ok(Ok(())) => return true,
            Ok(Err(_)) => return false,
            Err(_) => {}
        }
    }
}

/// `Controller::new`, except that the cached objects carry no `managedFields`: often most of an
/// object's bytes (every field manager's field set as a JSON tree), and no controller reads
/// them. Measured on local-path-provisioner, those trees were the largest share of its heap
/// under a burst of claims.
pub fn lean_controller<K>(api: kube::Api<K>, wc: kube::runtime::watcher::Config) -> Controller<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Eq + Hash + Debug + Unpin,
{
    trimmed_controller(api, wc, |_| {})
}

/// [`lean_controller`] that also applies `trim` to every object before caching it, for
/// controllers that read a small part of large objects (a CRD's schema is most of its size).
/// Only for controllers that write with patches: the cached copy is no longer the object.
pub fn trimmed_controller<K>(
    api: kube::Api<K>,
    wc: kube::runtime::watcher::Config,
    trim: impl Fn(&mut K) + Send + 'static,
) -> Controller<K>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Clone + Eq + Hash + Debug + Unpin,
{
    use kube::runtime::{WatchStreamExt, reflector, watcher};
    let (reader, writer) = reflector::store();
    // No backoff here: as with `Controller::new`, `Manager::run` backs off the trigger stream.
    let stream = watcher(api, wc)
        .modify(move |o: &mut K| {
            o.meta_mut().managed_fields = None;
            trim(o);
        })
        .reflect(writer)
        .applied_objects();
    Controller::for_stream(stream, reader)
}

/// Consecutive failures per object, for the retry backoff.
struct Failures<K: Resource>
where
    K::DynamicType: Eq + Hash,
{
    counts: HashMap<ObjectRef<K>, u32>,
    /// Size at which objects no longer in the cache are dropped next (doubling, so pruning
    /// stays linear overall however many objects fail at once).
    prune_at: usize,
}

impl<K: Resource> Default for Failures<K>
where
    K::DynamicType: Eq + Hash,
{
    fn default() -> Self {
        Self {
            counts: HashMap::new(),
            prune_at: FAILURES_PRUNE_MIN,
        }
    }
}

const FAILURES_PRUNE_MIN: usize = 64;

/// Objects deleted while failing are never reconciled again to clear their count.
fn prune_deleted<K>(f: &mut Failures<K>, store: &Store<K>)
where
    K: Resource + Clone + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    if f.counts.len() < f.prune_at {
        return;
    }
    f.counts.retain(|k, _| store.get(k).is_some());
    f.prune_at = (f.counts.len() * 2).max(FAILURES_PRUNE_MIN);
}

/// Announcements a subscriber may fall behind by before it misses some (then it is told how
/// many it missed; triggered controllers still have their requeue timers).
const ANNOUNCE_BUFFER: usize = 1024;

/// A cache whose changes are announced (see [`Manager::reflect_announced`]).
#[derive(Clone)]
pub struct Announced<K: Resource + 'static>
where
    K::DynamicType: Eq + Hash,
{
    pub store: Store<K>,
    tx: tokio::sync::broadcast::Sender<Arc<K>>,
}

impl<K> Announced<K>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + Hash,
{
    /// The objects changed from now on, for `Controller::watches_shared_stream`.
    pub fn subscribe(&self) -> impl futures::Stream<Item = Arc<K>> + Send + 'static {
        use tokio::sync::broadcast::error::RecvError;
        futures::stream::unfold(self.tx.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(o) => return Some((o, rx)),
                    Err(RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "a subscriber fell behind a cache's changes")
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// What every controller of a process shares.
#[derive(Clone)]
pub struct Manager {
    pub client: Client,
    /// Cancelled on SIGTERM/SIGINT (or by a test).
    pub shutdown: CancellationToken,
    pub readiness: Readiness,
    registry: Arc<Mutex<Registry>>,
    metrics: ReconcileMetrics,
    component: String,
    backoff: Backoff,
}

impl Manager {
    /// For a binary: sets up tracing from the flags, builds the client, and cancels `shutdown` on
    /// SIGTERM/SIGINT.
    pub async fn from_args(component: &str, args: &CommonArgs) -> Result<Self, Error> {
        telemetry::init(args.log_format, args.log_filter())?;
        let client = client::client(args.kubeconfig.as_deref()).await?;
        Ok(Self::new(component, client, crate::shutdown::on_signal()))
    }

    /// For tests and embedding: an explicit client and shutdown token.
    pub fn new(component: &str, client: Client, shutdown: CancellationToken) -> Self {
        let mut registry = Registry::default();
        let metrics = ReconcileMetrics::register(&mut registry);
        Self {
            client,
            shutdown,
            readiness: Readiness::default(),
            registry: Arc::new(Mutex::new(registry)),
            metrics,
            component: component.to_string(),
            backoff: Backoff::default(),
        }
    }

    /// Replaces the per-object error backoff (default 500 ms doubling to 5 min).
    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Lets a component add its own metrics to the one registry `/metrics` serves.
    pub fn register_metrics(&self, f: impl FnOnce(&mut Registry)) {
        f(&mut self.registry.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// OpenMetrics text of the registry (what `/metrics` serves).
    pub fn encode_metrics(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        prometheus_client::encoding::text::encode(&mut out, &registry)?;
        Ok(out)
    }

    /// An Events recorder reporting as `controller` (events.k8s.io/v1).
    pub fn recorder(&self, controller: &str) -> Recorder {
        Recorder::new(self.client.clone(), controller)
    }

    /// Starts the `/healthz` `/readyz` `/metrics` server; returns the bound address.
    pub async fn serve_health(&self, addr: SocketAddr) -> Result<SocketAddr, Error> {
        let state = HealthState {
            readiness: self.readiness.clone(),
            registry: self.registry.clone(),
        };
        // From the shutdown signal on, /readyz fails so Services and load balancers stop sending
        // new work; the server itself answers until the process ends, so liveness holds while
        // connections drain.
        let serving = self.readiness.register("not-shutting-down");
        serving.set(true);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            serving.set(false);
        });
        let (bound, _task) = health::serve(addr, state, CancellationToken::new()).await?;
        Ok(bound)
    }

    /// Runs `work` only while holding the component's Lease when `--leader-elect` is set,
    /// else right away; see [`leader::run_leader_elected`].
    pub async fn run_leader_elected<F, Fut>(
        &self,
        args: &crate::args::LeaderElectionArgs,
        default_lease: &str,
        work: F,
    ) -> Result<(), Error>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        if !args.leader_elect {
            work(self.shutdown.clone()).await;
            return Ok(());
        }
        let cfg = leader::LeaseConfig::from_args(args, default_lease)?;
        leader::run_leader_elected(self.client.clone(), cfg, self.shutdown.clone(), work).await
    }

    /// Keeps a cache of `K` (all objects `api` and `wc` select) until shutdown, notifying
    /// `changed` after every change, for components that rebuild a whole view (the ingress
    /// routing table) rather than reconcile objects one by one. `/readyz` waits for the first
    /// full list.
    pub fn reflect<K>(
        &self,
        name: &str,
        api: kube::Api<K>,
        wc: kube::runtime::watcher::Config,
        dyntype: K::DynamicType,
        changed: Arc<tokio::sync::Notify>,
    ) -> kube::runtime::reflector::Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash + Send + Sync,
    {
        self.reflect_with(name, api, wc, dyntype, move |_, _| changed.notify_one())
    }

    /// A cache of `K` like [`Manager::reflect`] whose every change (deletions too) is announced
    /// to subscribers after the cache has it, so a controller triggered by it reads the object
    /// it was woken for, never an older one.
    pub fn reflect_announced<K>(
        &self,
        name: &str,
        api: kube::Api<K>,
        wc: kube::runtime::watcher::Config,
    ) -> Announced<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Default + Clone + Eq + Hash + Send + Sync,
    {
        use kube::runtime::watcher::Event;
        let (tx, _) = tokio::sync::broadcast::channel(ANNOUNCE_BUFFER);
        let sender = tx.clone();
        // What the cache held when a relist began: objects deleted while the watch was down
        // are announced too, once the relist shows them gone.
        let mut before: Vec<Arc<K>> = Vec::new();
        let store = self.reflect_with(name, api, wc, Default::default(), move |ev, store| {
            match ev {
                Event::Apply(o) | Event::Delete(o) if sender.receiver_count() > 0 => {
                    let _ = sender.send(Arc::new(o.clone()));
                }
                Event::Apply(_) | Event::Delete(_) => {}
                Event::Init => before = store.state(),
                // After a relist the cache holds exactly the listed objects: announce them all,
                // and the ones that went.
                Event::InitDone => {
                    let gone = std::mem::take(&mut before)
                        .into_iter()
                        .filter(|o| store.get(&ObjectRef::from_obj(&**o)).is_none());
                    for o in store.state().into_iter().chain(gone) {
                        let _ = sender.send(o);
                    }
                }
                Event::InitApply(_) => {}
            }
        });
        Announced { store, tx }
    }

    fn reflect_with<K>(
        &self,
        name: &str,
        api: kube::Api<K>,
        wc: kube::runtime::watcher::Config,
        dyntype: K::DynamicType,
        mut on_event: impl FnMut(&kube::runtime::watcher::Event<K>, &Store<K>) + Send + 'static,
    ) -> Store<K>
    where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Clone + Eq + Hash + Send + Sync,
    {
        use kube::runtime::WatchStreamExt;
        let writer = kube::runtime::reflector::store::Writer::new(dyntype);
        let store = writer.as_reader();
        mark_ready_when_synced(
            store.clone(),
            self.readiness
                .register(format!("{}/{}", self.component, name)),
        );
        // managedFields is most of a cached object's size and nothing here reads it.
        let stream = kube::runtime::reflector(
            writer,
            kube::runtime::watcher(api, wc).modify(|o: &mut K| o.meta_mut().managed_fields = None),
        );
        let shutdown = self.shutdown.clone();
        let name = name.to_string();
        let reader = store.clone();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            let mut retry = crate::backoff::WatchRetry::default();
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = stream.next() => next,
                };
                match next {
                    Some(Ok(ev)) => {
                        retry.observe(&ev);
                        on_event(&ev, &reader);
                    }
                    Some(Err(e)) => {
                        let delay = retry.delay();
                        tracing::warn!(cache = %name, error = %e, retry_in = ?delay, "watch failed, retrying");
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                    None => return,
                }
            }
        });
        store
    }

    /// Drives `controller` until `stop` (or the process shutdown) fires. Failed objects are
    /// retried with per-object capped exponential backoff, reset by a success; `/readyz` waits
    /// for this controller's cache to sync.
    pub async fn run<K, Ctx, E, Fut, R>(
        &self,
        name: &str,
        controller: Controller<K>,
        reconcile: R,
        ctx: Arc<Ctx>,
        stop: CancellationToken,
    ) where
        K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
        K::DynamicType: Debug + Clone + Default + Eq + Hash + Unpin + Send + Sync,
        Ctx: Send + Sync + 'static,
        E: std::error::Error + Send + 'static,
        Fut: Future<Output = Result<Action, E>> + Send + 'static,
        R: Fn(Arc<K>, Arc<Ctx>) -> Fut + Send + 'static,
    {
        let ready = self
            .readiness
            .register(format!("{}/{}", self.component, name));
        mark_ready_when_synced(controller.store(), ready);

        let failures: Arc<Mutex<Failures<K>>> = Arc::default();
        let metrics = self.metrics.clone();
        let backoff = self.backoff;
        let label = name.to_string();
        let reconcile_failures = failures.clone();
        let reconciler = move |obj: Arc<K>, ctx: Arc<Ctx>| {
            let started = Instant::now();
            let fut = reconcile(obj.clone(), ctx);
            let metrics = metrics.clone();
            let label = label.clone();
            let failures = reconcile_failures.clone();
            async move {
                let result = fut.await;
                metrics.observe(&label, result.is_ok(), started.elapsed().as_secs_f64());
                if result.is_ok() {
                    failures
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .counts
                        .remove(&ObjectRef::from_obj(&*obj));
                }
                result
            }
        };
        let policy_label = name.to_string();
        let store = controller.store();
        let error_policy = move |obj: Arc<K>, err: &E, _ctx: Arc<Ctx>| {
            let key = ObjectRef::from_obj(&*obj);
            let mut map = failures.lock().unwrap_or_else(PoisonError::into_inner);
            prune_deleted(&mut map, &store);
            let count = map.counts.entry(key.clone()).or_insert(0);
            *count = count.saturating_add(1);
            let delay = backoff.delay(*count);
            tracing::warn!(controller = %policy_label, object = %key, error = %err, attempt = *count, retry_in = ?delay, "reconcile failed");
            Action::requeue(delay)
        };

        let process_stop = self.shutdown.clone();
        let stop_all = async move {
            tokio::select! {
                _ = stop.cancelled() => {},
                _ = process_stop.cancelled() => {},
            }
        };
        let name = name.to_string();
        // Replaces any trigger backoff the caller set (none does).
        controller
            .trigger_backoff(crate::backoff::WatchRetry::default())
            .graceful_shutdown_on(stop_all)
            .run(reconciler, error_policy, ctx)
            .for_each(|res| {
                match res {
                    // A failed watch (the reconcile errors are logged by the error policy).
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        tracing::warn!(controller = %name, error = %e, "watch failed, retrying");
                    }
                    Err(e) => tracing::debug!(controller = %name, error = %e, "controller event"),
                    Ok(_) => {}
                }
                futures::future::ready(())
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::reflector::store::Writer;
    use kube::runtime::watcher::Event;

    fn cm(name: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c
    }

    #[test]
    fn failures_of_deleted_objects_are_pruned() {
        let mut writer = Writer::<ConfigMap>::default();
        writer.apply_watcher_event(&Event::Apply(cm("live")));
        let store = writer.as_reader();
        let mut f = Failures::<ConfigMap>::default();
        f.counts.insert(ObjectRef::from_obj(&cm("live")), 3);
        for i in 0..200 {
            f.counts
                .insert(ObjectRef::from_obj(&cm(&format!("gone{i}"))), 1);
            prune_deleted(&mut f, &store);
            assert!(f.counts.len() <= FAILURES_PRUNE_MIN, "{}", f.counts.len());
        }
        assert_eq!(f.counts.get(&ObjectRef::from_obj(&cm("live"))), Some(&3));
    }
}
