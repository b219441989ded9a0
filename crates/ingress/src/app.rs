//! Wires the controller and the data plane together (the binary and the tests both use this).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow};
use tokio_util::sync::CancellationToken;

use kube_common::Manager;

use crate::cli::Args;
use crate::controller::{Caches, Outputs, sync_loop};
use crate::ingress_class::ClassSelector;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::snapshot::{Builder, Inputs, ObjectKey, Options};
use crate::tls_store::{TlsStore, fake_certificate, server_config};

/// What `start` brought up.
pub struct Running {
    /// The admission webhook's address, when `--validating-webhook` is set.
    pub webhook: Option<SocketAddr>,
    pub http: SocketAddr,
    pub https: SocketAddr,
    pub health: SocketAddr,
    pub proxy: Arc<Proxy>,
    /// The HTTP and HTTPS servers: they end once shutdown has drained their connections.
    pub servers: Vec<tokio::task::JoinHandle<()>>,
}

/// Cancelled `--shutdown-grace-period` seconds after `shutdown`.
fn after_grace(shutdown: &CancellationToken, grace_secs: u64) -> CancellationToken {
    let later = CancellationToken::new();
    let (shutdown, stop) = (shutdown.clone(), later.clone());
    tokio::spawn(async move {
        shutdown.cancelled().await;
        tokio::time::sleep(std::time::Duration::from_secs(grace_secs)).await;
        stop.cancel();
    });
    later
}

fn object_key(flag: &str, value: Option<&String>) -> Result<Option<ObjectKey>> {
    value
        .map(|v| {
            ObjectKey::parse(v).ok_or_else(|| anyhow!("--{flag} must be namespace/name, got {v:?}"))
        })
        .transpose()
}

/// Binds the listeners, starts the caches and the sync loop, and serves until shutdown.
pub async fn start(mgr: &Manager, args: &Args) -> Result<Running> {
    let configmap = object_key("configmap", args.configmap.as_ref())?;
    let opts = Options {
        class: ClassSelector {
            controller_class: args.controller_class.clone(),
            ingress_class: args.ingress_class.clone(),
            watch_without_class: args.watch_ingress_without_class,
        },
        default_backend_service: object_key(
            "default-backend-service",
            args.default_backend_service.as_ref(),
        )?,
        default_ssl_certificate: object_key(
            "default-ssl-certificate",
            args.default_ssl_certificate.as_ref(),
        )?,
    };
    let mut metrics = None;
    mgr.register_metrics(|r| metrics = Some(Metrics::register(r, &args.controller_class)));
    let metrics = metrics.context("registering metrics")?;

    // SO_REUSEPORT, as ingress-nginx's `reuse-port` default: the workers share the ports, and
    // a new instance on the same node binds them while this one drains. The worker count is
    // the ConfigMap's `worker-processes` as it stands now (nginx too reads it at start).
    let workers = crate::workers::count(&mgr.client, configmap.as_ref()).await;
    let bound = crate::workers::bind(args.bind_address, args.http_port, args.https_port, workers)?;
    let (http, https) = (bound.http, bound.https);

    let fake = fake_certificate().context("generating the default certificate")?;
    let mut builder = Builder::new(opts, fake);
    // Until the caches sync, serve the default backend (as nginx does before its first sync).
    let initial = builder.build(&Inputs::default());
    let tls = Arc::new(TlsStore::new(initial.certs));
    let proxy = Arc::new(Proxy::new(
        initial.snapshot,
        metrics.clone(),
        https.port(),
        workers,
    ));
    let cfg = proxy.snapshot().config.clone();
    let tls_config = Arc::new(arc_swap::ArcSwap::new(server_config(
        tls.clone(),
        &cfg.ssl_protocols,
        cfg.use_http2,
    )));

    let caches = Caches::start(mgr, configmap.as_ref())
        .await
        .context("starting watches")?;
    let webhook = match &args.validating_webhook {
        None => None,
        Some(addr) => {
            Some(start_webhook(mgr, args, addr, &caches, &proxy, &opts_class(args)).await?)
        }
    };
    let (generations, generation_rx) = tokio::sync::watch::channel(0u64);
    if let Some(publish) = object_key("publish-service", args.publish_service.as_ref())? {
        let (ingresses, services) = (caches.ingresses.clone(), caches.services.clone());
        let (mgr2, proxy2, le) = (
            mgr.clone(),
            proxy.clone(),
            args.common.leader_election.clone(),
        );
        let election_id = args.election_id.clone();
        tokio::spawn(async move {
            // Every replica keeps serving; only the Lease holder writes status. After losing
            // the Lease, stand as a candidate again.
            while !mgr2.shutdown.is_cancelled() {
                let result = mgr2
                    .run_leader_elected(&le, &election_id, |leading| {
                        crate::status::publish_loop(
                            mgr2.client.clone(),
                            publish.clone(),
                            ingresses.clone(),
                            services.clone(),
                            proxy2.clone(),
                            generation_rx.clone(),
                            leading,
                        )
                    })
                    .await;
                if let Err(e) = result {
                    tracing::warn!(error = %e, "status leader election ended");
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        });
    }
    tokio::spawn(sync_loop(
        mgr.clone(),
        caches,
        builder,
        Outputs {
            proxy: proxy.clone(),
            tls,
            tls_config: tls_config.clone(),
            metrics,
            recorder: mgr.recorder("nginx-ingress-controller"),
            generations,
        },
    ));
    let stop_accepting = after_grace(&mgr.shutdown, args.shutdown_grace_period);
    let servers = crate::workers::spawn(
        bound.workers,
        tls_config.clone(),
        proxy.clone(),
        stop_accepting,
        mgr.shutdown.clone(),
    )?;
    let health_addr = args
        .common
        .health_address
        .unwrap_or(SocketAddr::new(args.bind_address, args.healthz_port));
    let health = mgr.serve_health(health_addr).await?;
    tracing::info!(%http, %https, %health, workers, "ingress controller serving");
    Ok(Running {
        webhook,
        http,
        https,
        health,
        proxy,
        servers,
    })
}

fn opts_class(args: &Args) -> ClassSelector {
    ClassSelector {
        controller_class: args.controller_class.clone(),
        ingress_class: args.ingress_class.clone(),
        watch_without_class: args.watch_ingress_without_class,
    }
}

/// `--validating-webhook` (`:8443` or `IP:PORT`) with its certificate and key files.
async fn start_webhook(
    mgr: &Manager,
    args: &Args,
    addr: &str,
    caches: &Caches,
    proxy: &Arc<Proxy>,
    class: &ClassSelector,
) -> Result<SocketAddr> {
    let addr: SocketAddr = if let Some(port) = addr.strip_prefix(':') {
        SocketAddr::new(
            args.bind_address,
            port.parse().context("--validating-webhook port")?,
        )
    } else {
        addr.parse()
            .context("--validating-webhook must be :PORT or IP:PORT")?
    };
    let (Some(cert), Some(key)) = (
        &args.validating_webhook_certificate,
        &args.validating_webhook_key,
    ) else {
        anyhow::bail!(
            "--validating-webhook needs --validating-webhook-certificate and --validating-webhook-key"
        );
    };
    let cert_pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
    let key_pem = std::fs::read(key).with_context(|| format!("reading {}", key.display()))?;
    let loaded = crate::tls_store::load_pem(&cert_pem, &key_pem).context("webhook certificate")?;
    let mut table = crate::tls_store::CertTable::new(loaded.key);
    table.reject_unknown = false;
    let store = Arc::new(TlsStore::new(table));
    let tls = server_config(store, &["TLSv1.2".into(), "TLSv1.3".into()], false);
    let validator = crate::webhook::Validator {
        class: class.clone(),
        classes: caches.classes.clone(),
        proxy: proxy.clone(),
    };
    let bound = crate::webhook::serve(addr, tls, validator, mgr.shutdown.clone()).await?;
    tracing::info!(address = %bound, "validating webhook serving");
    Ok(bound)
}
