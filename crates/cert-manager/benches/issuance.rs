//! Ingress created → certificate served by our proxy, against the real apiserver and pebble
//! (PEBBLE_VA_NOSLEEP=1). Prints figures; asserts nothing about time.
//!
//! `cargo bench -p cert-manager --bench issuance` (after `cargo run -p xtask -- setup`).
//! `ISSUANCE_ROUNDS` (default 7) sets the number of Ingresses. The self-check runs one pass
//! here (`--acme-http01-self-check-passes=1`); the default of 3 passes 1 s apart adds 2 s.
#![allow(clippy::unwrap_used)] // test code

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, PostParams};
use serde_json::json;

fn main() {
    let shared = shared(EnvOptions {
        extra_args: vec!["--acme-http01-self-check-passes=1".into()],
        ..Default::default()
    });
    let rounds: usize = std::env::var("ISSUANCE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = client().await;
        let ns = namespace("bench-issue").await;
        let issuer = format!("le-{ns}");
        cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;
        // Register the account first: the figure is per Ingress, as on a running cluster.
        wait_for("issuer ready", Duration::from_secs(60), || async {
            let ci = Api::<ClusterIssuer>::all(client.clone()).get(&issuer).await.ok()?;
            condition(&ci.status.as_ref()?.conditions, "Ready")?.is_true().then_some(())
        })
        .await;
        let mut times: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        // Alternate the default key (RSA 2048, generated in pure Rust) and ECDSA P-256.
        for i in 0..rounds * 2 {
            let alg = ["RSA", "ECDSA"][i % 2];
            let host = format!("b{i}.{ns}.test");
            let ing: Ingress = serde_json::from_value(json!({
                "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
                "metadata": {"name": format!("web{i}"), "namespace": ns,
                             "annotations": {"cert-manager.io/cluster-issuer": issuer,
                                             "cert-manager.io/private-key-algorithm": alg}},
                "spec": {"ingressClassName": "nginx",
                         "tls": [{"hosts": [host], "secretName": format!("b{i}-tls")}],
                         "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                             "backend": {"service": {"name": "frontend", "port": {"number": 80}}}}]}}]}
            }))
            .expect("ingress");
            let started = Instant::now();
            Api::<Ingress>::namespaced(client.clone(), &ns)
                .create(&PostParams::default(), &ing)
                .await
                .expect("create");
            wait_for("served", Duration::from_secs(60), || async {
                served_leaf(shared.ingress_https, &host, &shared.root_pem).await.ok()
            })
            .await;
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            println!("round {i} ({alg}): Ingress created → certificate served: {ms:.0} ms");
            times[i % 2].push(ms);
        }
        for (alg, mut t) in ["RSA 2048", "ECDSA P-256"].into_iter().zip(times) {
            t.sort_by(f64::total_cmp);
            println!(
                "issuance ({} rounds, {alg}, PEBBLE_VA_NOSLEEP=1, 1 self-check pass): median {:.0} ms, min {:.0} ms, max {:.0} ms",
                t.len(),
                t[t.len() / 2],
                t[0],
                t[t.len() - 1]
            );
        }
    });
}
