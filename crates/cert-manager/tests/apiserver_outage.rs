//! Issue 13: kube-apiserver down for 60 s under the whole stack this binary runs (our ingress
//! controller and proxy, cert-manager's controllers, pebble): the proxy keeps serving its last
//! routing snapshot without a failed request, every controller resumes without a restart, and
//! nothing is lost or duplicated (Secret, Certificate, CertificateRequest, Order).
//! Its own test binary: it stops the binary's control plane.
#![allow(clippy::unwrap_used)] // test code

mod common;
#[path = "../../ingress/tests/common/mod.rs"]
mod ingress_common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use integration_tests::kube::Cluster;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(90);
const OUTAGE: Duration = Duration::from_secs(60);

async fn certificate(client: &kube::Client, ns: &str, name: &str, issuer: &str) {
    let cert: Certificate = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"secretName": format!("{name}-tls"), "dnsNames": [format!("{name}.{ns}.test")],
                 "privateKey": {"algorithm": "ECDSA"},
                 "issuerRef": {"name": issuer, "kind": "ClusterIssuer", "group": "cert-manager.io"}}
    }))
    .unwrap();
    Api::<Certificate>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &cert)
        .await
        .unwrap();
}

fn owned_by(meta: &kube::api::ObjectMeta, kind: &str, names: &[String]) -> bool {
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == kind && names.contains(&o.name))
}

/// (CertificateRequests, Orders) of one Certificate, by owner references.
async fn chain(client: &kube::Client, ns: &str, cert: &str) -> (usize, usize) {
    let requests: Vec<String> = Api::<CertificateRequest>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|r| owned_by(&r.metadata, "Certificate", &[cert.to_string()]))
        .filter_map(|r| r.metadata.name)
        .collect();
    let orders = Api::<Order>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|o| owned_by(&o.metadata, "CertificateRequest", &requests))
        .count();
    (requests.len(), orders)
}

/// New-connection GETs every 20 ms until stopped; (requests, failures).
fn steady(
    addr: std::net::SocketAddr,
    host: &'static str,
) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(u64, u64)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let task = tokio::spawn(async move {
        let (requests, failed) = (AtomicU64::new(0), AtomicU64::new(0));
        while !s.load(Ordering::Relaxed) {
            // A connection error panics inside `get`: its own task, counted as a failure.
            let get = tokio::spawn(ingress_common::get(addr, host, "/"));
            let ok = get.await.is_ok_and(|r| r.status == 200);
            requests.fetch_add(1, Ordering::Relaxed);
            if !ok {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (requests.into_inner(), failed.into_inner())
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_without_apiserver_loses_nothing() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("outage").await;
    let issuer = format!("le-{ns}");
    cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;

    // Before: a site served by the proxy, one certificate issued.
    let backend = ingress_common::backend("site").await;
    ingress_common::service(&client, &ns, "site", &[backend], &[]).await;
    let host = format!("site.{ns}.test");
    ingress_common::apply_ingress(
        &client,
        &ns,
        ingress_common::simple_ingress("site", &host, "/", "Prefix", "site"),
    )
    .await;
    let http = shared.ingress_http;
    eventually("site served", LIMIT, || async {
        ingress_common::get(http, &host, "/").await.status == 200
    })
    .await;
    certificate(&client, &ns, "before", &issuer).await;
    wait_for("issued before the outage", LIMIT, || {
        certificate_ready(&client, &ns, "before")
    })
    .await;
    let secret_before = secret(&client, &ns, "before-tls").await.unwrap();

    // The outage, with a client on the site throughout.
    let started = std::time::Instant::now();
    let (stop, load) = steady(http, host.clone().leak());
    let cluster = Cluster::shared().await.unwrap();
    cluster.stop_apiserver().unwrap();
    tokio::time::sleep(OUTAGE).await;
    cluster.start_apiserver().await.unwrap();

    // After: the controllers pick up new work without a restart.
    certificate(&client, &ns, "after", &issuer).await;
    let mut edited = ingress_common::simple_ingress("site", &host, "/", "Prefix", "site");
    edited["spec"]["rules"][0]["http"]["paths"]
        .as_array_mut()
        .unwrap()
        .push(json!({"path": "/after", "pathType": "Exact",
                     "backend": {"service": {"name": "missing", "port": {"number": 80}}}}));
    ingress_common::apply_ingress(&client, &ns, edited).await;
    println!("apiserver back, edits made: {:?}", started.elapsed());
    eventually("the Ingress edit served", LIMIT, || async {
        ingress_common::get(http, &host, "/after").await.status == 503
    })
    .await;
    println!("edit served: {:?}", started.elapsed());
    wait_for("issued after the outage", LIMIT, || {
        certificate_ready(&client, &ns, "after")
    })
    .await;
    println!("issued after: {:?}", started.elapsed());
    stop.store(true, Ordering::Relaxed);
    let (requests, failed) = load.await.unwrap();
    println!("{requests} requests through the outage, {failed} failed");
    assert!(requests > 1000, "the client ran throughout: {requests}");
    assert_eq!(failed, 0, "requests failed while the apiserver was down");

    // Nothing lost or duplicated.
    let secret_after = secret(&client, &ns, "before-tls").await.unwrap();
    assert_eq!(
        secret_before.data, secret_after.data,
        "the issued Secret is unchanged"
    );
    for cert in ["before", "after"] {
        assert_eq!(
            chain(&client, &ns, cert).await,
            (1, 1),
            "{cert}: one CertificateRequest, one Order"
        );
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let names: Vec<String> = secrets
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(names.contains(&"after-tls".to_string()), "{names:?}");
}
