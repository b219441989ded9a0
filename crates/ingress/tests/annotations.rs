//! Annotation behaviour and Ingress merging against the real kube-apiserver.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn with_annotations(mut ing: serde_json::Value, a: serde_json::Value) -> serde_json::Value {
    ing["metadata"]["annotations"] = a;
    ing
}

#[tokio::test]
async fn rewrite_regex_redirects_body_size_and_source_ranges() {
    let env = env("annot", &[]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let ns = env.ns.clone();
    let host = |p: &str| format!("{p}.{ns}.example");
    let http = env.running.http;

    apply_ingress(&env.client, &env.ns, with_annotations(
        simple_ingress("rewrite", &host("rw"), "/api(/|$)(.*)", "ImplementationSpecific", "web"),
        json!({"nginx.ingress.kubernetes.io/rewrite-target": "/$2", "nginx.ingress.kubernetes.io/x-forwarded-prefix": "/api"}),
    )).await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("approot", &host("ar"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/app-root": "/app1"}),
        ),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("moved", &host("mv"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/permanent-redirect": "https://elsewhere.example/",
               "nginx.ingress.kubernetes.io/permanent-redirect-code": "308"}),
        ),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("small", &host("sm"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/proxy-body-size": "10"}),
        ),
    )
    .await;
    let mut private = with_annotations(
        simple_ingress("private", &host("pv"), "/", "Prefix", "web"),
        json!({"nginx.ingress.kubernetes.io/whitelist-source-range": "10.0.0.0/8"}),
    );
    private["spec"]["rules"][0]["http"]["paths"]
        .as_array_mut()
        .expect("paths")
        .push(json!(
        {"path": "/.well-known/acme-challenge/t", "pathType": "Exact",
         "backend": {"service": {"name": "web", "port": {"name": "http"}}}}));
    apply_ingress(&env.client, &env.ns, private).await;

    eventually("rewrite served", WAIT, || async {
        get(http, &host("rw"), "/api/v1/items").await.status == 200
    })
    .await;
    let r = get(http, &host("rw"), "/API/v1/items?x=1").await;
    assert_eq!(
        r.json()["uri"],
        "/v1/items?x=1",
        "case-insensitive regex, capture group 2 rewritten, the query kept (as nginx's rewrite)"
    );
    assert_eq!(r.json()["headers"]["x-forwarded-prefix"], "/api");
    eventually("app-root", WAIT, || async {
        get(http, &host("ar"), "/").await.status == 302
    })
    .await;
    assert_eq!(
        get(http, &host("ar"), "/").await.headers["location"],
        "/app1"
    );
    assert_eq!(get(http, &host("ar"), "/app1").await.status, 200);
    eventually("permanent redirect", WAIT, || async {
        get(http, &host("mv"), "/x").await.status == 308
    })
    .await;
    assert_eq!(
        get(http, &host("mv"), "/x").await.headers["location"],
        "https://elsewhere.example/"
    );
    eventually("small served", WAIT, || async {
        get(http, &host("sm"), "/").await.status == 200
    })
    .await;
    let big = request(
        http,
        &host("sm"),
        "/",
        "POST",
        &[],
        bytes::Bytes::from(vec![b'x'; 11]),
    )
    .await;
    assert_eq!(big.status, 413);
    let ok = request(
        http,
        &host("sm"),
        "/",
        "POST",
        &[],
        bytes::Bytes::from(vec![b'x'; 10]),
    )
    .await;
    assert_eq!(ok.status, 200);
    eventually("private denied", WAIT, || async {
        get(http, &host("pv"), "/").await.status == 403
    })
    .await;
    assert_eq!(
        get(http, &host("pv"), "/.well-known/acme-challenge/t")
            .await
            .status,
        200,
        "HTTP-01 challenge paths are exempt from source-range limits"
    );
}

#[tokio::test]
async fn merge_oldest_wins_and_default_backends() {
    let env = env("merge", &[]).await;
    let (a, b) = (backend("old").await, backend("new").await);
    service(&env.client, &env.ns, "old", &[a], &[]).await;
    service(&env.client, &env.ns, "new", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    let http = env.running.http;
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("first", &host, "/shared", "Prefix", "old"),
    )
    .await;
    // creationTimestamp has one-second resolution: make the second Ingress clearly younger.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut second = simple_ingress("second", &host, "/shared", "Prefix", "new");
    second["spec"]["rules"][0]["http"]["paths"].as_array_mut().expect("paths").push(json!(
        {"path": "/only-new", "pathType": "Exact", "backend": {"service": {"name": "new", "port": {"name": "http"}}}}));
    second["spec"]["defaultBackend"] =
        json!({"service": {"name": "new", "port": {"name": "http"}}});
    apply_ingress(&env.client, &env.ns, second).await;
    eventually("merged", WAIT, || async {
        get(http, &host, "/only-new").await.backend() == "new"
    })
    .await;
    assert_eq!(
        get(http, &host, "/shared/x").await.backend(),
        "old",
        "the oldest Ingress wins a conflict"
    );
    assert_eq!(
        get(http, &host, "/unmatched").await.backend(),
        "new",
        "spec.defaultBackend serves the host's unmatched paths"
    );
}

#[tokio::test]
async fn default_backend_service_flag() {
    let cluster = integration_tests::kube::Cluster::shared()
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace("defbe").await.expect("ns");
    let b = backend("custom-default").await;
    service(&client, &ns, "fallback", &[b], &[]).await;
    let flag = format!("--default-backend-service={ns}/fallback");
    let env = env("defbe2", &[&flag]).await;
    let http = env.running.http;
    eventually("custom default backend", WAIT, || async {
        get(http, "unmatched.example", "/").await.backend() == "custom-default"
    })
    .await;
}

#[tokio::test]
async fn cors_basic_auth_and_rate_limits() {
    use base64::Engine;
    let env = env("policies", &[]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let ns = env.ns.clone();
    let host = |p: &str| format!("{p}.{ns}.example");
    let http = env.running.http;
    // htpasswd -nbm foo bar style user (apr1), as `htpasswd -c auth foo` writes.
    let secret: k8s_openapi::api::core::v1::Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "basic-auth", "namespace": env.ns},
        "stringData": {"auth": "foo:$apr1$abcdefgh$FBwExRW4dCc8aL.OvjpIE1\n"}
    })).expect("secret");
    kube::Api::<k8s_openapi::api::core::v1::Secret>::namespaced(env.client.clone(), &env.ns)
        .create(&Default::default(), &secret)
        .await
        .expect("auth secret");

    let headers: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "extra-headers", "namespace": env.ns},
        "data": {"X-Household": "yes", "Cache-Control": "no-store"}
    }))
    .expect("configmap");
    kube::Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(env.client.clone(), &env.ns)
        .create(&Default::default(), &headers)
        .await
        .expect("custom headers configmap");
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("cors", &host("cors"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/enable-cors": "true",
               "nginx.ingress.kubernetes.io/cors-allow-origin": "https://app.example.com",
               "nginx.ingress.kubernetes.io/custom-headers": "extra-headers"}),
        ),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("auth", &host("auth"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/auth-type": "basic",
               "nginx.ingress.kubernetes.io/auth-secret": "basic-auth",
               "nginx.ingress.kubernetes.io/auth-realm": "Household"}),
        ),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("limited", &host("rl"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/limit-rps": "1",
               "nginx.ingress.kubernetes.io/limit-burst-multiplier": "2"}),
        ),
    )
    .await;

    eventually("cors served", WAIT, || async {
        get(http, &host("cors"), "/").await.status == 200
    })
    .await;
    let pre = request(
        http,
        &host("cors"),
        "/",
        "OPTIONS",
        &[("origin", "https://app.example.com")],
        Default::default(),
    )
    .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        pre.headers["access-control-allow-methods"],
        "GET, PUT, POST, DELETE, PATCH, OPTIONS"
    );
    let r = request(
        http,
        &host("cors"),
        "/",
        "GET",
        &[("origin", "https://app.example.com")],
        Default::default(),
    )
    .await;
    assert_eq!(
        r.headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert_eq!(
        r.headers["x-household"], "yes",
        "custom-headers on the response"
    );
    assert_eq!(r.headers["cache-control"], "no-store");
    let r = request(
        http,
        &host("cors"),
        "/",
        "GET",
        &[("origin", "https://evil.example")],
        Default::default(),
    )
    .await;
    assert!(r.headers.get("access-control-allow-origin").is_none());

    eventually("auth enforced", WAIT, || async {
        get(http, &host("auth"), "/").await.status == 401
    })
    .await;
    let r = get(http, &host("auth"), "/").await;
    assert_eq!(r.headers["www-authenticate"], "Basic realm=\"Household\"");
    let good = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("foo:password")
    );
    let bad = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("foo:nope")
    );
    assert_eq!(
        request(
            http,
            &host("auth"),
            "/",
            "GET",
            &[("authorization", &good)],
            Default::default()
        )
        .await
        .status,
        200
    );
    assert_eq!(
        request(
            http,
            &host("auth"),
            "/",
            "GET",
            &[("authorization", &bad)],
            Default::default()
        )
        .await
        .status,
        401
    );

    eventually("limited served", WAIT, || async {
        get(http, &host("rl"), "/").await.status == 200
    })
    .await;
    // Burst 2 (1 rps x 2): some of a quick run of 6 must be refused with 503.
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(get(http, &host("rl"), "/").await.status);
    }
    assert!(codes.contains(&503), "{codes:?}");
    assert!(
        codes.iter().filter(|c| **c == 200).count() <= 3,
        "{codes:?}"
    );
}

#[tokio::test]
async fn service_upstream_external_name_and_more_annotations() {
    let env = env("more", &[]).await;
    let ns = env.ns.clone();
    let host = |p: &str| format!("{p}.{ns}.example");
    let http = env.running.http;

    // service-upstream: the ClusterIP itself is the upstream (the test cluster's service range
    // is loopback, so a backend can listen on the ClusterIP without kube-proxy).
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "cip", "namespace": env.ns},
        "spec": {"ports": [{"name": "http", "port": 18099, "targetPort": 18099, "protocol": "TCP"}]}
    }))
    .expect("service");
    let svc =
        kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(env.client.clone(), &env.ns)
            .create(&Default::default(), &svc)
            .await
            .expect("service");
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).expect("cluster ip");
    let listener = tokio::net::TcpListener::bind((cluster_ip.as_str(), 18099))
        .await
        .expect("bind ClusterIP");
    serve_echo_on(listener, "cluster-ip");
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("cip", &host("cip"), "/", "Prefix", "cip"),
            json!({"nginx.ingress.kubernetes.io/service-upstream": "true",
               "nginx.ingress.kubernetes.io/upstream-vhost": "internal.example"}),
        ),
    )
    .await;
    eventually("ClusterIP upstream", WAIT, || async {
        get(http, &host("cip"), "/").await.backend() == "cluster-ip"
    })
    .await;
    assert_eq!(
        get(http, &host("cip"), "/").await.json()["headers"]["host"],
        "internal.example"
    );

    // ExternalName pointing at loopback is refused (503), as upstream refuses it.
    let ext: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "ext", "namespace": env.ns},
        "spec": {"type": "ExternalName", "externalName": "localhost", "ports": [{"name": "http", "port": 18099}]}
    })).expect("service");
    kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(env.client.clone(), &env.ns)
        .create(&Default::default(), &ext)
        .await
        .expect("external name service");
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("ext", &host("ext"), "/", "Prefix", "ext"),
    )
    .await;
    eventually("ExternalName refused", WAIT, || async {
        get(http, &host("ext"), "/").await.status == 503
    })
    .await;

    // temporal-redirect, denylist-source-range, limit-connections.
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    apply_ingress(&env.client, &env.ns, with_annotations(
        simple_ingress("tmp", &host("tmp"), "/", "Prefix", "web"),
        json!({"nginx.ingress.kubernetes.io/temporal-redirect": "https://maintenance.example/"}),
    )).await;
    apply_ingress(
        &env.client,
        &env.ns,
        with_annotations(
            simple_ingress("deny", &host("deny"), "/", "Prefix", "web"),
            json!({"nginx.ingress.kubernetes.io/denylist-source-range": "127.0.0.0/8"}),
        ),
    )
    .await;
    eventually("temporal redirect", WAIT, || async {
        get(http, &host("tmp"), "/").await.status == 302
    })
    .await;
    assert_eq!(
        get(http, &host("tmp"), "/").await.headers["location"],
        "https://maintenance.example/"
    );
    eventually("denied", WAIT, || async {
        get(http, &host("deny"), "/").await.status == 403
    })
    .await;
}
