//! The validating webhook, called by the real kube-apiserver through a
//! ValidatingWebhookConfiguration (AdmissionReview v1).
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use integration_tests::kube::Cluster;
use integration_tests::pki::TestCa;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn apiserver_calls_webhook_which_rejects_bad_and_overlapping_ingresses() {
    let cluster = Cluster::shared().await.expect("cluster");
    let client = cluster.client().await.expect("client");
    let ca = TestCa::new("webhook-ca").expect("ca");
    let leaf = ca.leaf("webhook", &["127.0.0.1"]).expect("leaf");
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert, &leaf.cert_pem).expect("cert");
    std::fs::write(&key, &leaf.key_pem).expect("key");
    let (cert_flag, key_flag) = (
        format!("--validating-webhook-certificate={}", cert.display()),
        format!("--validating-webhook-key={}", key.display()),
    );
    let env = env(
        "webhook",
        &["--validating-webhook=127.0.0.1:0", &cert_flag, &key_flag],
    )
    .await;
    let port = env.running.webhook.expect("webhook address").port();

    // Scope the webhook to this test's namespace (other tests share the cluster).
    let label = integration_tests::kube::webhook_scope(&client, &env.ns)
        .await
        .expect("label namespace");
    let config: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingWebhookConfiguration",
        "metadata": {"name": label},
        "webhooks": [{
            "name": "validate.nginx.ingress.kubernetes.io",
            "clientConfig": {
                "url": format!("https://127.0.0.1:{port}/networking/v1/ingresses"),
                "caBundle": base64::engine::general_purpose::STANDARD.encode(&ca.cert_pem)
            },
            "rules": [{"apiGroups": ["networking.k8s.io"], "apiVersions": ["v1"],
                       "operations": ["CREATE", "UPDATE"], "resources": ["ingresses"]}],
            "failurePolicy": "Fail", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "namespaceSelector": {"matchLabels": {"homecluster-test": label}}
        }]
    }))
    .expect("webhook config");
    let configs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    configs
        .create(&PostParams::default(), &config)
        .await
        .expect("create webhook config");

    let b = backend("w").await;
    service(&client, &env.ns, "w", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    let ingresses: Api<k8s_openapi::api::networking::v1::Ingress> =
        Api::namespaced(client.clone(), &env.ns);
    let create = |v: serde_json::Value| {
        let ingresses = ingresses.clone();
        let ns = env.ns.clone();
        async move {
            let mut v = v;
            v["apiVersion"] = json!("networking.k8s.io/v1");
            v["kind"] = json!("Ingress");
            v["metadata"]["namespace"] = json!(ns);
            let ing = serde_json::from_value(v).expect("ingress");
            ingresses.create(&PostParams::default(), &ing).await
        }
    };

    // A valid Ingress is admitted (the webhook may need a moment to be reachable).
    eventually("valid Ingress admitted", WAIT, || async {
        create(simple_ingress("first", &host, "/app", "Prefix", "w"))
            .await
            .is_ok()
            || ingresses.get_opt("first").await.ok().flatten().is_some()
    })
    .await;
    let http = env.running.http;
    eventually("first served", WAIT, || async {
        get(http, &host, "/app").await.status == 200
    })
    .await;

    let mut snippet = simple_ingress("snippet", &host, "/other", "Prefix", "w");
    snippet["metadata"]["annotations"] =
        json!({"nginx.ingress.kubernetes.io/server-snippet": "return 200;"});
    let err = create(snippet).await.expect_err("snippet refused");
    assert!(err.to_string().contains("snippet"), "{err}");

    let err = create(simple_ingress("bad-path", &host, "/a b", "Prefix", "w"))
        .await
        .expect_err("path refused");
    assert!(err.to_string().contains("ImplementationSpecific"), "{err}");

    let err = create(simple_ingress("second", &host, "/app", "Prefix", "w"))
        .await
        .expect_err("overlap refused");
    assert!(
        err.to_string().contains("already defined in ingress"),
        "{err}"
    );

    // Not ours: admitted whatever it says.
    ensure_class(&client, "someone-else", "example.com/other").await;
    let mut foreign = simple_ingress("foreign", &host, "/app", "Prefix", "w");
    foreign["spec"]["ingressClassName"] = json!("someone-else");
    foreign["metadata"]["annotations"] = json!({"nginx.ingress.kubernetes.io/server-snippet": "x"});
    create(foreign).await.expect("other class admitted");

    configs
        .delete(&label, &DeleteParams::default())
        .await
        .expect("delete webhook config");
}
