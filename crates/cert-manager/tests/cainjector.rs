//! cainjector against the real apiserver: CA bundles land in webhook configurations, CRD
//! conversion webhooks and APIServices that ask for them, and follow the source.
#![allow(clippy::unwrap_used)] // test code

mod common_admission;

use std::collections::BTreeMap;

use clap::Parser;
use common_admission::*;
use integration_tests::kube::Cluster;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kube_common::Manager;
use serde_json::{Value, json};
use tokio_util::sync::{CancellationToken, DropGuard};

use cert_manager::cainjector::{self, Args};

struct Env {
    client: Client,
    ns: String,
    _stop: DropGuard,
}

/// A cainjector in this process (no leader election) and a fresh namespace.
async fn env(prefix: &str) -> Env {
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    install_crds(&client).await;
    let ns = cluster.namespace(prefix).await.expect("namespace");
    let shutdown = CancellationToken::new();
    let mgr = Manager::new("cert-manager-cainjector", client.clone(), shutdown.clone());
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let args = Args::parse_from([
        "cainjector",
        "--leader-elect=false",
        &format!("--kubeconfig={kubeconfig}"),
    ]);
    cainjector::start(&mgr, &args)
        .await
        .expect("cainjector starts");
    Env {
        client,
        ns,
        _stop: shutdown.drop_guard(),
    }
}

fn annotated(name: &str, key: &str, value: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        annotations: Some([(key.to_string(), value.to_string())].into()),
        ..Default::default()
    }
}

/// A webhook entry that matches nothing real (a made-up group), so it never gets called.
fn hook(name: &str) -> Value {
    json!({
        "name": name,
        "clientConfig": {"url": "https://127.0.0.1:1/never"},
        "rules": [{"apiGroups": ["nothing.homecluster.invalid"], "apiVersions": ["v1"],
                   "operations": ["CREATE"], "resources": ["widgets"]}],
        "sideEffects": "None", "admissionReviewVersions": ["v1"], "failurePolicy": "Ignore",
    })
}

fn vwc(meta: ObjectMeta) -> ValidatingWebhookConfiguration {
    let mut v: ValidatingWebhookConfiguration =
        serde_json::from_value(json!({"webhooks": [hook("a.example.com"), hook("b.example.com")]}))
            .expect("vwc");
    v.metadata = meta;
    v
}

async fn ca_secret(client: &Client, ns: &str, name: &str, ca: &str, annotations: &[(&str, &str)]) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            annotations: Some(
                annotations
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "ca.crt".to_string(),
            ByteString(ca.as_bytes().to_vec()),
        )])),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("create Secret");
}

fn webhook_bundles(hooks: Option<Vec<Vec<u8>>>) -> Vec<Vec<u8>> {
    hooks.unwrap_or_default()
}

async fn vwc_bundles(api: &Api<ValidatingWebhookConfiguration>, name: &str) -> Vec<Vec<u8>> {
    let Ok(v) = api.get(name).await else {
        return vec![];
    };
    webhook_bundles(v.webhooks.map(|hs| {
        hs.into_iter()
            .map(|h| h.client_config.ca_bundle.unwrap_or_default().0)
            .collect()
    }))
}

/// Waits for a Warning Event cainjector raised on `name` with `reason`.
async fn warning_event(client: &Client, name: &str, reason: &str) {
    // Events about cluster-scoped objects are filed in `default` (see `kube_common::events::publish`).
    let events: Api<Event> = Api::all(client.clone());
    eventually(&format!("{reason} event on {name}"), WAIT, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some(reason)
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
            })
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn inject_ca_from_secret_into_webhook_configurations_and_follow_changes() {
    let env = env("cainj-secret").await;
    let client = &env.client;
    let ca1 = test_ca("ca-one");
    ca_secret(
        client,
        &env.ns,
        "webhook-ca",
        &ca1,
        &[("cert-manager.io/allow-direct-injection", "true")],
    )
    .await;
    ca_secret(client, &env.ns, "not-allowed", &ca1, &[]).await;

    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let mwcs: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let name = format!("{}-from-secret", env.ns);
    let source = format!("{}/webhook-ca", env.ns);
    vwcs.create(
        &PostParams::default(),
        &vwc(annotated(
            &name,
            "cert-manager.io/inject-ca-from-secret",
            &source,
        )),
    )
    .await
    .expect("create validating config");
    let mut m: MutatingWebhookConfiguration =
        serde_json::from_value(json!({"webhooks": [hook("m.example.com")]})).expect("mwc");
    m.metadata = annotated(&name, "cert-manager.io/inject-ca-from-secret", &source);
    mwcs.create(&PostParams::default(), &m)
        .await
        .expect("create mutating config");
    let refused = format!("{}-not-allowed", env.ns);
    vwcs.create(
        &PostParams::default(),
        &vwc(annotated(
            &refused,
            "cert-manager.io/inject-ca-from-secret",
            &format!("{}/not-allowed", env.ns),
        )),
    )
    .await
    .expect("create refused config");

    // Every webhook entry gets the Secret's ca.crt.
    eventually(
        "caBundle injected into both validating webhooks",
        WAIT,
        || async {
            let bundles = vwc_bundles(&vwcs, &name).await;
            (bundles.len() == 2 && bundles.iter().all(|b| bundle_contains(b, ca1.as_bytes())))
                .then_some(())
        },
    )
    .await;
    eventually(
        "caBundle injected into the mutating webhook",
        WAIT,
        || async {
            let m = mwcs.get(&name).await.ok()?;
            let b = m.webhooks?.first()?.client_config.ca_bundle.clone()?.0;
            bundle_contains(&b, ca1.as_bytes()).then_some(())
        },
    )
    .await;

    // The Secret's CA changes: the new one is appended (upstream's merging), the old one kept
    // until it expires so serving certificates it signed stay trusted during a rotation.
    let ca2 = test_ca("ca-two");
    Api::<Secret>::namespaced(client.clone(), &env.ns)
        .patch(
            "webhook-ca",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"ca.crt": ByteString(ca2.as_bytes().to_vec())}})),
        )
        .await
        .expect("rotate CA");
    eventually("rotated CA injected", WAIT, || async {
        let bundles = vwc_bundles(&vwcs, &name).await;
        bundles
            .iter()
            .all(|b| bundle_contains(b, ca2.as_bytes()) && bundle_contains(b, ca1.as_bytes()))
            .then_some(())
    })
    .await;

    // Without allow-direct-injection on the Secret: a Warning Event, and nothing injected.
    warning_event(client, &refused, "SecretNotAllowed").await;
    assert!(
        vwc_bundles(&vwcs, &refused).await.iter().all(Vec::is_empty),
        "nothing injected from a Secret that does not allow it"
    );

    // A malformed annotation is reported, not retried.
    let bad = format!("{}-bad-annotation", env.ns);
    vwcs.create(
        &PostParams::default(),
        &vwc(annotated(
            &bad,
            "cert-manager.io/inject-ca-from-secret",
            "no-namespace",
        )),
    )
    .await
    .expect("create badly annotated config");
    warning_event(client, &bad, "InvalidAnnotation").await;

    let dp = DeleteParams::default();
    for n in [&name, &refused, &bad] {
        let _ = vwcs.delete(n, &dp).await;
    }
    let _ = mwcs.delete(&name, &dp).await;
}

#[tokio::test]
async fn inject_ca_from_certificate_uses_only_its_own_secret() {
    let env = env("cainj-cert").await;
    let client = &env.client;
    let certs: Api<cert_manager::api::Certificate> = Api::namespaced(client.clone(), &env.ns);
    for (name, secret) in [("serving", "serving-tls"), ("other", "other-tls")] {
        let cert: cert_manager::api::Certificate = serde_json::from_value(json!({
            "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
            "metadata": {"name": name},
            "spec": {"secretName": secret, "issuerRef": {"name": "ca"}, "dnsNames": ["x.example"]}
        }))
        .expect("certificate");
        certs
            .create(&PostParams::default(), &cert)
            .await
            .expect("create Certificate");
    }
    let ca = test_ca("cert-ca");
    ca_secret(
        client,
        &env.ns,
        "serving-tls",
        &ca,
        &[("cert-manager.io/certificate-name", "serving")],
    )
    .await;
    // Claims to belong to another Certificate: must not be used.
    ca_secret(
        client,
        &env.ns,
        "other-tls",
        &ca,
        &[("cert-manager.io/certificate-name", "someone-else")],
    )
    .await;

    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(client.clone());
    let good = format!("{}-from-cert", env.ns);
    let mismatched = format!("{}-mismatch", env.ns);
    for (n, cert) in [(&good, "serving"), (&mismatched, "other")] {
        vwcs.create(
            &PostParams::default(),
            &vwc(annotated(
                n,
                "cert-manager.io/inject-ca-from",
                &format!("{}/{cert}", env.ns),
            )),
        )
        .await
        .expect("create config");
    }
    eventually(
        "CA from the Certificate's Secret injected",
        WAIT,
        || async {
            let bundles = vwc_bundles(&vwcs, &good).await;
            (!bundles.is_empty() && bundles.iter().all(|b| bundle_contains(b, ca.as_bytes())))
                .then_some(())
        },
    )
    .await;
    warning_event(client, &mismatched, "SecretMismatch").await;
    assert!(
        vwc_bundles(&vwcs, &mismatched)
            .await
            .iter()
            .all(Vec::is_empty)
    );

    // The Certificate's Secret gets a new CA (e.g. re-issued): it follows.
    let ca2 = test_ca("cert-ca-2");
    Api::<Secret>::namespaced(client.clone(), &env.ns)
        .patch(
            "serving-tls",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"ca.crt": ByteString(ca2.as_bytes().to_vec())}})),
        )
        .await
        .expect("update Secret");
    eventually("new CA injected", WAIT, || async {
        let bundles = vwc_bundles(&vwcs, &good).await;
        bundles
            .iter()
            .all(|b| bundle_contains(b, ca2.as_bytes()))
            .then_some(())
    })
    .await;

    let dp = DeleteParams::default();
    let _ = vwcs.delete(&good, &dp).await;
    let _ = vwcs.delete(&mismatched, &dp).await;
}

#[tokio::test]
async fn inject_into_crd_conversion_webhook_and_apiservice() {
    let env = env("cainj-crd").await;
    let client = &env.client;
    let ca = test_ca("aggregated-ca");
    ca_secret(
        client,
        &env.ns,
        "ca",
        &ca,
        &[("cert-manager.io/allow-direct-injection", "true")],
    )
    .await;
    let source = format!("{}/ca", env.ns);
    let group = format!("{}.homecluster.example", env.ns);

    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd_name = format!("widgets.{group}");
    let mut crd: CustomResourceDefinition = serde_json::from_value(json!({
        "spec": {
            "group": group, "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
            "versions": [{"name": "v1", "served": true, "storage": true,
                          "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}],
            "conversion": {"strategy": "Webhook", "webhook": {
                "conversionReviewVersions": ["v1"],
                "clientConfig": {"url": "https://127.0.0.1:1/convert"}}}
        }
    }))
    .expect("crd");
    crd.metadata = annotated(&crd_name, "cert-manager.io/inject-ca-from-secret", &source);
    crds.create(&PostParams::default(), &crd)
        .await
        .expect("create CRD");
    eventually("CRD conversion caBundle injected", WAIT, || async {
        let crd = crds.get(&crd_name).await.ok()?;
        let b = crd.spec.conversion?.webhook?.client_config?.ca_bundle?.0;
        bundle_contains(&b, ca.as_bytes()).then_some(())
    })
    .await;

    let services: Api<APIService> = Api::all(client.clone());
    let svc_name = format!("v1alpha1.{group}");
    let mut svc: APIService = serde_json::from_value(json!({
        "spec": {"group": group, "version": "v1alpha1",
                 "service": {"namespace": env.ns, "name": "api", "port": 443},
                 "groupPriorityMinimum": 1000, "versionPriority": 15}
    }))
    .expect("apiservice");
    svc.metadata = annotated(&svc_name, "cert-manager.io/inject-ca-from-secret", &source);
    services
        .create(&PostParams::default(), &svc)
        .await
        .expect("create APIService");
    eventually("APIService caBundle injected", WAIT, || async {
        let s = services.get(&svc_name).await.ok()?;
        let b = s.spec?.ca_bundle?.0;
        bundle_contains(&b, ca.as_bytes()).then_some(())
    })
    .await;

    let dp = DeleteParams::default();
    let _ = crds.delete(&crd_name, &dp).await;
    let _ = services.delete(&svc_name, &dp).await;
}

#[tokio::test]
async fn inject_apiserver_ca() {
    let env = env("cainj-apiserver").await;
    let cluster = Cluster::shared().await.expect("test control plane");
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(env.client.clone());
    let name = format!("{}-apiserver-ca", env.ns);
    vwcs.create(
        &PostParams::default(),
        &vwc(annotated(
            &name,
            "cert-manager.io/inject-apiserver-ca",
            "true",
        )),
    )
    .await
    .expect("create config");
    let want = cluster.ca_pem().as_bytes().to_vec();
    eventually("apiserver CA injected", WAIT, || async {
        let bundles = vwc_bundles(&vwcs, &name).await;
        (!bundles.is_empty() && bundles.iter().all(|b| bundle_contains(b, &want))).then_some(())
    })
    .await;
    let _ = vwcs.delete(&name, &DeleteParams::default()).await;
}
