//! TLS against the real kube-apiserver: SNI certificates from Secrets, the fake default
//! certificate, rotation without restart, invalid Secrets keeping the last good certificate,
//! ssl-redirect with the ACME challenge exemption, and ssl-reject-handshake via the ConfigMap.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use common::*;
use integration_tests::pki::TestCa;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

async fn tls_secret(client: &kube::Client, ns: &str, name: &str, cert: &str, key: &str) {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": ns},
        "stringData": {"tls.crt": cert, "tls.key": key}
    }))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch(
            name,
            &PatchParams::apply("ingress-tests").force(),
            &Patch::Apply(secret),
        )
        .await
        .expect("apply secret");
}

fn tls_ingress(host: &str, secret: &str) -> serde_json::Value {
    let mut ing = simple_ingress("secure", host, "/", "Prefix", "web");
    ing["spec"]["tls"] = json!([{"hosts": [host], "secretName": secret}]);
    ing["spec"]["rules"][0]["http"]["paths"]
        .as_array_mut()
        .expect("paths")
        .push(
            json!({"path": "/.well-known/acme-challenge/tok", "pathType": "ImplementationSpecific",
                     "backend": {"service": {"name": "web", "port": {"name": "http"}}}}),
        );
    ing
}

#[tokio::test]
async fn sni_certificates_rotation_redirects_and_fake_default() {
    let env = env("tls", &[]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    let ca = TestCa::new("test-ca").expect("ca");
    let leaf = ca.leaf(&host, &[&host]).expect("leaf");
    tls_secret(&env.client, &env.ns, "cert", &leaf.cert_pem, &leaf.key_pem).await;
    apply_ingress(&env.client, &env.ns, tls_ingress(&host, "cert")).await;
    let https = env.running.https;
    let http = env.running.http;

    // Our certificate for our SNI name, verified against the CA.
    eventually("certificate served", WAIT, || async {
        tls_get(https, &host, "/", Some(&ca.cert_pem))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let r = tls_get(https, &host, "/", Some(&ca.cert_pem))
        .await
        .expect("https");
    assert_eq!(r.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(
        r.headers
            .get("strict-transport-security")
            .and_then(|v| v.to_str().ok()),
        Some("max-age=31536000; includeSubDomains")
    );
    // Any other name: the fake certificate.
    let other = tls_get(https, "unknown.example", "/", None)
        .await
        .expect("https");
    let der = other.peer_cert.expect("peer cert");
    assert!(contains(
        &der,
        b"Kubernetes Ingress Controller Fake Certificate"
    ));
    assert_eq!(other.status, 404);

    // HTTP is redirected (308) because the Ingress has tls; the ACME path is not.
    let r = get(http, &host, "/page?x=1").await;
    assert_eq!(r.status, 308);
    assert_eq!(
        r.headers.get("location").and_then(|v| v.to_str().ok()),
        Some(format!("https://{host}:{}/page?x=1", https.port()).as_str())
    );
    // Conflicting framing is refused over TLS (HTTP/1.1) too.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut config = ingress::upstream::upstream_tls_config();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut tls = integration_tests::http::tls_connect(https, &host, config)
            .await
            .expect("tls");
        let raw = format!(
            "POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        );
        tls.write_all(raw.as_bytes()).await.expect("write");
        let mut buf = vec![0u8; 1024];
        let n = tls.read(&mut buf).await.expect("read");
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    let r = get(http, &host, "/.well-known/acme-challenge/tok").await;
    assert_eq!(r.status, 200, "challenge path exempt from ssl-redirect");

    // Rotation: a new certificate in the same Secret is served on new handshakes.
    let ca2 = TestCa::new("test-ca-2").expect("ca2");
    let leaf2 = ca2.leaf(&host, &[&host]).expect("leaf2");
    tls_secret(
        &env.client,
        &env.ns,
        "cert",
        &leaf2.cert_pem,
        &leaf2.key_pem,
    )
    .await;
    eventually("rotated certificate", WAIT, || async {
        tls_get(https, &host, "/", Some(&ca2.cert_pem))
            .await
            .is_ok()
    })
    .await;

    // An invalid Secret (key of another certificate) keeps the last good one and raises an Event.
    tls_secret(&env.client, &env.ns, "cert", &leaf.cert_pem, &leaf2.key_pem).await;
    let events =
        Api::<k8s_openapi::api::events::v1::Event>::namespaced(env.client.clone(), &env.ns);
    eventually("InvalidCertificate event", WAIT, || async {
        events
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("InvalidCertificate"))
            })
            .unwrap_or(false)
    })
    .await;
    let r = tls_get(https, &host, "/", Some(&ca2.cert_pem))
        .await
        .expect("last good cert kept");
    assert_eq!(r.status, 200);
    let metrics = env.mgr.encode_metrics().expect("metrics");
    let info = format!(
        "nginx_ingress_controller_ssl_certificate_info{{host=\"{host}\",secret_name=\"cert\""
    );
    assert!(metrics.contains(&info), "{info} missing in:\n{metrics}");
}

#[tokio::test]
async fn configmap_reject_handshake_and_bad_values() {
    let cluster = integration_tests::kube::Cluster::shared()
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("client");
    let cm_ns = cluster.namespace("cm").await.expect("ns");
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &cm_ns);
    let apply = |data: serde_json::Value| {
        let cms = cms.clone();
        let ns = cm_ns.clone();
        async move {
            let cm: ConfigMap = serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": "ingress-nginx-controller", "namespace": ns},
                "data": data
            }))
            .expect("cm");
            cms.patch(
                "ingress-nginx-controller",
                &PatchParams::apply("ingress-tests").force(),
                &Patch::Apply(cm),
            )
            .await
            .expect("apply cm");
        }
    };
    apply(json!({"ssl-reject-handshake": "true", "ssl-redirect": "false"})).await;
    let flag = format!("--configmap={cm_ns}/ingress-nginx-controller");
    let env = env("cmtest", &[&flag]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    let ca = TestCa::new("ca").expect("ca");
    let leaf = ca.leaf(&host, &[&host]).expect("leaf");
    tls_secret(&env.client, &env.ns, "cert", &leaf.cert_pem, &leaf.key_pem).await;
    apply_ingress(&env.client, &env.ns, tls_ingress(&host, "cert")).await;
    let (https, http) = (env.running.https, env.running.http);
    eventually("served", WAIT, || async {
        tls_get(https, &host, "/", Some(&ca.cert_pem)).await.is_ok()
    })
    .await;
    assert!(
        tls12_handshake(https, &host).await.is_ok(),
        "TLS 1.2 on by default"
    );
    // Unknown names get no certificate at all.
    assert!(tls_get(https, "unknown.example", "/", None).await.is_err());
    // ssl-redirect off globally: HTTP is served.
    assert_eq!(get(http, &host, "/").await.status, 200);

    // A bad value: the whole new ConfigMap is refused, the last good one stays, an Event says why.
    apply(json!({"ssl-reject-handshake": "true", "ssl-redirect": "perhaps"})).await;
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), &cm_ns);
    eventually("InvalidConfiguration event", WAIT, || async {
        events
            .list(&Default::default())
            .await
            .map(|l| {
                l.items
                    .iter()
                    .any(|e| e.reason.as_deref() == Some("InvalidConfiguration"))
            })
            .unwrap_or(false)
    })
    .await;
    assert_eq!(
        get(http, &host, "/").await.status,
        200,
        "last good config kept"
    );
    let metrics = env.mgr.encode_metrics().expect("metrics");
    assert!(
        metrics.contains("nginx_ingress_controller_config_last_reload_successful 0"),
        "{metrics}"
    );

    // A good value again takes effect, including TLS listener settings (no restart).
    apply(json!({"ssl-reject-handshake": "false", "ssl-redirect": "true", "ssl-protocols": "TLSv1.3"})).await;
    eventually("redirect back on", WAIT, || async {
        get(http, &host, "/").await.status == 308
    })
    .await;
    let r = tls_get(https, "unknown.example", "/", None)
        .await
        .expect("fake cert again");
    assert!(
        tls12_handshake(https, &host).await.is_err(),
        "TLS 1.2 off after ssl-protocols: TLSv1.3, without a restart"
    );
    assert!(contains(
        &r.peer_cert.expect("cert"),
        b"Kubernetes Ingress Controller Fake Certificate"
    ));
    let metrics = env.mgr.encode_metrics().expect("metrics");
    for name in [
        "nginx_ingress_controller_requests",
        "nginx_ingress_controller_request_duration_seconds",
        "nginx_ingress_controller_config_last_reload_successful 1",
        "nginx_ingress_controller_build_info",
    ] {
        assert!(metrics.contains(name), "{name} missing in:\n{metrics}");
    }
}

async fn tls12_handshake(addr: std::net::SocketAddr, sni: &str) -> Result<(), std::io::Error> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .expect("tls12")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    match integration_tests::http::tls_connect(addr, sni, config).await {
        // An unknown-CA failure means the TLS 1.2 handshake itself went through.
        Err(e) if e.to_string().contains("UnknownIssuer") => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Ok(()),
    }
}

#[tokio::test]
async fn default_ssl_certificate_force_redirect_and_rotation_keeps_open_connections() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;

    let cluster = integration_tests::kube::Cluster::shared()
        .await
        .expect("cluster");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace("defcert").await.expect("ns");
    let ca = TestCa::new("default-ca").expect("ca");
    let def = ca
        .leaf("default.example", &["default.example"])
        .expect("leaf");
    tls_secret(&client, &ns, "default-cert", &def.cert_pem, &def.key_pem).await;
    let flag = format!("--default-ssl-certificate={ns}/default-cert");
    let env = env("defcert2", &[&flag]).await;
    let b = backend("web").await;
    service(&env.client, &env.ns, "web", &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    let (https, http) = (env.running.https, env.running.http);

    // Unknown names get the --default-ssl-certificate, not the fake one.
    eventually("default certificate", WAIT, || async {
        tls_get(https, "default.example", "/", Some(&ca.cert_pem))
            .await
            .is_ok()
    })
    .await;

    // force-ssl-redirect redirects even without tls on the Ingress.
    let mut ing = simple_ingress("forced", &host, "/", "Prefix", "web");
    ing["metadata"]["annotations"] =
        json!({"nginx.ingress.kubernetes.io/force-ssl-redirect": "true"});
    apply_ingress(&env.client, &env.ns, ing).await;
    eventually("forced redirect", WAIT, || async {
        get(http, &host, "/").await.status == 308
    })
    .await;

    // A connection opened before a certificate rotation keeps working after it.
    let leaf = ca.leaf(&host, &[&host]).expect("leaf");
    tls_secret(&env.client, &env.ns, "site", &leaf.cert_pem, &leaf.key_pem).await;
    let mut with_tls = simple_ingress("forced", &host, "/", "Prefix", "web");
    with_tls["spec"]["tls"] = json!([{"hosts": [host], "secretName": "site"}]);
    apply_ingress(&env.client, &env.ns, with_tls).await;
    eventually("site certificate", WAIT, || async {
        tls_get(https, &host, "/", Some(&ca.cert_pem))
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;
    let config = integration_tests::http::tls_config(Some(&ca.cert_pem)).expect("CA PEM");
    let tls = integration_tests::http::tls_connect(https, &host, config)
        .await
        .expect("handshake");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("h1");
    tokio::spawn(conn);
    let send = |sender: &mut hyper::client::conn::http1::SendRequest<Full<bytes::Bytes>>| {
        let req = http::Request::get("/")
            .header("host", host.as_str())
            .body(Full::new(bytes::Bytes::new()))
            .expect("req");
        sender.send_request(req)
    };
    assert_eq!(send(&mut sender).await.expect("before").status(), 200);
    let ca2 = TestCa::new("rotated-ca").expect("ca2");
    let leaf2 = ca2.leaf(&host, &[&host]).expect("leaf2");
    tls_secret(
        &env.client,
        &env.ns,
        "site",
        &leaf2.cert_pem,
        &leaf2.key_pem,
    )
    .await;
    eventually("rotated", WAIT, || async {
        tls_get(https, &host, "/", Some(&ca2.cert_pem))
            .await
            .is_ok()
    })
    .await;
    sender.ready().await.expect("connection still open");
    let after = send(&mut sender)
        .await
        .expect("after rotation on the same connection");
    assert_eq!(after.status(), 200);
    let _ = after.into_body().collect().await;
}
