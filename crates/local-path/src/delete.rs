//! Deletion (library v11 `shouldDelete` + upstream `deleteFor`): a Released PV of ours with
//! reclaim policy Delete gets its teardown run on its node, then the PV object is deleted.
//! Retain volumes are never touched. A PV whose node is gone is deleted without reaching for
//! the node. PVs made by upstream (hostPath or `local`, node in the affinity only) are handled
//! the same way, since node and path are read back from the PV itself.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use crate::context::{Ctx, Error};
use crate::quantity;
use crate::task::{ANY_NODE, Op, Phase, Script, TASK_LABEL, Task};
use crate::volume::{self, ANN_PROVISIONED_BY};

const TASK_POLL: Duration = Duration::from_secs(15);

pub async fn reconcile(pv: Arc<PersistentVolume>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if !should_delete(&pv, &ctx.opts.provisioner_name) {
        withdraw_untaken(&ctx, &pv).await?;
        return Ok(Action::await_change());
    }
    let name = pv.name_any();
    if let Some(state) = ctx.current_task(Op::Delete, &name).await? {
        return match state.phase {
            // A node that went away while its teardown waited: nobody will run it.
            Phase::Pending
                if !state.task.node.is_empty() && !node_exists(&ctx, &state.task.node).await? =>
            {
                tracing::info!(pv = %name, node = %state.task.node, "the volume's node is gone: deleting the PV without cleanup");
                ctx.delete_task(Op::Delete, &name).await?;
                delete_pv(&ctx, &name).await?;
                Ok(Action::await_change())
            }
            Phase::Pending => Ok(Action::requeue(TASK_POLL)),
            Phase::Succeeded => {
                delete_pv(&ctx, &name).await?;
                ctx.forget_failures(&name);
                ctx.delete_task(Op::Delete, &name).await?;
                Ok(Action::await_change())
            }
            Phase::Failed | Phase::NoSpace => {
                let limit = ctx.opts.deletion_retry_count;
                ctx.task_failed(&state, &pv.object_ref(&()), "VolumeFailedDelete", limit)
                    .await
            }
        };
    }
    if ctx.other_actor(Op::Delete, &name).await? {
        tracing::info!(pv = %name, "another actor (helper pod or agent task) is deleting this volume; waiting");
        return Ok(Action::requeue(crate::provision::OTHER_ACTOR_POLL));
    }
    let Some(path) = volume::path_of(&pv) else {
        ctx.event(
            &pv.object_ref(&()),
            true,
            "VolumeFailedDelete",
            "no hostPath or local path in the PV".into(),
        )
        .await;
        return Ok(Action::await_change());
    };
    let node = volume::node_of(&pv);
    let node_present = match &node {
        Some(n) => node_exists(&ctx, n).await?,
        None => false,
    };
    let task_node = match (volume::has_affinity(&pv), node_present) {
        (true, false) => {
            tracing::info!(pv = %name, node = ?node, "the volume's node is gone: deleting the PV without cleanup");
            delete_pv(&ctx, &name).await?;
            return Ok(Action::await_change());
        }
        (true, true) => node.unwrap_or_default(),
        // Shared filesystem: the node it was made from if it still exists, else any agent.
        (false, true) => node.unwrap_or_default(),
        (false, false) => ANY_NODE.to_string(),
    };
    let cfg = ctx.config.borrow().clone().ok_or(Error::NoConfig)?;
    // A helper pod runs whatever path it is given as root (no agent checks it): only a path
    // below one configured for the node goes to one.
    if ctx.opts.mode == crate::context::Mode::HelperPod && !configured(&cfg, &task_node, &path) {
        let note =
            format!("{path:?} is not under a path configured for node {task_node:?}: not touched");
        ctx.event(&pv.object_ref(&()), true, "VolumeFailedDelete", note)
            .await;
        return Ok(Action::await_change());
    }
    let size = pv
        .spec
        .as_ref()
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .and_then(|q| quantity::to_bytes(&q.0))
        .unwrap_or(0);
    let claim = pv
        .spec
        .as_ref()
        .and_then(|s| s.claim_ref.as_ref())
        .map(|r| {
            format!(
                "{}/{}",
                r.namespace.clone().unwrap_or_default(),
                r.name.clone().unwrap_or_default()
            )
        })
        .unwrap_or_default();
    let t = Task {
        op: Op::Delete,
        pv: name.clone(),
        node: task_node,
        base_paths: Vec::new(),
        vol_dir: path,
        size_bytes: size,
        vol_mode: pv
            .spec
            .as_ref()
            .and_then(|s| s.volume_mode.clone())
            .unwrap_or_else(|| "Filesystem".into()),
        script: match &cfg.teardown_command {
            Some(c) => Script::Command(c.clone()),
            None => Script::Shell(cfg.teardown_script.clone()),
        },
        timeout_secs: cfg.cmd_timeout.as_secs(),
        claim,
        claim_uid: String::new(),
        extra_env: Default::default(),
    };
    ctx.create_task(&t).await?;
    Ok(Action::requeue(TASK_POLL))
}

/// The decision to delete no longer holds (Retain now, bound again, annotation gone): a teardown
/// no agent has taken yet is withdrawn, so it cannot run later on a volume that must be kept.
async fn withdraw_untaken(ctx: &Ctx, pv: &PersistentVolume) -> Result<(), Error> {
    let ours = pv.annotations().get(ANN_PROVISIONED_BY).map(String::as_str)
        == Some(ctx.opts.provisioner_name.as_str());
    if !ours || ctx.opts.mode != crate::context::Mode::Agent {
        return Ok(());
    }
    let name = pv.name_any();
    // Asked of the API only when the cache has an untaken teardown (every Bound volume's
    // update comes here). A teardown the cache does not show yet is safe too: the agent
    // checks the volume is still Released and Delete before running it.
    let cached = ctx.current_task(Op::Delete, &name).await?;
    if cached.is_some_and(|s| s.phase == Phase::Pending && s.agent.is_none())
        && let Some(state) = ctx.get_task(Op::Delete, &name).await?
        && state.phase == Phase::Pending
        && state.agent.is_none()
    {
        tracing::info!(pv = %name, "the volume is no longer to be deleted: withdrawing its teardown");
        ctx.delete_task(Op::Delete, &name).await?;
    }
    Ok(())
}

fn configured(cfg: &crate::config::Config, node: &str, path: &str) -> bool {
    cfg.all_paths_on(node)
        .iter()
        .any(|b| crate::config::strictly_below(path, b))
}

/// `shouldDelete`: Released, reclaim Delete, not being deleted, provisioned by us.
pub fn should_delete(pv: &PersistentVolume, provisioner: &str) -> bool {
    let released = pv.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Released");
    let delete = pv
        .spec
        .as_ref()
        .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
        == Some("Delete");
    let ours = pv.annotations().get(ANN_PROVISIONED_BY).map(String::as_str) == Some(provisioner);
    released && delete && ours && pv.meta().deletion_timestamp.is_none()
}

/// Asked of the API, not a cache: deciding that a node is gone skips its volume's cleanup.
async fn node_exists(ctx: &Ctx, name: &str) -> Result<bool, Error> {
    Ok(Api::<Node>::all(ctx.client.clone())
        .get_opt(name)
        .await?
        .is_some())
}

async fn delete_pv(ctx: &Ctx, name: &str) -> Result<(), Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    match pvs.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Create tasks whose claim disappeared before its PV was made: the directory the agent may
/// have made is torn down (a delete task), so a claim deleted mid-provisioning leaks nothing.
/// Tasks whose PV is gone are removed.
pub async fn sweep(ctx: &Ctx) -> Result<(), Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    for state in ctx.list_tasks(TASK_LABEL).await? {
        if state.task.op != Op::Create || state.phase == Phase::Pending {
            continue;
        }
        if claim_alive(ctx, &state.task.claim, &state.task.claim_uid).await? {
            continue;
        }
        if pvs.get_opt(&state.task.pv).await?.is_some() {
            ctx.delete_task(Op::Create, &state.task.pv).await?;
            continue;
        }
        if let (Phase::Succeeded, Some(dir)) = (&state.phase, &state.result_dir) {
            let cfg = ctx.config.borrow().clone().ok_or(Error::NoConfig)?;
            let t = Task {
                op: Op::Delete,
                vol_dir: dir.clone(),
                base_paths: Vec::new(),
                script: match &cfg.teardown_command {
                    Some(c) => Script::Command(c.clone()),
                    None => Script::Shell(cfg.teardown_script.clone()),
                },
                ..state.task.clone()
            };
            tracing::info!(pv = %t.pv, dir = %dir, "claim deleted while provisioning: tearing its directory down");
            ctx.create_task(&t).await?;
        }
        ctx.delete_task(Op::Create, &state.task.pv).await?;
    }
    sweep_finished_deletes(ctx).await?;
    forget_gone_failures(ctx).await
}

/// Failure counts are keyed by PV name (`pvc-<claim uid>`): kept while the PV or the claim exists.
async fn forget_gone_failures(ctx: &Ctx) -> Result<(), Error> {
    if !ctx.has_failures() {
        return Ok(());
    }
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    let claims: Api<PersistentVolumeClaim> = Api::all(ctx.client.clone());
    let mut live: std::collections::HashSet<String> = pvs
        .list_metadata(&Default::default())
        .await?
        .into_iter()
        .map(|p| p.name_any())
        .collect();
    let claim_list = claims.list_metadata(&Default::default()).await?;
    live.extend(
        claim_list
            .into_iter()
            .filter_map(|c| Some(crate::pv_naming::pv_name(&c.uid()?))),
    );
    ctx.keep_failures(&live);
    Ok(())
}

/// Delete tasks that finished for a PV that no longer exists (teardown of a leaked directory).
async fn sweep_finished_deletes(ctx: &Ctx) -> Result<(), Error> {
    let pvs: Api<PersistentVolume> = Api::all(ctx.client.clone());
    for state in ctx.list_tasks(&format!("{TASK_LABEL}=delete")).await? {
        if state.phase != Phase::Pending && pvs.get_opt(&state.task.pv).await?.is_none() {
            ctx.delete_task(Op::Delete, &state.task.pv).await?;
        }
    }
    Ok(())
}

async fn claim_alive(ctx: &Ctx, claim: &str, uid: &str) -> Result<bool, Error> {
    let Some((ns, name)) = claim.split_once('/') else {
        return Ok(false);
    };
    let api: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    Ok(api
        .get_opt(name)
        .await?
        .is_some_and(|c| c.uid().as_deref() == Some(uid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helper_pod_teardown_only_below_configured_paths() {
        let cfg = crate::config::Config::parse_json(
            r#"{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["/opt/lp"]}]}"#,
        )
        .unwrap();
        assert!(configured(&cfg, "n1", "/opt/lp/pvc-1"));
        assert!(!configured(&cfg, "n1", "/opt/lp"));
        assert!(!configured(&cfg, "n1", "/etc"));
        assert!(!configured(&cfg, "n1", "/opt/lp/../../etc"));
    }
}
