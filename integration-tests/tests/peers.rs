//! The harness's own peers work: the control plane (with controller-manager and scheduler),
//! pebble with its DNS and management API, and network namespaces joined by veth and a bridge.

use std::time::Duration;

use integration_tests::acme::{Pebble, PebbleOptions};
use integration_tests::http;
use integration_tests::kube::{Cluster, ClusterOptions};
use integration_tests::netns::{self, NetNs, VethEnd};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::Api;

#[tokio::test]
async fn control_plane_serves_and_runs_controllers() {
    let cluster = Cluster::start(ClusterOptions {
        controller_manager: true,
        scheduler: true,
        ..Default::default()
    })
    .await
    .expect("control plane with controller-manager and scheduler");
    println!(
        "control plane (etcd, apiserver, controller-manager, scheduler) started in {:?}",
        cluster.startup
    );
    let client = cluster.client().await.expect("client");
    let version = client.apiserver_version().await.expect("version");
    assert_eq!(version.git_version, "v1.20.2");
    let ns = cluster.namespace("peers").await.expect("namespace");
    // The controller-manager's serviceaccount controller fills new namespaces.
    let sa: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sa.get_opt("default").await.expect("get sa").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no default ServiceAccount in {ns}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let all: Api<Namespace> = Api::all(client);
    assert!(all.get_opt("kube-system").await.expect("get ns").is_some());
    // The kubeconfig is self-contained (CA inline) and works for other clients.
    let text = std::fs::read_to_string(cluster.kubeconfig_path()).expect("kubeconfig");
    assert!(text.contains("certificate-authority-data") && text.contains(&cluster.server_url()));
}

#[tokio::test]
async fn pebble_directory_roots_and_dns() {
    let pebble = Pebble::start(PebbleOptions::default())
        .await
        .expect("pebble");
    let dir = http::get(&pebble.directory_url(), Some(&pebble.ca_pem))
        .await
        .expect("directory");
    assert_eq!(dir.status, 200);
    let json: serde_json::Value = serde_json::from_slice(&dir.body).expect("directory JSON");
    assert!(json["newAccount"].as_str().is_some(), "{json}");
    // The listener is signed by our CA only: a client without it must fail.
    assert!(http::get(&pebble.directory_url(), None).await.is_err());
    let root = pebble.issuing_root_pem().await.expect("issuing root");
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");
    pebble
        .set_dns_a("household-task-mgr.duckdns.org", "127.0.0.1")
        .await
        .expect("DNS A record");
}

#[tokio::test]
async fn pebble_restart_changes_root() {
    let mut pebble = Pebble::start(PebbleOptions::default())
        .await
        .expect("pebble");
    let before = pebble.issuing_root_pem().await.expect("root");
    pebble.stop();
    assert!(
        http::get(&pebble.directory_url(), Some(&pebble.ca_pem))
            .await
            .is_err()
    );
    pebble.restart().await.expect("restart");
    let after = pebble.issuing_root_pem().await.expect("root");
    assert_ne!(before, after, "pebble makes a new root on every start");
}

#[test]
fn namespaces_veth_and_bridge() {
    let a = NetNs::new("a").expect("netns a");
    let b = NetNs::new("b").expect("netns b");
    let node = NetNs::new("node").expect("netns node");
    // a <-> b directly.
    let (ia, ib) = (
        format!("v{}a", std::process::id() % 100000),
        format!("v{}b", std::process::id() % 100000),
    );
    netns::veth(
        VethEnd {
            ns: Some(&a),
            ifname: &ia,
            addr: Some("10.250.0.1/30"),
        },
        VethEnd {
            ns: Some(&b),
            ifname: &ib,
            addr: Some("10.250.0.2/30"),
        },
    )
    .expect("veth a-b");
    a.exec("ping", &["-c", "1", "-W", "2", "10.250.0.2"])
        .expect("a pings b");

    // Two "pods" on a bridge inside a "node".
    netns::bridge(Some(&node), "cni0", Some("10.244.0.1/24")).expect("bridge");
    for (i, pod) in [&a, &b].into_iter().enumerate() {
        let host_if = format!("veth{i}");
        let pod_if = format!("eth{i}");
        let addr = format!("10.244.0.{}/24", i + 10);
        netns::veth(
            VethEnd {
                ns: Some(&node),
                ifname: &host_if,
                addr: None,
            },
            VethEnd {
                ns: Some(pod),
                ifname: &pod_if,
                addr: Some(&addr),
            },
        )
        .expect("pod veth");
        netns::attach(Some(&node), &host_if, "cni0").expect("attach to bridge");
    }
    a.exec("ping", &["-c", "1", "-W", "2", "10.244.0.11"])
        .expect("pod a pings pod b over the bridge");
    node.exec("ping", &["-c", "1", "-W", "2", "10.244.0.10"])
        .expect("node pings pod a");
    let name = a.name().to_string();
    drop(a);
    let list = integration_tests::process::run("ip", &["netns", "list"]).expect("netns list");
    assert!(!list.contains(&name), "namespace deleted on drop");
}
