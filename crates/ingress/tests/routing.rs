//! Routing against the real kube-apiserver: Ingress + Service + EndpointSlice in, traffic out.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn routes_host_and_path_with_upstream_headers() {
    let env = env("route", &[]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("web", &host, "/app", "Prefix", "web"),
    )
    .await;
    let http = env.running.http;
    eventually("route served", WAIT, || async {
        get(http, &host, "/app/x").await.status == 200
    })
    .await;

    let r = get(http, &host, "/app/x?q=1").await;
    let j = r.json();
    assert_eq!(j["backend"], "web");
    assert_eq!(j["uri"], "/app/x?q=1");
    let h = &j["headers"];
    assert_eq!(h["host"], host.as_str());
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-real-ip"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], host.as_str());
    assert_eq!(h["x-forwarded-port"], http.port().to_string());
    assert_eq!(h["x-request-id"].as_str().map(str::len), Some(32));
    // Element-wise prefix: /appx is not under /app.
    assert_eq!(get(http, &host, "/appx").await.status, 404);
    // CONNECT and TRACE never reach the upstream (nginx answers 405), and a HEAD's empty
    // answer leaves the pooled upstream connection usable.
    let trace = format!("TRACE /app/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert!(
        raw_exchange(http, trace.as_bytes())
            .await
            .starts_with("HTTP/1.1 405")
    );
    let connect =
        format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\nConnection: close\r\n\r\n");
    assert!(
        raw_exchange(http, connect.as_bytes())
            .await
            .starts_with("HTTP/1.1 405")
    );
    let head = format!("HEAD /app/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    assert!(
        raw_exchange(http, head.as_bytes())
            .await
            .starts_with("HTTP/1.1 200")
    );
    assert_eq!(get(http, &host, "/app/x").await.status, 200);
    // Unknown host: the built-in default backend.
    let r = get(http, "nothing.example", "/").await;
    assert_eq!(
        (r.status, r.body.as_ref()),
        (404, &b"default backend - 404\n"[..])
    );
    assert_eq!(get(http, "nothing.example", "/healthz").await.status, 200);
    // Duration and size are measured when the body ends (as nginx's $request_time/$bytes_sent).
    let metrics = env.mgr.encode_metrics().expect("metrics");
    let size_line = metrics
        .lines()
        .find(|l| {
            l.starts_with("nginx_ingress_controller_response_size_sum{status=\"200\"")
                && l.contains(&format!("host=\"{host}\""))
                && l.contains("method=\"GET\"")
        })
        .unwrap_or_else(|| panic!("no response_size for {host} in:\n{metrics}"));
    let sum: f64 = size_line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .expect("sum");
    assert!(sum > 100.0, "{size_line}");

    // `Proxy` is stripped (httpoxy); a given X-Request-ID is kept.
    let r = request(
        http,
        &host,
        "/app",
        "GET",
        &[("proxy", "http://evil"), ("x-request-id", "abc")],
        Default::default(),
    )
    .await;
    assert!(r.json()["headers"].get("proxy").is_none());
    assert_eq!(r.json()["headers"]["x-request-id"], "abc");
    // Conflicting framing (sent raw: HTTP clients refuse to write it) is refused with 400, as
    // nginx does, and the connection closes: nothing after it is served.
    let raw = format!(
        "POST /app HTTP/1.1\r\nHost: {host}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: {host}\r\n\r\n"
    );
    let reply = raw_exchange(http, raw.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(!reply.contains("/smuggled"), "{reply}");
    // Keep-alive requests with bodies before and after are unaffected.
    let raw = format!(
        "POST /app HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\n\r\nabcPOST /app HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\nGET /app/last HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    );
    let reply = raw_exchange_all(http, raw.as_bytes()).await;
    assert_eq!(reply.matches("HTTP/1.1 200").count(), 3, "{reply}");
    // A Content-Length repeated with the same value is one length (RFC 9110 §8.6 lets a
    // recipient take it as one; nginx refuses it): passed on once, never as two fields.
    let raw = format!(
        "POST /app HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc"
    );
    let reply = raw_exchange(http, raw.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(
        reply.contains(r#""body_len":3,"headers":{"content-length":"3","#),
        "{reply}"
    );
    // Different values are refused.
    let raw = format!(
        "POST /app HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd"
    );
    let reply = raw_exchange(http, raw.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    let raw = format!("POST /app HTTP/1.1\r\nHost: {host}\r\nTransfer-Encoding: gzip\r\n\r\n");
    assert!(
        raw_exchange(http, raw.as_bytes())
            .await
            .starts_with("HTTP/1.1 400")
    );
}

/// Method and Host are the client's: a loop of invented ones must not add a metric series
/// each (memory would grow without bound). Rule hosts label series; others are folded.
#[tokio::test]
async fn metric_labels_a_client_controls_stay_bounded() {
    let env = env("labels", &[]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let wildcard = format!("*.{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("web", &wildcard, "/", "Prefix", "web"),
    )
    .await;
    let http = env.running.http;
    let probe = format!("probe.{}.example", env.ns);
    eventually("wildcard served", WAIT, || async {
        get(http, &probe, "/").await.status == 200
    })
    .await;
    let series = |m: &str| {
        m.lines()
            .filter(|l| l.starts_with("nginx_ingress_controller_requests{"))
            .count()
    };
    let before = series(&env.mgr.encode_metrics().expect("metrics"));
    for i in 0..200 {
        let host = format!("h{i}.{}.example", env.ns);
        let r = request(http, &host, "/", &format!("M{i}"), &[], Default::default()).await;
        assert_eq!(r.status, 200, "{host}");
        get(http, &format!("nowhere{i}.example"), "/").await;
    }
    let m = env.mgr.encode_metrics().expect("metrics");
    // New series: UNKNOWN 200 on the wildcard rule, GET 404 on the default backend.
    assert!(series(&m) <= before + 2, "{m}");
    assert!(!m.contains("h17.") && !m.contains("nowhere17"), "{m}");
    assert!(m.contains("method=\"UNKNOWN\""), "{m}");
}

/// Shutdown: the listeners close at once (a second instance can take the port), requests in
/// flight still complete, and the servers end when their connections have drained.
#[tokio::test]
async fn shutdown_refuses_new_connections_and_finishes_requests_in_flight() {
    let mut env = env("drain", &[]).await;
    let host = serve_backend(&env, "web").await;
    let http = env.running.http;
    let in_flight = tokio::spawn({
        let host = host.clone();
        async move { get(http, &host, "/slow").await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    env.shutdown.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(http).await.is_err(),
        "new connections refused once draining"
    );
    let r = in_flight.await.expect("request task");
    assert_eq!(r.status, 200, "the request in flight completed");
    for server in std::mem::take(&mut env.running.servers) {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("drained")
            .expect("server task");
    }
}

/// Shutdown closes keep-alive connections waiting between requests (parked without a task)
/// at once, plain and TLS, as nginx closes its idle connections when it stops; the drain does
/// not wait for their keep-alive timeout.
#[tokio::test]
async fn shutdown_closes_idle_keep_alive_connections() {
    let mut env = env("drain-idle", &[]).await;
    let host = serve_backend(&env, "web").await;
    let plain = tokio::net::TcpStream::connect(env.running.http)
        .await
        .expect("connect");
    let tls = tls_any_cert(env.running.https, &host).await;
    let mut senders = vec![
        http1_client(hyper_util::rt::TokioIo::new(plain)).await,
        http1_client(hyper_util::rt::TokioIo::new(tls)).await,
    ];
    for sender in &mut senders {
        let req = http::Request::get("/")
            .header("host", host.as_str())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .expect("request");
        let resp = sender.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), 200);
        http_body_util::BodyExt::collect(resp.into_body())
            .await
            .expect("body");
    }
    // Idle for longer than the grace: both are parked.
    tokio::time::sleep(ingress::keepalive::GRACE * 10).await;
    env.shutdown.cancel();
    eventually("idle connections closed by the proxy", WAIT, || async {
        senders.iter().all(|s| s.is_closed())
    })
    .await;
    for server in std::mem::take(&mut env.running.servers) {
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("drained")
            .expect("server task");
    }
}

/// `--shutdown-grace-period` (ingress-nginx's flag): after the signal, new connections are still
/// served for the grace period while `/readyz` fails; then the listeners close.
#[tokio::test]
async fn shutdown_grace_period_keeps_serving_while_not_ready() {
    let env = env("grace", &["--shutdown-grace-period=2"]).await;
    let host = serve_backend(&env, "web").await;
    let (http, health) = (env.running.http, env.running.health);
    assert_eq!(get(health, "health", "/readyz").await.status, 200);
    env.shutdown.cancel();
    eventually("not ready once shutting down", WAIT, || async {
        get(health, "health", "/readyz").await.status == 503
    })
    .await;
    assert_eq!(
        get(http, &host, "/").await.status,
        200,
        "a new connection in the grace period is served"
    );
    eventually("listeners closed after the grace period", WAIT, || async {
        tokio::net::TcpStream::connect(http).await.is_err()
    })
    .await;
}

/// Issue 13: hand-over on one node. A second instance binds the same ports (SO_REUSEPORT, as
/// ingress-nginx's `reuse-port`); the first gets the shutdown signal with a grace period while
/// clients keep opening connections and a slow request is in flight. No request fails, and
/// requests keep succeeding after the first instance has stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_instance_takes_over_the_ports_without_a_failed_request() {
    let mut first = env("handover", &["--shutdown-grace-period=1"]).await;
    let host = serve_backend(&first, "web").await;
    let (http, https) = (first.running.http, first.running.https);
    // A connection to the first instance (the only one yet), for a request in flight when it
    // is told to stop.
    let stream = tokio::net::TcpStream::connect(http).await.expect("connect");
    let (mut to_first, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("handshake");
    tokio::spawn(conn);
    let ports = [
        format!("--http-port={}", http.port()),
        format!("--https-port={}", https.port()),
    ];
    let second = env("handover-b", &[&ports[0], &ports[1]]).await;
    eventually("the second instance routes the host", WAIT, || async {
        let snap = second.running.proxy.snapshot();
        ingress::proxy::route(&snap, &host, "/").0.ingress.is_some()
    })
    .await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, host) = (stop.clone(), host.clone());
            tokio::spawn(async move {
                let (mut sent, mut failed) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    // A new connection each time; a refused or reset one panics in `get`.
                    let host = host.clone();
                    let r = tokio::spawn(async move { get(http, &host, "/").await }).await;
                    sent += 1;
                    if !r.is_ok_and(|r| r.status == 200) {
                        failed += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (sent, failed)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let slow = http::Request::get("/slow")
        .header("host", host.as_str())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .expect("request");
    let in_flight = tokio::spawn(async move { to_first.send_request(slow).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A burst of new connections right as the first instance stops (and closes its listener
    // a grace period later), on top of the steady clients.
    let burst: Vec<_> = (0..50)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(30 * i)).await;
                get(http, &host, "/").await.status
            })
        })
        .collect();
    first.shutdown.cancel();
    for server in std::mem::take(&mut first.running.servers) {
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the first instance drains")
            .expect("server task");
    }
    // The first instance has stopped: these are all the second's.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut sent, mut failed) = (0, 0);
    for c in clients {
        let (s, f) = c.await.expect("client");
        sent += s;
        failed += f;
    }
    let slow = in_flight
        .await
        .expect("slow request task")
        .expect("answered");
    assert_eq!(
        slow.status(),
        200,
        "the request in flight on the first instance completed"
    );
    for b in burst {
        assert_eq!(b.await.expect("burst request"), 200);
    }
    assert!(sent > 100, "clients ran throughout: {sent}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed in the hand-over"
    );
}

#[tokio::test]
async fn endpoints_follow_slices_round_robin_ready_only() {
    let env = env("eps", &[]).await;
    let (a, b) = (backend("a").await, backend("b").await);
    // Two endpoints need two IPs: 127.0.0.1 and 127.0.0.2 both reach loopback backends only if
    // the backend binds all of 127/8; ours bind 127.0.0.1, so use distinct ports per slice.
    service(&env.client, &env.ns, "svc", &[a], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("svc", &host, "/", "Prefix", "svc"),
    )
    .await;
    let http = env.running.http;
    eventually("a served", WAIT, || async {
        get(http, &host, "/").await.backend() == "a"
    })
    .await;

    // Endpoint change: b replaces a, without touching the Ingress.
    set_endpoints(&env.client, &env.ns, "svc", &[b], &[]).await;
    eventually("b served", WAIT, || async {
        get(http, &host, "/").await.backend() == "b"
    })
    .await;

    // Not ready: no endpoints left → 503.
    set_endpoints(&env.client, &env.ns, "svc", &[], &[b]).await;
    eventually("503 without ready endpoints", WAIT, || async {
        get(http, &host, "/").await.status == 503
    })
    .await;
}

#[tokio::test]
async fn class_selection() {
    let env = env("class", &[]).await;
    let b = backend("c").await;
    service(&env.client, &env.ns, "c", &[b], &[]).await;
    ensure_class(&env.client, "someone-else", "example.com/other").await;
    let ns = env.ns.clone();
    let mk = |name: &str, class: serde_json::Value, annotation: Option<&str>| {
        let mut ing = simple_ingress(name, &format!("{name}.{ns}.example"), "/", "Prefix", "c");
        if class.is_null() {
            ing["spec"]
                .as_object_mut()
                .expect("spec")
                .remove("ingressClassName");
        } else {
            ing["spec"]["ingressClassName"] = class;
        }
        if let Some(a) = annotation {
            ing["metadata"]["annotations"] = json!({"kubernetes.io/ingress.class": a});
        }
        ing
    };
    apply_ingress(&env.client, &env.ns, mk("by-class", json!("nginx"), None)).await;
    apply_ingress(
        &env.client,
        &env.ns,
        mk("other-class", json!("someone-else"), None),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        mk("by-annotation", serde_json::Value::Null, Some("nginx")),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        mk("other-annotation", serde_json::Value::Null, Some("traefik")),
    )
    .await;
    apply_ingress(
        &env.client,
        &env.ns,
        mk("no-class", serde_json::Value::Null, None),
    )
    .await;
    let http = env.running.http;
    let host = |n: &str| format!("{n}.{}.example", env.ns);
    eventually("classed served", WAIT, || async {
        get(http, &host("by-class"), "/").await.status == 200
    })
    .await;
    assert_eq!(get(http, &host("by-annotation"), "/").await.status, 200);
    assert_eq!(get(http, &host("other-class"), "/").await.status, 404);
    assert_eq!(get(http, &host("other-annotation"), "/").await.status, 404);
    assert_eq!(get(http, &host("no-class"), "/").await.status, 404);

    // --watch-ingress-without-class picks up the unclassed one (a second controller).
    let open = env_with_ns(&env, &["--watch-ingress-without-class"]).await;
    eventually("unclassed served", WAIT, || async {
        get(open.running.http, &host("no-class"), "/").await.status == 200
    })
    .await;
    assert_eq!(
        get(open.running.http, &host("other-annotation"), "/")
            .await
            .status,
        404
    );
}

/// Another controller instance on the same cluster.
async fn env_with_ns(_env: &Env, args: &[&str]) -> Env {
    env("class2", args).await
}

#[tokio::test]
async fn invalid_ingress_keeps_last_good_version_and_raises_event() {
    let env = env("invalid", &[]).await;
    let b = backend("v").await;
    service(&env.client, &env.ns, "v", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("v", &host, "/good", "Prefix", "v"),
    )
    .await;
    let http = env.running.http;
    eventually("good served", WAIT, || async {
        get(http, &host, "/good").await.status == 200
    })
    .await;
    // A bad annotation value and a snippet: the new version is refused, the old one stays.
    let mut bad = simple_ingress("v", &host, "/new", "Prefix", "v");
    bad["metadata"]["annotations"] = json!({
        "nginx.ingress.kubernetes.io/proxy-body-size": "lots",
        "nginx.ingress.kubernetes.io/configuration-snippet": "return 200;"
    });
    apply_ingress(&env.client, &env.ns, bad).await;
    let events =
        kube::Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.client.clone(), &env.ns);
    eventually("InvalidIngress event", WAIT, || async {
        events
            .list(&Default::default())
            .await
            .map(|l| {
                l.items.iter().any(|e| {
                    e.reason.as_deref() == Some("InvalidIngress")
                        && e.note
                            .as_deref()
                            .is_some_and(|n| n.contains("proxy-body-size") && n.contains("snippet"))
                })
            })
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        get(http, &host, "/good").await.status,
        200,
        "last good version still served"
    );
    assert_eq!(get(http, &host, "/new").await.status, 404);
}

#[tokio::test]
async fn publish_service_address_goes_to_ingress_status() {
    let cluster = integration_tests::kube::Cluster::shared()
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace("publish").await.expect("ns");
    let b = backend("p").await;
    service(&client, &ns, "controller", &[b], &[]).await;
    let svc = kube::Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), &ns)
        .get("controller")
        .await
        .expect("service");
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).expect("cluster ip");
    let publish = format!("--publish-service={ns}/controller");
    let lease_ns = format!("--leader-election-namespace={ns}");
    let env = env("publish2", &[&publish, "--leader-elect=true", &lease_ns]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("mine", &host, "/", "Prefix", "p"),
    )
    .await;
    let mut other = simple_ingress("theirs", &format!("other.{host}"), "/", "Prefix", "p");
    other["spec"]["ingressClassName"] = json!("someone-else");
    ensure_class(&env.client, "someone-else", "example.com/other").await;
    apply_ingress(&env.client, &env.ns, other).await;
    let api = kube::Api::<k8s_openapi::api::networking::v1::Ingress>::namespaced(
        env.client.clone(),
        &env.ns,
    );
    let status_ip = |name: &'static str| {
        let api = api.clone();
        async move {
            api.get(name)
                .await
                .ok()
                .and_then(|i| i.status?.load_balancer?.ingress?.first()?.ip.clone())
        }
    };
    eventually("status published", WAIT, || async {
        status_ip("mine").await.as_deref() == Some(cluster_ip.as_str())
    })
    .await;
    assert_eq!(
        status_ip("theirs").await,
        None,
        "another class's Ingress is left alone"
    );
    let lease =
        kube::Api::<k8s_openapi::api::coordination::v1::Lease>::namespaced(env.client.clone(), &ns)
            .get("ingress-nginx-leader")
            .await
            .expect("status writer holds the election-id Lease");
    assert!(lease.spec.and_then(|s| s.holder_identity).is_some());
}

/// features/load_balancing.feature: requests spread over all ready endpoints; with
/// `affinity: cookie` a client sticks to one.
#[tokio::test]
async fn round_robin_and_cookie_affinity() {
    let env = env("lb", &[]).await;
    let (a, b) = backend_pair("a", "b").await;
    service(&env.client, &env.ns, "pair", &[a, b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("rr", &host, "/", "Prefix", "pair"),
    )
    .await;
    let mut sticky = simple_ingress("sticky", &format!("sticky.{host}"), "/", "Prefix", "pair");
    sticky["metadata"]["annotations"] = json!({
        "nginx.ingress.kubernetes.io/affinity": "cookie",
        "nginx.ingress.kubernetes.io/session-cookie-name": "route",
        "nginx.ingress.kubernetes.io/session-cookie-max-age": "172800"
    });
    apply_ingress(&env.client, &env.ns, sticky).await;
    let http = env.running.http;
    eventually("served", WAIT, || async {
        get(http, &host, "/").await.status == 200
    })
    .await;
    let mut seen = std::collections::BTreeMap::new();
    for _ in 0..10 {
        *seen
            .entry(get(http, &host, "/").await.backend())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.get("a"), Some(&5), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&5), "{seen:?}");

    let shost = format!("sticky.{host}");
    eventually("sticky served", WAIT, || async {
        get(http, &shost, "/").await.status == 200
    })
    .await;
    let first = get(http, &shost, "/").await;
    let cookie = first.headers["set-cookie"]
        .to_str()
        .expect("cookie")
        .to_string();
    assert!(
        cookie.starts_with("route=")
            && cookie.contains("Max-Age=172800")
            && cookie.contains("HttpOnly"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().expect("pair").to_string();
    for _ in 0..6 {
        let r = request(
            http,
            &shost,
            "/",
            "GET",
            &[("cookie", &pair)],
            Default::default(),
        )
        .await;
        assert_eq!(r.backend(), first.backend(), "sticks to one upstream");
        assert!(r.headers.get("set-cookie").is_none());
    }
    // A cookie naming an upstream that is gone: a new one is chosen and set.
    let r = request(
        http,
        &shost,
        "/",
        "GET",
        &[("cookie", "route=0000000000000000")],
        Default::default(),
    )
    .await;
    assert_eq!(r.status, 200);
    assert!(r.headers.get("set-cookie").is_some());
}

#[tokio::test]
async fn forwarded_headers_from_a_trusted_balancer() {
    let flag = controller_configmap(
        "cm",
        json!({"use-forwarded-headers": "true", "compute-full-forwarded-for": "true"}),
    )
    .await;
    let env = env("fwd", &[&flag]).await;
    let b = backend("f").await;
    service(&env.client, &env.ns, "f", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("f", &host, "/", "Prefix", "f"),
    )
    .await;
    let http = env.running.http;
    eventually("served", WAIT, || async {
        get(http, &host, "/").await.status == 200
    })
    .await;
    let r = request(
        http,
        &host,
        "/",
        "GET",
        &[
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-port", "443"),
        ],
        Default::default(),
    )
    .await;
    let h = &r.json()["headers"];
    assert_eq!(h["x-real-ip"], "203.0.113.7");
    assert_eq!(h["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(h["x-original-forwarded-for"], "203.0.113.7");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-port"], "443");
}

#[tokio::test]
async fn keep_alive_closes_idle_client_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let flag = controller_configmap("cm", json!({"keep-alive": "1"})).await;
    let env = env("ka", &[&flag]).await;
    let b = backend("k").await;
    service(&env.client, &env.ns, "k", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("k", &host, "/", "Prefix", "k"),
    )
    .await;
    let http = env.running.http;
    eventually("served", WAIT, || async {
        get(http, &host, "/").await.status == 200
    })
    .await;

    let mut s = tokio::net::TcpStream::connect(http).await.expect("connect");
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n");
    let mut buf = vec![0u8; 8192];
    for _ in 0..3 {
        // Requests 0.5 s apart keep the connection open.
        s.write_all(req.as_bytes()).await.expect("write");
        let n = s.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // Idle past keep-alive: the proxy closes it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "idle connection closed by the proxy");
}
