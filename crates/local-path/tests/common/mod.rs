//! One control plane per test binary (apiserver, controller-manager with the PV controller,
//! scheduler with volume binding) and three Ready Nodes. Each test gets its own namespace, its
//! own provisioner name and StorageClasses, its own provisioner process and one agent process
//! per node, and its own directory per node standing for that node's disk, so tests run in
//! parallel without seeing each other's volumes.
#![allow(clippy::unwrap_used)] // test code
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use integration_tests::kube::{Cluster, ClusterOptions};
use integration_tests::nodes::{TestNode, make_schedulable, register};
use integration_tests::process::{ManagedProcess, free_port};
use k8s_openapi::api::core::v1::{ConfigMap, Event, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::sync::OnceCell;

pub use integration_tests::poll::{eventually, wait_for};

pub const NODES: [&str; 3] = ["lp-node-a", "lp-node-b", "lp-node-c"];
pub const LIMIT: Duration = Duration::from_secs(60);
pub const SETUP: &str = "#!/bin/sh\nset -eu\nmkdir -m 0777 -p \"$VOL_DIR\"\n";
pub const TEARDOWN: &str = "#!/bin/sh\nset -eu\nrm -rf \"$VOL_DIR\"\n";

static CLUSTER: OnceCell<Cluster> = OnceCell::const_new();

/// The binary's control plane with controller-manager and scheduler, nodes registered.
pub async fn cluster() -> &'static Cluster {
    CLUSTER
        .get_or_try_init(|| async {
            let c = Cluster::start(ClusterOptions {
                controller_manager: true,
                scheduler: true,
                ..Default::default()
            })
            .await?;
            let client = c.client().await?;
            for n in NODES {
                register(&client, &TestNode::new(n)).await?;
                make_schedulable(&client, n).await?;
            }
            eprintln!("control plane + scheduler started in {:?}", c.startup);
            Ok::<_, integration_tests::HarnessError>(c)
        })
        .await
        .expect("starting the test control plane (run `cargo run -p xtask -- test` once)")
}

/// One test's world.
pub struct Env {
    pub client: Client,
    pub ns: String,
    /// Where tasks and node reports are (`--task-namespace`): apart from the config, as deployed.
    pub task_ns: String,
    pub provisioner: String,
    pub root: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    procs: Mutex<Vec<ManagedProcess>>,
    mounts: Mutex<Vec<PathBuf>>,
    pub health_port: u16,
    /// Health/metrics port of each node's agent.
    pub agent_ports: Mutex<BTreeMap<String, u16>>,
}

impl Env {
    /// Namespace, ConfigMap `local-path-config` from `config_json` (which gets the per-node disk
    /// directories), and agents on every node. The provisioner is started separately.
    pub async fn new(prefix: &str) -> Env {
        let c = cluster().await;
        let client = c.client().await.expect("client");
        let ns = c.namespace(prefix).await.expect("namespace");
        let task_ns = c
            .namespace(&format!("{prefix}-tasks"))
            .await
            .expect("namespace");
        let root = tempfile::Builder::new()
            .prefix(&format!("lp-{ns}-"))
            .tempdir()
            .expect("tempdir");
        for n in NODES {
            std::fs::create_dir_all(root.path().join(n)).expect("node disk");
        }
        Env {
            client,
            provisioner: format!("test.io/{ns}"),
            ns,
            task_ns,
            root,
            kubeconfig: c.kubeconfig_path().to_path_buf(),
            procs: Mutex::default(),
            mounts: Mutex::default(),
            health_port: free_port().expect("port"),
            agent_ports: Mutex::default(),
        }
    }

    /// `<root>/<node>`: that node's disk.
    pub fn disk(&self, node: &str) -> PathBuf {
        self.root.path().join(node)
    }

    /// Default config: every node its own disk directory.
    pub fn default_config(&self) -> String {
        let map: Vec<_> = NODES
            .iter()
            .map(|n| json!({"node": n, "paths": [self.disk(n).display().to_string()]}))
            .collect();
        json!({ "nodePathMap": map }).to_string()
    }

    pub async fn put_config(&self, config_json: &str, setup: &str, teardown: &str) {
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("local-path-config".into()),
                ..Default::default()
            },
            data: Some(BTreeMap::from([
                ("config.json".to_string(), config_json.to_string()),
                ("setup".to_string(), setup.to_string()),
                ("teardown".to_string(), teardown.to_string()),
            ])),
            ..Default::default()
        };
        let api: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        api.patch(
            "local-path-config",
            &PatchParams::apply("test").force(),
            &Patch::Apply(&cm),
        )
        .await
        .expect("config map");
    }

    fn spawn(&self, name: &str, args: Vec<String>) -> ManagedProcess {
        // `xtask bench local-path` hands over the binary as shipped (static, profile small).
        let bin = std::env::var_os("SHIPPED_BIN_DIR")
            .map(|d| PathBuf::from(d).join("local-path-provisioner"))
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_local-path-provisioner")));
        let log = self.root.path().join(format!("{name}.log"));
        let mut all = vec![
            "--kubeconfig".to_string(),
            self.kubeconfig.display().to_string(),
            "--log-level".into(),
            "info,local_path=debug".into(),
        ];
        all.extend(args);
        ManagedProcess::spawn(name, &bin, &all, &[], &log).expect("spawning local-path-provisioner")
    }

    /// Starts a provisioner replica (leader-elected on the provisioner's Lease, short timers).
    pub fn start_provisioner(&self, name: &str, extra: &[&str]) -> usize {
        let port = if name == "provisioner" {
            self.health_port
        } else {
            free_port().expect("port")
        };
        let mut args: Vec<String> = [
            "start",
            "--provisioner-name",
            &self.provisioner,
            "--namespace",
            &self.ns,
            "--task-namespace",
            &self.task_ns,
            "--health-address",
            &format!("127.0.0.1:{port}"),
            "--leader-elect-lease-duration",
            "4s",
            "--leader-elect-renew-deadline",
            "3s",
            "--leader-elect-retry-period",
            "1s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = self.spawn(name, args);
        let mut procs = self.procs.lock().unwrap();
        procs.push(p);
        procs.len() - 1
    }

    /// One agent process per node (as the DaemonSet would run), reporting every second.
    pub fn start_agents(&self) {
        for n in NODES {
            let port = free_port().expect("port");
            self.agent_ports.lock().unwrap().insert(n.to_string(), port);
            let args = [
                "agent",
                "--node-name",
                n,
                "--namespace",
                &self.ns,
                "--task-namespace",
                &self.task_ns,
                "--report-interval",
                "1s",
                "--provisioner-name",
                &self.provisioner,
                "--health-address",
                &format!("127.0.0.1:{port}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let p = self.spawn(&format!("agent-{n}"), args);
            self.procs.lock().unwrap().push(p);
        }
    }

    pub fn pid(&self, idx: usize) -> Option<u32> {
        self.procs.lock().unwrap()[idx].pid()
    }

    pub fn kill(&self, idx: usize) {
        self.procs.lock().unwrap()[idx].kill();
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.root.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A tmpfs of `mib` MiB mounted at `dir` (a small disk), unmounted when the test ends.
    pub fn small_disk(&self, dir: &Path, mib: u32) {
        std::fs::create_dir_all(dir).expect("mount point");
        integration_tests::process::run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m"),
                "tmpfs",
                &dir.display().to_string(),
            ],
        )
        .expect("mounting a tmpfs (needs root)");
        self.mounts.lock().unwrap().push(dir.to_path_buf());
    }

    pub async fn storage_class(
        &self,
        suffix: &str,
        params: &[(&str, &str)],
        reclaim: &str,
    ) -> String {
        let name = format!("{}-{suffix}", self.ns);
        let sc: StorageClass = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": self.provisioner,
            "volumeBindingMode": "WaitForFirstConsumer",
            "reclaimPolicy": reclaim,
            "parameters": params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>(),
        }))
        .expect("storage class");
        Api::<StorageClass>::all(self.client.clone())
            .create(&PostParams::default(), &sc)
            .await
            .expect("creating storage class");
        name
    }

    pub async fn claim(&self, name: &str, class: &str, size: &str, access: &str) {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "accessModes": [access],
                "storageClassName": class,
                "resources": {"requests": {"storage": size}},
            }
        }))
        .expect("claim");
        self.claims()
            .create(&PostParams::default(), &pvc)
            .await
            .expect("creating claim");
    }

    /// A claim with the selected-node annotation already set, as the scheduler sets it.
    pub async fn claim_on_node(&self, name: &str, class: &str, size: &str, node: &str) {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"volume.kubernetes.io/selected-node": node}},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": class,
                     "resources": {"requests": {"storage": size}}}
        }))
        .expect("claim");
        self.claims()
            .create(&PostParams::default(), &pvc)
            .await
            .expect("creating claim");
    }

    /// A pod using the claim: the scheduler picks its node (no kubelet runs it).
    pub async fn pod(&self, name: &str, claim: &str) {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "containers": [{"name": "app", "image": "postgres:13",
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            }
        }))
        .expect("pod");
        // A fresh namespace's default ServiceAccount gets its token a moment after creation;
        // until then the apiserver refuses pods with "retry after" (500).
        let deadline = Instant::now() + LIMIT;
        loop {
            match self.pods().create(&PostParams::default(), &pod).await {
                Ok(_) => return,
                Err(kube::Error::Api(s)) if s.code == 500 && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("creating pod: {e}"),
            }
        }
    }

    pub fn claims(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    pub fn pvs(&self) -> Api<PersistentVolume> {
        Api::all(self.client.clone())
    }

    /// The config's namespace (`local-path-config`).
    pub fn configmaps(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// Tasks and node reports.
    pub fn tasks(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.task_ns)
    }

    /// Waits for the claim to be Bound; returns its PV.
    pub async fn bound(&self, claim: &str) -> PersistentVolume {
        self.bound_within(claim, LIMIT).await
    }

    pub async fn bound_within(&self, claim: &str, limit: Duration) -> PersistentVolume {
        let started = Instant::now();
        let c = self.clone_client();
        let ns = self.ns.clone();
        let name = claim.to_string();
        let dump = tokio::spawn(async move {
            tokio::time::sleep(limit - Duration::from_secs(2)).await;
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(c.clone(), &ns);
            let pods: Api<Pod> = Api::namespaced(c, &ns);
            eprintln!(
                "claim: {:?}",
                claims
                    .get(&name)
                    .await
                    .map(|c| (c.metadata.annotations, c.status))
            );
            for p in pods
                .list(&ListParams::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                eprintln!(
                    "pod {}: {:?} {:?}",
                    p.name_any(),
                    p.spec.and_then(|s| s.node_name),
                    p.status.and_then(|s| s.conditions)
                );
            }
        });
        let pv_name = wait_for(&format!("claim {claim} bound"), limit, || async {
            let c = self.claims().get(claim).await.ok()?;
            let phase = c.status.as_ref()?.phase.clone()?;
            (phase == "Bound").then(|| c.spec?.volume_name)?
        })
        .await;
        dump.abort();
        eprintln!(
            "claim {claim}: Bound to {pv_name} after {:?}",
            started.elapsed()
        );
        self.pvs().get(&pv_name).await.expect("pv")
    }

    fn clone_client(&self) -> Client {
        self.client.clone()
    }

    /// Waits for the pod to be placed on a node (after its volume is bound).
    pub async fn scheduled(&self, pod: &str) -> String {
        wait_for(&format!("pod {pod} scheduled"), LIMIT, || async {
            self.pods().get(pod).await.ok()?.spec?.node_name
        })
        .await
    }

    pub async fn delete_claim(&self, claim: &str) {
        let _ = self.claims().delete(claim, &DeleteParams::default()).await;
    }

    pub async fn delete_pod(&self, pod: &str) {
        // No kubelet: a grace period of 0 removes the object at once.
        let _ = self
            .pods()
            .delete(pod, &DeleteParams::default().grace_period(0))
            .await;
    }

    /// Reasons and notes of Events about `name` in the test namespace (and about cluster-scoped
    /// objects, in `default`).
    pub async fn events_for(&self, name: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for ns in [self.ns.as_str(), "default"] {
            let api: Api<k8s_openapi::api::events::v1::Event> =
                Api::namespaced(self.client.clone(), ns);
            if let Ok(list) = api.list(&ListParams::default()).await {
                for e in list {
                    if e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name) {
                        out.push((e.reason.unwrap_or_default(), e.note.unwrap_or_default()));
                    }
                }
            }
            let api: Api<Event> = Api::namespaced(self.client.clone(), ns);
            if let Ok(list) = api.list(&ListParams::default()).await {
                for e in list {
                    if e.involved_object.name.as_deref() == Some(name) {
                        out.push((e.reason.unwrap_or_default(), e.message.unwrap_or_default()));
                    }
                }
            }
        }
        out
    }

    pub async fn wait_event(&self, name: &str, reason: &str) -> String {
        wait_for(&format!("event {reason} on {name}"), LIMIT, || async {
            self.events_for(name)
                .await
                .into_iter()
                .find(|(r, _)| r == reason)
                .map(|(_, n)| n)
        })
        .await
    }

    /// `pvc-*` entries (and pathPattern trees) under every node's disk.
    pub fn volume_dirs(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for n in NODES {
            if let Ok(rd) = std::fs::read_dir(self.disk(n)) {
                out.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out.sort();
        out
    }

    /// GET on the provisioner's health port.
    pub async fn health(&self, path: &str) -> (u16, String) {
        self.get(self.health_port, path).await
    }

    /// GET on the `node` agent's health/metrics port.
    pub async fn agent_get(&self, node: &str, path: &str) -> (u16, String) {
        let port = self.agent_ports.lock().unwrap()[node];
        self.get(port, path).await
    }

    async fn get(&self, port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{port}{path}");
        match integration_tests::http::get(&url, None).await {
            Ok(r) => (r.status, r.text()),
            Err(e) => (0, e.to_string()),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.procs.lock().unwrap().iter() {
                eprintln!("--- {} ---\n{}", p.name(), p.log_tail(3000));
            }
        }
        for p in self.procs.lock().unwrap().iter_mut() {
            p.kill();
        }
        // Pods never run here but still count for the scheduler's scoring: remove them so the
        // next tests' placements are not skewed towards the nodes this one left empty.
        let ns = self.ns.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    let Some(c) = CLUSTER.get() else { return };
                    let Ok(client) = c.client().await else { return };
                    let pods: Api<Pod> = Api::namespaced(client, &ns);
                    let _ = pods
                        .delete_collection(
                            &DeleteParams::default().grace_period(0),
                            &ListParams::default(),
                        )
                        .await;
                });
            }
        })
        .join();
        for m in self.mounts.lock().unwrap().iter() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(m)
                .status();
        }
    }
}

/// The directory of a PV (hostPath or local).
pub fn pv_path(pv: &PersistentVolume) -> String {
    local_path::volume::path_of(pv).expect("pv path")
}

/// The node in a PV's required node affinity.
pub fn pv_node(pv: &PersistentVolume) -> Option<String> {
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    let e = terms.first()?.match_expressions.as_ref()?.first()?;
    assert_eq!(e.key, "kubernetes.io/hostname");
    e.values.as_ref()?.first().cloned()
}

pub fn mode_of(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).expect("metadata").permissions().mode() & 0o7777
}

pub fn name_of<K: ResourceExt>(o: &K) -> String {
    o.name_any()
}
