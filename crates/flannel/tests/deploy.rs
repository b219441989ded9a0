//! deploy/kube-flannel: upstream's object names, RBAC, ConfigMap contents, probes and mounts,
//! accepted by the real apiserver (server-side dry run) and readable by our own parsers.
#![allow(clippy::unwrap_used)] // test code

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::Api;
use kube::api::PostParams;
use serde::Deserialize;
use serde_json::Value;

fn docs() -> Vec<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/kube-flannel/kube-flannel.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
        .collect()
}

fn find(kind: &str) -> Value {
    docs()
        .into_iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

#[test]
fn manifests_have_upstreams_names_rbac_and_seed_config() {
    let cm: ConfigMap = serde_json::from_value(find("ConfigMap")).unwrap();
    assert_eq!(cm.metadata.name.as_deref(), Some("kube-flannel-cfg"));
    assert_eq!(cm.metadata.namespace.as_deref(), Some("kube-flannel"));
    let data = cm.data.unwrap();
    let net = flannel::config::parse(&data["net-conf.json"]).unwrap();
    assert_eq!(net.network.to_string(), "10.244.0.0/16");
    let cni: Value = serde_json::from_str(&data["cni-conf.json"]).unwrap();
    assert_eq!(
        cni,
        serde_json::json!({"name":"cbr0","cniVersion":"0.3.1","plugins":[
            {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
            {"type":"portmap","capabilities":{"portMappings":true}}]})
    );
    let role: ClusterRole = serde_json::from_value(find("ClusterRole")).unwrap();
    let mut rules: Vec<(String, String)> = Vec::new();
    for r in role.rules.unwrap() {
        for res in r.resources.clone().unwrap_or_default() {
            for v in &r.verbs {
                rules.push((res.clone(), v.clone()));
            }
        }
    }
    let mut want: Vec<(String, String)> = [
        ("pods", "get"),
        ("nodes", "get"),
        ("nodes", "list"),
        ("nodes", "watch"),
        ("nodes/status", "patch"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let mut have = rules.clone();
    want.sort();
    have.sort();
    assert_eq!(have, want, "exactly upstream's RBAC (no nodes patch)");
    let ds: DaemonSet = serde_json::from_value(find("DaemonSet")).unwrap();
    assert_eq!(ds.metadata.name.as_deref(), Some("kube-flannel-ds"));
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("flannel"));
    let init: Vec<String> = pod
        .init_containers
        .unwrap()
        .iter()
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(init, ["install-cni-plugin", "install-cni"]);
    let c = &pod.containers[0];
    let caps = c
        .security_context
        .clone()
        .unwrap()
        .capabilities
        .unwrap()
        .add
        .unwrap();
    assert_eq!(caps, ["NET_ADMIN", "NET_RAW"]);
    let args = c.args.clone().unwrap();
    assert!(
        args.contains(&"--kube-subnet-mgr".into())
            && args.contains(&"--ip-masq".into())
            && args.contains(&"--healthz-port=8081".into())
    );
    // flanneld accepts the DaemonSet's flags.
    let mut argv = vec!["flanneld".to_string()];
    argv.extend(args);
    use clap::Parser;
    flannel::args::Args::try_parse_from(argv).unwrap();
    let probe = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        let g = p.clone().unwrap().http_get.unwrap();
        (g.path.unwrap(), g.port)
    };
    assert_eq!(probe(&c.liveness_probe).0, "/healthz");
    assert_eq!(probe(&c.readiness_probe).0, "/readyz");
    let mounts: Vec<String> = c
        .volume_mounts
        .clone()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.clone())
        .collect();
    assert!(
        mounts.contains(&"/run/flannel".into())
            && mounts.contains(&"/etc/kube-flannel/".into())
            && mounts.contains(&"/run/xtables.lock".into())
    );
}

#[tokio::test]
async fn manifests_are_accepted_by_the_apiserver() {
    let cluster = integration_tests::kube::Cluster::shared().await.unwrap();
    let client = cluster.client().await.unwrap();
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    // The namespace must exist for the namespaced dry runs.
    let ns: Namespace = serde_json::from_value(find("Namespace")).unwrap();
    let _ = Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await;
    for d in docs() {
        let kind = d["kind"].as_str().unwrap().to_string();
        let r = match kind.as_str() {
            "Namespace" => continue,
            "ServiceAccount" => Api::<ServiceAccount>::namespaced(client.clone(), "kube-flannel")
                .create(&pp, &serde_json::from_value(d).unwrap())
                .await
                .map(drop),
            "ClusterRole" => Api::<ClusterRole>::all(client.clone())
                .create(&pp, &serde_json::from_value(d).unwrap())
                .await
                .map(drop),
            "ClusterRoleBinding" => Api::<ClusterRoleBinding>::all(client.clone())
                .create(&pp, &serde_json::from_value(d).unwrap())
                .await
                .map(drop),
            "ConfigMap" => Api::<ConfigMap>::namespaced(client.clone(), "kube-flannel")
                .create(&pp, &serde_json::from_value(d).unwrap())
                .await
                .map(drop),
            "DaemonSet" => Api::<DaemonSet>::namespaced(client.clone(), "kube-flannel")
                .create(&pp, &serde_json::from_value(d).unwrap())
                .await
                .map(drop),
            other => panic!("unexpected kind {other}"),
        };
        r.unwrap_or_else(|e| panic!("{kind} rejected: {e}"));
    }
}
