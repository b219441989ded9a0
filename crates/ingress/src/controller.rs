//! The sync loop: caches of every kind the routing table depends on, and on any change a new
//! snapshot built off the request path and swapped in atomically (no reloads).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::Api;
use kube::core::DynamicObject;
use kube::runtime::reflector::Store;
use kube::runtime::watcher;
use kube_common::Manager;
use kube_common::controller::wait_synced;
use kube_common::events::{Event, EventType, Recorder};
use tokio::sync::Notify;

use crate::endpoints::{Slice, slice_resource};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::snapshot::{Builder, Inputs, ObjectKey};
use crate::tls_store::TlsStore;

/// Caches of the watched kinds.
pub struct Caches {
    pub ingresses: Store<Ingress>,
    pub classes: Store<IngressClass>,
    pub services: Store<Service>,
    pub slices: Store<DynamicObject>,
    pub secrets: Store<Secret>,
    /// All ConfigMaps: the controller's (`--configmap`) and those `custom-headers` names.
    pub configmaps: Store<ConfigMap>,
    pub configmap: Option<ObjectKey>,
    pub changed: Arc<Notify>,
}

impl Caches {
    /// Starts watching. Secrets and ConfigMaps are watched in all namespaces, as upstream does
    /// (TLS and basic-auth Secrets of any type; the controller ConfigMap and `custom-headers`).
    pub async fn start(mgr: &Manager, configmap: Option<&ObjectKey>) -> Result<Self, kube::Error> {
        let client = mgr.client.clone();
        let changed = Arc::new(Notify::new());
        let all = watcher::Config::default;
        let slice_ar = slice_resource(&client).await?;
        Ok(Caches {
            ingresses: mgr.reflect(
                "ingresses",
                Api::all(client.clone()),
                all(),
                (),
                changed.clone(),
            ),
            classes: mgr.reflect(
                "ingressclasses",
                Api::all(client.clone()),
                all(),
                (),
                changed.clone(),
            ),
            services: mgr.reflect(
                "services",
                Api::all(client.clone()),
                all(),
                (),
                changed.clone(),
            ),
            slices: mgr.reflect(
                "endpointslices",
                Api::all_with(client.clone(), &slice_ar),
                all(),
                slice_ar.clone(),
                changed.clone(),
            ),
            secrets: mgr.reflect(
                "secrets",
                Api::all(client.clone()),
                all(),
                (),
                changed.clone(),
            ),
            configmaps: mgr.reflect(
                "configmaps",
                Api::all(client.clone()),
                all(),
                (),
                changed.clone(),
            ),
            configmap: configmap.cloned(),
            changed,
        })
    }

    async fn synced(&self) {
        wait_synced(&self.ingresses).await;
        wait_synced(&self.classes).await;
        wait_synced(&self.services).await;
        wait_synced(&self.slices).await;
        wait_synced(&self.secrets).await;
        wait_synced(&self.configmaps).await;
    }

    fn inputs(&self) -> Inputs {
        Inputs {
            ingresses: self.ingresses.state(),
            classes: self.classes.state(),
            services: self.services.state(),
            slices: self
                .slices
                .state()
                .iter()
                .filter_map(|s| Slice::from_dynamic(s))
                .collect(),
            secrets: self.secrets.state(),
            configmap: self.configmap.as_ref().and_then(|k| {
                self.configmaps
                    .get(&kube::runtime::reflector::ObjectRef::new(&k.name).within(&k.namespace))
            }),
            configmaps: self.configmaps.state(),
        }
    }
}

/// Where a new generation goes: the proxy, the certificate store, the metrics, and the
/// status writer (which waits for generations).
pub struct Outputs {
    pub proxy: Arc<Proxy>,
    pub tls: Arc<TlsStore>,
    /// The listener's rustls config, rebuilt when `ssl-protocols` or `use-http2` change.
    pub tls_config: Arc<arc_swap::ArcSwap<rustls::ServerConfig>>,
    pub metrics: Metrics,
    pub recorder: Recorder,
    pub generations: tokio::sync::watch::Sender<u64>,
}

/// Rebuilds and swaps on every change until shutdown. `/readyz` waits for the first build.
pub async fn sync_loop(mgr: Manager, caches: Caches, mut builder: Builder, out: Outputs) {
    let Outputs {
        proxy,
        tls,
        tls_config,
        metrics,
        recorder,
        generations,
    } = out;
    let mut tls_settings = None;
    let mut served_certs = Vec::new();
    let events = spawn_event_publisher(recorder);
    let ready = mgr.readiness.register("ingress/first-sync");
    tokio::select! {
        _ = mgr.shutdown.cancelled() => return,
        _ = caches.synced() => {}
    }
    loop {
        let started = std::time::Instant::now();
        let built = builder.build(&caches.inputs());
        let generation = built.snapshot.generation;
        tls.swap(built.certs);
        let settings = (
            built.snapshot.config.ssl_protocols.clone(),
            built.snapshot.config.use_http2,
        );
        if tls_settings.as_ref() != Some(&settings) {
            tls_config.store(crate::tls_store::server_config(
                tls.clone(),
                &settings.0,
                settings.1,
            ));
            tls_settings = Some(settings);
        }
        proxy.swap(built.snapshot);
        metrics
            .config_last_reload_successful
            .set(i64::from(built.config_ok));
        if built.config_ok {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            metrics.config_last_reload_successful_timestamp.set(now);
        }
        metrics.config_hash.set(generation as i64);
        // Unchanged on most builds; 1,000 certificates are 1,000 series to rebuild.
        if built.cert_info != served_certs {
            metrics.ssl_certificate_info.clear();
            for c in &built.cert_info {
                metrics
                    .ssl_certificate_info
                    .get_or_create(&crate::metrics::CertLabels {
                        host: c.host.clone(),
                        secret_name: c.secret.name.clone(),
                        namespace: c.secret.namespace.clone(),
                        identifier: c.fingerprint.clone(),
                    })
                    .set(1);
            }
            served_certs = built.cert_info;
        }
        ready.set(true);
        generations.send_replace(generation);
        tracing::debug!(generation, took = ?started.elapsed(), "routing snapshot swapped");
        for p in built.problems {
            tracing::warn!(object = ?p.object.name, reason = p.reason, message = %p.message, "configuration problem");
            // Published by their own task: a thousand new problems (Ingresses created before
            // their Secrets, say) must not hold the next snapshot back by a round trip each.
            if events.try_send(p).is_err() {
                tracing::warn!("event queue full; a configuration problem was only logged");
            }
        }
        tokio::select! {
            _ = mgr.shutdown.cancelled() => return,
            _ = caches.changed.notified() => {}
        }
    }
}

/// Problems waiting to be published as Events, at most this many.
const EVENT_QUEUE: usize = 1024;

/// A task that publishes each problem as a Warning Event, in order.
fn spawn_event_publisher(
    recorder: Recorder,
) -> tokio::sync::mpsc::Sender<crate::snapshot::Problem> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::snapshot::Problem>(EVENT_QUEUE);
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let event = Event {
                type_: EventType::Warning,
                reason: p.reason.to_string(),
                note: Some(p.message.chars().take(1000).collect()),
                action: "Sync".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &p.object).await {
                tracing::warn!(error = %e, "publishing event failed");
            }
        }
    });
    tx
}
