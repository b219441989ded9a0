//! Live configuration: the ConfigMap `local-path-config` watched through the API (or, with
//! `--config`, the mounted `config.json` and its sibling `setup`/`teardown`/`helperPod.yaml`
//! files re-read periodically, as upstream's `watchAndRefreshConfig`). A config that does not
//! parse or canonicalise is refused with a Warning Event on the ConfigMap naming the problem;
//! the last good one stays in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_common::backoff::WatchRetry;
use kube_common::events::{EventType, Recorder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// upstream re-reads the mounted file every 30 s; the kubelet's own refresh delay dominates.
pub const FILE_CHECK_INTERVAL: Duration = Duration::from_secs(10);

pub type ConfigRx = watch::Receiver<Option<Arc<Config>>>;

/// Where the configuration comes from.
pub struct Source {
    pub client: Client,
    pub namespace: String,
    pub configmap: String,
    pub file: Option<PathBuf>,
    /// `None` for the agent, which only reads and never reports.
    pub recorder: Option<Recorder>,
}

/// Starts following the configuration; the receiver holds the last good config (`None` until
/// the first good one).
pub fn follow(src: Source, shutdown: CancellationToken) -> ConfigRx {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        match src.file.clone() {
            Some(file) => poll_file(&src, &file, &tx, shutdown).await,
            None => watch_configmap(&src, &tx, shutdown).await,
        }
    });
    rx
}

async fn watch_configmap(
    src: &Source,
    tx: &watch::Sender<Option<Arc<Config>>>,
    shutdown: CancellationToken,
) {
    let api: Api<ConfigMap> = Api::namespaced(src.client.clone(), &src.namespace);
    let wc = watcher::Config::default().fields(&format!("metadata.name={}", src.configmap));
    let mut stream = std::pin::pin!(watcher(api, wc));
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
            Some(Ok(watcher::Event::Apply(cm) | watcher::Event::InitApply(cm))) => {
                apply(src, tx, &cm.data.unwrap_or_default()).await
            }
            Some(Ok(watcher::Event::Delete(_))) => {
                tracing::warn!(configmap = %src.configmap, "config ConfigMap deleted; keeping the last good configuration")
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                let delay = retry.delay();
                tracing::warn!(error = %e, retry_in = ?delay, "watching the config ConfigMap failed, retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            None => return,
        }
    }
}

async fn poll_file(
    src: &Source,
    file: &Path,
    tx: &watch::Sender<Option<Arc<Config>>>,
    shutdown: CancellationToken,
) {
    let mut last: Option<BTreeMap<String, String>> = None;
    loop {
        let path = file.to_path_buf();
        // std::fs blocks: off the async threads. A failed join is skipped, not an empty config.
        if let Ok(data) = tokio::task::spawn_blocking(move || read_dir_data(&path)).await
            && last.as_ref() != Some(&data)
        {
            apply(src, tx, &data).await;
            last = Some(data);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(FILE_CHECK_INTERVAL) => {}
        }
    }
}

/// `config.json` from `file`, the scripts from files beside it (the mounted ConfigMap's keys).
fn read_dir_data(file: &Path) -> BTreeMap<String, String> {
    let mut data = BTreeMap::new();
    if let Ok(s) = std::fs::read_to_string(file) {
        data.insert("config.json".to_string(), s);
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    for key in ["setup", "teardown", "helperPod.yaml"] {
        if let Ok(s) = std::fs::read_to_string(dir.join(key)) {
            data.insert(key.to_string(), s);
        }
    }
    data
}

async fn apply(
    src: &Source,
    tx: &watch::Sender<Option<Arc<Config>>>,
    data: &BTreeMap<String, String>,
) {
    match Config::from_configmap_data(data) {
        Ok(cfg) => {
            let changed = tx.borrow().as_deref() != Some(&cfg);
            if changed {
                tracing::info!(configmap = %src.configmap, "configuration loaded");
                tx.send_replace(Some(Arc::new(cfg)));
            }
        }
        Err(e) => {
            tracing::error!(configmap = %src.configmap, error = %e, "invalid configuration; keeping the last good one");
            if let Some(recorder) = &src.recorder {
                let reference = ObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("ConfigMap".into()),
                    namespace: Some(src.namespace.clone()),
                    name: Some(src.configmap.clone()),
                    ..Default::default()
                };
                kube_common::events::publish(
                    recorder,
                    &reference,
                    EventType::Warning,
                    "InvalidConfig",
                    &format!("Reload: {e}"),
                    format!("configuration refused, the last good one stays in force: {e}"),
                )
                .await;
            }
        }
    }
}
