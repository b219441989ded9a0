//! Upstream connection pools (nginx's `upstream` keepalive), built per pool setting so
//! ConfigMap changes (`upstream-keepalive-*`, `proxy-connect-timeout`) and per-Ingress
//! `proxy-connect-timeout` apply without a restart. HTTP/1 (plain and TLS) goes through each
//! worker's own [`pool::Pool`] of [`h1`] connections; HTTP/2 (gRPC) through hyper-util's
//! pooled client, where one connection carries many streams.

pub mod h1;
pub mod pool;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::proxy::Body;

type HttpsConnector = hyper_rustls::HttpsConnector<HttpConnector>;

/// The ConfigMap's keep-alive settings: a change gets a new pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolSettings {
    pub keepalive_timeout: Duration,
    /// `upstream-keepalive-connections`: idle connections one worker keeps, all upstreams
    /// together (nginx's `keepalive` in its one balancer upstream).
    pub keepalive_connections: u32,
    /// `upstream-keepalive-requests`: a connection closes after this many.
    pub keepalive_requests: u32,
    /// `upstream-keepalive-time`: a connection closes once this old.
    pub keepalive_time: Duration,
}

/// The clients of one pool setting. `proxy-connect-timeout` (which an Ingress may set) is not
/// part of the HTTP/1 pool's identity, so Ingresses with their own timeouts share its
/// connections; hyper-util's HTTP/2 client takes it at build time, so gRPC gets one client
/// per timeout.
pub struct Clients {
    pub http1: Arc<pool::Pool>,
    settings: PoolSettings,
    h2: Mutex<HashMap<Duration, Arc<H2>>>,
}

/// HTTP/2 (gRPC) clients for one connect timeout.
struct H2 {
    plain: Client<HttpConnector, Body>,
    tls: Client<HttpsConnector, Body>,
}

impl H2 {
    fn new(s: PoolSettings, connect_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        connector.enforce_http(false);
        let mut h2 = Client::builder(TokioExecutor::new());
        h2.pool_idle_timeout(s.keepalive_timeout)
            .pool_max_idle_per_host(s.keepalive_connections as usize)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(true);
        // Upstream certificates are not verified, as nginx's `proxy_ssl_verify off` default.
        let https_conn = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(upstream_tls_config())
            .https_or_http()
            .enable_http2()
            .wrap_connector(connector.clone());
        Self {
            plain: h2.build(connector),
            tls: h2.build(https_conn),
        }
    }
}

impl Clients {
    fn new(s: PoolSettings) -> Self {
        Self {
            http1: pool::Pool::new(s),
            settings: s,
            h2: Mutex::default(),
        }
    }

    /// Sends an HTTP/2 (gRPC) request; `req` carries an absolute URI.
    pub fn request_h2(
        &self,
        tls: bool,
        connect_timeout: Duration,
        req: http::Request<Body>,
    ) -> ResponseFuture {
        let h2 = {
            let mut all = self.h2.lock().unwrap_or_else(PoisonError::into_inner);
            if all.len() >= MAX_POOLS && !all.contains_key(&connect_timeout) {
                all.clear();
            }
            all.entry(connect_timeout)
                .or_insert_with(|| Arc::new(H2::new(self.settings, connect_timeout)))
                .clone()
        };
        if tls {
            h2.tls.request(req)
        } else {
            h2.plain.request(req)
        }
    }
}

/// Pools by setting; the most recently used setting is read without a lock.
#[derive(Default)]
pub struct Upstreams {
    last: ArcSwap<Option<(PoolSettings, Arc<Clients>)>>,
    all: Mutex<HashMap<PoolSettings, Arc<Clients>>>,
}

/// Pools kept for settings no longer in use are dropped past this many.
const MAX_POOLS: usize = 16;

impl Upstreams {
    pub fn get(&self, s: PoolSettings) -> Arc<Clients> {
        if let Some((settings, clients)) = self.last.load().as_ref()
            && *settings == s
        {
            return clients.clone();
        }
        let clients = {
            let mut all = self.all.lock().unwrap_or_else(PoisonError::into_inner);
            if all.len() >= MAX_POOLS && !all.contains_key(&s) {
                all.clear();
            }
            all.entry(s)
                .or_insert_with(|| Arc::new(Clients::new(s)))
                .clone()
        };
        self.last.store(Arc::new(Some((s, clients.clone()))));
        clients
    }
}

/// A client config that accepts any server certificate: nginx's `proxy_ssl_verify off` default
/// for upstreams (also used by tests that inspect whatever certificate is served).
pub fn upstream_tls_config() -> rustls::ClientConfig {
    kube_common::tls::insecure_client_config()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_pool_per_setting() {
        let u = Upstreams::default();
        let a = PoolSettings {
            keepalive_timeout: Duration::from_secs(60),
            keepalive_connections: 320,
            keepalive_requests: 10_000,
            keepalive_time: Duration::from_secs(3600),
        };
        let b = PoolSettings {
            keepalive_connections: 10,
            ..a
        };
        let (a1, b1, a2) = (u.get(a), u.get(b), u.get(a));
        assert!(Arc::ptr_eq(&a1, &a2), "same setting, same pool");
        assert!(!Arc::ptr_eq(&a1, &b1), "a ConfigMap change gets a new pool");
    }
}
