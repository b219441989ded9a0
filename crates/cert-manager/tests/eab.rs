//! External account binding against pebble configured to require it (as ZeroSSL and some
//! enterprise CAs do): the issuer registers with the key from its Secret, and a wrong key is
//! reported on the issuer.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use base64::Engine;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);
/// Pebble's documented test HMAC key for kid-1 (base64url, as cert-manager stores it).
const KID_1: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

async fn eab_issuer(client: &kube::Client, shared: &Shared, name: &str, key: &str) {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &shared.resource_ns);
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": format!("{name}-eab")},
        "data": {"secret": base64::engine::general_purpose::STANDARD.encode(key)}
    }))
    .expect("secret");
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .expect("EAB secret");
    let ci: ClusterIssuer = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": name},
        "spec": {"acme": {
            "server": shared.directory_url,
            "caBundle": base64::engine::general_purpose::STANDARD.encode(&shared.pebble_ca_pem),
            "privateKeySecretRef": {"name": format!("{name}-account")},
            "externalAccountBinding": {"keyID": "kid-1", "keySecretRef": {"name": format!("{name}-eab"), "key": "secret"}},
            "solvers": [{"http01": {"ingress": {"ingressClassName": "nginx"}}}]
        }}
    }))
    .expect("issuer");
    Api::<ClusterIssuer>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("tests").force(),
            &Patch::Apply(&ci),
        )
        .await
        .expect("issuer applies");
}

async fn ready_condition(
    client: &kube::Client,
    name: &str,
) -> Option<cert_manager::api::Condition> {
    let ci = Api::<ClusterIssuer>::all(client.clone())
        .get(name)
        .await
        .ok()?;
    condition(&ci.status?.conditions, "Ready").cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_account_binding_registers_and_a_wrong_key_is_reported() {
    let shared = shared(EnvOptions {
        eab_keys: vec![("kid-1".into(), KID_1.into())],
        ..Default::default()
    });
    let client = client().await;
    let ns = namespace("cm-eab").await;

    let good = format!("eab-{ns}");
    eab_issuer(&client, &shared, &good, KID_1).await;
    wait_for("EAB issuer registered", LIMIT, || async {
        ready_condition(&client, &good)
            .await
            .filter(|c| c.is_true())
    })
    .await;

    let bad = format!("eab-bad-{ns}");
    eab_issuer(
        &client,
        &shared,
        &bad,
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
    .await;
    let c = wait_for("wrong EAB key reported", LIMIT, || async {
        ready_condition(&client, &bad)
            .await
            .filter(|c| c.status == "False")
    })
    .await;
    assert_eq!(c.reason.as_deref(), Some("ErrRegisterACMEAccount"), "{c:?}");
}
