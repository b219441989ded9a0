//! Running the provisioner and one agent per node in this process against any cluster, with
//! each node's "disk" a directory under `data_dir` (for `xtask up` and the tests' set-up).

use std::path::{Path, PathBuf};
use std::time::Duration;

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::agent::{self, AgentOptions};
use crate::context::{Mode, Options};
use crate::provisioner::{self, ConfigSource};

/// upstream's default scripts (`deploy/local-path-storage.yaml`).
pub const DEFAULT_SETUP: &str = "#!/bin/sh\nset -eu\nmkdir -m 0777 -p \"$VOL_DIR\"\n";
pub const DEFAULT_TEARDOWN: &str = "#!/bin/sh\nset -eu\nrm -rf \"$VOL_DIR\"\n";

/// What to run locally.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// Namespace of the provisioner's objects (`local-path-storage`).
    pub namespace: String,
    /// Node names; each gets `<data_dir>/<node>` as its only path.
    pub nodes: Vec<String>,
    pub data_dir: PathBuf,
}

/// Writes `config.json`, `setup` and `teardown` for `opts` into `<data_dir>/config` and returns
/// the `config.json` path.
pub fn write_config(opts: &LocalOptions) -> std::io::Result<PathBuf> {
    let dir = opts.data_dir.join("config");
    std::fs::create_dir_all(&dir)?;
    let map: Vec<serde_json::Value> = opts
        .nodes
        .iter()
        .map(|n| {
            let p = opts.data_dir.join(n);
            serde_json::json!({"node": n, "paths": [p.display().to_string()]})
        })
        .collect();
    let json = serde_json::json!({ "nodePathMap": map });
    let file = dir.join("config.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&json)?)?;
    write_if_missing(&dir.join("setup"), DEFAULT_SETUP)?;
    write_if_missing(&dir.join("teardown"), DEFAULT_TEARDOWN)?;
    Ok(file)
}

fn write_if_missing(p: &Path, text: &str) -> std::io::Result<()> {
    if !p.exists() {
        std::fs::write(p, text)?;
    }
    Ok(())
}

/// Runs the provisioner (agent mode, no leader election) and one agent per node until
/// `shutdown`. Config comes from the file [`write_config`] makes, not the cluster's ConfigMap,
/// so volumes land under `data_dir`.
pub async fn run(
    client: Client,
    opts: LocalOptions,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = write_config(&opts)?;
    let mgr = provisioner::manager(client.clone(), shutdown.clone());
    let provisioner = provisioner::run(
        &mgr,
        Options {
            provisioner_name: "rancher.io/local-path".into(),
            namespace: opts.namespace.clone(),
            task_namespace: opts.namespace.clone(),
            service_account: "local-path-provisioner-service-account".into(),
            mode: Mode::Agent,
            provisioning_retry_count: 15,
            deletion_retry_count: 15,
            configmap: "local-path-config".into(),
            sweep_interval: provisioner::SWEEP_INTERVAL,
            worker_threads: 4,
        },
        ConfigSource {
            configmap: "local-path-config".into(),
            file: Some(config.clone()),
        },
        None,
    );
    let agents = futures::future::join_all(opts.nodes.iter().map(|node| {
        let mgr = provisioner::manager(client.clone(), shutdown.clone());
        let a = AgentOptions {
            node: node.clone(),
            namespace: opts.namespace.clone(),
            task_namespace: opts.namespace.clone(),
            configmap: "local-path-config".into(),
            config_file: Some(config.clone()),
            report_interval: Duration::from_secs(60),
            provisioner_name: "rancher.io/local-path".into(),
        };
        async move { agent::run(&mgr, a).await }
    }));
    let (r, _) = tokio::join!(provisioner, agents);
    r?;
    Ok(())
}
