//! `worker-processes`: the proxy runs on N worker threads, each a current-thread runtime with
//! its own HTTP and HTTPS listeners on the same ports (SO_REUSEPORT). The kernel spreads new
//! connections over them and a request never leaves the thread that accepted it: no work
//! stealing, no cross-thread wakeups, no shared pool lock, as nginx's worker processes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::snapshot::ObjectKey;

/// One worker's listeners, unregistered so the worker's own runtime can take them.
pub struct Listeners {
    http: std::net::TcpListener,
    https: std::net::TcpListener,
}

/// The bound ports and one pair of listeners per worker.
pub struct Bound {
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub workers: Vec<Listeners>,
}

/// Binds the HTTP and HTTPS ports once per worker. Port 0 picks a port for the first worker;
/// the others bind that same port.
pub fn bind(ip: IpAddr, http_port: u16, https_port: u16, workers: usize) -> Result<Bound> {
    let bind = |port: u16, what: &str| -> Result<std::net::TcpListener> {
        let listener = kube_common::serve::bind(SocketAddr::new(ip, port), true)
            .with_context(|| format!("binding {what} port {port}"))?;
        listener
            .into_std()
            .context("handing the listener to a worker")
    };
    let first = Listeners {
        http: bind(http_port, "HTTP")?,
        https: bind(https_port, "HTTPS")?,
    };
    let http = first.http.local_addr()?;
    let https = first.https.local_addr()?;
    let mut all = vec![first];
    for _ in 1..workers.max(1) {
        all.push(Listeners {
            http: bind(http.port(), "HTTP")?,
            https: bind(https.port(), "HTTPS")?,
        });
    }
    Ok(Bound {
        http,
        https,
        workers: all,
    })
}

/// Starts one thread per worker; each handle ends when its worker has drained.
/// A worker that ends before `stop_accepting` (it could not use its listeners, or panicked)
/// cancels `fatal`, so the process stops rather than serving on fewer workers unnoticed.
pub fn spawn(
    workers: Vec<Listeners>,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    proxy: Arc<Proxy>,
    stop_accepting: CancellationToken,
    fatal: CancellationToken,
) -> Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut handles = Vec::with_capacity(workers.len());
    for (index, listeners) in workers.into_iter().enumerate() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("building a worker runtime")?;
        let (done, finished) = tokio::sync::oneshot::channel::<()>();
        let (tls, proxy, stop) = (tls.clone(), proxy.clone(), stop_accepting.clone());
        std::thread::Builder::new()
            .name(format!("proxy-worker-{index}"))
            .spawn(move || {
                runtime.block_on(run(index, listeners, tls, proxy, stop));
                let _ = done.send(());
            })
            .context("starting a worker thread")?;
        let (stop, fatal) = (stop_accepting.clone(), fatal.clone());
        handles.push(tokio::spawn(async move {
            let _ = finished.await;
            if !stop.is_cancelled() {
                tracing::error!(worker = index, "proxy worker ended; shutting down");
                fatal.cancel();
            }
        }));
    }
    Ok(handles)
}

async fn run(
    index: usize,
    listeners: Listeners,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    proxy: Arc<Proxy>,
    stop: CancellationToken,
) {
    let register = |l: std::net::TcpListener| tokio::net::TcpListener::from_std(l);
    let (http, https) = match (register(listeners.http), register(listeners.https)) {
        (Ok(http), Ok(https)) => (http, https),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(worker = index, error = %e, "worker cannot use its listeners");
            return;
        }
    };
    tokio::join!(
        crate::server::serve(http, None, proxy.clone(), stop.clone(), index),
        crate::server::serve(https, Some(tls), proxy, stop, index),
    );
}

/// How long start-up waits for the ConfigMap before using `auto`.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The worker count at start: the ConfigMap's `worker-processes` when it can be read (within
/// [`READ_TIMEOUT`]) and is valid, else one per CPU (the key's `auto` default). nginx too
/// reads it only when it starts; the sync loop reports a bad value.
pub async fn count(client: &kube::Client, configmap: Option<&ObjectKey>) -> usize {
    let Some(key) = configmap else {
        return Config::default().workers();
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &key.namespace);
    let value = match tokio::time::timeout(READ_TIMEOUT, api.get_opt(&key.name)).await {
        Ok(Ok(cm)) => cm.and_then(|cm| cm.data).and_then(|mut d| d.remove(KEY)),
        Ok(Err(e)) => {
            tracing::warn!(configmap = %key, error = %e, "reading {KEY}; using auto");
            None
        }
        Err(_) => {
            tracing::warn!(configmap = %key, "reading {KEY} timed out; using auto");
            None
        }
    };
    // Only this key: a bad value elsewhere in the map does not change the worker count.
    let only = value.map(|v| BTreeMap::from([(KEY.to_string(), v)]));
    match Config::parse(only.as_ref()) {
        Ok(parsed) => parsed.config.workers(),
        Err(_) => Config::default().workers(),
    }
}

const KEY: &str = "worker-processes";
