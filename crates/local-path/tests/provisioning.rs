//! Against the real kube-apiserver, kube-controller-manager (PV controller, binder) and
//! kube-scheduler (volume binding sets the selected node): our provisioner and one agent
//! process per node, each node's disk a directory of its own.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolume};
use kube::ResourceExt;
use kube::api::{ListParams, PostParams};
use serde_json::json;

/// Pod + claim → scheduled, PV with the node's affinity and upstream's directory, setup's mode
/// and environment; claim deleted → teardown ran, PV gone (reclaim Delete).
#[tokio::test(flavor = "multi_thread")]
async fn pod_claim_is_provisioned_on_its_node_and_deleted() {
    let env = Env::new("lp-basic").await;
    // Records upstream's environment and arguments next to the volume.
    let setup = "#!/bin/sh\nset -eu\nmkdir -m 0750 -p \"$VOL_DIR\"\necho \"$VOL_DIR $VOL_MODE $VOL_SIZE_BYTES $*\" > \"$VOL_DIR.env\"\n";
    let teardown = "#!/bin/sh\nset -eu\nrm -rf \"$VOL_DIR\" \"$VOL_DIR.env\"\n";
    env.put_config(&env.default_config(), setup, teardown).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;
    env.claim("data", &class, "1Gi", "ReadWriteOnce").await;
    env.pod("db", "data").await;

    let pv = env.bound("data").await;
    let node = env.scheduled("db").await;
    let claim = env.claims().get("data").await.unwrap();
    let uid = claim.uid().unwrap();
    assert_eq!(pv.name_any(), format!("pvc-{uid}"));
    assert_eq!(pv_node(&pv).as_deref(), Some(node.as_str()));
    let dir = env.disk(&node).join(format!("pvc-{uid}_{}_data", env.ns));
    assert_eq!(pv_path(&pv), dir.display().to_string());
    let spec = pv.spec.clone().unwrap();
    assert_eq!(
        spec.host_path.unwrap().type_.as_deref(),
        Some("DirectoryOrCreate")
    );
    assert_eq!(spec.capacity.unwrap()["storage"].0, "1Gi");
    assert_eq!(
        spec.persistent_volume_reclaim_policy.as_deref(),
        Some("Delete")
    );
    assert_eq!(
        spec.access_modes.unwrap(),
        vec!["ReadWriteOnce".to_string()]
    );
    assert_eq!(
        pv.annotations().get("pv.kubernetes.io/provisioned-by"),
        Some(&env.provisioner)
    );
    assert_eq!(mode_of(&dir), 0o750);
    let recorded = std::fs::read_to_string(format!("{}.env", dir.display())).unwrap();
    assert_eq!(
        recorded.trim(),
        format!(
            "{d} Filesystem {s} -p {d} -s {s} -m Filesystem -a create",
            d = dir.display(),
            s = 1u64 << 30
        )
    );
    assert!(
        env.events_for("data")
            .await
            .iter()
            .any(|(r, _)| r == "ProvisioningSucceeded")
    );

    // upstream's probe paths and kube-common's.
    for p in ["/health", "/ready", "/healthz", "/readyz"] {
        let (status, _) = env.health(p).await;
        assert_eq!(status, 200, "{p}");
    }
    let (_, metrics) = env.health("/metrics").await;
    assert!(metrics.contains("controller_reconcile"), "{metrics}");

    let started = Instant::now();
    env.delete_pod("db").await;
    env.delete_claim("data").await;
    eventually("PV deleted", LIMIT, || async {
        env.pvs().get_opt(&pv.name_any()).await.unwrap().is_none()
    })
    .await;
    eprintln!("claim deleted → PV gone after {:?}", started.elapsed());
    assert!(!dir.exists(), "teardown removed the directory");
    assert!(env.volume_dirs().is_empty(), "{:?}", env.volume_dirs());
    // The PV goes first, then its finished task: wait for the second step too.
    none_labelled_task("no task left behind", &env.tasks()).await;
}

/// Waits until no object of `api` carries the task label (task ConfigMaps or helper pods).
async fn none_labelled_task<K>(what: &str, api: &kube::Api<K>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    eventually(what, LIMIT, || async {
        api.list(&ListParams::default().labels("local-path.homecluster.io/task"))
            .await
            .unwrap()
            .items
            .is_empty()
    })
    .await;
}

/// Retain: the claim goes, the PV is Released and nothing on disk changes, byte for byte.
#[tokio::test(flavor = "multi_thread")]
async fn retain_keeps_the_directory_byte_for_byte() {
    let env = Env::new("lp-retain").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("keep", &[], "Retain").await;
    env.claim("keep", &class, "10Mi", "ReadWriteOnce").await;
    env.pod("app", "keep").await;
    let pv = env.bound("keep").await;
    let dir = std::path::PathBuf::from(pv_path(&pv));
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(dir.join("table.dat"), &payload).unwrap();

    env.delete_pod("app").await;
    env.delete_claim("keep").await;
    eventually("PV Released", LIMIT, || async {
        env.pvs()
            .get(&pv.name_any())
            .await
            .ok()
            .and_then(|p| p.status?.phase)
            .as_deref()
            == Some("Released")
    })
    .await;
    // Long enough for a wrong teardown to have happened (the agent reacts in milliseconds).
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        env.pvs().get_opt(&pv.name_any()).await.unwrap().is_some(),
        "Retain PV kept"
    );
    assert_eq!(std::fs::read(dir.join("table.dat")).unwrap(), payload);
    let tasks = env
        .tasks()
        .list(&ListParams::default().labels("local-path.homecluster.io/task"))
        .await
        .unwrap();
    assert!(
        tasks.items.is_empty(),
        "no teardown requested for a Retain volume"
    );

    // Forged teardowns with the configured script: one named after the Retain PV, one after a
    // PV that does not exist. The agent reads the PV now and touches nothing.
    let node = volume_node(&pv);
    for forged_pv in [pv.name_any(), format!("{}-forged", pv.name_any())] {
        let t = local_path::task::Task {
            op: local_path::task::Op::Delete,
            pv: forged_pv.clone(),
            node: node.clone(),
            base_paths: Vec::new(),
            vol_dir: dir.display().to_string(),
            size_bytes: 0,
            vol_mode: "Filesystem".into(),
            script: local_path::task::Script::Shell(TEARDOWN.into()),
            timeout_secs: 10,
            claim: String::new(),
            claim_uid: String::new(),
            extra_env: BTreeMap::new(),
        };
        let name = local_path::task::name(local_path::task::Op::Delete, &forged_pv);
        env.tasks()
            .create(&PostParams::default(), &t.to_configmap(&env.task_ns))
            .await
            .unwrap();
        eventually("forged teardown refused or withdrawn", LIMIT, || async {
            match env.tasks().get_opt(&name).await.unwrap() {
                None => true,
                Some(cm) => cm.data.and_then(|d| d.get("phase").cloned()).is_some(),
            }
        })
        .await;
        let cm = env.tasks().get_opt(&name).await.unwrap();
        if let Some(phase) = cm.and_then(|c| c.data?.get("phase").cloned()) {
            assert_eq!(phase, "Failed", "forged teardown of {forged_pv}");
        }
        assert_eq!(std::fs::read(dir.join("table.dat")).unwrap(), payload);
    }
}

fn volume_node(pv: &PersistentVolume) -> String {
    pv.annotations()
        .get("local.path.provisioner/selected-node")
        .cloned()
        .unwrap_or_default()
}

/// pathPattern renders upstream's template subset; a pattern escaping the claim's directory is
/// refused with an Event and nothing is created.
#[tokio::test(flavor = "multi_thread")]
async fn path_pattern_and_traversal_refused() {
    let env = Env::new("lp-pattern").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let good = env
        .storage_class(
            "pattern",
            &[(
                "pathPattern",
                "{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ .PVC.Labels.app }}",
            )],
            "Delete",
        )
        .await;
    let evil = env
        .storage_class(
            "evil",
            &[(
                "pathPattern",
                "{{ .PVC.Namespace }}/{{ .PVC.Name }}/../../../../etc",
            )],
            "Delete",
        )
        .await;

    let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "pat", "labels": {"app": "pg"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": good,
                 "resources": {"requests": {"storage": "1Mi"}}}
    }))
    .unwrap();
    env.claims()
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    env.pod("pat-pod", "pat").await;
    let pv = env.bound("pat").await;
    let node = env.scheduled("pat-pod").await;
    let expected = env.disk(&node).join(&env.ns).join("pat").join("pg");
    assert_eq!(pv_path(&pv), expected.display().to_string());
    assert!(expected.is_dir());

    env.claim("evil", &evil, "1Mi", "ReadWriteOnce").await;
    env.pod("evil-pod", "evil").await;
    let note = env.wait_event("evil", "ProvisioningFailed").await;
    assert!(
        note.contains("invalid references") || note.contains("must start with"),
        "{note}"
    );
    let claim = env.claims().get("evil").await.unwrap();
    assert_eq!(
        claim.status.and_then(|s| s.phase).as_deref(),
        Some("Pending")
    );
    assert!(!env.root.path().join("etc").exists());

    // An error out of the reconcile itself (here: an unsupported volumeType found once the
    // directory is made) is an Event on the claim too, not only a log line.
    let pvc: k8s_openapi::api::core::v1::PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": "odd", "labels": {"app": "odd"}, "annotations": {"volumeType": "nfs"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": good,
                 "resources": {"requests": {"storage": "1Mi"}}}
    }))
    .unwrap();
    env.claims()
        .create(&PostParams::default(), &pvc)
        .await
        .unwrap();
    env.pod("odd-pod", "odd").await;
    let note = env.wait_event("odd", "ProvisioningFailed").await;
    assert!(note.contains("not supported"), "{note}");
}

/// storageClassConfigs: a class on a shared filesystem (any access mode, no node affinity)
/// next to a node-local one.
#[tokio::test(flavor = "multi_thread")]
async fn shared_filesystem_class() {
    let env = Env::new("lp-shared").await;
    let shared_dir = env.root.path().join("nfs");
    let local_class = format!("{}-local", env.ns);
    let shared_class = format!("{}-shared", env.ns);
    let map: Vec<_> = NODES
        .iter()
        .map(|n| json!({"node": n, "paths": [env.disk(n).display().to_string()]}))
        .collect();
    let config = json!({"storageClassConfigs": {
        local_class.clone(): {"nodePathMap": map},
        shared_class.clone(): {"sharedFileSystemPath": shared_dir.display().to_string()},
    }});
    env.put_config(&config.to_string(), SETUP, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    env.storage_class("local", &[], "Delete").await;
    env.storage_class("shared", &[], "Delete").await;
    env.claim("rwx", &shared_class, "5Mi", "ReadWriteMany")
        .await;
    env.pod("rwx-pod", "rwx").await;
    env.claim("rwo", &local_class, "5Mi", "ReadWriteOnce").await;
    env.pod("rwo-pod", "rwo").await;

    let shared_pv = env.bound("rwx").await;
    assert!(
        shared_pv.spec.as_ref().unwrap().node_affinity.is_none(),
        "no affinity on a shared volume"
    );
    assert!(pv_path(&shared_pv).starts_with(&shared_dir.display().to_string()));
    assert!(std::path::Path::new(&pv_path(&shared_pv)).is_dir());
    let local_pv = env.bound("rwo").await;
    assert!(pv_node(&local_pv).is_some());

    env.delete_pod("rwx-pod").await;
    env.delete_claim("rwx").await;
    eventually("shared volume torn down", LIMIT, || async {
        env.pvs()
            .get_opt(&shared_pv.name_any())
            .await
            .unwrap()
            .is_none()
    })
    .await;
    assert!(!std::path::Path::new(&pv_path(&shared_pv)).exists());
}

/// Live reload: a bad config raises a Warning Event and the last good one keeps working; a good
/// new one takes effect for the next claim.
#[tokio::test(flavor = "multi_thread")]
async fn config_reload_and_bad_config_kept_out() {
    let env = Env::new("lp-reload").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;
    eventually("provisioner ready (config loaded)", LIMIT, || async {
        env.health("/ready").await.0 == 200
    })
    .await;

    env.put_config(
        r#"{"nodePathMap":[{"node":"x","paths":["relative/path"]}]}"#,
        SETUP,
        TEARDOWN,
    )
    .await;
    let note = env.wait_event("local-path-config", "InvalidConfig").await;
    assert!(
        note.contains("relative/path") && note.contains("absolute"),
        "{note}"
    );

    env.claim("one", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("one-pod", "one").await;
    let pv = env.bound("one").await;
    let node = env.scheduled("one-pod").await;
    assert!(
        pv_path(&pv).starts_with(&env.disk(&node).display().to_string()),
        "last good config used"
    );

    // A new good config: every node's volumes under <disk>/v2.
    let map: Vec<_> = NODES
        .iter()
        .map(|n| json!({"node": n, "paths": [env.disk(n).join("v2").display().to_string()]}))
        .collect();
    env.put_config(&json!({"nodePathMap": map}).to_string(), SETUP, TEARDOWN)
        .await;
    // The reload is a watch event; give it a moment before the next claim.
    tokio::time::sleep(Duration::from_secs(1)).await;
    env.claim("two", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("two-pod", "two").await;
    let pv2 = env.bound("two").await;
    let node2 = env.scheduled("two-pod").await;
    assert!(
        pv_path(&pv2).starts_with(&env.disk(&node2).join("v2").display().to_string()),
        "{}",
        pv_path(&pv2)
    );
}

/// Capacity: a claim too big for the selected node's path is sent back to the scheduler (the
/// selected-node annotation removed, with an Event) and lands on a node where it fits; with two
/// paths on a node the one with more free space is chosen.
#[tokio::test(flavor = "multi_thread")]
async fn claim_too_big_for_a_node_lands_where_it_fits() {
    let env = Env::new("lp-capacity").await;
    let small = env.disk(NODES[2]);
    env.small_disk(&small, 8);
    let tiny_a = env.root.path().join("tiny-a");
    env.small_disk(&tiny_a, 4);
    let map = json!([
        {"node": NODES[0], "paths": [tiny_a.display().to_string(), env.disk(NODES[0]).display().to_string()]},
        {"node": NODES[1], "paths": [env.disk(NODES[1]).display().to_string()]},
        {"node": NODES[2], "paths": [small.display().to_string()]},
    ]);
    env.put_config(&json!({"nodePathMap": map}).to_string(), SETUP, TEARDOWN)
        .await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;

    // As the scheduler would: the small node selected for a 64Mi claim.
    env.claim_on_node("pinned", &class, "64Mi", NODES[2]).await;
    let note = env.wait_event("pinned", "ProvisioningFailed").await;
    assert!(
        note.contains("does not fit") && note.contains("scheduler"),
        "{note}"
    );
    eventually("selected-node removed", LIMIT, || async {
        let c = env.claims().get("pinned").await.unwrap();
        !c.annotations()
            .contains_key("volume.kubernetes.io/selected-node")
    })
    .await;

    // With a pod: whichever node the scheduler tries, the claim ends on a node where it fits.
    let started = Instant::now();
    env.claim("big", &class, "64Mi", "ReadWriteOnce").await;
    env.pod("big-pod", "big").await;
    // Each wrong pick costs the pod a scheduler backoff (1 s doubling to 10 s).
    let pv = env.bound_within("big", Duration::from_secs(150)).await;
    let node = env.scheduled("big-pod").await;
    let reschedules = env
        .events_for("big")
        .await
        .iter()
        .filter(|(r, _)| r == "ProvisioningFailed")
        .count();
    eprintln!(
        "64Mi claim: on {node} after {:?}, {reschedules} reschedule(s)",
        started.elapsed()
    );
    assert_ne!(node, NODES[2]);
    if node == NODES[0] {
        assert!(
            pv_path(&pv).starts_with(&env.disk(NODES[0]).display().to_string()),
            "the larger path of node a"
        );
    }
    assert!(
        std::fs::read_dir(&small).unwrap().next().is_none(),
        "nothing made on the small disk"
    );

    // Two paths on node a, a small claim fits both: the one with more free space wins.
    env.claim_on_node("two-paths", &class, "1Mi", NODES[0])
        .await;
    let pv = env.bound("two-paths").await;
    assert!(
        pv_path(&pv).starts_with(&env.disk(NODES[0]).display().to_string()),
        "{}",
        pv_path(&pv)
    );
}

/// PVs as upstream makes them (no annotation of ours, node in the affinity only): a Released one
/// is torn down and deleted by ours; one whose node is gone is deleted without touching a node.
#[tokio::test(flavor = "multi_thread")]
async fn upstream_pvs_and_deleted_nodes_are_cleaned_up() {
    let env = Env::new("lp-upstream").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;

    let make = |name: &str, node: &str, path: &str| -> PersistentVolume {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"pv.kubernetes.io/provisioned-by": env.provisioner}},
            "spec": {
                "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete", "storageClassName": class,
                "hostPath": {"path": path, "type": "DirectoryOrCreate"},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
                // A claim that no longer exists: the PV controller marks the PV Released.
                "claimRef": {"namespace": env.ns, "name": "gone", "uid": "00000000-0000-0000-0000-000000000001"},
            }
        }))
        .unwrap()
    };
    let old_dir = env.disk(NODES[1]).join(format!("pvc-old_{}_gone", env.ns));
    std::fs::create_dir_all(&old_dir).unwrap();
    std::fs::write(old_dir.join("f"), b"x").unwrap();
    let old_name = format!("{}-old", env.ns);
    env.pvs()
        .create(
            &PostParams::default(),
            &make(&old_name, NODES[1], &old_dir.display().to_string()),
        )
        .await
        .unwrap();
    let lost_name = format!("{}-lost", env.ns);
    let lost_dir = env.root.path().join("lost-node-disk/pvc-lost");
    std::fs::create_dir_all(&lost_dir).unwrap();
    env.pvs()
        .create(
            &PostParams::default(),
            &make(&lost_name, "no-such-node", &lost_dir.display().to_string()),
        )
        .await
        .unwrap();

    // A PV pointing outside every configured path (forged, or left from an old config): the
    // agent refuses to run the teardown there; the PV and the data stay.
    let outside = env.root.path().join("outside/pvc-x");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), b"precious").unwrap();
    let outside_name = format!("{}-outside", env.ns);
    env.pvs()
        .create(
            &PostParams::default(),
            &make(&outside_name, NODES[0], &outside.display().to_string()),
        )
        .await
        .unwrap();
    let note = env.wait_event(&outside_name, "VolumeFailedDelete").await;
    assert!(note.contains("not under a path configured"), "{note}");
    assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"precious");
    assert!(env.pvs().get_opt(&outside_name).await.unwrap().is_some());

    for name in [&old_name, &lost_name] {
        eventually(&format!("PV {name} deleted"), LIMIT, || async {
            env.pvs().get_opt(name).await.unwrap().is_none()
        })
        .await;
    }
    assert!(
        !old_dir.exists(),
        "upstream-made volume torn down on its node"
    );
    assert!(lost_dir.exists(), "nothing ran for a node that is gone");
}

/// Per-volume usage on the agent's /metrics, and orphaned pvc-* directories reported (in the
/// node's report ConfigMap and as a metric), never deleted.
#[tokio::test(flavor = "multi_thread")]
async fn usage_metric_and_orphan_report() {
    let env = Env::new("lp-usage").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    let orphan = env.disk(NODES[0]).join("pvc-orphan_ns_old");
    std::fs::create_dir_all(&orphan).unwrap();
    env.start_agents();
    env.start_provisioner("provisioner", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;
    env.claim("u", &class, "10Mi", "ReadWriteOnce").await;
    env.pod("u-pod", "u").await;
    let pv = env.bound("u").await;
    let node = env.scheduled("u-pod").await;
    std::fs::write(
        std::path::Path::new(&pv_path(&pv)).join("blob"),
        vec![1u8; 256 * 1024],
    )
    .unwrap();

    let report: ConfigMap = wait_for("node report with usage", LIMIT, || async {
        let cm = env
            .tasks()
            .get(&format!("local-path-node-{node}"))
            .await
            .ok()?;
        let usage: BTreeMap<String, u64> =
            serde_json::from_str(cm.data.as_ref()?.get("usage.json")?).ok()?;
        (usage.get(&pv.name_any()).copied().unwrap_or(0) >= 256 * 1024).then_some(cm)
    })
    .await;
    assert!(report.data.unwrap().contains_key("free.json"));
    let a: ConfigMap = wait_for("orphan reported", LIMIT, || async {
        let cm = env
            .tasks()
            .get(&format!("local-path-node-{}", NODES[0]))
            .await
            .ok()?;
        cm.data
            .as_ref()?
            .get("orphans")?
            .contains("pvc-orphan_ns_old")
            .then_some(cm)
    })
    .await;
    assert!(!a.data.unwrap()["orphans"].contains(&pv.name_any()));
    assert!(orphan.exists(), "orphans are reported, not deleted");
    let metrics = env.agent_get(&node, "/metrics").await.1;
    let used = metrics
        .lines()
        .find(|l| l.starts_with("local_path_volume_used_bytes") && l.contains(&pv.name_any()))
        .unwrap_or_else(|| panic!("no usage metric for the PV: {metrics}"));
    let bytes: u64 = used.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(bytes >= 256 * 1024, "{used}");
    let a_metrics = env.agent_get(NODES[0], "/metrics").await.1;
    assert!(
        a_metrics
            .lines()
            .any(|l| l.starts_with("local_path_orphaned_directories") && l.ends_with(" 1")),
        "{a_metrics}"
    );
}

/// Two replicas on the provisioner's Lease (upstream's name with leader election on); the
/// leader killed while the agent runs a slow setup; the other replica takes over and finishes:
/// one PV, one directory, no task left.
#[tokio::test(flavor = "multi_thread")]
async fn provisioner_killed_mid_provisioning_leaves_no_leak_nor_duplicate() {
    let env = Env::new("lp-crash").await;
    let slow = "#!/bin/sh\nset -eu\nsleep 3\nmkdir -m 0777 -p \"$VOL_DIR\"\n";
    env.put_config(&env.default_config(), slow, TEARDOWN).await;
    env.start_agents();
    let first = env.start_provisioner("provisioner", &[]);
    let lease_name = env.provisioner.replace('/', "-");
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(env.client.clone(), &env.ns);
    wait_for("first replica leads", LIMIT, || async {
        leases.get(&lease_name).await.ok()?.spec?.holder_identity
    })
    .await;
    env.start_provisioner("provisioner-2", &[]);
    let class = env.storage_class("lp", &[], "Delete").await;
    env.claim("c", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("c-pod", "c").await;
    let uid = env.claims().get("c").await.unwrap().uid().unwrap();
    let task = format!("local-path-create-pvc-{uid}");
    wait_for("the agent took the task", LIMIT, || async {
        env.tasks()
            .get(&task)
            .await
            .ok()?
            .data?
            .get("agent")
            .cloned()
    })
    .await;
    env.kill(first);
    let killed = Instant::now();
    let pv = env.bound("c").await;
    eprintln!(
        "leader killed mid-provisioning: bound {:?} later by the other replica",
        killed.elapsed()
    );
    let pvs: Vec<_> = env
        .pvs()
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.clone())
                == Some(uid.clone())
        })
        .collect();
    assert_eq!(pvs.len(), 1);
    assert_eq!(
        env.volume_dirs(),
        vec![std::path::PathBuf::from(pv_path(&pv))]
    );
    eventually("task removed", LIMIT, || async {
        env.tasks().get_opt(&task).await.unwrap().is_none()
    })
    .await;
}

/// Plays the kubelet for a helper pod: checks it is shaped as upstream's, runs its command with
/// its arguments and environment on the host, and reports phase Succeeded.
async fn run_helper_pod(env: &Env, name: &str, node: Option<&str>) {
    use k8s_openapi::api::core::v1::Pod;
    let pod: Pod = wait_for(&format!("helper pod {name}"), LIMIT, || async {
        env.pods().get(name).await.ok()
    })
    .await;
    let spec = pod.spec.clone().unwrap();
    assert_eq!(spec.node_name.as_deref(), node);
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    assert_eq!(
        spec.service_account_name.as_deref(),
        Some("local-path-provisioner-service-account")
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let c = &spec.containers[0];
    assert_eq!(c.image.as_deref(), Some("busybox"));
    let args = c.args.clone().unwrap();
    let vol_dir = args[1].clone();
    let envs: BTreeMap<String, String> = c
        .env
        .clone()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.value.unwrap_or_default()))
        .collect();
    assert_eq!(envs["VOL_DIR"], vol_dir);
    let volumes = spec.volumes.clone().unwrap();
    let data = volumes
        .iter()
        .find(|v| v.name == "data")
        .unwrap()
        .host_path
        .clone()
        .unwrap();
    assert_eq!(data.type_.as_deref(), Some("DirectoryOrCreate"));
    assert_eq!(
        std::path::Path::new(&vol_dir)
            .parent()
            .unwrap()
            .display()
            .to_string(),
        data.path
    );
    let script_vol = volumes
        .iter()
        .find(|v| v.name == "script")
        .unwrap()
        .config_map
        .clone()
        .unwrap();
    assert_eq!(script_vol.name, "local-path-config");
    let command = c.command.clone().unwrap();
    assert_eq!(command[0], "/bin/sh");
    let key = command[1].strip_prefix("/script/").unwrap().to_string();
    let cm = env.configmaps().get("local-path-config").await.unwrap();
    let script = env.root.path().join(format!("{name}.sh"));
    std::fs::write(&script, &cm.data.unwrap()[&key]).unwrap();
    let status = std::process::Command::new("/bin/sh")
        .arg(&script)
        .args(&args)
        .envs(&envs)
        .status()
        .unwrap();
    assert!(status.success());
    let patch = json!({"status": {"phase": "Succeeded"}});
    env.pods()
        .patch_status(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
}

/// `--mode helper-pod`: upstream's helper pod per create and delete (the test is the kubelet).
#[tokio::test(flavor = "multi_thread")]
async fn helper_pod_mode_is_upstream_compatible() {
    let env = Env::new("lp-helper").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    let template = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: helper-pod\nspec:\n  priorityClassName: system-node-critical\n  containers:\n  - name: helper-pod\n    image: busybox\n    imagePullPolicy: IfNotPresent\n";
    let patch = json!({"data": {"helperPod.yaml": template}});
    env.configmaps()
        .patch(
            "local-path-config",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    let sa: k8s_openapi::api::core::v1::ServiceAccount = serde_json::from_value(
        json!({"metadata": {"name": "local-path-provisioner-service-account"}}),
    )
    .unwrap();
    kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        env.client.clone(),
        &env.ns,
    )
    .create(&PostParams::default(), &sa)
    .await
    .unwrap();
    env.start_provisioner(
        "provisioner",
        &["--mode", "helper-pod", "--task-sweep-interval", "1s"],
    );
    let class = env.storage_class("lp", &[], "Delete").await;
    env.claim("h", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("h-pod", "h").await;
    let uid = wait_for("claim uid", LIMIT, || async {
        env.claims().get("h").await.ok()?.uid()
    })
    .await;
    let node = wait_for("selected node", LIMIT, || async {
        env.claims()
            .get("h")
            .await
            .ok()?
            .annotations()
            .get("volume.kubernetes.io/selected-node")
            .cloned()
    })
    .await;
    run_helper_pod(&env, &format!("helper-pod-create-pvc-{uid}"), Some(&node)).await;
    let pv = env.bound("h").await;
    let dir = std::path::PathBuf::from(pv_path(&pv));
    assert_eq!(dir, env.disk(&node).join(format!("pvc-{uid}_{}_h", env.ns)));
    assert_eq!(mode_of(&dir), 0o777);
    eventually("create helper pod removed", LIMIT, || async {
        env.pods()
            .get_opt(&format!("helper-pod-create-pvc-{uid}"))
            .await
            .unwrap()
            .is_none()
    })
    .await;

    env.delete_pod("h-pod").await;
    env.delete_claim("h").await;
    run_helper_pod(&env, &format!("helper-pod-delete-pvc-{uid}"), Some(&node)).await;
    eventually("PV deleted", LIMIT, || async {
        env.pvs().get_opt(&pv.name_any()).await.unwrap().is_none()
    })
    .await;
    assert!(!dir.exists());

    // A claim deleted while its helper pod runs: the sweep tears the directory down with a
    // delete helper pod and removes both pods.
    env.claim("h2", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("h2-pod", "h2").await;
    let uid = env.claims().get("h2").await.unwrap().uid().unwrap();
    let create = format!("helper-pod-create-pvc-{uid}");
    wait_for("create helper pod", LIMIT, || async {
        env.pods().get_opt(&create).await.unwrap()
    })
    .await;
    let claim = env.claims().get("h2").await.unwrap();
    let node = claim.annotations()["volume.kubernetes.io/selected-node"].clone();
    env.delete_pod("h2-pod").await;
    env.delete_claim("h2").await;
    run_helper_pod(&env, &create, Some(&node)).await;
    let dir = env.disk(&node).join(format!("pvc-{uid}_{}_h2", env.ns));
    assert!(dir.is_dir());
    run_helper_pod(&env, &format!("helper-pod-delete-pvc-{uid}"), Some(&node)).await;
    assert!(!dir.exists());
    none_labelled_task("helper pods swept", &env.pods()).await;
}

/// What `xtask up` runs: `local_path::local::run` (provisioner + one agent per node in one
/// process, rancher.io/local-path, volumes under a data directory).
#[tokio::test(flavor = "multi_thread")]
async fn local_run_serves_rancher_local_path() {
    let env = Env::new("lp-local").await;
    let data = env.root.path().join("up");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let opts = local_path::local::LocalOptions {
        namespace: env.ns.clone(),
        nodes: NODES.iter().map(|n| n.to_string()).collect(),
        data_dir: data.clone(),
    };
    let run = tokio::spawn(local_path::local::run(
        env.client.clone(),
        opts,
        shutdown.clone(),
    ));
    let sc: k8s_openapi::api::storage::v1::StorageClass = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-local-path", env.ns)},
        "provisioner": "rancher.io/local-path",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Delete",
    }))
    .unwrap();
    kube::Api::<k8s_openapi::api::storage::v1::StorageClass>::all(env.client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .unwrap();
    env.claim("postgres-data", &sc.name_any(), "10Gi", "ReadWriteOnce")
        .await;
    env.pod("postgres", "postgres-data").await;
    let pv = env.bound("postgres-data").await;
    let node = env.scheduled("postgres").await;
    assert!(pv_path(&pv).starts_with(&data.join(&node).display().to_string()));
    assert!(std::path::Path::new(&pv_path(&pv)).is_dir());
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), run).await;
}

/// deploy/local-path-storage and the postgres manifest are accepted by the real apiserver
/// (server-side dry run, so nothing in them acts on the shared test cluster).
/// The two tests that apply deploy/'s objects to the shared cluster take turns: a dry run's
/// create fails with AlreadyExists when the other test creates the same Role in between.
static DEPLOY_OBJECTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread")]
async fn deploy_manifests_pass_server_side_validation() {
    let _turn = DEPLOY_OBJECTS.lock().await;
    let c = cluster().await;
    let client = c.client().await.unwrap();
    for ns in [
        "local-path-storage",
        "local-path-tasks",
        "household-task-manager",
    ] {
        let obj: k8s_openapi::api::core::v1::Namespace =
            serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
        let _ = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone())
            .create(&PostParams::default(), &obj)
            .await;
    }
    let kubectl = integration_tests::paths::k8s_bin_dir().join("kubectl");
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    for f in [
        "local-path-storage/local-path-storage.yaml",
        "household-task-manager/postgres.yaml",
    ] {
        let out = std::process::Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(c.kubeconfig_path())
            .args(["apply", "--dry-run=server", "-f"])
            .arg(root.join(f))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{f}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// deploy/'s RBAC on the real apiserver: a node agent can read local-path-config but not write
/// it (every node runs its scripts as root), and writes tasks and reports only in
/// local-path-tasks; the provisioner manages tasks there.
#[tokio::test(flavor = "multi_thread")]
async fn deployed_agent_cannot_write_the_config() {
    let _turn = DEPLOY_OBJECTS.lock().await;
    let c = cluster().await;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let text =
        std::fs::read_to_string(root.join("local-path-storage/local-path-storage.yaml")).unwrap();
    let rbac_kinds = [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    ];
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let v = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if rbac_kinds.contains(&v["kind"].as_str().unwrap_or_default()) {
            docs.push(serde_yaml::to_string(&v).unwrap());
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rbac.yaml");
    std::fs::write(&file, docs.join("---\n")).unwrap();
    let kubectl = integration_tests::paths::k8s_bin_dir().join("kubectl");
    let run = |args: &[&str]| {
        std::process::Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(c.kubeconfig_path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["apply", "-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sa = |n: &str| format!("system:serviceaccount:local-path-storage:{n}");
    let (agent, provisioner) = (
        sa("local-path-agent"),
        sa("local-path-provisioner-service-account"),
    );
    let cases = [
        (
            &agent,
            "update",
            "configmaps/local-path-config",
            "local-path-storage",
            "no",
        ),
        (
            &agent,
            "patch",
            "configmaps/local-path-config",
            "local-path-storage",
            "no",
        ),
        (
            &agent,
            "delete",
            "configmaps/local-path-config",
            "local-path-storage",
            "no",
        ),
        (&agent, "create", "configmaps", "local-path-storage", "no"),
        (
            &agent,
            "get",
            "configmaps/local-path-config",
            "local-path-storage",
            "yes",
        ),
        (
            &agent,
            "watch",
            "configmaps/local-path-config",
            "local-path-storage",
            "yes",
        ),
        (&agent, "list", "configmaps", "local-path-storage", "no"),
        (
            &agent,
            "update",
            "configmaps/local-path-create-pvc-x",
            "local-path-tasks",
            "yes",
        ),
        (&agent, "create", "configmaps", "local-path-tasks", "yes"),
        (
            &agent,
            "delete",
            "configmaps/local-path-create-pvc-x",
            "local-path-tasks",
            "no",
        ),
        (
            &provisioner,
            "create",
            "configmaps",
            "local-path-tasks",
            "yes",
        ),
        (
            &provisioner,
            "delete",
            "configmaps/local-path-create-pvc-x",
            "local-path-tasks",
            "yes",
        ),
    ];
    // RBAC objects reach the authorizer's cache shortly after they are written.
    eventually("deploy/'s RBAC in force", LIMIT, || async {
        let wrong: Vec<_> = cases
            .iter()
            .filter(|(who, verb, what, ns, want)| {
                let out = run(&["auth", "can-i", verb, what, "-n", ns, "--as", who]);
                String::from_utf8_lossy(&out.stdout).trim() != *want
            })
            .collect();
        if !wrong.is_empty() {
            eprintln!("not (yet) as expected: {wrong:?}");
        }
        wrong.is_empty()
    })
    .await;
}

/// A claim deleted while its directory is being made: once the setup finishes, the directory
/// is torn down (nothing leaks) and no PV or task is left.
#[tokio::test(flavor = "multi_thread")]
async fn claim_deleted_mid_provisioning_leaks_nothing() {
    let env = Env::new("lp-gone").await;
    let slow = "#!/bin/sh\nset -eu\nsleep 2\nmkdir -m 0777 -p \"$VOL_DIR\"\n";
    env.put_config(&env.default_config(), slow, TEARDOWN).await;
    env.start_agents();
    env.start_provisioner("provisioner", &["--task-sweep-interval", "1s"]);
    let class = env.storage_class("lp", &[], "Delete").await;
    env.claim("short", &class, "1Mi", "ReadWriteOnce").await;
    env.pod("short-pod", "short").await;
    let uid = env.claims().get("short").await.unwrap().uid().unwrap();
    let task = format!("local-path-create-pvc-{uid}");
    wait_for("the agent took the task", LIMIT, || async {
        env.tasks()
            .get(&task)
            .await
            .ok()?
            .data?
            .get("agent")
            .cloned()
    })
    .await;
    env.delete_pod("short-pod").await;
    env.delete_claim("short").await;
    eventually(
        "directory made, then torn down; tasks gone",
        LIMIT,
        || async {
            let tasks = env
                .tasks()
                .list(&ListParams::default().labels("local-path.homecluster.io/task"))
                .await
                .unwrap();
            tasks.items.is_empty() && env.volume_dirs().is_empty()
        },
    )
    .await;
    assert!(
        env.pvs()
            .get_opt(&format!("pvc-{uid}"))
            .await
            .unwrap()
            .is_none()
    );
}
