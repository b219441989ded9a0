//! Real nodes (issue 11): containerd and a kubelet per node namespace, our images imported,
//! our flannel DaemonSet from deploy/ giving pods their network, kube-proxy for Services.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration_tests::overlay::{Kubelets, Lab, LabOptions};
use integration_tests::paths::{images_dir, k8s_bin_dir};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde_json::json;

const TAG: &str = "0.1.0";

fn archive(name: &str) -> PathBuf {
    let path = images_dir().join(format!("{name}.oci.tar"));
    assert!(
        path.is_file(),
        "{} missing: run `{}` (or `cargo run -p xtask -- test`, which builds it)",
        path.display(),
        integration_tests::paths::IMAGES_COMMAND
    );
    path
}

fn kubectl(lab: &Lab, args: &[&str]) -> String {
    let out = Command::new(k8s_bin_dir().join("kubectl"))
        .arg(format!(
            "--kubeconfig={}",
            lab.cluster.kubeconfig_path().display()
        ))
        .args(args)
        .output()
        .expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

async fn wait_nodes_ready(lab: &Lab, n: usize) {
    let nodes: Api<Node> = Api::all(lab.client().clone());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        let list = nodes.list(&ListParams::default()).await.unwrap();
        let ready = list
            .items
            .iter()
            .filter(|n| {
                n.status
                    .as_ref()
                    .and_then(|s| s.conditions.as_ref())
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            })
            .count();
        if ready >= n {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            let logs: Vec<String> = lab
                .nodes
                .iter()
                .map(|n| {
                    format!(
                        "--- {} kubelet:\n{}",
                        n.name,
                        n.kubelet
                            .as_ref()
                            .map(|k| k.kubelet_log(3000))
                            .unwrap_or_default()
                    )
                })
                .collect();
            panic!(
                "{ready} of {n} nodes Ready after 120 s\n{}\n{}",
                kubectl(lab, &["get", "nodes,pods", "-A", "-o", "wide"]),
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn wait_running(pods: &Api<Pod>, name: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    loop {
        let pod = pods.get(name).await.unwrap();
        let status = pod.status.unwrap_or_default();
        if status.phase.as_deref() == Some("Running")
            && let Some(ip) = status.pod_ip
        {
            return ip;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pod {name} not Running within 90 s: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Creates `pod`, retrying while the new namespace's service account has no token yet.
async fn create_pod(pods: &Api<Pod>, pod: &Pod) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match pods.create(&PostParams::default(), pod).await {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.message.contains("No API token") => {
                assert!(tokio::time::Instant::now() < deadline, "{s:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("creating pod: {e}"),
        }
    }
}

fn frontend_pod(name: &str, node: &str) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "nodeName": node,
            "containers": [{
                "name": "web",
                "image": format!("docker.io/homecluster/household-frontend:{TAG}"),
                "imagePullPolicy": "Never",
                "ports": [{"containerPort": 8080}],
            }],
        }
    }))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn pods_on_two_real_nodes_talk_through_our_flannel() {
    let images = ["pause", "flannel", "household-frontend"]
        .map(archive)
        .to_vec();
    let lab = Lab::start(
        LabOptions::new("unused", "unused")
            .nodes(2)
            .node_names(&["rpi-master-1", "rpi-worker-1"])
            .kubelets(Kubelets {
                sandbox_image: format!("docker.io/homecluster/pause:{TAG}"),
                images,
            }),
    )
    .await
    .expect("control plane and two real nodes");
    kubectl(
        &lab,
        &["apply", "-f", "../deploy/kube-flannel/kube-flannel.yaml"],
    );
    wait_nodes_ready(&lab, 2).await;

    let ns = lab.cluster.namespace("real-nodes").await.unwrap();
    let pods: Api<Pod> = Api::namespaced(lab.client().clone(), &ns);
    for (name, node) in [("web-a", "rpi-master-1"), ("web-b", "rpi-worker-1")] {
        create_pod(&pods, &frontend_pod(name, node)).await;
    }
    let ip_a = wait_running(&pods, "web-a").await;
    let ip_b = wait_running(&pods, "web-b").await;
    assert_ne!(ip_a, ip_b);
    // From the pod on the second node to the one on the first, through VXLAN (busybox's
    // nc: Debian's static busybox wget crashes).
    let page = kubectl(
        &lab,
        &[
            "exec",
            "-n",
            &ns,
            "web-b",
            "--",
            "sh",
            "-c",
            &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip_a} 8080"),
        ],
    );
    assert!(page.contains("household-task-manager frontend"), "{page}");
}
