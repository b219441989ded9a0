//! ACME faults the real pebble produces: rejected nonces (half of them), and the server going
//! away mid-life (stopped, then restarted with no memory of accounts or orders); and one it
//! cannot be asked to produce, injected by a proxy in front of it: a server error right after
//! new-order.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use common::*;
use integration_tests::faults::{HttpsFaultProxy, Outage};
use kube::api::{Api, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(90);

/// The tests share one pebble and one stops it: they take turns.
static PEBBLE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn env() -> Shared {
    shared(EnvOptions {
        pebble_env: vec![("PEBBLE_VA_NOSLEEP", "1"), ("PEBBLE_WFE_NONCEREJECT", "50")],
        validity_secs: Some(3600),
        // Short failure backoff so the retry after the outage happens within the test.
        extra_args: vec![
            "--certificate-request-minimum-backoff-duration=2s".into(),
            "--certificate-request-maximum-backoff-duration=8s".into(),
        ],
        ..Default::default()
    })
}

async fn certificate(client: &kube::Client, ns: &str, name: &str, issuer: &str, host: &str) {
    let cert: Certificate = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"secretName": format!("{name}-tls"), "dnsNames": [host],
                 "privateKey": {"algorithm": "ECDSA"},
                 "issuerRef": {"name": issuer, "kind": "ClusterIssuer", "group": "cert-manager.io"}}
    }))
    .expect("certificate");
    Api::<Certificate>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cert)
        .await
        .expect("create certificate");
}

/// A fault proxy in front of pebble, and a ClusterIssuer (in a new namespace's name) whose
/// ACME server is pebble through it.
async fn issuer_through_proxy(
    shared: &Shared,
    client: &kube::Client,
    prefix: &str,
) -> (HttpsFaultProxy, String, String) {
    let proxy = HttpsFaultProxy::start(&shared.directory_url, &shared.pebble_ca_pem)
        .await
        .expect("fault proxy");
    let through_proxy = Shared {
        directory_url: proxy.url("/dir"),
        pebble_ca_pem: proxy.ca_pem().to_string(),
        ..shared.clone()
    };
    let ns = namespace(prefix).await;
    let issuer = format!("le-{ns}");
    cluster_issuer(
        client,
        &through_proxy,
        &issuer,
        &format!("{issuer}-account"),
    )
    .await;
    (proxy, ns, issuer)
}

/// cert-manager's /metrics text.
async fn metrics(shared: &Shared) -> String {
    integration_tests::http::get(&format!("http://{}/metrics", shared.metrics), None)
        .await
        .expect("metrics")
        .text()
}

/// pebble's new-order path, from its directory (read through the proxy, so it names it).
async fn new_order_path(proxy: &HttpsFaultProxy) -> String {
    let directory = integration_tests::http::get(&proxy.url("/dir"), Some(proxy.ca_pem()))
        .await
        .expect("directory");
    let directory: serde_json::Value = serde_json::from_slice(&directory.body).expect("JSON");
    directory["newOrder"]
        .as_str()
        .and_then(|u| u.strip_prefix(&proxy.url("")))
        .unwrap_or_else(|| panic!("newOrder through the proxy in {directory}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issues_with_half_the_nonces_rejected_and_survives_an_acme_outage() {
    let shared = env();
    let _pebble = PEBBLE.lock().await;
    let client = client().await;
    let ns = namespace("cm-faults").await;
    let issuer = format!("le-{ns}");
    cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;

    // PEBBLE_WFE_NONCEREJECT=50: instant-acme retries badNonce; issuance still completes.
    certificate(
        &client,
        &ns,
        "nonces",
        &issuer,
        &format!("nonces.{ns}.test"),
    )
    .await;
    wait_for("issued despite rejected nonces", LIMIT, || {
        certificate_ready(&client, &ns, "nonces")
    })
    .await;

    // Pebble goes away: the next issuance fails (after retries) and backs off.
    pebble(&shared, PebbleCmd::Stop).await;
    certificate(
        &client,
        &ns,
        "outage",
        &issuer,
        &format!("outage.{ns}.test"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let api: Api<Certificate> = Api::namespaced(client.clone(), &ns);
    let during = api.get("outage").await.expect("get");
    assert!(
        certificate_ready(&client, &ns, "outage").await.is_none(),
        "cannot be issued while the CA is down"
    );
    assert!(secret(&client, &ns, "outage-tls").await.is_none());
    let issuing = condition(
        &during.status.as_ref().expect("status").conditions,
        "Issuing",
    )
    .cloned();
    assert!(
        issuing.is_some_and(|c| c.is_true()),
        "issuance in progress during the outage"
    );

    // Back (with a fresh state: the old order and account are gone): issued after backoff.
    let root = pebble(&shared, PebbleCmd::Restart).await;
    let cert = wait_for("issued after the outage", LIMIT, || {
        certificate_ready(&client, &ns, "outage")
    })
    .await;
    let status = cert.status.expect("status");
    assert_eq!(
        status.failed_issuance_attempts, None,
        "a success clears the failure count"
    );
    assert_eq!(status.last_failure_time, None);
    // The outage was ridden out by retrying with backoff (counted as sync errors), not by
    // failing the issuance.
    let metrics = metrics(&shared).await;
    let errors = metrics
        .lines()
        .find(|l| l.starts_with("certmanager_controller_sync_error_count{controller=\"orders\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        errors >= 1.0,
        "order sync errors during the outage:\n{metrics}"
    );
    assert!(!root.is_empty());
}

/// Issue 13: a transient error after new-order (here the first authorization fetch, answered
/// 500 by the proxy) must not make the retry open a second ACME order and spend the CA's
/// new-orders limit: the Order records the order URL before anything else can fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fault_after_new_order_does_not_open_a_second_acme_order() {
    let shared = env();
    let _pebble = PEBBLE.lock().await;
    let client = client().await;
    let (proxy, ns, issuer) = issuer_through_proxy(&shared, &client, "cm-order-once").await;

    let new_order = new_order_path(&proxy).await;

    // pebble's authorization URLs are /authZ/<id>; the first fetch comes right after new-order.
    proxy.fail_next("/authZ/", 1);
    certificate(&client, &ns, "once", &issuer, &format!("once.{ns}.test")).await;
    wait_for("issued despite the fault", LIMIT, || {
        certificate_ready(&client, &ns, "once")
    })
    .await;

    let log = proxy.exchanges();
    let shown = log.iter().map(|e| format!("\n  {e}")).collect::<String>();
    let injected = log
        .iter()
        .filter(|e| e.injected && e.path.starts_with("/authZ/"))
        .count();
    assert_eq!(injected, 1, "the authorization fetch failed once: {shown}");
    // Rejected nonces make instant-acme repeat a request; an accepted new-order (201) is one
    // ACME order.
    let orders = log
        .iter()
        .filter(|e| e.path == new_order && e.status == 201)
        .count();
    assert_eq!(orders, 1, "one Order makes one ACME order: {shown}");
    assert!(
        log.iter().any(|e| e.path.starts_with("/finalize-order/")),
        "issued through the proxy: {shown}"
    );
}

/// Issue 13: the CA stops answering for 40 s, then answers 503 for 20 s. The client gives a
/// silent request up after upstream's 30 s timeout (without it the first request would wait
/// for the whole window), the Order rides the minute out with backoff (not a tight loop),
/// opens exactly one ACME order, and the certificate is issued once the CA is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acme_outage_of_silence_then_errors_is_ridden_out_with_one_order() {
    let shared = env();
    let _pebble = PEBBLE.lock().await;
    let client = client().await;
    let (proxy, ns, issuer) = issuer_through_proxy(&shared, &client, "cm-acme-outage").await;
    let issuers: Api<cert_manager::api::ClusterIssuer> = Api::all(client.clone());
    wait_for("issuer registered", LIMIT, || async {
        let ci = issuers.get_opt(&issuer).await.ok()??;
        condition(&ci.status?.conditions, "Ready")?
            .is_true()
            .then_some(())
    })
    .await;

    let new_order = new_order_path(&proxy).await;
    proxy.outage(Outage::Hang, Duration::from_secs(40));
    proxy.outage(Outage::ServerError, Duration::from_secs(20));
    let started = std::time::Instant::now();
    certificate(
        &client,
        &ns,
        "outage",
        &issuer,
        &format!("outage.{ns}.test"),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    wait_for("issued after the outage", 2 * LIMIT, || {
        certificate_ready(&client, &ns, "outage")
    })
    .await;
    println!("issued {:?} after creation", started.elapsed());

    let log = proxy.exchanges();
    let shown = log.iter().map(|e| format!("\n  {e}")).collect::<String>();
    let during = log.iter().filter(|e| e.injected).count();
    println!("requests during the 60 s outage: {during}");
    assert!(during >= 2, "the outage was met: {shown}");
    assert!(
        during <= 60,
        "{during} requests in 60 s: retried without backoff: {shown}"
    );
    // The client's own verdict on the silent request: status "999" (no answer) in upstream's
    // ACME client metric, for this proxy's host only.
    let metrics = metrics(&shared).await;
    let host = format!("localhost:{}", proxy.addr().port());
    let gave_up = metrics.lines().any(|l| {
        l.starts_with("certmanager_http_acme_client_request_count")
            && l.contains(&host)
            && l.contains("status=\"999\"")
    });
    assert!(
        gave_up,
        "no request given up by the client's timeout:\n{metrics}"
    );
    let new_orders = log
        .iter()
        .filter(|e| e.status == 201 && e.path == new_order)
        .count();
    assert_eq!(new_orders, 1, "one Order makes one ACME order: {shown}");
}
