//! HTTP/2 from clients (ALPN), gRPC to an h2c backend with trailers, and WebSocket upgrades.
#![allow(clippy::unwrap_used)] // test code

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(20);

/// An h2c (prior knowledge) backend replying like a gRPC server: one message, then trailers.
async fn grpc_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from(version))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body = StreamBody::new(futures::stream::iter(frames));
                    let mut resp = Response::new(body);
                    resp.headers_mut().insert(
                        "content-type",
                        http::HeaderValue::from_static("application/grpc"),
                    );
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// An HTTP/1.1 backend that accepts an Upgrade and then echoes bytes.
async fn upgrade_backend() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let mut io = TokioIo::new(up);
                            let mut buf = [0u8; 64];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    let mut resp = Response::new(Full::new(Bytes::new()));
                    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert("upgrade", http::HeaderValue::from_static("websocket"));
                    resp.headers_mut()
                        .insert("connection", http::HeaderValue::from_static("upgrade"));
                    Ok::<_, Infallible>(resp)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

fn h2_client_config() -> rustls::ClientConfig {
    // Any certificate: this test is about protocols, the fake certificate is fine.
    let mut c = ingress::upstream::upstream_tls_config();
    c.alpn_protocols = vec![b"h2".to_vec()];
    c
}

#[tokio::test]
async fn http2_clients_and_grpc_backends() {
    let env = env("h2", &[]).await;
    let web = backend("web").await;
    let grpc = grpc_backend().await;
    service(&env.client, &env.ns, "web", &[web], &[]).await;
    service(&env.client, &env.ns, "grpc", &[grpc], &[]).await;
    let host = format!("{}.example", env.ns);
    let mut ing = simple_ingress("web", &host, "/", "Prefix", "web");
    ing["spec"]["rules"][0]["http"]["paths"].as_array_mut().expect("paths").push(json!(
        {"path": "/svc.Echo", "pathType": "Prefix", "backend": {"service": {"name": "grpc", "port": {"name": "http"}}}}));
    apply_ingress(&env.client, &env.ns, ing).await;
    let mut grpc_ing = simple_ingress("grpc", &format!("grpc.{host}"), "/", "Prefix", "grpc");
    grpc_ing["metadata"]["annotations"] =
        json!({"nginx.ingress.kubernetes.io/backend-protocol": "GRPC"});
    apply_ingress(&env.client, &env.ns, grpc_ing).await;
    let https = env.running.https;
    eventually("served", WAIT, || async {
        tls_get(https, &host, "/", None)
            .await
            .is_ok_and(|r| r.status == 200)
    })
    .await;

    let h2 = |sni: String| async move {
        let tls = integration_tests::http::tls_connect(https, &sni, h2_client_config())
            .await
            .expect("tls");
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        sender
    };
    // Plain HTTP/2 request to an HTTP/1.1 backend.
    let mut sender = h2(host.clone()).await;
    let req = Request::get(format!("https://{host}/hello"))
        .body(Full::new(Bytes::new()))
        .expect("req");
    let resp = sender.send_request(req).await.expect("response");
    assert_eq!(resp.version(), http::Version::HTTP_2);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(j["backend"], "web");
    assert_eq!(j["headers"]["host"], host.as_str());

    // A client that negotiated h2 but speaks HTTP/1 is served as HTTP/1 (its writes are not
    // held back for HTTP/2's batching), and the connection closes after it as asked.
    let mut tls = integration_tests::http::tls_connect(https, &host, h2_client_config())
        .await
        .expect("tls");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let raw = format!("GET /hello HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    tls.write_all(raw.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match tokio::time::timeout(WAIT, tls.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    let reply = String::from_utf8_lossy(&reply);
    assert!(closed, "the connection stayed open: {reply}");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains(r#""backend":"web""#), "{reply}");

    // gRPC: HTTP/2 end to end, trailers passed through.
    let ghost = format!("grpc.{host}");
    eventually("grpc host served", WAIT, || async {
        tls_get(https, &ghost, "/", None).await.is_ok()
    })
    .await;
    let mut sender = h2(ghost.clone()).await;
    let req = Request::post(format!("https://{ghost}/svc.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
        .expect("req");
    let resp = sender.send_request(req).await.expect("grpc response");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        collected.to_bytes().as_ref(),
        b"HTTP/2.0",
        "backend reached over HTTP/2"
    );
}

/// Reads one HTTP/1 response with a Content-Length body from `s`, and nothing after it.
async fn read_response(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0usize);
            if got.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte))
            .await
            .expect("response in time")
            .expect("read");
        assert_eq!(n, 1, "closed after {text:?}");
        got.push(byte[0]);
    }
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let env = env("ws", &[]).await;
    let up = upgrade_backend().await;
    service(&env.client, &env.ns, "ws", &[up], &[]).await;
    let host = format!("{}.example", env.ns);
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("ws", &host, "/", "Prefix", "ws"),
    )
    .await;
    let http = env.running.http;
    eventually("route", WAIT, || async {
        get(http, &host, "/").await.status != 404
    })
    .await;
    let mut s = TcpStream::connect(http).await.expect("connect");
    // The upgrade comes on a connection that served a request (a host with no rule: 404 from
    // the proxy itself) and then idled past the grace, so it was parked.
    s.write_all(b"GET / HTTP/1.1\r\nHost: no-rule.example\r\n\r\n")
        .await
        .expect("write");
    let first = read_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 404"), "{first}");
    tokio::time::sleep(ingress::keepalive::GRACE * 10).await;
    let head = format!(
        "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = s.read(&mut buf).await.expect("read 101");
    let text = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    for msg in [&b"ping"[..], b"second message"] {
        s.write_all(msg).await.expect("write");
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(&buf[..n], msg);
    }
}

/// Sends `count` POSTs on one keep-alive connection, pausing longer than the proxy's idle grace
/// (`ingress::keepalive::GRACE`) between them, so that the connection is parked each time;
/// every request must be answered whole on that same connection.
async fn requests_after_idling<I>(io: I, host: &str, count: usize)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let mut sender = http1_client(io).await;
    for i in 0..count {
        tokio::time::sleep(ingress::keepalive::GRACE * 10).await;
        let body = "x".repeat(1000 + i);
        let req = Request::post(format!("/after-idle/{i}"))
            .header("host", host)
            .body(Full::new(Bytes::from(body)))
            .expect("request");
        let resp = tokio::time::timeout(WAIT, sender.send_request(req))
            .await
            .expect("answered in time")
            .expect("answered on the same connection");
        assert_eq!(resp.status(), 200);
        let reply = resp.into_body().collect().await.expect("body").to_bytes();
        let reply: serde_json::Value = serde_json::from_slice(&reply).expect("echo JSON");
        assert_eq!(reply["uri"], format!("/after-idle/{i}"));
        assert_eq!(reply["body_len"], 1000 + i);
    }
}

#[tokio::test]
async fn keep_alive_connections_are_served_after_idling_plain_and_tls() {
    let env = env("idle", &[]).await;
    let host = serve_backend(&env, "idle").await;
    let plain = TcpStream::connect(env.running.http).await.expect("connect");
    requests_after_idling(TokioIo::new(plain), &host, 3).await;
    let tls = tls_any_cert(env.running.https, &host).await;
    requests_after_idling(TokioIo::new(tls), &host, 3).await;
}

/// `keep-alive-requests` (nginx's `keepalive_requests`): the last request a client connection
/// serves. HTTP/1 answers it with `Connection: close` and closes, the count going on across
/// idle spells (the connection parked between them); HTTP/2 sends GOAWAY.
#[tokio::test]
async fn keep_alive_requests_ends_client_connections() {
    let flag = controller_configmap("kar", json!({"keep-alive-requests": "3"})).await;
    let env = env("kar", &[&flag]).await;
    let host = serve_backend(&env, "kar").await;

    let plain = TcpStream::connect(env.running.http).await.expect("connect");
    let mut sender = http1_client(TokioIo::new(plain)).await;
    for i in 1..=3 {
        // Longer than the grace: parked before requests 2 and 3.
        tokio::time::sleep(ingress::keepalive::GRACE * 10).await;
        let req = Request::get("/")
            .header("host", host.as_str())
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = sender.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), 200);
        let close = resp
            .headers()
            .get("connection")
            .map(|v| v.as_bytes().to_vec());
        let expected = (i == 3).then(|| b"close".to_vec());
        assert_eq!(close, expected, "request {i}");
        resp.into_body().collect().await.expect("body");
    }
    eventually("HTTP/1 connection closed", WAIT, || async {
        sender.is_closed()
    })
    .await;

    // HTTP/1.0 keep-alive, pipelined: the third answer closes, without a `keep-alive` token.
    let one = format!("GET / HTTP/1.0\r\nHost: {host}\r\nConnection: keep-alive\r\n\r\n");
    let all = raw_exchange_all(env.running.http, one.repeat(4).as_bytes()).await;
    let heads = response_heads(&all);
    assert_eq!(heads.len(), 3, "{all}");
    assert!(heads[2].contains("\r\nconnection: close\r\n"), "{all}");
    assert!(!heads[2].contains("keep-alive"), "{all}");

    let tls = integration_tests::http::tls_connect(env.running.https, &host, h2_client_config())
        .await
        .expect("tls");
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    let conn = tokio::spawn(conn);
    for _ in 0..3 {
        let req = Request::get(format!("https://{host}/"))
            .body(Full::new(Bytes::new()))
            .expect("request");
        let resp = h2.send_request(req).await.expect("answered");
        assert_eq!(resp.status(), 200);
        resp.into_body().collect().await.expect("body");
    }
    tokio::time::timeout(WAIT, conn)
        .await
        .expect("HTTP/2 connection ended by GOAWAY")
        .expect("connection task")
        .expect("a clean end");
}

/// `http2-max-concurrent-streams` is what the proxy advertises (nginx's
/// `http2_max_concurrent_streams`, 128 by default; hyper's would be 200), and
/// `large-client-header-buffers` bounds an HTTP/2 request's headers as it bounds HTTP/1's.
#[tokio::test]
async fn http2_settings_follow_the_configmap() {
    let flag = controller_configmap(
        "h2s",
        json!({"http2-max-concurrent-streams": "7", "large-client-header-buffers": "4 16k"}),
    )
    .await;
    let env = env("h2s", &[&flag]).await;
    let host = serve_backend(&env, "h2s").await;
    let tls = integration_tests::http::tls_connect(env.running.https, &host, h2_client_config())
        .await
        .expect("tls");
    let (h2, conn) = h2::client::handshake(tls).await.expect("h2 handshake");
    tokio::spawn(conn);
    // 36 KiB of headers: over hyper's 16 KiB default, under the 64 KiB configured, each field
    // within one 16 KiB buffer (nginx refuses a longer field).
    let mut h2 = h2.ready().await.expect("ready");
    let get = |fields: usize| {
        let mut req = Request::get(format!("https://{host}/"));
        for i in 0..fields {
            req = req.header(format!("x-big-{i}"), "x".repeat(12 * 1024));
        }
        req.body(()).expect("request")
    };
    let (answer, _) = h2.send_request(get(3), true).expect("sent");
    let answer = tokio::time::timeout(WAIT, answer)
        .await
        .expect("answered in time")
        .expect("answered");
    assert_eq!(answer.status(), 200);
    // The server's SETTINGS came before its first answer.
    assert_eq!(h2.current_max_send_streams(), 7);

    // Over the configured size: refused, as HTTP/1 refuses it.
    let mut h2 = h2.ready().await.expect("ready");
    let refused = match h2.send_request(get(6), true) {
        Ok((answer, _)) => match tokio::time::timeout(WAIT, answer).await.expect("in time") {
            Ok(r) => r.status() != 200,
            Err(_) => true,
        },
        Err(_) => true,
    };
    assert!(refused, "a 70 KiB head was proxied");
}

/// The heads (lowercased) of the responses in `all`, each followed by its Content-Length body.
fn response_heads(all: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut rest = all;
    while let Some(end) = rest.find("\r\n\r\n") {
        let head = rest[..end + 2].to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        rest = rest.get(end + 4 + length..).unwrap_or("");
        heads.push(head);
    }
    heads
}

/// An HTTPS backend with a self-signed certificate (nginx does not verify upstreams by default).
async fn https_backend() -> std::net::SocketAddr {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["backend.local".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    let loaded =
        ingress::tls_store::load_pem(cert.pem().as_bytes(), key.serialize_pem().as_bytes())
            .expect("load");
    let mut table = ingress::tls_store::CertTable::new(loaded.key);
    table.reject_unknown = false;
    let store = Arc::new(ingress::tls_store::TlsStore::new(table));
    let config = ingress::tls_store::server_config(store, &["TLSv1.3".into()], false);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let svc = service_fn(|_req: Request<hyper::body::Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        b"{\"backend\":\"tls\"}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// A backend whose `/slow` answers after 1.5 s.
async fn slow_backend(name: &'static str) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| async move {
                    if req.uri().path() == "/slow" {
                        tokio::time::sleep(Duration::from_millis(1500)).await;
                    }
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{{\"backend\":\"{name}\"}}"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_upstreams_header_limits_and_in_flight_requests_across_endpoint_changes() {
    let env = env("misc", &[]).await;
    let tls = https_backend().await;
    let (old, new) = (slow_backend("old").await, slow_backend("new").await);
    service(&env.client, &env.ns, "tls", &[tls], &[]).await;
    service(&env.client, &env.ns, "moving", &[old], &[]).await;
    let host = format!("{}.example", env.ns);
    let mut ing = simple_ingress("tls", &host, "/", "Prefix", "tls");
    ing["metadata"]["annotations"] =
        json!({"nginx.ingress.kubernetes.io/backend-protocol": "HTTPS"});
    apply_ingress(&env.client, &env.ns, ing).await;
    let mhost = format!("moving.{host}");
    apply_ingress(
        &env.client,
        &env.ns,
        simple_ingress("moving", &mhost, "/", "Prefix", "moving"),
    )
    .await;
    let http = env.running.http;
    eventually("https upstream", WAIT, || async {
        get(http, &host, "/").await.backend() == "tls"
    })
    .await;

    // Request headers beyond large-client-header-buffers (4 x 8k) are refused.
    let big = "x".repeat(40 * 1024);
    let raw = format!("GET / HTTP/1.1\r\nHost: {host}\r\nX-Big: {big}\r\n\r\n");
    let reply = raw_exchange(http, raw.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");

    // An in-flight request finishes on its endpoint while the endpoints change under it.
    eventually("old served", WAIT, || async {
        get(http, &mhost, "/").await.backend() == "old"
    })
    .await;
    let in_flight = tokio::spawn(async move { get(http, &mhost, "/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    set_endpoints(&env.client, &env.ns, "moving", &[new], &[]).await;
    let mhost2 = format!("moving.{host}");
    eventually("new served", WAIT, || async {
        get(http, &mhost2, "/").await.backend() == "new"
    })
    .await;
    let r = in_flight.await.expect("in-flight request");
    assert_eq!((r.status, r.backend()), (200, "old".to_string()));
}

#[tokio::test]
async fn limit_connections_counts_concurrent_requests_per_client() {
    let env = env("conn", &[]).await;
    let slow = slow_backend("slow").await;
    service(&env.client, &env.ns, "slow", &[slow], &[]).await;
    let host = format!("{}.example", env.ns);
    let mut ing = simple_ingress("slow", &host, "/", "Prefix", "slow");
    ing["metadata"]["annotations"] = json!({"nginx.ingress.kubernetes.io/limit-connections": "1"});
    apply_ingress(&env.client, &env.ns, ing).await;
    let http = env.running.http;
    eventually("served", WAIT, || async {
        get(http, &host, "/").await.status == 200
    })
    .await;
    let h = host.clone();
    let first = tokio::spawn(async move { get(http, &h, "/slow").await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(http, &host, "/").await.status,
        503,
        "second concurrent request refused"
    );
    assert_eq!(first.await.expect("first"), 200);
    assert_eq!(get(http, &host, "/").await.status, 200, "slot released");
}
