//! Issuance end to end against the real apiserver, pebble and our ingress controller: Ingress
//! annotation → Certificate → CertificateRequest → Order → Challenge (HTTP-01 through the
//! ingress) → TLS Secret, served by the proxy for its SNI name.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

async fn app_ingress(
    client: &kube::Client,
    ns: &str,
    host: &str,
    secret: &str,
    annotations: serde_json::Value,
) -> Ingress {
    let ing: Ingress = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "web", "namespace": ns, "annotations": annotations, "labels": {"app": "web"}},
        "spec": {
            "ingressClassName": "nginx",
            "tls": [{"hosts": [host], "secretName": secret}],
            "rules": [{"host": host, "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "frontend", "port": {"number": 80}}}
            }]}}]
        }
    }))
    .expect("ingress");
    Api::<Ingress>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &ing)
        .await
        .expect("ingress created")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_annotation_to_served_certificate() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-issue").await;
    let issuer = format!("le-{ns}");
    cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;
    let host = format!("app.{ns}.test");

    let started = Instant::now();
    app_ingress(
        &client,
        &ns,
        &host,
        "app-tls",
        json!({"cert-manager.io/cluster-issuer": issuer}),
    )
    .await;
    let leaf = wait_for("certificate served for the SNI name", LIMIT, || async {
        served_leaf(shared.ingress_https, &host, &shared.root_pem)
            .await
            .ok()
    })
    .await;
    let elapsed = started.elapsed();
    println!(
        "Ingress created → certificate served by the proxy: {:.0} ms",
        elapsed.as_secs_f64() * 1000.0
    );
    assert!(!leaf.is_empty());

    // The Certificate the shim made, and its status.
    let cert = wait_for("Certificate Ready", LIMIT, || {
        certificate_ready(&client, &ns, "app-tls")
    })
    .await;
    assert_eq!(cert.spec.dns_names.as_deref(), Some(&[host.clone()][..]));
    assert_eq!(cert.spec.issuer_ref.kind.as_deref(), Some("ClusterIssuer"));
    assert_eq!(cert.owner_references()[0].kind, "Ingress");
    let status = cert.status.clone().expect("status");
    assert_eq!(status.revision, Some(1));
    assert!(
        status.not_after.is_some() && status.renewal_time.is_some() && status.not_before.is_some()
    );
    assert!(condition(&status.conditions, "Issuing").is_none());

    // The Secret, exactly as upstream writes it.
    let s = secret(&client, &ns, "app-tls").await.expect("secret");
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/tls"));
    let data = s.data.clone().expect("data");
    let crt = String::from_utf8(data["tls.crt"].0.clone()).expect("pem");
    assert!(
        crt.matches("BEGIN CERTIFICATE").count() >= 2,
        "leaf then chain:\n{crt}"
    );
    let key = String::from_utf8(data["tls.key"].0.clone()).expect("pem");
    assert!(
        key.starts_with("-----BEGIN RSA PRIVATE KEY-----"),
        "RSA PKCS#1 by default"
    );
    assert!(!data.contains_key("ca.crt"), "ACME issuers return no CA");
    let a = s.annotations();
    for (k, v) in [
        ("cert-manager.io/certificate-name", "app-tls"),
        ("cert-manager.io/issuer-name", issuer.as_str()),
        ("cert-manager.io/issuer-kind", "ClusterIssuer"),
        ("cert-manager.io/issuer-group", "cert-manager.io"),
        ("cert-manager.io/alt-names", host.as_str()),
        ("cert-manager.io/ip-sans", ""),
        ("cert-manager.io/uri-sans", ""),
        // Pebble (like Let's Encrypt) puts the first name in the subject CN.
        ("cert-manager.io/common-name", host.as_str()),
    ] {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "annotation {k}");
    }
    assert_eq!(
        s.labels()
            .get("controller.cert-manager.io/fao")
            .map(String::as_str),
        Some("true")
    );
    let managers: Vec<_> = s
        .managed_fields()
        .iter()
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers
            .iter()
            .any(|m| m == "cert-manager-certificates-issuing"),
        "{managers:?}"
    );

    // The request, approved; the order valid; the issuer registered.
    let cr = Api::<CertificateRequest>::namespaced(client.clone(), &ns)
        .get("app-tls-1")
        .await
        .expect("request");
    let cr_status = cr.status.expect("cr status");
    assert_eq!(
        condition(&cr_status.conditions, "Approved").map(|c| c.reason.clone()),
        Some(Some("cert-manager.io".into()))
    );
    assert!(condition(&cr_status.conditions, "Ready").is_some_and(|c| c.is_true()));
    let orders = Api::<Order>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("orders");
    assert!(
        orders
            .items
            .iter()
            .any(|o| o.status.as_ref().and_then(|s| s.state.as_deref()) == Some("valid"))
    );
    let ci = Api::<ClusterIssuer>::all(client.clone())
        .get(&issuer)
        .await
        .expect("issuer");
    let ci_status = ci.status.expect("issuer status");
    let ready = condition(&ci_status.conditions, "Ready").expect("Ready");
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_deref()),
        ("True", Some("ACMEAccountRegistered"))
    );
    let acme = ci_status.acme.expect("acme status");
    assert!(
        acme.uri
            .unwrap_or_default()
            .starts_with("https://localhost:")
    );
    assert_eq!(
        acme.last_registered_email.as_deref(),
        Some("admin@example.test")
    );

    // Challenge resources are cleaned up.
    eventually("solver Ingress removed", LIMIT, || async {
        let list = Api::<Ingress>::namespaced(client.clone(), &ns)
            .list(&Default::default())
            .await
            .expect("list");
        list.items
            .iter()
            .all(|i| !i.name_any().starts_with("cm-acme-http-solver-"))
    })
    .await;

    // Metrics with upstream's names.
    let body = reqwest_metrics(shared.metrics).await;
    for name in [
        "certmanager_certificate_ready_status{",
        "certmanager_certificate_expiration_timestamp_seconds{",
        "certmanager_certificate_renewal_timestamp_seconds{",
        "certmanager_http_acme_client_request_count{",
        "certmanager_http_acme_client_request_duration_seconds_count{",
        "certmanager_controller_sync_call_count{",
    ] {
        assert!(body.contains(name), "metric {name} missing:\n{body}");
    }

    // A deleted Secret is issued again.
    Api::<Secret>::namespaced(client.clone(), &ns)
        .delete("app-tls", &DeleteParams::default())
        .await
        .expect("delete secret");
    wait_for("Secret re-issued", LIMIT, || async {
        let c = certificate_ready(&client, &ns, "app-tls").await?;
        (c.status?.revision == Some(2)).then_some(())?;
        secret(&client, &ns, "app-tls").await
    })
    .await;

    // Removing the TLS entry removes the Certificate the shim made.
    let patch = json!({"spec": {"tls": null}});
    Api::<Ingress>::namespaced(client.clone(), &ns)
        .patch("web", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch ingress");
    eventually("stale Certificate deleted", LIMIT, || async {
        Api::<Certificate>::namespaced(client.clone(), &ns)
            .get_opt("app-tls")
            .await
            .expect("get")
            .is_none()
    })
    .await;
    assert!(
        secret(&client, &ns, "app-tls").await.is_some(),
        "the Secret is not owned and stays"
    );
}

async fn reqwest_metrics(addr: std::net::SocketAddr) -> String {
    let reply = integration_tests::http::get(&format!("http://{addr}/metrics"), None)
        .await
        .expect("metrics");
    reply.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_lived_certificate_renews_without_downtime() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-renew").await;
    let issuer = format!("le-{ns}");
    cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;
    let host = format!("renew.{ns}.test");
    // Pebble issues for an hour here; renew 20 s into that hour.
    app_ingress(
        &client,
        &ns,
        &host,
        "renew-tls",
        json!({"cert-manager.io/cluster-issuer": issuer, "cert-manager.io/renew-before": "59m40s",
               "cert-manager.io/private-key-algorithm": "ECDSA"}),
    )
    .await;
    let first = wait_for("first certificate served", LIMIT, || async {
        served_leaf(shared.ingress_https, &host, &shared.root_pem)
            .await
            .ok()
    })
    .await;
    // Handshake continuously until the served certificate changes; none may fail.
    let started = Instant::now();
    let mut handshakes = 0u32;
    let second = loop {
        let leaf = served_leaf(shared.ingress_https, &host, &shared.root_pem)
            .await
            .unwrap_or_else(|e| {
                panic!("handshake failed during renewal after {handshakes} good ones: {e}")
            });
        handshakes += 1;
        if leaf != first {
            break leaf;
        }
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "no renewal within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_ne!(first, second);
    let cert = wait_for("revision 2", LIMIT, || async {
        let c = certificate_ready(&client, &ns, "renew-tls").await?;
        (c.status.as_ref()?.revision >= Some(2)).then_some(c)
    })
    .await;
    let events = events_for(&client, &ns, "renew-tls").await;
    assert!(
        events
            .iter()
            .any(|e| e.starts_with("Issuing: Renewing certificate as renewal was scheduled at")),
        "{events:?}"
    );
    let key = secret(&client, &ns, "renew-tls")
        .await
        .and_then(|s| s.data)
        .expect("data")["tls.key"]
        .0
        .clone();
    assert!(String::from_utf8_lossy(&key).starts_with("-----BEGIN EC PRIVATE KEY-----"));
    println!(
        "renewed after {handshakes} successful handshakes; revision {:?}",
        cert.status.and_then(|s| s.revision)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_and_bad_issuers_are_reported() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-bad").await;

    // Contradictory and invalid annotations: an Event, no Certificate.
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    app_ingress(
        &client,
        &ns,
        "bad.test",
        "bad-tls",
        json!({"cert-manager.io/cluster-issuer": "x", "cert-manager.io/duration": "30m"}),
    )
    .await;
    eventually("BadConfig event for the duration", LIMIT, || async {
        events_for(&client, &ns, "web")
            .await
            .iter()
            .any(|e| e.starts_with("BadConfig:") && e.contains("duration"))
    })
    .await;
    ingresses
        .delete("web", &DeleteParams::default())
        .await
        .expect("delete");
    let ing2: Ingress = serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "both", "namespace": ns, "annotations": {
            "cert-manager.io/cluster-issuer": "a", "cert-manager.io/issuer": "b"}},
        "spec": {"tls": [{"hosts": ["both.test"], "secretName": "both-tls"}],
                 "rules": [{"host": "both.test"}]}
    }))
    .expect("ingress");
    ingresses
        .create(&PostParams::default(), &ing2)
        .await
        .expect("create");
    eventually("BadConfig event for two issuers", LIMIT, || async {
        events_for(&client, &ns, "both")
            .await
            .iter()
            .any(|e| e.starts_with("BadConfig:") && e.contains("may not be set"))
    })
    .await;
    let certs = Api::<Certificate>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await
        .expect("list");
    assert!(
        certs.items.is_empty(),
        "no Certificate from bad annotations"
    );

    // A Certificate for an issuer that does not exist: pending, no Secret.
    let cert: Certificate = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate",
        "metadata": {"name": "orphan", "namespace": ns},
        "spec": {"secretName": "orphan-tls", "dnsNames": ["orphan.test"],
                 "issuerRef": {"name": "does-not-exist", "kind": "ClusterIssuer"}}
    }))
    .expect("cert");
    Api::<Certificate>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &cert)
        .await
        .expect("create");
    wait_for("request pending on the missing issuer", LIMIT, || async {
        let cr = Api::<CertificateRequest>::namespaced(client.clone(), &ns)
            .get_opt("orphan-1")
            .await
            .ok()??;
        let c = condition(&cr.status?.conditions, "Ready")?.clone();
        (c.reason.as_deref() == Some("Pending")
            && c.message.unwrap_or_default().contains("not found"))
        .then_some(())
    })
    .await;
    assert!(secret(&client, &ns, "orphan-tls").await.is_none());

    // An issuer whose server does not answer: Ready=False with the registration error.
    let name = format!("down-{ns}");
    let ci: ClusterIssuer = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1", "kind": "ClusterIssuer", "metadata": {"name": name},
        "spec": {"acme": {"server": "https://127.0.0.1:1/dir", "skipTLSVerify": true,
                          "privateKeySecretRef": {"name": format!("{name}-key")},
                          "solvers": [{"http01": {"ingress": {}}}]}}
    }))
    .expect("issuer");
    Api::<ClusterIssuer>::all(client.clone())
        .create(&PostParams::default(), &ci)
        .await
        .expect("create");
    wait_for("issuer not ready", LIMIT, || async {
        let ci = Api::<ClusterIssuer>::all(client.clone())
            .get(&name)
            .await
            .ok()?;
        let c = condition(&ci.status?.conditions, "Ready")?.clone();
        (c.status == "False" && c.reason.as_deref() == Some("ErrRegisterACMEAccount")).then_some(())
    })
    .await;
    let _ = shared;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rsa_account_secret_is_left_untouched() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-rsa").await;
    let issuer = format!("rsa-{ns}");
    let key_secret = format!("{issuer}-account");
    // What upstream cert-manager leaves behind: an RSA key, PKCS#1, under tls.key.
    let rsa = cert_manager::pki::PrivateKey::generate(cert_manager::pki::KeySpec::Rsa(2048))
        .expect("rsa");
    let pem = rsa.to_pem(false).expect("pem");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &shared.resource_ns);
    let original: Secret = secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": key_secret, "labels": {"app.kubernetes.io/managed-by": "cert-manager"}},
                "data": {"tls.key": base64::engine::general_purpose::STANDARD.encode(&pem)}
            }))
            .expect("secret"),
        )
        .await
        .expect("create RSA secret");
    cluster_issuer(&client, &shared, &issuer, &key_secret).await;
    let ci = wait_for("issuer ready", LIMIT, || async {
        let ci = Api::<ClusterIssuer>::all(client.clone())
            .get(&issuer)
            .await
            .ok()?;
        condition(&ci.status.as_ref()?.conditions, "Ready")?
            .is_true()
            .then_some(ci)
    })
    .await;
    let message = condition(&ci.status.as_ref().expect("status").conditions, "Ready")
        .and_then(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("RSA account key") && message.contains(&format!("{key_secret}-es256")),
        "{message}"
    );
    let now = secrets.get(&key_secret).await.expect("still there");
    assert_eq!(now.data, original.data, "RSA key unchanged");
    assert_eq!(
        now.metadata.resource_version, original.metadata.resource_version,
        "not even rewritten"
    );
    let sibling = secrets
        .get(&format!("{key_secret}-es256"))
        .await
        .expect("sibling Secret");
    let key = String::from_utf8(sibling.data.expect("data")["tls.key"].0.clone()).expect("pem");
    assert_eq!(
        cert_manager::pki::PrivateKey::from_pem(key.as_bytes())
            .expect("key")
            .kind,
        cert_manager::pki::KeySpec::Ecdsa(256)
    );
    // Events about cluster-scoped objects live in "default".
    let events = events_for(&client, "default", &issuer).await;
    assert!(
        events.iter().any(|e| e.starts_with("RSAAccountKeyKept")),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_in_place_adds_and_removes_the_solver_path() {
    let shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-inplace").await;
    let issuer = format!("le-{ns}");
    cluster_issuer(&client, &shared, &issuer, &format!("{issuer}-account")).await;
    let host = format!("inplace.{ns}.test");
    app_ingress(
        &client,
        &ns,
        &host,
        "inplace-tls",
        json!({"cert-manager.io/cluster-issuer": issuer, "acme.cert-manager.io/http01-edit-in-place": "true"}),
    )
    .await;
    let cert = wait_for("Certificate created", LIMIT, || async {
        Api::<Certificate>::namespaced(client.clone(), &ns)
            .get_opt("inplace-tls")
            .await
            .ok()?
    })
    .await;
    assert_eq!(
        cert.annotations()
            .get("acme.cert-manager.io/http01-override-ingress-name")
            .map(String::as_str),
        Some("web")
    );
    // The challenge is answered through the user's Ingress: no solver Ingress is made.
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    wait_for("issued through the edited Ingress", LIMIT, || {
        certificate_ready(&client, &ns, "inplace-tls")
    })
    .await;
    let all = ingresses.list(&Default::default()).await.expect("list");
    assert!(
        all.items
            .iter()
            .all(|i| !i.name_any().starts_with("cm-acme-http-solver-")),
        "no separate solver Ingress"
    );
    eventually(
        "solver path removed from the user's Ingress",
        LIMIT,
        || async {
            let web = ingresses.get("web").await.expect("web");
            let paths: Vec<String> = web
                .spec
                .and_then(|s| s.rules)
                .unwrap_or_default()
                .into_iter()
                .flat_map(|r| r.http.map(|h| h.paths).unwrap_or_default())
                .filter_map(|p| p.path)
                .collect();
            paths == ["/"]
        },
    )
    .await;
    served_leaf(shared.ingress_https, &host, &shared.root_pem)
        .await
        .expect("served");
    // edit-in-place asks for a stand-in certificate while the real one is issued.
    let events = events_for(&client, &ns, "inplace-tls").await;
    assert!(
        events
            .iter()
            .any(|e| e == "Issuing: Issued temporary certificate"),
        "{events:?}"
    );
}

/// A Challenge deleted while it is being solved: its finalizer (kube-runtime's helper) holds
/// the deletion until the solver's objects are gone, then lets it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenge_deleted_in_progress_is_cleaned_up_then_released() {
    use cert_manager::api::Challenge;
    let _shared = shared(EnvOptions::default());
    let client = client().await;
    let ns = namespace("cm-chdel").await;
    let challenges: Api<Challenge> = Api::namespaced(client.clone(), &ns);
    let ch: Challenge = serde_json::from_value(json!({
        "apiVersion": "acme.cert-manager.io/v1", "kind": "Challenge",
        "metadata": {"name": "in-progress", "namespace": ns},
        "spec": {
            "url": "https://127.0.0.1:1/chal/x", "authorizationURL": "https://127.0.0.1:1/authz/x",
            "dnsName": format!("gone.{ns}.test"), "type": "HTTP-01",
            "token": "tok", "key": "tok.thumbprint",
            "solver": {"http01": {"ingress": {"ingressClassName": "nginx"}}},
            "issuerRef": {"name": "absent", "kind": "ClusterIssuer", "group": "cert-manager.io"}
        }
    }))
    .expect("challenge");
    challenges
        .create(&PostParams::default(), &ch)
        .await
        .expect("create challenge");
    let solver_ingresses = || async {
        Api::<Ingress>::namespaced(client.clone(), &ns)
            .list(
                &kube::api::ListParams::default().labels("acme.cert-manager.io/http01-solver=true"),
            )
            .await
            .map(|l| l.items.len())
            .unwrap_or(0)
    };
    eventually("finalizer added and token presented", LIMIT, || async {
        challenges.get("in-progress").await.is_ok_and(|c| {
            c.finalizers()
                .iter()
                .any(|f| f == cert_manager::challenges::FINALIZER)
                && c.status.as_ref().and_then(|s| s.presented) == Some(true)
        })
    })
    .await;
    assert_eq!(solver_ingresses().await, 1, "solver Ingress made");
    challenges
        .delete("in-progress", &DeleteParams::default())
        .await
        .expect("delete challenge");
    eventually("challenge released", LIMIT, || async {
        challenges
            .get_opt("in-progress")
            .await
            .is_ok_and(|c| c.is_none())
    })
    .await;
    assert_eq!(solver_ingresses().await, 0, "solver Ingress removed first");
}
