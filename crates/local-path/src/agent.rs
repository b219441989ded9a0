//! `agent`: the node agent (a DaemonSet of this same binary, the node's paths mounted). It
//! decides nothing: it runs the tasks the provisioner addressed to its node — the user's
//! `setup`/`teardown` with upstream's environment — and reports free space per path, bytes used
//! per volume, and `pvc-*` directories no PV points at (reported, never deleted).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume};
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use kube_common::Manager;
use kube_common::backoff::WatchRetry;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::capacity;
use crate::config::{clean, strictly_below as below};
use crate::reload::{self, ConfigRx};
use crate::script::{self, Run};
use crate::task::{self, ANY_NODE, MANAGED_BY, MANAGER, Op, Phase, Script, TASK_LABEL, TaskState};
use crate::volume;

/// Settings of `agent`.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub node: String,
    /// Where `local-path-config` is (read only).
    pub namespace: String,
    /// Where tasks and this node's report are (read and written).
    pub task_namespace: String,
    pub configmap: String,
    pub config_file: Option<std::path::PathBuf>,
    pub report_interval: Duration,
    /// The provisioner whose Released Delete volumes this agent may tear down.
    pub provisioner_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    persistentvolume: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    node: String,
    path: String,
}

#[derive(Clone, Default)]
struct Metrics {
    used: Family<VolumeLabels, Gauge>,
    free: Family<PathLabels, Gauge>,
    orphans: Family<PathLabels, Gauge>,
}

struct Agent {
    client: Client,
    opts: AgentOptions,
    /// Tasks running or done in this process (by uid): a repeated watch event never reruns one.
    seen: Mutex<HashSet<String>>,
    metrics: Metrics,
    config: ConfigRx,
}

/// Runs the agent until shutdown.
pub async fn run(mgr: &Manager, opts: AgentOptions) {
    let metrics = Metrics::default();
    mgr.register_metrics(|r| {
        r.register(
            "local_path_volume_used_bytes",
            "Bytes used by each local-path volume on this node",
            metrics.used.clone(),
        );
        r.register(
            "local_path_free_bytes",
            "Free bytes per configured base path on this node",
            metrics.free.clone(),
        );
        r.register(
            "local_path_orphaned_directories",
            "pvc-* directories under a base path that no PersistentVolume points at",
            metrics.orphans.clone(),
        );
    });
    let config = reload::follow(
        reload::Source {
            client: mgr.client.clone(),
            namespace: opts.namespace.clone(),
            configmap: opts.configmap.clone(),
            file: opts.config_file.clone(),
            recorder: None,
        },
        mgr.shutdown.clone(),
    );
    let agent = Arc::new(Agent {
        client: mgr.client.clone(),
        opts,
        seen: Mutex::default(),
        metrics,
        config: config.clone(),
    });
    let ready = mgr.readiness.register("agent/tasks");
    tokio::join!(
        agent.clone().watch_tasks(mgr.shutdown.clone(), ready),
        agent.report_loop(config, mgr.shutdown.clone()),
    );
}

impl Agent {
    fn tasks(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.opts.task_namespace)
    }

    async fn watch_tasks(
        self: Arc<Self>,
        shutdown: CancellationToken,
        ready: kube_common::ReadyHandle,
    ) {
        let wc = watcher::Config::default().labels(TASK_LABEL);
        let mut stream = std::pin::pin!(watcher(self.tasks(), wc));
        // Uids listed by the current (re)list: at its end, `seen` keeps only those, so deletes
        // missed while the watch was down do not stay in it for good.
        let mut listed: HashSet<String> = HashSet::new();
        let mut retry = WatchRetry::default();
        loop {
            let ev = tokio::select! {
                _ = shutdown.cancelled() => return,
                ev = stream.next() => ev,
            };
            if let Some(Ok(ev)) = &ev {
                retry.observe(ev);
            }
            match ev {
                Some(Ok(watcher::Event::Apply(cm))) => self.clone().consider(cm),
                Some(Ok(watcher::Event::InitApply(cm))) => {
                    listed.extend(cm.uid());
                    self.clone().consider(cm)
                }
                Some(Ok(watcher::Event::Delete(cm))) => {
                    if let Some(uid) = cm.uid() {
                        self.seen
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .remove(&uid);
                    }
                }
                Some(Ok(watcher::Event::InitDone)) => {
                    self.keep_seen(&std::mem::take(&mut listed));
                    ready.set(true)
                }
                Some(Ok(watcher::Event::Init)) => listed.clear(),
                Some(Err(e)) => {
                    let delay = retry.delay();
                    tracing::warn!(error = %e, retry_in = ?delay, "watching tasks failed, retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                None => return,
            }
        }
    }

    /// Takes the task if it is for this node and nobody else has it, then runs it.
    fn consider(self: Arc<Self>, cm: ConfigMap) {
        let Some(state) = task::parse(&cm) else {
            return;
        };
        let me = &self.opts.node;
        let for_me = state.task.node == *me || state.task.node == ANY_NODE;
        let free = state.agent.as_ref().is_none_or(|a| a == me);
        if !for_me || !free || state.phase != Phase::Pending {
            return;
        }
        let Some(uid) = cm.uid() else { return };
        if !self
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(uid.clone())
        {
            return;
        }
        tokio::spawn(async move {
            if let Err(e) = self.take_and_run(cm, state).await {
                // Forgotten, so the next event for the task (the change that made the update
                // conflict, or the watch's relist) considers it again instead of never.
                tracing::warn!(error = %e, "task not run or result not written; will retry");
                self.forget(&uid);
            }
        });
    }

    fn keep_seen(&self, live: &HashSet<String>) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|u| live.contains(u));
    }

    fn forget(&self, uid: &str) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(uid);
    }

    async fn take_and_run(&self, mut cm: ConfigMap, state: TaskState) -> Result<(), kube::Error> {
        let name = cm.name_any();
        // Replace with the object's resourceVersion: of two agents (or an old and a new pod of
        // this one), exactly one takes the task.
        if state.agent.is_none() {
            cm.data
                .get_or_insert_default()
                .insert("agent".into(), self.opts.node.clone());
            self.tasks()
                .replace(&name, &PostParams::default(), &cm)
                .await?;
        }
        let checked = match self.check(&state) {
            Ok(()) if state.task.op == Op::Delete => self.delete_allowed(&state.task).await,
            other => other,
        };
        let (phase, dir, message) = match checked {
            Ok(()) => execute(&state).await,
            Err(why) => (Phase::Failed, None, why),
        };
        tracing::info!(task = %name, ?phase, dir = ?dir, message = %message, "task finished");
        let patch =
            serde_json::json!({ "data": task::result_data(&phase, dir.as_deref(), &message) });
        let tasks = self.tasks();
        let (params, patch) = (PatchParams::default(), Patch::Merge(&patch));
        let write = || tasks.patch(&name, &params, &patch);
        match retry(RESULT_BACKOFF, RESULT_ATTEMPTS, write).await {
            // The provisioner withdrew the task meanwhile: nobody waits for the result.
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// A task is only run with the configured script, on a directory under one of this node's
    /// configured paths: whoever can write ConfigMaps in the namespace still cannot make the
    /// agent run other commands or remove other directories.
    fn check(&self, state: &TaskState) -> Result<(), String> {
        let Some(cfg) = self.config.borrow().clone() else {
            return Err("the agent has no valid configuration yet".into());
        };
        let t = &state.task;
        t.validate()?;
        let expected = match (t.op, &cfg.setup_command, &cfg.teardown_command) {
            (Op::Create, Some(c), _) | (Op::Delete, _, Some(c)) => Script::Command(c.clone()),
            (Op::Create, None, _) => Script::Shell(cfg.setup_script.clone()),
            (Op::Delete, _, None) => Script::Shell(cfg.teardown_script.clone()),
        };
        if t.script != expected {
            return Err("the task's script is not the configured one (config changed?)".into());
        }
        let allowed = cfg.all_paths_on(&self.opts.node);
        let ok = match t.op {
            Op::Create => {
                !t.base_paths.is_empty()
                    && t.base_paths.iter().all(|b| allowed.contains(&clean(b)))
                    && t.base_paths
                        .iter()
                        .all(|b| below(&format!("{b}/{}", t.vol_dir), b))
            }
            Op::Delete => allowed.iter().any(|b| below(&t.vol_dir, b)),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "volume directory {:?} is not under a path configured for node {}: not touched",
                if t.op == Op::Create {
                    t.base_paths.join(", ")
                } else {
                    t.vol_dir.clone()
                },
                self.opts.node
            ))
        }
    }

    /// A teardown runs only while the decision to delete still holds, read from the PV now
    /// (not when the task was written): Released, reclaim Delete, provisioned by us, and its
    /// path is the task's directory. A task for a PV that does not exist (a directory left by a
    /// claim deleted mid-provisioning) runs only if no PV points at the directory.
    async fn delete_allowed(&self, t: &task::Task) -> Result<(), String> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let dir = clean(&t.vol_dir);
        let api_err = |e: kube::Error| format!("reading PersistentVolumes failed: {e}");
        match pvs.get_opt(&t.pv).await.map_err(api_err)? {
            Some(pv) => {
                if !crate::delete::should_delete(&pv, &self.opts.provisioner_name) {
                    return Err(format!(
                        "PersistentVolume {} is not a Released Delete volume of {}: {dir:?} not touched",
                        t.pv, self.opts.provisioner_name
                    ));
                }
                if volume::path_of(&pv).map(|p| clean(&p)).as_deref() != Some(dir.as_str()) {
                    return Err(format!(
                        "PersistentVolume {} does not point at {dir:?}: not touched",
                        t.pv
                    ));
                }
            }
            None => {
                let list = pvs.list(&Default::default()).await.map_err(api_err)?;
                if let Some(pv) = list
                    .iter()
                    .find(|pv| volume::path_of(pv).map(|p| clean(&p)).as_deref() == Some(&dir))
                {
                    return Err(format!(
                        "PersistentVolume {} points at {dir:?}: not touched",
                        pv.name_any()
                    ));
                }
            }
        }
        Ok(())
    }

    async fn report_loop(&self, config: ConfigRx, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.report(&config).await {
                tracing::warn!(error = %e, "node report failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.opts.report_interval) => {}
            }
        }
    }

    /// Free space per path, bytes per volume, orphans: metrics and ConfigMap
    /// `local-path-node-<node>` (`free.json`, `usage.json`, `orphans`).
    async fn report(&self, config: &ConfigRx) -> Result<(), kube::Error> {
        let Some(cfg) = config.borrow().clone() else {
            return Ok(());
        };
        let me = self.opts.node.clone();
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let mine: Vec<(String, String)> = pvs
            .list(&Default::default())
            .await?
            .into_iter()
            .filter(|pv| volume::node_of(pv).as_deref() == Some(me.as_str()))
            .filter_map(|pv| Some((pv.name_any(), volume::path_of(&pv)?)))
            .collect();
        let all_known: BTreeSet<String> = pvs
            .list(&Default::default())
            .await?
            .iter()
            .filter_map(volume::path_of)
            .map(|p| clean(&p))
            .collect();
        let paths = cfg.all_paths_on(&me);
        let report = tokio::task::spawn_blocking(move || scan(&paths, &mine, &all_known))
            .await
            .unwrap_or_default();
        self.publish(&me, &report).await
    }

    async fn publish(&self, me: &str, r: &Report) -> Result<(), kube::Error> {
        let m = &self.metrics;
        m.used.clear();
        m.free.clear();
        m.orphans.clear();
        for (pv, bytes) in &r.used {
            m.used
                .get_or_create(&VolumeLabels {
                    persistentvolume: pv.clone(),
                    node: me.into(),
                })
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        for (path, bytes) in &r.free {
            m.free
                .get_or_create(&PathLabels {
                    node: me.into(),
                    path: path.clone(),
                })
                .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
        }
        for (path, dirs) in &r.orphans {
            m.orphans
                .get_or_create(&PathLabels {
                    node: me.into(),
                    path: path.clone(),
                })
                .set(i64::try_from(dirs.len()).unwrap_or(i64::MAX));
            for d in dirs {
                tracing::warn!(directory = %d, "orphaned volume directory (no PersistentVolume points at it); not deleted");
            }
        }
        let orphan_list: Vec<&String> = r.orphans.values().flatten().collect();
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(format!("local-path-node-{me}")),
                labels: Some(BTreeMap::from([(
                    MANAGED_BY.to_string(),
                    MANAGER.to_string(),
                )])),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                (
                    "free.json".to_string(),
                    serde_json::to_string(&r.free).unwrap_or_default(),
                ),
                (
                    "usage.json".to_string(),
                    serde_json::to_string(&r.used).unwrap_or_default(),
                ),
                (
                    "orphans".to_string(),
                    orphan_list.iter().map(|s| format!("{s}\n")).collect(),
                ),
            ])),
            ..Default::default()
        };
        let params = PatchParams::apply("local-path-agent").force();
        self.tasks()
            .patch(
                &format!("local-path-node-{me}"),
                &params,
                &Patch::Apply(&cm),
            )
            .await?;
        Ok(())
    }
}

#[derive(Default)]
struct Report {
    used: BTreeMap<String, u64>,
    free: BTreeMap<String, u64>,
    orphans: BTreeMap<String, Vec<String>>,
}

fn scan(paths: &[String], mine: &[(String, String)], known: &BTreeSet<String>) -> Report {
    let mut r = Report::default();
    for (pv, dir) in mine {
        r.used
            .insert(pv.clone(), capacity::used_bytes(Path::new(dir)));
    }
    for p in paths {
        if let Ok(free) = capacity::free_bytes(Path::new(p)) {
            r.free.insert(p.clone(), free);
        }
        let o = capacity::orphans(Path::new(p), known);
        if !o.is_empty() {
            r.orphans.insert(p.clone(), o);
        }
    }
    r
}

/// The result of a script that ran is worth a few retries: without it the task waits forever.
const RESULT_BACKOFF: kube_common::backoff::Backoff =
    kube_common::backoff::Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
const RESULT_ATTEMPTS: u32 = 8;

/// Calls `f` until it succeeds, a 404 (nothing to retry on) or `attempts` calls.
async fn retry<T, F, Fut>(
    backoff: kube_common::backoff::Backoff,
    attempts: u32,
    mut f: F,
) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, kube::Error>>,
{
    let mut delays = backoff.iter();
    let mut n = 1;
    loop {
        match f().await {
            Err(kube::Error::Api(s)) if s.code == 404 => return Err(kube::Error::Api(s)),
            Err(e) if n < attempts => {
                tracing::warn!(error = %e, attempt = n, "writing the task result failed, retrying");
                n += 1;
                tokio::time::sleep(delays.next().unwrap_or(backoff.max)).await;
            }
            r => return r,
        }
    }
}

/// The base path with most free space that fits `size`, or what each has free. statvfs is a
/// blocking call: kept off the agent's async threads.
async fn pick_path(paths: Vec<String>, size: u64) -> Result<(String, u64), String> {
    let pick = move || {
        if let Some((base, free)) = capacity::choose_path(&paths, size) {
            return Ok((base.to_string(), free));
        }
        let free: Vec<String> = paths
            .iter()
            .map(|p| {
                let bytes = capacity::free_bytes(Path::new(p)).unwrap_or(0);
                format!("{p}: {bytes} bytes free")
            })
            .collect();
        Err(free.join(", "))
    };
    tokio::task::spawn_blocking(pick)
        .await
        .unwrap_or_else(|e| Err(format!("free space check failed: {e}")))
}

/// Runs one task: (phase, directory made, message).
async fn execute(state: &TaskState) -> (Phase, Option<String>, String) {
    let t = &state.task;
    let dir = match t.op {
        Op::Create => {
            let (base, free) = match pick_path(t.base_paths.clone(), t.size_bytes).await {
                Ok(chosen) => chosen,
                Err(free) => {
                    let msg = format!(
                        "volume of {} bytes does not fit on node {} ({free})",
                        t.size_bytes, t.node
                    );
                    return (Phase::NoSpace, None, msg);
                }
            };
            tracing::debug!(base, free, "path chosen");
            let dir = clean(&format!("{base}/{}", t.vol_dir));
            if !below(&dir, &base) {
                return (
                    Phase::Failed,
                    None,
                    format!("volume directory {dir:?} is not below {base:?}: not touched"),
                );
            }
            dir
        }
        Op::Delete => clean(&t.vol_dir),
    };
    if !dir.starts_with('/') || dir == "/" || t.base_paths.iter().any(|b| clean(b) == dir) {
        return (
            Phase::Failed,
            None,
            format!("refusing volume directory {dir:?}"),
        );
    }
    let run = Run {
        op: t.op,
        script: &t.script,
        vol_dir: &dir,
        size_bytes: t.size_bytes,
        vol_mode: &t.vol_mode,
        extra_env: &t.extra_env,
        timeout: Duration::from_secs(t.timeout_secs.max(1)),
    };
    match script::run(&run).await {
        Ok(output) => {
            if !output.is_empty() {
                tracing::info!(dir = %dir, output = %output, "script output");
            }
            (Phase::Succeeded, Some(dir), output)
        }
        Err(e) => (Phase::Failed, None, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Task;

    /// An agent of node `n` whose API calls all fail (nothing listens at its address).
    fn test_agent() -> Agent {
        let cfg = kube::Config::new("http://127.0.0.1:1".parse().unwrap());
        let (_tx, config) = tokio::sync::watch::channel(None);
        Agent {
            client: Client::try_from(cfg).unwrap(),
            opts: AgentOptions {
                node: "n".into(),
                namespace: "ns".into(),
                task_namespace: "ns".into(),
                configmap: "c".into(),
                config_file: None,
                report_interval: Duration::from_secs(60),
                provisioner_name: "p".into(),
            },
            seen: Mutex::default(),
            metrics: Metrics::default(),
            config,
        }
    }

    fn api_error(code: u16) -> kube::Error {
        kube::Error::Api(Box::new(
            kube::core::Status::failure("x", "x").with_code(code),
        ))
    }

    #[tokio::test]
    async fn result_write_retried_until_it_lands() {
        let quick =
            kube_common::backoff::Backoff::new(Duration::from_millis(1), Duration::from_millis(5));
        let calls = std::cell::Cell::new(0);
        let r = retry(quick, 8, || {
            calls.set(calls.get() + 1);
            let n = calls.get();
            async move { if n < 3 { Err(api_error(500)) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        // Calls made before giving up, for a call that always fails with `code`.
        let always = |code: u16, attempts: u32| {
            let calls = std::cell::Cell::new(0);
            async move {
                let r: Result<(), _> = retry(quick, attempts, || {
                    calls.set(calls.get() + 1);
                    async move { Err(api_error(code)) }
                })
                .await;
                assert!(r.is_err());
                calls.get()
            }
        };
        assert_eq!(always(404, 8).await, 1, "a 404 is not retried");
        assert_eq!(always(409, 4).await, 4, "bounded");
    }

    /// An API call that fails (here: no apiserver at all) leaves the task to be considered
    /// again, not marked as seen for good.
    #[tokio::test]
    async fn a_task_whose_take_failed_is_considered_again() {
        let agent = Arc::new(test_agent());
        let t = Task {
            op: Op::Delete,
            pv: "pvc-1".into(),
            node: "n".into(),
            base_paths: Vec::new(),
            vol_dir: "/nowhere/pvc-1".into(),
            size_bytes: 0,
            vol_mode: "Filesystem".into(),
            script: Script::Shell("exit 0".into()),
            timeout_secs: 5,
            claim: String::new(),
            claim_uid: String::new(),
            extra_env: Default::default(),
        };
        let mut cm = t.to_configmap("ns");
        cm.metadata.uid = Some("u1".into());
        agent.clone().consider(cm);
        assert!(agent.seen.lock().unwrap().contains("u1"));
        for _ in 0..100 {
            if !agent.seen.lock().unwrap().contains("u1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the uid stayed in `seen` after the take failed");
    }

    #[tokio::test]
    async fn seen_keeps_only_listed_tasks() {
        let agent = test_agent();
        agent
            .seen
            .lock()
            .unwrap()
            .extend(["a".to_string(), "gone".to_string()]);
        agent.keep_seen(&HashSet::from(["a".to_string(), "new".to_string()]));
        assert_eq!(
            *agent.seen.lock().unwrap(),
            HashSet::from(["a".to_string()])
        );
    }

    #[tokio::test]
    async fn path_picked_off_the_async_threads() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().display().to_string();
        let (base, free) = pick_path(vec![p.clone()], 1).await.unwrap();
        assert_eq!(base, p);
        assert!(free > 0);
        let why = pick_path(vec![p.clone()], u64::MAX).await.unwrap_err();
        assert!(why.starts_with(&format!("{p}: ")), "{why}");
    }

    #[tokio::test]
    async fn create_outside_the_base_is_refused() {
        let base = tempfile::tempdir().unwrap();
        let marker = base.path().join("ran");
        let state = TaskState {
            task: Task {
                op: Op::Create,
                pv: "pvc-1".into(),
                node: "n".into(),
                base_paths: vec![base.path().join("disk").display().to_string()],
                vol_dir: "../escaped".into(),
                size_bytes: 0,
                vol_mode: "Filesystem".into(),
                script: Script::Shell(format!("touch {}", marker.display())),
                timeout_secs: 5,
                claim: String::new(),
                claim_uid: String::new(),
                extra_env: Default::default(),
            },
            phase: Phase::Pending,
            agent: None,
            result_dir: None,
            message: String::new(),
        };
        std::fs::create_dir(base.path().join("disk")).unwrap();
        let (phase, dir, message) = execute(&state).await;
        assert_eq!((phase, dir), (Phase::Failed, None), "{message}");
        assert!(!marker.exists(), "the script did not run");
    }
}
