//! `start`: the provisioner. Config follower, then — only while holding upstream's Lease — the
//! claim controller, the volume controller and the task sweeper.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{controller, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use kube_common::Manager;
use kube_common::controller::lean_controller;
use kube_common::leader::{self, LeaseConfig};
use tokio_util::sync::CancellationToken;

use crate::context::{Caches, Ctx, Options};
use crate::reload::{self, ConfigRx};
use crate::task::{self, Op, TASK_LABEL, TaskState};
use crate::{delete, helper_pod, provision, pv_naming};

/// Default pause between sweeps of finished tasks whose claim went away.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(30);

/// The Lease the external-provisioner library would take with leader election on:
/// the provisioner name with `/` replaced by `-` (`rancher.io-local-path`).
pub fn lease_name(provisioner: &str) -> String {
    provisioner.replace('/', "-")
}

/// Where the configuration comes from (see [`reload`]).
pub struct ConfigSource {
    pub configmap: String,
    pub file: Option<std::path::PathBuf>,
}

/// Runs the provisioner until shutdown (or loss of the Lease, an error as in client-go).
pub async fn run(
    mgr: &Manager,
    opts: Options,
    source: ConfigSource,
    lease: Option<LeaseConfig>,
) -> Result<(), kube_common::Error> {
    let recorder = mgr.recorder("rancher.io/local-path_local-path-provisioner");
    let config = reload::follow(
        reload::Source {
            client: mgr.client.clone(),
            namespace: opts.namespace.clone(),
            configmap: source.configmap,
            file: source.file,
            recorder: Some(recorder.clone()),
        },
        mgr.shutdown.clone(),
    );
    let loaded = mgr.readiness.register("config");
    let mut rx = config.clone();
    tokio::spawn(async move {
        if rx.wait_for(Option::is_some).await.is_ok() {
            loaded.set(true);
        }
    });
    let changed = Arc::new(tokio::sync::Notify::new());
    let caches = Caches {
        classes: mgr.reflect(
            "storageclasses",
            Api::<StorageClass>::all(mgr.client.clone()),
            watcher::Config::default(),
            (),
            changed.clone(),
        ),
        nodes: mgr.reflect(
            "nodes",
            Api::<Node>::all(mgr.client.clone()),
            watcher::Config::default(),
            (),
            changed,
        ),
        tasks: mgr.reflect_announced(
            "tasks",
            Api::namespaced(mgr.client.clone(), &opts.task_namespace),
            watcher::Config::default().labels(TASK_LABEL),
        ),
        helpers: mgr.reflect_announced(
            "helper-pods",
            Api::namespaced(mgr.client.clone(), &opts.namespace),
            watcher::Config::default().labels(TASK_LABEL),
        ),
    };
    let ctx = Arc::new(Ctx::new(
        mgr.client.clone(),
        opts,
        config,
        recorder,
        Some(caches.clone()),
    ));
    match lease {
        None => {
            controllers(mgr, ctx, &caches, mgr.shutdown.clone()).await;
            Ok(())
        }
        Some(cfg) => {
            leader::run_leader_elected(mgr.client.clone(), cfg, mgr.shutdown.clone(), |stop| {
                controllers(mgr, ctx, &caches, stop)
            })
            .await
        }
    }
}

async fn controllers(mgr: &Manager, ctx: Arc<Ctx>, caches: &Caches, stop: CancellationToken) {
    wait_config(&ctx.config, &stop).await;
    let client = mgr.client.clone();
    // Tasks and helper pods wake the controllers from the caches the reconciles read, after
    // the caches have the change.
    // upstream's threadiness: this many reconciles at once per queue (claims, volumes), which
    // also bounds the provisioner's API connections and memory under a burst of claims.
    let workers = controller::Config::default().concurrency(ctx.opts.worker_threads);
    let claims = lean_controller(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(workers.clone())
    .watches_shared_stream(caches.tasks.subscribe(), |cm: Arc<ConfigMap>| {
        claim_of_task(task::parse(&cm)?)
    })
    .watches_shared_stream(caches.helpers.subscribe(), |pod: Arc<Pod>| {
        claim_of_task(helper_pod::parse(&pod)?)
    });
    let volumes = lean_controller(
        Api::<PersistentVolume>::all(client.clone()),
        watcher::Config::default(),
    )
    .with_config(workers)
    .watches_shared_stream(caches.tasks.subscribe(), |cm: Arc<ConfigMap>| {
        pv_of_task(task::parse(&cm)?)
    })
    .watches_shared_stream(caches.helpers.subscribe(), |pod: Arc<Pod>| {
        pv_of_task(helper_pod::parse(&pod)?)
    });
    tokio::join!(
        mgr.run(
            "claims",
            claims,
            |claim, ctx| async move {
                let key = pv_naming::pv_name(&claim.uid().unwrap_or_default());
                let regarding = claim.object_ref(&());
                if ctx.given_up(&key, &regarding) {
                    return Ok(kube::runtime::controller::Action::await_change());
                }
                let r = provision::reconcile(claim.clone(), ctx.clone()).await;
                let limit = ctx.opts.provisioning_retry_count;
                ctx.counted(r, &regarding, &key, "ProvisioningFailed", limit)
                    .await
            },
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "volumes",
            volumes,
            |pv, ctx| async move {
                let regarding = pv.object_ref(&());
                if ctx.given_up(&pv.name_any(), &regarding) {
                    return Ok(kube::runtime::controller::Action::await_change());
                }
                let r = delete::reconcile(pv.clone(), ctx.clone()).await;
                let limit = ctx.opts.deletion_retry_count;
                ctx.counted(r, &regarding, &pv.name_any(), "VolumeFailedDelete", limit)
                    .await
            },
            ctx.clone(),
            stop.clone()
        ),
        sweeper(ctx.clone(), stop.clone()),
    );
}

fn pv_of_task(state: TaskState) -> Option<ObjectRef<PersistentVolume>> {
    (state.task.op == Op::Delete).then(|| ObjectRef::new(&state.task.pv))
}

fn claim_of_task(state: TaskState) -> Option<ObjectRef<PersistentVolumeClaim>> {
    if state.task.op != Op::Create {
        return None;
    }
    let (ns, name) = state.task.claim.split_once('/')?;
    Some(ObjectRef::new(name).within(ns))
}

async fn wait_config(config: &ConfigRx, stop: &CancellationToken) {
    let mut rx = config.clone();
    tokio::select! {
        _ = stop.cancelled() => {},
        _ = rx.wait_for(Option::is_some) => {},
    }
}

async fn sweeper(ctx: Arc<Ctx>, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(ctx.opts.sweep_interval) => {}
        }
        if let Err(e) = delete::sweep(&ctx).await {
            tracing::warn!(error = %e, "task sweep failed");
        }
    }
}

/// For embedding (tests, `xtask up`): a client, not flags.
pub fn manager(client: Client, shutdown: CancellationToken) -> Manager {
    Manager::new("local-path-provisioner", client, shutdown)
}
