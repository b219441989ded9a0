//! PVC created → Bound with the pod placed by the real scheduler, for one claim at a time and
//! for 100 claims at once, and the provisioner's idle and peak RSS. Writes
//! benches/results/local-path.md. Run on purpose: `cargo bench -p local-path --bench provisioning`.
#![allow(clippy::unwrap_used)] // test code

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::runtime::watcher;
use kube::{Api, ResourceExt};

const SEQUENTIAL: usize = 20;
const BURST: usize = 100;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

type Seen = Arc<Mutex<HashMap<String, Instant>>>;

/// When each claim of the namespace first got its selected node (the scheduler's part) and
/// first showed phase Bound.
fn watch_claims(env: &Env) -> (Seen, Seen) {
    let (selected, bound): (Seen, Seen) = Default::default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(env.client.clone(), &env.ns);
    let (s, b) = (selected.clone(), bound.clone());
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) = ev {
                let now = Instant::now();
                if c.annotations()
                    .contains_key("volume.kubernetes.io/selected-node")
                {
                    s.lock().unwrap().entry(c.name_any()).or_insert(now);
                }
                if c.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Bound") {
                    b.lock().unwrap().entry(c.name_any()).or_insert(now);
                }
            }
        }
    });
    (selected, bound)
}

/// When the PV of each claim (by claim name) was first seen: the provisioner's part done.
fn watch_pvs(env: &Env) -> Seen {
    let seen: Seen = Arc::default();
    let api: Api<PersistentVolume> = Api::all(env.client.clone());
    let ns = env.ns.clone();
    let s = seen.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(watcher(api, watcher::Config::default()));
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(pv) | watcher::Event::InitApply(pv)) = ev
                && let Some(r) = pv.spec.as_ref().and_then(|sp| sp.claim_ref.as_ref())
                && r.namespace.as_deref() == Some(ns.as_str())
                && let Some(name) = r.name.clone()
            {
                s.lock().unwrap().entry(name).or_insert_with(Instant::now);
            }
        }
    });
    seen
}

async fn wait_bound(seen: &Seen, name: &str) -> Instant {
    wait_for(
        &format!("{name} bound"),
        Duration::from_secs(300),
        || async { seen.lock().unwrap().get(name).copied() },
    )
    .await
}

fn summary(label: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "| {label} | {} | {:.0} | {:.0} | {:.0} |",
        v.len(),
        percentile(&v, 0.5).as_secs_f64() * 1000.0,
        percentile(&v, 0.99).as_secs_f64() * 1000.0,
        v.last().unwrap().as_secs_f64() * 1000.0
    )
}

/// The same burst of claims and pods against PVs created beforehand (static provisioning):
/// the real scheduler and PV controller's own time, the floor under any provisioner.
async fn static_burst(env: &Env, seen: &Seen) -> Vec<Duration> {
    use k8s_openapi::api::storage::v1::StorageClass;
    use kube::api::PostParams;
    let class = format!("{}-static", env.ns);
    let sc: StorageClass = serde_json::from_value(serde_json::json!({
        "metadata": {"name": class},
        "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer",
        "reclaimPolicy": "Retain",
    }))
    .expect("class");
    Api::<StorageClass>::all(env.client.clone())
        .create(&PostParams::default(), &sc)
        .await
        .expect("static class");
    for i in 0..BURST {
        let node = NODES[i % NODES.len()];
        let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
            "metadata": {"name": format!("{}-static-{i}", env.ns)},
            "spec": {
                "capacity": {"storage": "1Mi"},
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "persistentVolumeReclaimPolicy": "Retain",
                "local": {"path": env.disk(node).join(format!("static-{i}"))},
                "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
            }
        }))
        .expect("pv");
        env.pvs()
            .create(&PostParams::default(), &pv)
            .await
            .expect("static pv");
    }
    let creates = (0..BURST).map(|i| {
        let class = &class;
        async move {
            let name = format!("static-{i}");
            let start = Instant::now();
            env.claim(&name, class, "1Mi", "ReadWriteOnce").await;
            env.pod(&format!("{name}-pod"), &name).await;
            (name, start)
        }
    });
    let mut took = Vec::new();
    for (name, start) in futures::future::join_all(creates).await {
        took.push(wait_bound(seen, &name).await - start);
    }
    took
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let env = Env::new("lp-bench").await;
    env.put_config(&env.default_config(), SETUP, TEARDOWN).await;
    env.start_agents();
    let prov = env.start_provisioner("provisioner", &["--log-level", "warn"]);
    let pid = env.pid(prov).expect("provisioner pid");
    let class = env.storage_class("bench", &[], "Delete").await;
    eventually("provisioner ready", LIMIT, || async {
        env.health("/ready").await.0 == 200
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_kib = integration_tests::process::status_kib(pid, "VmRSS:");
    let idle_anon = integration_tests::process::status_kib(pid, "RssAnon:");
    let idle_file = integration_tests::process::status_kib(pid, "RssFile:");
    let (selected, seen) = watch_claims(&env);
    let pvs = watch_pvs(&env);
    // (created → selected node, selected node → PV, PV → claim Bound)
    let stage = |name: &str, start: Instant| {
        let sel = selected.lock().unwrap().get(name).copied();
        let pv = pvs.lock().unwrap().get(name).copied();
        let bound = seen.lock().unwrap().get(name).copied();
        (
            sel.map(|t| t - start),
            sel.zip(pv).map(|(s, p)| p.saturating_duration_since(s)),
            pv.zip(bound).map(|(p, b)| b.saturating_duration_since(p)),
        )
    };
    let (mut sched, mut ours, mut binding) = (Vec::new(), Vec::new(), Vec::new());

    let mut one = Vec::new();
    for i in 0..SEQUENTIAL {
        let name = format!("seq-{i}");
        let t0 = Instant::now();
        env.claim(&name, &class, "1Mi", "ReadWriteOnce").await;
        env.pod(&format!("{name}-pod"), &name).await;
        one.push(wait_bound(&seen, &name).await - t0);
    }
    for i in 0..SEQUENTIAL {
        let (_, b, _) = stage(&format!("seq-{i}"), Instant::now());
        ours.extend(b);
    }
    let one_ours = std::mem::take(&mut ours);

    let t0 = Instant::now();
    let creates = (0..BURST).map(|i| {
        let env = &env;
        let class = &class;
        async move {
            let name = format!("burst-{i}");
            let start = Instant::now();
            env.claim(&name, class, "1Mi", "ReadWriteOnce").await;
            env.pod(&format!("{name}-pod"), &name).await;
            (name, start)
        }
    });
    let started = futures::future::join_all(creates).await;
    let mut burst = Vec::new();
    for (name, start) in &started {
        burst.push(wait_bound(&seen, name).await - *start);
    }
    for (name, start) in &started {
        let (a, b, c) = stage(name, *start);
        sched.extend(a);
        ours.extend(b);
        binding.extend(c);
    }
    let all_bound = t0.elapsed();
    let peak_kib = integration_tests::process::status_kib(pid, "VmHWM:");
    let agent_kib: Vec<u64> = (0..3)
        .filter_map(|i| env.pid(i))
        .map(|p| integration_tests::process::status_kib(p, "VmHWM:"))
        .collect();
    let floor = static_burst(&env, &seen).await;

    let table = [
        "| case | claims | p50 ms | p99 ms | max ms |".to_string(),
        "|---|---|---|---|---|".to_string(),
        summary("1 claim at a time (PVC + pod created → PVC Bound)", one),
        summary(
            "… selected node → PV created (provisioner + agent)",
            one_ours,
        ),
        summary(
            &format!("{BURST} claims at once (each: created → Bound)"),
            burst,
        ),
        summary("… created → selected node set (kube-scheduler)", sched),
        summary("… selected node → PV created (provisioner + agent)", ours),
        summary(
            "… PV created → claim Bound (kube-controller-manager's PV controller)",
            binding,
        ),
        summary(
            &format!("floor: {BURST} claims at once on PVs made beforehand (no provisioner)"),
            floor,
        ),
    ]
    .join("\n");
    let report = format!(
        "# local-path provisioning benchmark\n\n\
         `cargo run -p xtask -- bench local-path` (`cargo bench -p local-path --bench provisioning --profile small`; {}; real kube-apiserver, \
         kube-controller-manager and kube-scheduler v1.20.2 on loopback, three registered Nodes, \
         our provisioner and one agent process per node; default setup/teardown scripts).\n\n\
         {table}\n\n\
         All {BURST} claims of the burst Bound {:.2} s after the first was created. The floor \
         row is the same burst with no provisioner at all (class `kubernetes.io/no-provisioner`, \
         {BURST} `local` PVs created first): what kube-scheduler and kube-controller-manager alone \
         take here to bind {BURST} claims, which no provisioner can go below.\n\n\
         | process | RSS |\n|---|---|\n\
         | provisioner idle (VmRSS, config loaded, caches synced) | {:.1} MiB (heap and stacks {:.1} MiB, binary pages {:.1} MiB) |\n\
         | provisioner peak (VmHWM, after the burst) | {:.1} MiB |\n\
         | agent peak (VmHWM, each of 3) | {} |\n\n\
         upstream (rancher/local-path-provisioner) needs a helper pod per claim: the pod must be \
         scheduled, its image present or pulled, the container started by the kubelet, and the \
         provisioner polls its phase once a second; there is no kubelet in this environment, so \
         upstream is not measured side by side here.\n",
        if std::env::var_os("SHIPPED_BIN_DIR").is_some() {
            "the binary as shipped: static, musl"
        } else {
            "cargo's own binary, dynamically linked"
        },
        all_bound.as_secs_f64(),
        idle_kib as f64 / 1024.0,
        idle_anon as f64 / 1024.0,
        idle_file as f64 / 1024.0,
        peak_kib as f64 / 1024.0,
        agent_kib
            .iter()
            .map(|k| format!("{:.1} MiB", *k as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", "),
    );
    println!("{report}");
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../benches/results/local-path.md");
    std::fs::write(&out, &report).expect("writing benches/results/local-path.md");
    eprintln!("wrote {}", out.display());
}
