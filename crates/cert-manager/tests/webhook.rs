//! The webhook, called by the real kube-apiserver through Validating and Mutating
//! WebhookConfigurations (AdmissionReview v1), serving TLS from its self-managed CA Secret.
#![allow(clippy::unwrap_used)] // test code

mod common_admission;

use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use clap::Parser;
use common_admission::*;
use integration_tests::kube::Cluster;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Api, Client};
use kube_common::Manager;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use cert_manager::webhook::{self, Args, Running, authority};

struct Env {
    client: Client,
    ns: String,
    running: Running,
    _stop: tokio_util::sync::DropGuard,
}

async fn start_webhook(client: &Client, ns: &str) -> (Running, CancellationToken) {
    let shutdown = CancellationToken::new();
    let mgr = Manager::new("cert-manager-webhook", client.clone(), shutdown.clone());
    let args = Args::parse_from([
        "webhook",
        "--secure-port=0",
        "--healthz-port=0",
        "--listen-host=127.0.0.1",
        &format!("--dynamic-serving-ca-secret-namespace={ns}"),
        // The apiserver dials 127.0.0.1, so the leaf needs that IP SAN.
        "--dynamic-serving-dns-names=cert-manager-webhook,127.0.0.1",
    ]);
    let running = webhook::run(&mgr, &args).await.expect("webhook starts");
    (running, shutdown)
}

async fn env(prefix: &str) -> Env {
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    install_crds(&client).await;
    let ns = cluster.namespace(prefix).await.expect("namespace");
    let (running, shutdown) = start_webhook(&client, &ns).await;
    Env {
        client,
        ns,
        running,
        _stop: shutdown.drop_guard(),
    }
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

fn ca_secret_data(secret: &Secret, key: &str) -> Vec<u8> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .unwrap_or_default()
}

fn api(
    client: &Client,
    ns: Option<&str>,
    group: &str,
    kind: &str,
    plural: &str,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

async fn create(api: &Api<DynamicObject>, v: Value) -> Result<DynamicObject, kube::Error> {
    let obj: DynamicObject = serde_json::from_value(v).expect("object");
    api.create(&PostParams::default(), &obj).await
}

fn certificate(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": name}, "spec": spec,
    })
}

fn csr_b64() -> String {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec!["app.example".to_string()]).expect("params");
    let csr = params.serialize_request(&key).expect("csr");
    base64::engine::general_purpose::STANDARD.encode(csr.pem().expect("pem"))
}

#[tokio::test]
async fn apiserver_calls_webhook_which_rejects_invalid_and_mutates_requests() {
    let env = env("webhook").await;
    let client = &env.client;

    // The CA Secret is created the way upstream's DynamicAuthority does it.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &env.ns);
    let secret = eventually("CA Secret", WAIT, || async {
        secrets
            .get_opt("cert-manager-webhook-ca")
            .await
            .ok()
            .flatten()
    })
    .await;
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("cert-manager.io/allow-direct-injection")
            .map(String::as_str),
        Some("true")
    );
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("cert-manager-webhook")
    );
    let ca_pem = ca_secret_data(&secret, "ca.crt");
    assert_eq!(ca_pem, ca_secret_data(&secret, "tls.crt"));
    assert!(!ca_secret_data(&secret, "tls.key").is_empty());

    // Ready once the serving certificate is loaded; live all along.
    let health = env.running.healthz_addr;
    eventually("/readyz 200", WAIT, || async {
        http_get(health, "/readyz")
            .await
            .filter(|r| r.starts_with("HTTP/1.1 200"))
    })
    .await;
    let live = http_get(health, "/livez").await.unwrap_or_default();
    assert!(live.starts_with("HTTP/1.1 200"), "{live}");

    // Scope the configurations to this test's namespace (namespaced kinds); ClusterIssuers are
    // cluster-scoped and always go through (no other test in this binary registers webhooks).
    let label = integration_tests::kube::webhook_scope(client, &env.ns)
        .await
        .expect("label namespace");
    let port = env.running.secure_addr.port();
    let ca_bundle = base64::engine::general_purpose::STANDARD.encode(&ca_pem);
    let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": label},
        "webhooks": [{
            "name": "webhook.cert-manager.io",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/validate"), "caBundle": ca_bundle},
            "rules": [{"apiGroups": ["cert-manager.io", "acme.cert-manager.io"], "apiVersions": ["v1"],
                       "operations": ["CREATE", "UPDATE"], "resources": ["*/*"]}],
            "matchPolicy": "Equivalent", "failurePolicy": "Fail", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "timeoutSeconds": 30,
            "namespaceSelector": {"matchLabels": {"homecluster-test": label}}
        }]
    }))
    .expect("validating config");
    let mwc: MutatingWebhookConfiguration = serde_json::from_value(json!({
        "metadata": {"name": label},
        "webhooks": [{
            "name": "webhook.cert-manager.io",
            "clientConfig": {"url": format!("https://127.0.0.1:{port}/mutate"), "caBundle": ca_bundle},
            "rules": [{"apiGroups": ["cert-manager.io"], "apiVersions": ["v1"],
                       "operations": ["CREATE"], "resources": ["certificaterequests"]}],
            "matchPolicy": "Equivalent", "failurePolicy": "Fail", "sideEffects": "None",
            "admissionReviewVersions": ["v1"], "timeoutSeconds": 30,
            "namespaceSelector": {"matchLabels": {"homecluster-test": label}}
        }]
    }))
    .expect("mutating config");
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    vwcs.create(&PostParams::default(), &vwc)
        .await
        .expect("create validating config");
    mwcs.create(&PostParams::default(), &mwc)
        .await
        .expect("create mutating config");

    let certs = api(
        client,
        Some(&env.ns),
        "cert-manager.io",
        "Certificate",
        "certificates",
    );
    let valid = json!({"secretName": "app-tls", "issuerRef": {"name": "le", "kind": "ClusterIssuer"},
                       "dnsNames": ["app.example"], "duration": "2160h", "renewBefore": "360h"});

    // The apiserver picks the configuration up asynchronously: wait until it calls us, which
    // an invalid object (rejected only by the webhook) shows.
    let attempt = AtomicUsize::new(0);
    let err = eventually("webhook in the admission chain", WAIT, || async {
        // A fresh name each time: a probe admitted before the webhook is active stays behind.
        let name = format!("probe-{}", attempt.fetch_add(1, Ordering::Relaxed));
        let bad = certificate(
            &name,
            json!({"secretName": "probe", "issuerRef": {"name": "le"},
                                             "dnsNames": ["a.example"], "duration": "30m"}),
        );
        create(&certs, bad)
            .await
            .err()
            .filter(|e| e.to_string().contains("denied the request"))
    })
    .await;
    let msg = err.to_string();
    assert!(msg.contains("webhook.cert-manager.io"), "{msg}");
    assert!(
        msg.contains(
            "spec.duration: Invalid value: 30m0s: certificate duration must be greater than 1h0m0s"
        ),
        "{msg}"
    );

    create(&certs, certificate("app", valid.clone()))
        .await
        .expect("valid Certificate admitted");

    // (A missing secretName never reaches the webhook: the CRD schema requires it.)
    let mut bad_secret = valid.clone();
    bad_secret["secretName"] = json!("Not_A_Name");
    let err = create(&certs, certificate("bad-secret", bad_secret))
        .await
        .expect_err("invalid secretName rejected");
    assert!(
        err.to_string().contains(
            "spec.secretName: Invalid value: \"Not_A_Name\": a lowercase RFC 1123 subdomain"
        ),
        "{err}"
    );

    let mut renew = valid.clone();
    renew["duration"] = json!("2h");
    renew["renewBefore"] = json!("2h");
    let err = create(&certs, certificate("renew", renew))
        .await
        .expect_err("renewBefore >= duration rejected");
    assert!(
        err.to_string()
            .contains("spec.renewBefore: Invalid value: 2h0m0s: certificate duration 2h0m0s must be greater than renewBefore 2h0m0s"),
        "{err}"
    );

    // UPDATE goes through the same rules.
    let err = certs
        .patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"privateKey": {"algorithm": "ECDSA", "size": 512}}})),
        )
        .await
        .expect_err("bad key size rejected on update");
    assert!(
        err.to_string()
            .contains("spec.privateKey.size: Unsupported value: 512"),
        "{err}"
    );

    // ClusterIssuer: caBundle and skipTLSVerify are exclusive.
    let issuers = api(
        client,
        None,
        "cert-manager.io",
        "ClusterIssuer",
        "clusterissuers",
    );
    let issuer = |name: &str, extra: Value| {
        let mut acme = json!({"server": "https://acme.example/directory",
                              "privateKeySecretRef": {"name": "acct"},
                              "solvers": [{"http01": {"ingress": {"ingressClassName": "nginx"}}}]});
        if let (Some(a), Some(e)) = (acme.as_object_mut(), extra.as_object()) {
            a.extend(e.clone());
        }
        json!({"apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer",
               "metadata": {"name": name}, "spec": {"acme": acme}})
    };
    let bad_name = format!("{}-bad", env.ns);
    let err = create(
        &issuers,
        issuer(
            &bad_name,
            json!({"caBundle": ca_bundle, "skipTLSVerify": true}),
        ),
    )
    .await
    .expect_err("caBundle + skipTLSVerify rejected");
    assert!(
        err.to_string()
            .contains("spec.acme.caBundle: Invalid value: \"\": caBundle and skipTLSVerify are mutually exclusive"),
        "{err}"
    );
    let good_name = format!("{}-good", env.ns);
    create(&issuers, issuer(&good_name, json!({"caBundle": ca_bundle})))
        .await
        .expect("valid ClusterIssuer admitted");

    // CertificateRequest: the mutating webhook stamps the requester (the harness's admin).
    let crs = api(
        client,
        Some(&env.ns),
        "cert-manager.io",
        "CertificateRequest",
        "certificaterequests",
    );
    let cr = json!({"apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
                    "metadata": {"name": "app-1"},
                    "spec": {"request": csr_b64(), "issuerRef": {"name": "le", "kind": "ClusterIssuer"},
                             "username": "someone-else"}});
    let created = create(&crs, cr).await.expect("CertificateRequest admitted");
    let spec = &created.data["spec"];
    assert_eq!(spec["username"], "admin", "{spec}");
    assert_eq!(spec["uid"], "admin-uid", "{spec}");
    let groups = spec["groups"].as_array().cloned().unwrap_or_default();
    assert!(groups.contains(&json!("system:masters")), "{spec}");

    let err = crs
        .patch(
            "app-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"duration": "2h"}})),
        )
        .await
        .expect_err("CertificateRequest spec is immutable");
    assert!(
        err.to_string()
            .contains("spec: Forbidden: cannot change spec after creation"),
        "{err}"
    );

    let bad_csr = json!({"apiVersion": "cert-manager.io/v1", "kind": "CertificateRequest",
                         "metadata": {"name": "bad-csr"},
                         "spec": {"request": base64::engine::general_purpose::STANDARD.encode("nope"),
                                  "issuerRef": {"name": "le"}}});
    let err = create(&crs, bad_csr)
        .await
        .expect_err("unparseable CSR rejected");
    assert!(
        err.to_string().contains("spec.request: Invalid value"),
        "{err}"
    );

    // Clean up what would otherwise outlive this test's server.
    let dp = DeleteParams::default();
    let _ = vwcs.delete(&label, &dp).await;
    let _ = mwcs.delete(&label, &dp).await;
    let _ = issuers.delete(&good_name, &dp).await;
}

#[tokio::test]
async fn invalid_ca_secret_is_regenerated_and_racing_replicas_agree() {
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace("webhook-ca").await.expect("namespace");

    // Two replicas start at once against a missing Secret: one create wins, both serve
    // leaves signed by the CA that is stored.
    let (a, stop_a) = start_webhook(&client, &ns).await;
    let (b, stop_b) = start_webhook(&client, &ns).await;
    let _guards = (stop_a.drop_guard(), stop_b.drop_guard());
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let chains_to_stored_ca = |r: &Running, ca: &[u8]| {
        r.cert.current().is_some_and(|k| {
            k.cert
                .get(1)
                .is_some_and(|c| ders(ca).contains(&c.to_vec()))
        })
    };
    let first_ca = eventually("both replicas serve from the stored CA", WAIT, || async {
        let s = secrets
            .get_opt("cert-manager-webhook-ca")
            .await
            .ok()
            .flatten()?;
        let ca = ca_secret_data(&s, "ca.crt");
        (chains_to_stored_ca(&a, &ca) && chains_to_stored_ca(&b, &ca)).then_some(ca)
    })
    .await;

    // Corrupt the Secret: a replica notices and writes a fresh CA; both follow it.
    secrets
        .patch(
            "cert-manager-webhook-ca",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"tls.crt": ByteString(b"garbage".to_vec())}})),
        )
        .await
        .expect("corrupt CA Secret");
    eventually("CA regenerated and served", WAIT, || async {
        let s = secrets
            .get_opt("cert-manager-webhook-ca")
            .await
            .ok()
            .flatten()?;
        let now = time::OffsetDateTime::now_utc();
        let ca = ca_secret_data(&s, "ca.crt");
        (authority::ca_problem(&s, now).is_none()
            && ca != first_ca
            && chains_to_stored_ca(&a, &ca)
            && chains_to_stored_ca(&b, &ca))
        .then_some(())
    })
    .await;
}
