//! The provisioner ↔ node-agent protocol: one ConfigMap per volume operation in the task
//! namespace (`--task-namespace`, by default the provisioner's), named like upstream's helper
//! pod (`local-path-create-<pv>`, `local-path-delete-<pv>`), so a name can only ever stand for
//! one operation and a provisioner that restarts finds the one it started. The provisioner writes the request; the agent of the
//! node takes it (an update with the object's resourceVersion, so only one agent runs it), runs
//! the script and writes the result; the provisioner acts on the result and deletes the task.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ObjectMeta;

pub const TASK_LABEL: &str = "local-path.homecluster.io/task";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const MANAGER: &str = "local-path-provisioner";
/// Node value for a task any agent may run (shared filesystem whose node is gone).
pub const ANY_NODE: &str = "";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Create,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Op> {
        match s {
            "create" => Some(Op::Create),
            "delete" => Some(Op::Delete),
            _ => None,
        }
    }
}

/// What the agent reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not run yet (or running).
    Pending,
    Succeeded,
    Failed,
    /// The volume does not fit the free space of any candidate path (create only).
    NoSpace,
}

/// The script to run: the ConfigMap's `setup`/`teardown` text (run by `/bin/sh`), or
/// `setupCommand`/`teardownCommand` (run directly).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Script {
    Shell(String),
    Command(String),
}

/// A request, as the provisioner writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub op: Op,
    pub pv: String,
    /// Node whose agent runs it; [`ANY_NODE`] lets any agent take it.
    pub node: String,
    /// Create: candidate base paths (the agent picks the one with most free space that fits).
    /// Delete: the one base path is unused; `vol_dir` is absolute.
    pub base_paths: Vec<String>,
    /// Create: the folder relative to the chosen base path. Delete: the absolute directory.
    pub vol_dir: String,
    pub size_bytes: u64,
    pub vol_mode: String,
    pub script: Script,
    pub timeout_secs: u64,
    /// `namespace/name` and uid of the claim (create), for reconcile mapping and orphan clean-up.
    pub claim: String,
    pub claim_uid: String,
    /// Extra environment (VOL_USER, VOL_GROUP, VOL_PERM when the class sets them).
    pub extra_env: BTreeMap<String, String>,
}

/// A task with what the agent wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskState {
    pub task: Task,
    pub phase: Phase,
    /// The agent that took it (node name), if any.
    pub agent: Option<String>,
    /// Create: the absolute directory made.
    pub result_dir: Option<String>,
    pub message: String,
}

pub fn name(op: Op, pv: &str) -> String {
    format!("local-path-{}-{pv}", op.as_str())
}

impl Task {
    pub fn to_configmap(&self, namespace: &str) -> ConfigMap {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            data.insert(k.to_string(), v);
        };
        put("op", self.op.as_str().into());
        put("pv", self.pv.clone());
        put("node", self.node.clone());
        put("basePaths", self.base_paths.join("\n"));
        put("volDir", self.vol_dir.clone());
        put("sizeBytes", self.size_bytes.to_string());
        put("volMode", self.vol_mode.clone());
        match &self.script {
            Script::Shell(s) => put("script", s.clone()),
            Script::Command(c) => put("command", c.clone()),
        }
        put("timeoutSeconds", self.timeout_secs.to_string());
        put("claim", self.claim.clone());
        put("claimUID", self.claim_uid.clone());
        if !self.extra_env.is_empty() {
            put(
                "env",
                serde_json::to_string(&self.extra_env).unwrap_or_default(),
            );
        }
        let labels = BTreeMap::from([
            (TASK_LABEL.to_string(), self.op.as_str().to_string()),
            (MANAGED_BY.to_string(), MANAGER.to_string()),
        ]);
        ConfigMap {
            metadata: ObjectMeta {
                name: Some(name(self.op, &self.pv)),
                namespace: Some(namespace.to_string()),
                labels: Some(labels),
                ..Default::default()
            },
            data: Some(data),
            ..Default::default()
        }
    }
}

/// The only extra variables a task may set (what the class's `userPattern`, `groupPattern`,
/// `permPattern` become): anything else (`LD_PRELOAD`, `PATH`...) would run code as root.
pub const EXTRA_ENV_KEYS: [&str; 3] = ["VOL_USER", "VOL_GROUP", "VOL_PERM"];

impl Task {
    /// Fields a task's writer controls that the script sees: refused unless they are what the
    /// provisioner writes.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(k) = self
            .extra_env
            .keys()
            .find(|k| !EXTRA_ENV_KEYS.contains(&k.as_str()))
        {
            return Err(format!(
                "environment variable {k:?} not allowed (only {})",
                EXTRA_ENV_KEYS.join(", ")
            ));
        }
        if !matches!(self.vol_mode.as_str(), "Filesystem" | "Block") {
            return Err(format!(
                "volume mode {:?} is neither Filesystem nor Block",
                self.vol_mode
            ));
        }
        Ok(())
    }
}

/// Reads a task ConfigMap; `None` if it is not a well-formed task (then it is ignored).
pub fn parse(cm: &ConfigMap) -> Option<TaskState> {
    let data = cm.data.as_ref()?;
    let get = |k: &str| data.get(k).cloned().unwrap_or_default();
    let op = Op::parse(&get("op"))?;
    let pv = get("pv");
    if cm.metadata.name.as_deref() != Some(name(op, &pv).as_str()) {
        return None;
    }
    let script = match (data.get("script"), data.get("command")) {
        (_, Some(c)) => Script::Command(c.clone()),
        (Some(s), None) => Script::Shell(s.clone()),
        (None, None) => return None,
    };
    let task = Task {
        op,
        pv,
        node: get("node"),
        base_paths: get("basePaths")
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        vol_dir: get("volDir"),
        size_bytes: get("sizeBytes").parse().ok()?,
        vol_mode: get("volMode"),
        script,
        timeout_secs: get("timeoutSeconds").parse().ok()?,
        claim: get("claim"),
        claim_uid: get("claimUID"),
        extra_env: data
            .get("env")
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_default(),
    };
    let phase = match data.get("phase").map(String::as_str) {
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        Some("NoSpace") => Phase::NoSpace,
        _ => Phase::Pending,
    };
    Some(TaskState {
        task,
        phase,
        agent: data.get("agent").cloned(),
        result_dir: data.get("resultDir").cloned(),
        message: get("message"),
    })
}

/// The data keys an agent writes to report a result.
pub fn result_data(
    phase: &Phase,
    result_dir: Option<&str>,
    message: &str,
) -> BTreeMap<String, String> {
    let phase = match phase {
        Phase::Pending => "Pending",
        Phase::Succeeded => "Succeeded",
        Phase::Failed => "Failed",
        Phase::NoSpace => "NoSpace",
    };
    let mut data = BTreeMap::from([
        ("phase".to_string(), phase.to_string()),
        ("message".to_string(), message.to_string()),
    ]);
    if let Some(d) = result_dir {
        data.insert("resultDir".into(), d.to_string());
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let t = Task {
            op: Op::Create,
            pv: "pvc-1".into(),
            node: "n1".into(),
            base_paths: vec!["/a".into(), "/b".into()],
            vol_dir: "pvc-1_ns_c".into(),
            size_bytes: 1 << 30,
            vol_mode: "Filesystem".into(),
            script: Script::Shell("mkdir -p \"$VOL_DIR\"".into()),
            timeout_secs: 120,
            claim: "ns/c".into(),
            claim_uid: "1".into(),
            extra_env: BTreeMap::from([("VOL_PERM".into(), "0700".into())]),
        };
        let cm = t.to_configmap("local-path-storage");
        assert_eq!(cm.metadata.name.as_deref(), Some("local-path-create-pvc-1"));
        let s = parse(&cm).unwrap();
        assert_eq!(s.task, t);
        assert_eq!(s.phase, Phase::Pending);
        let mut cm2 = cm.clone();
        cm2.data
            .as_mut()
            .unwrap()
            .extend(result_data(&Phase::NoSpace, None, "full"));
        assert_eq!(parse(&cm2).unwrap().phase, Phase::NoSpace);
    }

    #[test]
    fn only_known_env_and_modes() {
        let mut t = Task {
            op: Op::Create,
            pv: "pvc-1".into(),
            node: "n1".into(),
            base_paths: vec!["/a".into()],
            vol_dir: "d".into(),
            size_bytes: 1,
            vol_mode: "Block".into(),
            script: Script::Shell(String::new()),
            timeout_secs: 1,
            claim: String::new(),
            claim_uid: String::new(),
            extra_env: BTreeMap::from([("VOL_USER".into(), "1000".into())]),
        };
        assert_eq!(t.validate(), Ok(()));
        for bad in ["LD_PRELOAD", "PATH", "VOL_DIR"] {
            t.extra_env.insert(bad.into(), "/tmp/x".into());
            assert!(t.validate().unwrap_err().contains(bad));
            t.extra_env.remove(bad);
        }
        t.vol_mode = "Filesystem -x".into();
        assert!(t.validate().is_err());
    }

    #[test]
    fn foreign_configmaps_ignored() {
        let mut cm = ConfigMap::default();
        assert!(parse(&cm).is_none());
        cm.metadata.name = Some("local-path-create-pvc-2".into());
        cm.data = Some(BTreeMap::from([
            ("op".to_string(), "create".to_string()),
            ("pv".to_string(), "pvc-1".to_string()),
        ]));
        assert!(parse(&cm).is_none(), "name must match the pv");
    }
}
