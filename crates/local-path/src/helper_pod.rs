//! upstream's helper pod (`createHelperPod`), kept for compatibility (`--mode helper-pod`): the
//! same task, run by a pod from `helperPod.yaml` on the volume's node instead of by the agent.
//! The task itself rides on the pod as an annotation, so a restarted provisioner reads it back
//! exactly as it reads a task ConfigMap.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, Container, EnvVar, HostPathVolumeSource, KeyToPath, Pod, Toleration,
    Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use crate::task::{self, MANAGED_BY, MANAGER, Op, Phase, Script, TASK_LABEL, Task, TaskState};

/// Annotation carrying the task's data on the helper pod.
pub const TASK_ANNOTATION: &str = "local-path.homecluster.io/task";
const MAX_NAME: usize = 128;

/// `helper-pod-<create|delete>-<pv>`, cut to 128 characters as upstream does.
pub fn name(op: Op, pv: &str) -> String {
    let mut n = format!("helper-pod-{}-{pv}", op.as_str());
    n.truncate(MAX_NAME);
    n
}

#[derive(Debug, thiserror::Error)]
pub enum HelperPodError {
    #[error("helperPod.yaml is missing from the config")]
    NoTemplate,
    #[error("helperPod.yaml: {0}")]
    Template(String),
    #[error("helperPod.yaml must have exactly one container")]
    Containers,
}

/// The pod for `t`, from the template: node, service account, never restarted, the volume's
/// parent directory and the script mounted, upstream's command, arguments and environment.
pub fn build(
    t: &Task,
    template: Option<&str>,
    configmap: &str,
    service_account: &str,
) -> Result<Pod, HelperPodError> {
    let mut pod: Pod = serde_yaml::from_str(template.ok_or(HelperPodError::NoTemplate)?)
        .map_err(|e| HelperPodError::Template(e.to_string()))?;
    let vol_dir = t.vol_dir.clone();
    let parent = std::path::Path::new(&vol_dir)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/".into());
    let mut data: BTreeMap<String, String> = t.to_configmap("").data.unwrap_or_default();
    data.insert("resultDir".into(), vol_dir.clone());
    let meta = &mut pod.metadata;
    meta.name = Some(name(t.op, &t.pv));
    meta.namespace = None;
    meta.labels.get_or_insert_default().extend([
        (TASK_LABEL.to_string(), t.op.as_str().to_string()),
        (MANAGED_BY.to_string(), MANAGER.to_string()),
    ]);
    meta.annotations.get_or_insert_default().insert(
        TASK_ANNOTATION.into(),
        serde_json::to_string(&data).unwrap_or_default(),
    );
    let spec = pod.spec.get_or_insert_default();
    if spec.containers.len() != 1 {
        return Err(HelperPodError::Containers);
    }
    if !t.node.is_empty() {
        spec.node_name = Some(t.node.clone());
    }
    spec.service_account_name = Some(service_account.into());
    spec.restart_policy = Some("Never".into());
    if spec.tolerations.as_ref().is_none_or(Vec::is_empty) {
        spec.tolerations = Some(vec![Toleration {
            key: Some("node.kubernetes.io/disk-pressure".into()),
            operator: Some("Exists".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        }]);
    }
    let mut volumes = vec![Volume {
        name: "data".into(),
        host_path: Some(HostPathVolumeSource {
            path: parent.clone(),
            type_: Some("DirectoryOrCreate".into()),
        }),
        ..Default::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "data".into(),
        mount_path: parent,
        ..Default::default()
    }];
    let key = if t.op == Op::Create {
        "setup"
    } else {
        "teardown"
    };
    let command = match &t.script {
        Script::Shell(_) => {
            volumes.push(Volume {
                name: "script".into(),
                config_map: Some(ConfigMapVolumeSource {
                    name: configmap.into(),
                    items: Some(vec![
                        KeyToPath {
                            key: "setup".into(),
                            path: "setup".into(),
                            mode: None,
                        },
                        KeyToPath {
                            key: "teardown".into(),
                            path: "teardown".into(),
                            mode: None,
                        },
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            });
            mounts.push(VolumeMount {
                name: "script".into(),
                mount_path: "/script".into(),
                ..Default::default()
            });
            vec!["/bin/sh".to_string(), format!("/script/{key}")]
        }
        Script::Command(c) => vec![c.clone()],
    };
    spec.volumes = Some(volumes);
    let c: &mut Container = &mut spec.containers[0];
    c.command = Some(command);
    c.args = Some(
        [
            "-p",
            &vol_dir,
            "-s",
            &t.size_bytes.to_string(),
            "-m",
            &t.vol_mode,
            "-a",
            t.op.as_str(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let mut env = vec![
        EnvVar {
            name: "VOL_DIR".into(),
            value: Some(vol_dir),
            ..Default::default()
        },
        EnvVar {
            name: "VOL_MODE".into(),
            value: Some(t.vol_mode.clone()),
            ..Default::default()
        },
        EnvVar {
            name: "VOL_SIZE_BYTES".into(),
            value: Some(t.size_bytes.to_string()),
            ..Default::default()
        },
    ];
    env.extend(t.extra_env.iter().map(|(k, v)| EnvVar {
        name: k.clone(),
        value: Some(v.clone()),
        ..Default::default()
    }));
    c.env = Some(env);
    c.volume_mounts = Some(mounts);
    Ok(pod)
}

/// Reads the task back from its helper pod; the pod's phase is the result. A pod that has not
/// succeeded within `cmdTimeoutSeconds` counts as failed, with upstream's message.
pub fn parse(pod: &Pod) -> Option<TaskState> {
    let data: BTreeMap<String, String> =
        serde_json::from_str(pod.annotations().get(TASK_ANNOTATION)?).ok()?;
    let op = data.get("op")?.clone();
    let pv = data.get("pv")?.clone();
    let cm = k8s_openapi::api::core::v1::ConfigMap {
        metadata: kube::api::ObjectMeta {
            name: Some(format!("local-path-{op}-{pv}")),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let mut state = task::parse(&cm)?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    state.phase = match phase {
        Some("Succeeded") => Phase::Succeeded,
        Some("Failed") => Phase::Failed,
        _ if expired(
            pod.metadata.creation_timestamp.as_ref(),
            state.task.timeout_secs,
        ) =>
        {
            Phase::Failed
        }
        _ => Phase::Pending,
    };
    state.message = match state.phase {
        Phase::Failed if phase != Some("Failed") => format!(
            "{} process timeout after {} seconds",
            state.task.op.as_str(),
            state.task.timeout_secs
        ),
        Phase::Failed => format!("helper pod {} failed", pod.name_any()),
        _ => String::new(),
    };
    Some(state)
}

fn expired(created: Option<&Time>, timeout_secs: u64) -> bool {
    let Some(Time(t)) = created else { return false };
    let age = k8s_openapi::jiff::Timestamp::now().duration_since(*t);
    age.as_secs() > i64::try_from(timeout_secs).unwrap_or(i64::MAX)
        && Duration::from_secs(timeout_secs) > Duration::ZERO
}
