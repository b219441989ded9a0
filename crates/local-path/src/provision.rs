//! The external-provisioner protocol for claims (library v11 `provisionClaimOperation`), with
//! the directory work handed to the node's agent through a task: decide → task → result → PV.
//! Every step is keyed by the claim's uid, so a provisioner restarted at any point picks up the
//! task it started instead of making a second directory or a second PV.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ObjectReference, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use crate::config::Placement;
use crate::context::{Ctx, Error, Mode};
use crate::pv_naming::{self, ClaimMeta};
use crate::quantity;
use crate::task::{ANY_NODE, Op, Phase, Script, Task, TaskState};
use crate::volume::{self, HOSTNAME_KEY, NewVolume, VolumeType};

pub const ANN_STORAGE_PROVISIONER: &str = "volume.kubernetes.io/storage-provisioner";
pub const ANN_STORAGE_PROVISIONER_BETA: &str = "volume.beta.kubernetes.io/storage-provisioner";
pub const ANN_SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";
pub const ANN_SELECTED_NODE_ALPHA: &str = "volume.alpha.kubernetes.io/selected-node";

/// While a task runs, look again at least this often (the task watch usually wakes us first).
const TASK_POLL: Duration = Duration::from_secs(15);

/// While another actor works on the volume, look again this often.
pub const OTHER_ACTOR_POLL: Duration = Duration::from_secs(5);

/// A claim could not be provisioned as asked: an Event, no retry until the claim changes.
struct Refusal(String);

pub async fn reconcile(claim: Arc<PersistentVolumeClaim>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !should_provision(&claim, &ctx.opts.provisioner_name) {
        return Ok(Action::await_change());
    }
    let Some(uid) = claim.uid() else {
        return Ok(Action::await_change());
    };
    let pv_name = pv_naming::pv_name(&uid);
    let Some(class) = class_of(&claim, &ctx).await? else {
        return Ok(Action::await_change());
    };
    let wffc = class.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer");
    let node_name = selected_node(&claim);
    if wffc && node_name.is_none() {
        return Ok(Action::await_change());
    }
    if let Some(state) = ctx.current_task(Op::Create, &pv_name).await? {
        return on_task(&claim, &class, state, &ctx).await;
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    if pvs.get_opt(&pv_name).await?.is_some() {
        return Ok(Action::await_change());
    }
    if ctx.other_actor(Op::Create, &pv_name).await? {
        tracing::info!(pv = %pv_name, "another actor (helper pod or agent task) is provisioning this claim; waiting");
        return Ok(Action::requeue(OTHER_ACTOR_POLL));
    }
    match start(&claim, &class, node_name.as_deref(), &pv_name, &ctx).await? {
        Ok(()) => Ok(Action::requeue(TASK_POLL)),
        Err(Refusal(msg)) => {
            ctx.event(&claim_ref(&claim), true, "ProvisioningFailed", msg)
                .await;
            Ok(Action::await_change())
        }
    }
}

/// `shouldProvision`: unbound, ours by the storage-provisioner annotation (GA or beta key).
pub fn should_provision(claim: &PersistentVolumeClaim, provisioner: &str) -> bool {
    let unbound = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .is_none_or(str::is_empty);
    let a = claim.annotations();
    let ours = a
        .get(ANN_STORAGE_PROVISIONER)
        .or_else(|| a.get(ANN_STORAGE_PROVISIONER_BETA))
        .is_some_and(|p| p == provisioner);
    unbound && ours && claim.meta().deletion_timestamp.is_none()
}

fn selected_node(claim: &PersistentVolumeClaim) -> Option<String> {
    let a = claim.annotations();
    a.get(ANN_SELECTED_NODE)
        .or_else(|| a.get(ANN_SELECTED_NODE_ALPHA))
        .filter(|n| !n.is_empty())
        .cloned()
}

async fn class_of(claim: &PersistentVolumeClaim, ctx: &Ctx) -> Result<Option<StorageClass>, Error> {
    let Some(name) = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.clone())
    else {
        return Ok(None);
    };
    Ok(ctx
        .class(&name)
        .await?
        .filter(|c| c.provisioner == ctx.opts.provisioner_name))
}

pub fn claim_ref(claim: &PersistentVolumeClaim) -> ObjectReference {
    claim.object_ref(&())
}

/// Decides where the volume goes and hands the directory work to the node's agent.
async fn start(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    node_name: Option<&str>,
    pv_name: &str,
    ctx: &Ctx,
) -> Result<Result<(), Refusal>, Error> {
    let cfg = ctx.config.borrow().clone().ok_or(Error::NoConfig)?;
    let spec = claim.spec.clone().unwrap_or_default();
    if spec.volume_mode.as_deref() == Some("Block") {
        return Ok(Err(Refusal(
            "rancher.io/local-path does not support block volume provisioning".into(),
        )));
    }
    let paths = match cfg.for_class(&class.name_any()) {
        Ok(p) => p,
        Err(e) => return Ok(Err(Refusal(e.to_string()))),
    };
    if let Some(node) = node_name
        && paths.shared_fs_path.is_none()
        && ctx.node(node).await?.is_none()
    {
        reschedule(claim, ctx, &format!("selected node {node} does not exist")).await?;
        return Ok(Ok(()));
    }
    let params = class.parameters.clone().unwrap_or_default();
    let placement = match paths.placement(
        node_name.unwrap_or(""),
        params.get("nodePath").map(String::as_str),
    ) {
        Ok(p) => p,
        Err(e) => return Ok(Err(Refusal(e.to_string()))),
    };
    let (base_paths, task_node) = match placement {
        Placement::Shared(p) => (vec![p.to_string()], node_name.unwrap_or(ANY_NODE)),
        Placement::Local(p) => {
            let Some(node) = node_name else {
                return Ok(Err(Refusal(
                    "configuration error, no node was specified".into(),
                )));
            };
            if let Err(msg) = check_local_claim(claim) {
                return Ok(Err(Refusal(msg)));
            }
            (p.into_iter().map(str::to_string).collect(), node)
        }
    };
    if let Err(e) = VolumeType::for_claim(claim, class) {
        return Ok(Err(Refusal(e)));
    }
    let folder = match folder_for(claim, class, pv_name) {
        Ok(f) => f,
        Err(e) => return Ok(Err(Refusal(e.to_string()))),
    };
    let size = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(|q| quantity::to_bytes(&q.0))
        .unwrap_or(0);
    let script = match &cfg.setup_command {
        Some(c) => Script::Command(c.clone()),
        None => Script::Shell(cfg.setup_script.clone()),
    };
    // A helper pod cannot measure the node's disks: the first path, the directory decided here.
    let (base_paths, folder) = if ctx.opts.mode == Mode::HelperPod {
        let base = base_paths.first().cloned().unwrap_or_default();
        (
            vec![base.clone()],
            crate::config::clean(&format!("{base}/{folder}")),
        )
    } else {
        (base_paths, folder)
    };
    let task = Task {
        op: Op::Create,
        pv: pv_name.to_string(),
        node: task_node.to_string(),
        base_paths,
        vol_dir: folder,
        size_bytes: size,
        vol_mode: "Filesystem".into(),
        script,
        timeout_secs: cfg.cmd_timeout.as_secs(),
        claim: format!(
            "{}/{}",
            claim.namespace().unwrap_or_default(),
            claim.name_any()
        ),
        claim_uid: claim.uid().unwrap_or_default(),
        extra_env: extra_env(&params, claim),
    };
    if !ctx.create_task(&task).await? {
        return Ok(Ok(()));
    }
    ctx.event(
        &claim_ref(claim),
        false,
        "Provisioning",
        format!(
            "External provisioner is provisioning volume for claim \"{}\"",
            task.claim
        ),
    )
    .await;
    Ok(Ok(()))
}

/// Without a shared filesystem only single-node access modes, and no selector (upstream).
fn check_local_claim(claim: &PersistentVolumeClaim) -> Result<(), String> {
    let spec = claim.spec.clone().unwrap_or_default();
    for mode in spec.access_modes.unwrap_or_default() {
        if mode != "ReadWriteOnce" && mode != "ReadWriteOncePod" {
            return Err(format!(
                "NodePath only supports ReadWriteOnce and ReadWriteOncePod access modes, not {mode}"
            ));
        }
    }
    if spec.selector.is_some() {
        return Err("claim.Spec.Selector is not supported".into());
    }
    Ok(())
}

fn folder_for(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pv_name: &str,
) -> Result<String, pv_naming::PatternError> {
    let params = class.parameters.clone().unwrap_or_default();
    let allow_unsafe = params
        .get("allowUnsafePathPattern")
        .or_else(|| class.annotations().get("allowUnsafePathPattern"))
        .is_some_and(|v| parse_go_bool(v));
    let namespace = claim.namespace().unwrap_or_default();
    let name = claim.name_any();
    pv_naming::folder(
        &ClaimMeta {
            pv_name,
            namespace: &namespace,
            name: &name,
            labels: claim.labels(),
            annotations: claim.annotations(),
        },
        params.get("pathPattern").map(String::as_str),
        allow_unsafe,
    )
}

/// Go's `strconv.ParseBool`; anything else is false (upstream logs and defaults to false).
fn parse_go_bool(v: &str) -> bool {
    matches!(v, "1" | "t" | "T" | "TRUE" | "true" | "True")
}

/// `VOL_USER`/`VOL_GROUP`/`VOL_PERM` from the class parameters `userPattern`, `groupPattern`,
/// `permPattern` (literal values; templates are not rendered here).
fn extra_env(
    params: &BTreeMap<String, String>,
    _claim: &PersistentVolumeClaim,
) -> BTreeMap<String, String> {
    [
        ("userPattern", "VOL_USER"),
        ("groupPattern", "VOL_GROUP"),
        ("permPattern", "VOL_PERM"),
    ]
    .into_iter()
    .filter_map(|(p, env)| params.get(p).map(|v| (env.to_string(), v.clone())))
    .collect()
}

/// The library's Reschedule: drop the selected-node annotation so the scheduler picks again.
async fn reschedule(claim: &PersistentVolumeClaim, ctx: &Ctx, why: &str) -> Result<(), Error> {
    let api: Api<PersistentVolumeClaim> =
        Api::namespaced(ctx.client.clone(), &claim.namespace().unwrap_or_default());
    let patch = serde_json::json!({"metadata": {"annotations": {
        ANN_SELECTED_NODE: null, ANN_SELECTED_NODE_ALPHA: null}}});
    api.patch(
        &claim.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    ctx.event(
        &claim_ref(claim),
        true,
        "ProvisioningFailed",
        format!("{why}; the claim goes back to the scheduler"),
    )
    .await;
    Ok(())
}

/// Acts on the agent's result.
async fn on_task(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    state: TaskState,
    ctx: &Ctx,
) -> Result<Action, Error> {
    let pv = state.task.pv.clone();
    match state.phase {
        Phase::Pending => Ok(Action::requeue(TASK_POLL)),
        Phase::Succeeded => {
            create_pv(claim, class, &state, ctx).await?;
            ctx.forget_failures(&pv);
            ctx.delete_task(Op::Create, &pv).await?;
            Ok(Action::await_change())
        }
        Phase::NoSpace => {
            // Delete first: a new selected node must start from a fresh decision.
            ctx.delete_task(Op::Create, &pv).await?;
            reschedule(claim, ctx, &state.message).await?;
            Ok(Action::await_change())
        }
        Phase::Failed => {
            let limit = ctx.opts.provisioning_retry_count;
            ctx.task_failed(&state, &claim_ref(claim), "ProvisioningFailed", limit)
                .await
        }
    }
}

/// The directory the agent (or helper pod) reports becomes the PV's path, later handed to
/// teardown. Whoever can write tasks can rewrite them, so it must be exactly `<base>/<folder>`
/// for one of the task's base paths, with `folder` computed again here from the claim and class
/// (which the agents cannot write): never another volume's directory.
fn result_dir(state: &TaskState, folder: &str) -> Result<String, Error> {
    use crate::config::{clean, strictly_below};
    let t = &state.task;
    let path = state
        .result_dir
        .as_deref()
        .map(clean)
        .ok_or_else(|| Error::Retry("agent reported success without a directory".into()))?;
    let under = |b: &String| clean(&format!("{b}/{folder}"));
    // Helper-pod mode decides the whole directory up front; agent mode only the folder.
    let ok = if t.vol_dir.starts_with('/') {
        let dir = clean(&t.vol_dir);
        path == dir && t.base_paths.iter().any(|b| under(b) == dir)
    } else {
        t.vol_dir == folder && t.base_paths.iter().any(|b| under(b) == path)
    };
    if !ok || !t.base_paths.iter().any(|b| strictly_below(&path, b)) {
        return Err(Error::Retry(format!(
            "reported directory {path:?} is not {folder:?} below the task's paths ({}): no PV made",
            t.base_paths.join(", ")
        )));
    }
    Ok(path)
}

async fn create_pv(
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    state: &TaskState,
    ctx: &Ctx,
) -> Result<(), Error> {
    let folder =
        folder_for(claim, class, &state.task.pv).map_err(|e| Error::Retry(e.to_string()))?;
    let path = result_dir(state, &folder)?;
    let volume_type = VolumeType::for_claim(claim, class).map_err(Error::Retry)?;
    let shared = ctx
        .config
        .borrow()
        .as_ref()
        .and_then(|c| {
            c.for_class(&class.name_any())
                .ok()
                .map(|p| p.shared_fs_path.is_some())
        })
        .unwrap_or(false);
    let key = class
        .parameters
        .as_ref()
        .and_then(|p| p.get("nodeAffinityKey"))
        .cloned()
        .unwrap_or_else(|| HOSTNAME_KEY.to_string());
    let node_name = state.task.node.clone();
    let value = if shared {
        String::new()
    } else {
        ctx.node(&node_name)
            .await?
            .and_then(|n| n.labels().get(&key).cloned())
            .unwrap_or_else(|| node_name.clone())
    };
    let pv = volume::build(&NewVolume {
        name: &state.task.pv,
        provisioner: &ctx.opts.provisioner_name,
        claim,
        class,
        path: &path,
        volume_type,
        node: (!shared).then_some((node_name.as_str(), key.as_str(), value.as_str())),
    });
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs.create(&PostParams::default(), &pv).await {
        Ok(_) => {}
        // Made by an earlier pass whose task deletion failed: already reported.
        Err(kube::Error::Api(s)) if s.code == 409 => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    ctx.event(
        &claim_ref(claim),
        false,
        "ProvisioningSucceeded",
        format!(
            "Successfully provisioned volume {} at {path}",
            state.task.pv
        ),
    )
    .await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_directory_must_be_below_a_task_path() {
        let mut state = TaskState {
            task: Task {
                op: Op::Create,
                pv: "pvc-1".into(),
                node: "n".into(),
                base_paths: vec!["/disk/a".into(), "/disk/b".into()],
                vol_dir: "pvc-1_ns_c".into(),
                size_bytes: 0,
                vol_mode: "Filesystem".into(),
                script: Script::Shell(String::new()),
                timeout_secs: 1,
                claim: String::new(),
                claim_uid: String::new(),
                extra_env: Default::default(),
            },
            phase: Phase::Succeeded,
            agent: Some("n".into()),
            result_dir: Some("/disk/b/pvc-1_ns_c".into()),
            message: String::new(),
        };
        let folder = "pvc-1_ns_c";
        assert_eq!(result_dir(&state, folder).unwrap(), "/disk/b/pvc-1_ns_c");
        assert!(
            result_dir(&state, "pvc-2_ns_d").is_err(),
            "a folder other than the claim's"
        );
        for bad in [
            "/etc",
            "/disk/a",
            "/disk/a/../../etc",
            "/disk/ab/x",
            "/disk/b/pvc-2_ns_d",
        ] {
            state.result_dir = Some(bad.into());
            assert!(result_dir(&state, folder).is_err(), "{bad}");
        }
        state.result_dir = None;
        assert!(result_dir(&state, folder).is_err());
        // Helper-pod mode: the task names the whole directory.
        state.task.base_paths = vec!["/disk/a".into()];
        state.task.vol_dir = "/disk/a/pvc-1_ns_c".into();
        state.result_dir = Some("/disk/a/pvc-1_ns_c".into());
        assert_eq!(result_dir(&state, folder).unwrap(), "/disk/a/pvc-1_ns_c");
        state.task.vol_dir = "/disk/a/pvc-2_ns_d".into();
        state.result_dir = Some("/disk/a/pvc-2_ns_d".into());
        assert!(result_dir(&state, folder).is_err());
    }
}
