//! What the provisioner's controllers share, and the task helpers both use.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client};
use kube_common::controller::Announced;
use kube_common::events::{EventType, Recorder};
use thiserror::Error;

use crate::helper_pod;
use crate::reload::ConfigRx;
use crate::task::{self, Op, Phase, Task, TaskState};

/// How volume directories are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The node agent (DaemonSet of this binary) runs the scripts: no image pull per volume.
    Agent,
    /// upstream's helper pod per create/delete (image from `helperPod.yaml`).
    HelperPod,
}

/// Settings of `start`.
#[derive(Clone, Debug)]
pub struct Options {
    pub provisioner_name: String,
    pub namespace: String,
    /// Where task ConfigMaps live. A namespace of their own in deploy/, so the agents (which
    /// must write tasks) get no write access to `local-path-config`, whose scripts every node
    /// runs as root.
    pub task_namespace: String,
    pub service_account: String,
    pub mode: Mode,
    pub provisioning_retry_count: u32,
    pub deletion_retry_count: u32,
    /// The ConfigMap whose `setup`/`teardown` a helper pod mounts.
    pub configmap: String,
    /// How often tasks left by claims deleted mid-provisioning are cleaned up.
    pub sweep_interval: std::time::Duration,
    /// `--worker-threads`: reconciles at once per controller (0: no limit).
    pub worker_threads: u16,
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no valid configuration loaded yet")]
    NoConfig,
    #[error("{0}")]
    Retry(String),
    /// A failure already reported (Event) and counted against the retry limit.
    #[error("{0}")]
    Counted(String),
}

/// Caches of what every reconcile reads. StorageClasses and Nodes: a miss asks the API, so a
/// cache that lags never hides an object. Tasks and helper pods: see [`Ctx::current_task`].
#[derive(Clone)]
pub struct Caches {
    pub classes: Store<StorageClass>,
    pub nodes: Store<Node>,
    pub tasks: Announced<ConfigMap>,
    pub helpers: Announced<Pod>,
}

pub struct Ctx {
    pub client: Client,
    pub caches: Option<Caches>,
    pub opts: Options,
    pub config: ConfigRx,
    pub recorder: Recorder,
    /// Failed script runs per volume, against the retry counts.
    failures: Mutex<HashMap<String, u32>>,
    /// Volumes past their retry limit, with the object's resourceVersion then: left alone until
    /// the object changes (our own task deletions would otherwise retrigger them at once).
    gave_up: Mutex<HashMap<String, String>>,
}

impl Ctx {
    pub fn new(
        client: Client,
        opts: Options,
        config: ConfigRx,
        recorder: Recorder,
        caches: Option<Caches>,
    ) -> Self {
        Self {
            client,
            caches,
            opts,
            config,
            recorder,
            failures: Mutex::default(),
            gave_up: Mutex::default(),
        }
    }

    pub async fn class(&self, name: &str) -> Result<Option<StorageClass>, Error> {
        if let Some(c) = self
            .caches
            .as_ref()
            .and_then(|c| c.classes.get(&ObjectRef::new(name)))
        {
            return Ok(Some((*c).clone()));
        }
        Ok(Api::<StorageClass>::all(self.client.clone())
            .get_opt(name)
            .await?)
    }

    pub async fn node(&self, name: &str) -> Result<Option<Node>, Error> {
        if let Some(n) = self
            .caches
            .as_ref()
            .and_then(|c| c.nodes.get(&ObjectRef::new(name)))
        {
            return Ok(Some((*n).clone()));
        }
        Ok(Api::<Node>::all(self.client.clone()).get_opt(name).await?)
    }

    pub fn tasks(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.opts.task_namespace)
    }

    pub fn helper_pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.opts.namespace)
    }

    /// The task for `pv` as far as this process can tell without asking: a running one from
    /// the cache (whose changes wake the controllers, so a newer state is on its way); a
    /// finished one confirmed with the API, since it may be one this process already acted on
    /// and deleted (acting twice would count a failure twice). `None` when the cache has none:
    /// the caller then checks the API for what a task would make before starting one.
    pub async fn current_task(&self, op: Op, pv: &str) -> Result<Option<TaskState>, Error> {
        let Some(caches) = &self.caches else {
            return self.get_task(op, pv).await;
        };
        let cached = if self.opts.mode == Mode::HelperPod {
            let key = ObjectRef::new(&helper_pod::name(op, pv)).within(&self.opts.namespace);
            caches
                .helpers
                .store
                .get(&key)
                .and_then(|p| helper_pod::parse(&p))
        } else {
            let key = ObjectRef::new(&task::name(op, pv)).within(&self.opts.task_namespace);
            caches.tasks.store.get(&key).and_then(|c| task::parse(&c))
        };
        match cached {
            Some(s) if s.phase == Phase::Pending => Ok(Some(s)),
            Some(_) => self.get_task(op, pv).await,
            None => Ok(None),
        }
    }

    /// The task for `pv`, from its ConfigMap (agent mode) or its helper pod, asked of the API.
    pub async fn get_task(&self, op: Op, pv: &str) -> Result<Option<TaskState>, Error> {
        if self.opts.mode == Mode::HelperPod {
            let name = helper_pod::name(op, pv);
            let Some(pod) = self.helper_pods().get_opt(&name).await? else {
                return Ok(None);
            };
            let state = helper_pod::parse(&pod);
            if state.as_ref().is_some_and(|s| s.phase != Phase::Pending) {
                // upstream copies the helper's output into its own log.
                if let Ok(log) = self.helper_pods().logs(&name, &LogParams::default()).await {
                    tracing::info!(pod = %name, output = %log.trim(), "helper pod output");
                }
            }
            return Ok(state);
        }
        let cm = self.tasks().get_opt(&task::name(op, pv)).await?;
        Ok(cm.as_ref().and_then(task::parse))
    }

    /// This mode's tasks (task ConfigMaps, or our helper pods) matching a label selector.
    pub async fn list_tasks(&self, selector: &str) -> Result<Vec<TaskState>, Error> {
        let lp = ListParams::default().labels(selector);
        Ok(if self.opts.mode == Mode::HelperPod {
            let pods = self.helper_pods().list(&lp).await?;
            pods.iter().filter_map(helper_pod::parse).collect()
        } else {
            let cms = self.tasks().list(&lp).await?;
            cms.iter().filter_map(task::parse).collect()
        })
    }

    /// Whether the other mode's actor (a helper pod, from upstream or our helper-pod mode, or a
    /// task ConfigMap of our agent mode) is working on `pv`: then we wait for it to go rather
    /// than start a second one.
    pub async fn other_actor(&self, op: Op, pv: &str) -> Result<bool, Error> {
        Ok(if self.opts.mode == Mode::HelperPod {
            self.tasks().get_opt(&task::name(op, pv)).await?.is_some()
        } else {
            self.helper_pods()
                .get_opt(&helper_pod::name(op, pv))
                .await?
                .is_some()
        })
    }

    /// Creates the task; an existing one of the same name (ours, from before a restart or one
    /// the cache has not shown yet) wins. True if this call made it.
    pub async fn create_task(&self, t: &Task) -> Result<bool, Error> {
        let result = if self.opts.mode == Mode::HelperPod {
            let template = self
                .config
                .borrow()
                .as_ref()
                .and_then(|c| c.helper_pod_yaml.clone());
            let pod = helper_pod::build(
                t,
                template.as_deref(),
                &self.opts.configmap,
                &self.opts.service_account,
            )
            .map_err(|e| Error::Retry(e.to_string()))?;
            self.helper_pods()
                .create(&PostParams::default(), &pod)
                .await
                .map(|_| ())
        } else {
            let cm = t.to_configmap(&self.opts.task_namespace);
            self.tasks()
                .create(&PostParams::default(), &cm)
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_task(&self, op: Op, pv: &str) -> Result<(), Error> {
        let result = if self.opts.mode == Mode::HelperPod {
            self.helper_pods()
                .delete(
                    &helper_pod::name(op, pv),
                    &DeleteParams::default().grace_period(0),
                )
                .await
                .map(|_| ())
        } else {
            self.tasks()
                .delete(&task::name(op, pv), &DeleteParams::default())
                .await
                .map(|_| ())
        };
        match result {
            Ok(()) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Counts a failed run; true while retries are left.
    pub fn count_failure(&self, pv: &str, limit: u32) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = f.entry(pv.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        limit == 0 || *n < limit
    }

    /// A failed run: the task goes, an Event says why, and the object is retried (with the
    /// controller's backoff) until `limit` runs have failed.
    pub async fn task_failed(
        &self,
        state: &TaskState,
        regarding: &ObjectReference,
        reason: &str,
        limit: u32,
    ) -> Result<kube::runtime::controller::Action, Error> {
        self.delete_task(state.task.op, &state.task.pv).await?;
        let retry = self.count_failure(&state.task.pv, limit);
        self.event(regarding, true, reason, state.message.clone())
            .await;
        if retry {
            Err(Error::Counted(state.message.clone()))
        } else {
            self.give_up(&state.task.pv, regarding);
            Ok(kube::runtime::controller::Action::await_change())
        }
    }

    /// Every error out of a reconcile: a Warning Event on the object and a count against the
    /// retry limit (past it, no more retries until the object changes), as for a failed run.
    pub async fn counted(
        &self,
        result: Result<kube::runtime::controller::Action, Error>,
        regarding: &ObjectReference,
        key: &str,
        reason: &str,
        limit: u32,
    ) -> Result<kube::runtime::controller::Action, Error> {
        let e = match result {
            Err(Error::Counted(m)) => return Err(Error::Counted(m)),
            Ok(a) => return Ok(a),
            Err(e) => e,
        };
        self.event(regarding, true, reason, e.to_string()).await;
        if self.count_failure(key, limit) {
            Err(e)
        } else {
            tracing::warn!(key, error = %e, "retry limit reached; waiting for a change");
            self.give_up(key, regarding);
            Ok(kube::runtime::controller::Action::await_change())
        }
    }

    fn give_up(&self, key: &str, regarding: &ObjectReference) {
        let rv = regarding.resource_version.clone().unwrap_or_default();
        self.gave_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key.to_string(), rv);
    }

    /// True while `key` is past its retry limit and `regarding` has not changed since; a
    /// changed object starts again with a fresh count.
    pub fn given_up(&self, key: &str, regarding: &ObjectReference) -> bool {
        let mut g = self.gave_up.lock().unwrap_or_else(PoisonError::into_inner);
        match g.get(key) {
            None => false,
            Some(rv) if Some(rv) == regarding.resource_version.as_ref() => true,
            Some(_) => {
                g.remove(key);
                drop(g);
                self.forget_failures(key);
                false
            }
        }
    }

    /// Drops the counts of volumes that no longer exist (claim and PV gone): the map would
    /// otherwise keep one entry per volume that ever failed.
    pub fn keep_failures(&self, live: &std::collections::HashSet<String>) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| live.contains(k));
        self.gave_up
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|k, _| live.contains(k));
    }

    pub fn has_failures(&self) -> bool {
        !self
            .failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    pub fn forget_failures(&self, pv: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pv);
    }

    pub async fn event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        // Off the reconcile path: the recorder serialises its writes, and an Event is a report,
        // not a step of the protocol (a reconcile must not wait behind a hundred of them).
        let recorder = self.recorder.clone();
        let regarding = regarding.clone();
        let reason = reason.to_string();
        tokio::spawn(async move {
            kube_common::events::publish(&recorder, &regarding, type_, &reason, &reason, note)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::controller::Action;

    fn ctx() -> Ctx {
        let client =
            Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
        let (_tx, config) = tokio::sync::watch::channel(None);
        let recorder = Recorder::new(client.clone(), "test");
        let opts = Options {
            provisioner_name: "p".into(),
            namespace: "ns".into(),
            task_namespace: "ns".into(),
            service_account: "sa".into(),
            mode: Mode::Agent,
            provisioning_retry_count: 3,
            deletion_retry_count: 3,
            configmap: "c".into(),
            sweep_interval: std::time::Duration::from_secs(1),
            worker_threads: 4,
        };
        Ctx::new(client, opts, config, recorder, None)
    }

    #[tokio::test]
    async fn reconcile_errors_count_against_the_limit() {
        let ctx = ctx();
        let r = ObjectReference::default();
        let fail = || Err(Error::NoConfig);
        for _ in 0..2 {
            assert!(
                ctx.counted(fail(), &r, "pv", "ProvisioningFailed", 3)
                    .await
                    .is_err()
            );
        }
        let last = ctx.counted(fail(), &r, "pv", "ProvisioningFailed", 3).await;
        assert_eq!(last.unwrap(), Action::await_change(), "limit reached");
        // Already counted (a failed run): passed through, not counted twice.
        ctx.forget_failures("pv");
        for _ in 0..5 {
            let r = ctx
                .counted(Err(Error::Counted("x".into())), &r, "pv", "X", 3)
                .await;
            assert!(matches!(r, Err(Error::Counted(_))));
        }
        assert!(ctx.count_failure("pv", 3), "nothing was counted");
    }

    #[tokio::test]
    async fn past_the_limit_left_alone_until_the_object_changes() {
        let ctx = ctx();
        let v1 = ObjectReference {
            resource_version: Some("1".into()),
            ..Default::default()
        };
        for _ in 0..3 {
            let _ = ctx.counted(Err(Error::NoConfig), &v1, "pv", "X", 3).await;
        }
        assert!(ctx.given_up("pv", &v1), "same object: left alone");
        let v2 = ObjectReference {
            resource_version: Some("2".into()),
            ..Default::default()
        };
        assert!(!ctx.given_up("pv", &v2), "changed: tried again");
        assert!(ctx.count_failure("pv", 3), "with a fresh count");
    }

    #[tokio::test]
    async fn failures_of_gone_volumes_forgotten() {
        let ctx = ctx();
        ctx.count_failure("pvc-a", 3);
        ctx.count_failure("pvc-b", 3);
        ctx.keep_failures(&std::collections::HashSet::from(["pvc-a".to_string()]));
        assert!(ctx.has_failures());
        ctx.keep_failures(&Default::default());
        assert!(!ctx.has_failures());
    }
}
