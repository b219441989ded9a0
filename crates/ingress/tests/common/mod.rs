//! Shared pieces of the ingress tests: an in-process controller against the real apiserver,
//! echo backends, and raw HTTP/HTTPS clients that set Host and SNI freely.
#![allow(clippy::unwrap_used)] // test code
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ingress::app::Running;
use ingress::cli::Args;
use integration_tests::kube::Cluster;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::{Api, Client};
use kube_common::Manager;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub use integration_tests::poll::eventually;

pub struct Env {
    pub client: Client,
    pub ns: String,
    pub running: Running,
    pub shutdown: CancellationToken,
    pub mgr: Manager,
}

impl Drop for Env {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A controller in this process, watching the shared test cluster, listening on free ports.
pub async fn env(prefix: &str, extra_args: &[&str]) -> Env {
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace(prefix).await.expect("namespace");
    ensure_class(&client, "nginx", "k8s.io/ingress-nginx").await;
    let args = Args::parse_from(integration_tests::ingress::controller_args(extra_args));
    let shutdown = CancellationToken::new();
    let mgr = Manager::new("ingress-nginx", client.clone(), shutdown.clone());
    let running = ingress::app::start(&mgr, &args)
        .await
        .expect("controller starts");
    eventually("controller ready", Duration::from_secs(30), || async {
        mgr.readiness.is_ready()
    })
    .await;
    Env {
        client,
        ns,
        running,
        shutdown,
        mgr,
    }
}

pub async fn ensure_class(client: &Client, name: &str, controller: &str) {
    integration_tests::kube::ensure_ingress_class(client, name, controller)
        .await
        .expect("IngressClass");
}

/// An HTTP backend answering with its name, the path it saw, and the request headers.
pub async fn backend(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind backend");
    serve_echo(name, listener)
}

/// Two echo backends on 127.0.0.1 and 127.0.0.2 with the same port, so that one
/// EndpointSlice port can list both (as two pods of one Service).
pub async fn backend_pair(a: &'static str, b: &'static str) -> (SocketAddr, SocketAddr) {
    for _ in 0..20 {
        let first = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let port = first.local_addr().expect("addr").port();
        if let Ok(second) = TcpListener::bind(("127.0.0.2", port)).await {
            return (serve_echo(a, first), serve_echo(b, second));
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.2");
}

/// Serves the echo backend on an already bound listener.
pub fn serve_echo_on(listener: TcpListener, name: &'static str) -> SocketAddr {
    serve_echo(name, listener)
}

fn serve_echo(name: &'static str, listener: TcpListener) -> SocketAddr {
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    let headers: BTreeMap<String, String> = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    let uri = req.uri().to_string();
                    // A request that takes a while, to catch one in flight.
                    if uri.starts_with("/slow") {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    let body = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes().len())
                        .unwrap_or(0);
                    let reply =
                        json!({"backend": name, "uri": uri, "headers": headers, "body_len": body});
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(reply.to_string()))))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// A Service without selector plus an EndpointSlice (in the API version the server serves)
/// pointing at `addrs`, all ready unless listed in `not_ready`.
pub async fn service(
    client: &Client,
    ns: &str,
    name: &str,
    addrs: &[SocketAddr],
    not_ready: &[SocketAddr],
) {
    let port = addrs.first().map(|a| a.port()).unwrap_or(8080);
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}]}
    }))
    .expect("service");
    let api: Api<Service> = Api::namespaced(client.clone(), ns);
    let _ = api.create(&PostParams::default(), &svc).await;
    set_endpoints(client, ns, name, addrs, not_ready).await;
}

pub async fn set_endpoints(
    client: &Client,
    ns: &str,
    name: &str,
    addrs: &[SocketAddr],
    not_ready: &[SocketAddr],
) {
    let ar = ingress::endpoints::slice_resource(client)
        .await
        .expect("slice api");
    let port = addrs
        .first()
        .or(not_ready.first())
        .map(|a| a.port())
        .unwrap_or(8080);
    let endpoints: Vec<Value> =
        addrs
            .iter()
            .map(|a| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": true}}))
            .chain(not_ready.iter().map(
                |a| json!({"addresses": [a.ip().to_string()], "conditions": {"ready": false}}),
            ))
            .collect();
    let slice = json!({
        "apiVersion": ar.api_version, "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-slice"), "namespace": ns,
                     "labels": {"kubernetes.io/service-name": name}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": endpoints,
    });
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ar);
    api.patch(
        &format!("{name}-slice"),
        &PatchParams::apply("ingress-tests").force(),
        &Patch::Apply(slice),
    )
    .await
    .expect("apply EndpointSlice");
}

/// Server-side applies an Ingress given as JSON (metadata.namespace is filled in).
pub async fn apply_ingress(client: &Client, ns: &str, mut ingress: Value) -> Ingress {
    ingress["apiVersion"] = json!("networking.k8s.io/v1");
    ingress["kind"] = json!("Ingress");
    ingress["metadata"]["namespace"] = json!(ns);
    let name = ingress["metadata"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let api: Api<Ingress> = Api::namespaced(client.clone(), ns);
    api.patch(
        &name,
        &PatchParams::apply("ingress-tests").force(),
        &Patch::Apply(ingress),
    )
    .await
    .expect("apply Ingress")
}

/// A simple Ingress: one host, one path, one service port `http`.
pub fn simple_ingress(name: &str, host: &str, path: &str, path_type: &str, service: &str) -> Value {
    json!({
        "metadata": {"name": name},
        "spec": {"ingressClassName": "nginx", "rules": [{"host": host, "http": {"paths": [
            {"path": path, "pathType": path_type,
             "backend": {"service": {"name": service, "port": {"name": "http"}}}}
        ]}}]}
    })
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    /// DER of the server's leaf certificate (TLS only).
    pub peer_cert: Option<Vec<u8>>,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    pub fn backend(&self) -> String {
        self.json()["backend"].as_str().unwrap_or("").to_string()
    }
}

/// Plain HTTP/1.1 request with an explicit Host header.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Reply {
    request(addr, host, path, "GET", &[], Bytes::new()).await
}

pub async fn request(
    addr: SocketAddr,
    host: &str,
    path: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    send(
        TokioIo::new(stream),
        host,
        path,
        method,
        headers,
        body,
        None,
    )
    .await
}

async fn send<I>(
    io: I,
    host: &str,
    path: &str,
    method: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    peer_cert: Option<Vec<u8>>,
) -> Reply
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut sender = http1_client(io).await;
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).expect("request"))
        .await
        .expect("response");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    Reply {
        status,
        headers,
        body,
        peer_cert,
    }
}

/// An echo backend `name` behind `<ns>.example/`, served: returns the host.
pub async fn serve_backend(env: &Env, name: &'static str) -> String {
    let b = backend(name).await;
    service(&env.client, &env.ns, name, &[b], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress(name, &host, "/", "Prefix", name),
    )
    .await;
    let http = env.running.http;
    eventually("served", Duration::from_secs(20), || async {
        get(http, &host, "/").await.status == 200
    })
    .await;
    host
}

/// A TLS connection for `host` that accepts any certificate (HTTP/1: no ALPN).
pub async fn tls_any_cert(
    addr: SocketAddr,
    host: &str,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    integration_tests::http::tls_connect(addr, host, ingress::upstream::upstream_tls_config())
        .await
        .expect("TLS")
}

/// An HTTP/1 client connection over `io`, its connection task spawned.
pub async fn http1_client<I>(io: I) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("handshake");
    tokio::spawn(conn);
    sender
}

/// HTTPS request with SNI `sni`; `ca_pem` None accepts any certificate (to inspect it).
pub async fn tls_get(
    addr: SocketAddr,
    sni: &str,
    path: &str,
    ca_pem: Option<&str>,
) -> Result<Reply, std::io::Error> {
    let tls = integration_tests::http::tls_connect(addr, sni, client_config(ca_pem)).await?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec());
    Ok(send(TokioIo::new(tls), sni, path, "GET", &[], Bytes::new(), cert).await)
}

fn client_config(ca_pem: Option<&str>) -> rustls::ClientConfig {
    match ca_pem {
        Some(pem) => integration_tests::http::tls_config(Some(pem)).expect("CA PEM"),
        None => ingress::upstream::upstream_tls_config(),
    }
}

pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Writes raw bytes, returns whatever the server answers before closing or a short timeout.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Creates a controller ConfigMap with `data` in a fresh namespace; returns the `--configmap`
/// flag that points at it.
pub async fn controller_configmap(prefix: &str, data: Value) -> String {
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    let ns = cluster.namespace(prefix).await.expect("namespace");
    let cm: k8s_openapi::api::core::v1::ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ingress-nginx-controller", "namespace": ns},
        "data": data
    }))
    .expect("configmap");
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, &ns)
        .create(&PostParams::default(), &cm)
        .await
        .expect("create configmap");
    format!("--configmap={ns}/ingress-nginx-controller")
}

/// Writes raw bytes and reads until the server closes (or 5 s pass).
pub async fn raw_exchange_all(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}
