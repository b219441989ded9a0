//! Our ingress-controller as production runs it: fed by a real kube-apiserver with an Ingress,
//! a Service, an EndpointSlice and a TLS Secret; plus the Ingress-edit measurements.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use integration_tests::kube::Cluster;
use integration_tests::process::free_port;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Error;
use crate::peers::{HOST, Peer, PeerKind, Shared};
use crate::probe;

const MANAGER: &str = "homecluster-bench";
const SECRET: &str = "bench-tls";
const SERVICE: &str = "backend";
/// Host of the Ingress that the edit measurements change.
pub const PROBE_HOST: &str = "probe.bench.test";

/// The objects in the apiserver and the running controller.
pub struct IngressEnv {
    pub client: Client,
    pub ns: String,
    pub peer: Peer,
    /// Filler Ingresses created so far.
    fillers: usize,
    /// Path generation of the probe Ingress.
    generation: usize,
}

async fn apply<K>(api: &Api<K>, name: &str, obj: Value) -> Result<K, Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .patch(
            name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

fn ingress(name: &str, host: &str, paths: Value, tls: bool) -> Value {
    let mut spec = json!({
        "ingressClassName": "nginx",
        "rules": [{"host": host, "http": {"paths": paths}}]
    });
    if tls {
        spec["tls"] = json!([{"hosts": [host], "secretName": SECRET}]);
    }
    // The plaintext scenarios measure proxying, not the HTTPS redirect a TLS Ingress gets.
    let annotations = if tls {
        json!({"nginx.ingress.kubernetes.io/ssl-redirect": "false"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": name, "annotations": annotations},
        "spec": spec
    })
}

fn path(p: &str, path_type: &str) -> Value {
    json!({"path": p, "pathType": path_type,
           "backend": {"service": {"name": SERVICE, "port": {"name": "http"}}}})
}

/// Creates the objects, starts `program` (the ingress-controller binary) and waits until it
/// serves the benchmark host.
pub async fn start(
    cluster: &Cluster,
    shared: &Shared,
    program: &Path,
    backend: SocketAddr,
) -> Result<IngressEnv, Error> {
    let client = cluster.client().await?;
    let ns = cluster.namespace("bench").await?;
    let classes: Api<IngressClass> = Api::all(client.clone());
    let class = json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}});
    apply(&classes, "nginx", class).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let secret = json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": SECRET},
        "stringData": {"tls.crt": shared.cert_pem, "tls.key": shared.key_pem}});
    apply(&secrets, SECRET, secret).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let port = backend.port();
    let svc = json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": SERVICE},
        "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port, "protocol": "TCP"}]}});
    apply(&services, SERVICE, svc).await?;
    // The EndpointSlice a kube-controller-manager would write for one ready pod.
    let ar = ingress::endpoints::slice_resource(&client).await?;
    let slice = json!({
        "apiVersion": ar.api_version, "kind": "EndpointSlice",
        "metadata": {"name": format!("{SERVICE}-1"), "labels": {"kubernetes.io/service-name": SERVICE}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
        "endpoints": [{"addresses": [backend.ip().to_string()], "conditions": {"ready": true}}],
    });
    let slices: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &ar);
    slices
        .patch(
            &format!("{SERVICE}-1"),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(slice),
        )
        .await?;
    let ingresses: Api<Ingress> = Api::namespaced(client.clone(), &ns);
    apply(
        &ingresses,
        "bench",
        ingress("bench", HOST, json!([path("/", "Prefix")]), true),
    )
    .await?;

    let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let args = vec![
        format!("--kubeconfig={}", cluster.kubeconfig_path().display()),
        "--bind-address=127.0.0.1".into(),
        format!("--http-port={}", http.port()),
        format!("--https-port={}", https.port()),
        format!("--healthz-port={}", free_port()?),
        "--leader-elect=false".into(),
        // wrk connects by IP, so its SNI names no Ingress host: serve the same certificate then.
        format!("--default-ssl-certificate={ns}/{SECRET}"),
        "--log-level=warn".into(),
    ];
    let process = shared.spawn("ingress-controller", program, &args, &[])?;
    let version = format!(
        "ingress-controller {} (this tree, release build)",
        env!("CARGO_PKG_VERSION")
    );
    let mut peer = Peer::new(PeerKind::IngressController, http, https, process, version)?;
    if let Err(e) = probe::wait_status(
        http,
        HOST,
        "/1k",
        200,
        Duration::from_millis(100),
        Duration::from_secs(60),
    )
    .await
    {
        peer.check_running()?;
        return Err(Error::Peer {
            peer: "ingress-controller".into(),
            message: format!("{e}; log: {}", peer.log_tail()),
        });
    }
    Ok(IngressEnv {
        client,
        ns,
        peer,
        fillers: 0,
        generation: 0,
    })
}

/// Edit → served times of one series of edits, in milliseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Propagation {
    /// Filler Ingresses in the cluster besides the two the benchmark uses.
    pub ingresses: usize,
    /// From sending the edit to the first 200 on the new path.
    pub from_request_ms: Vec<f64>,
    /// From the apiserver's answer to the edit to the first 200 (0 when served first).
    pub from_ack_ms: Vec<f64>,
}

/// Failed requests while the probe Ingress (which also carries the loaded path) is edited.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EditsUnderLoad {
    pub ingresses: usize,
    pub edits: usize,
    pub requests: u64,
    pub failed: u64,
    pub propagation: Propagation,
}

/// How often the probe polls for the new path.
const POLL: Duration = Duration::from_millis(1);
const SERVE_LIMIT: Duration = Duration::from_secs(60);

impl IngressEnv {
    /// An Ingress without a host, so requests naming any host (an IP address, say) reach the
    /// backend too, as nginx's default server does; waits until it is served.
    pub async fn catch_all(&self) -> Result<(), Error> {
        let ingresses: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        let mut obj = ingress("catch-all", HOST, json!([path("/", "Prefix")]), false);
        obj["spec"]["rules"] = json!([{"http": {"paths": [path("/", "Prefix")]}}]);
        apply(&ingresses, "catch-all", obj).await?;
        probe::wait_status(
            self.peer.http,
            "127.0.0.1",
            "/",
            200,
            Duration::from_millis(50),
            SERVE_LIMIT,
        )
        .await
    }

    /// Grows the filler Ingresses to `n` (one host each, same Service) and waits until the
    /// last one is served.
    pub async fn fillers(&mut self, n: usize) -> Result<(), Error> {
        if n <= self.fillers {
            return Ok(());
        }
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        futures::stream::iter(self.fillers..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let name = format!("filler-{i}");
                    let host = format!("f{i}.bench.test");
                    let obj: Ingress = serde_json::from_value(ingress(
                        &name,
                        &host,
                        json!([path("/", "Prefix")]),
                        false,
                    ))?;
                    api.create(&PostParams::default(), &obj).await?;
                    Ok::<_, Error>(())
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<()>>()
            .await?;
        self.fillers = n;
        probe::wait_status(
            self.peer.http,
            &format!("f{}.bench.test", n - 1),
            "/",
            200,
            Duration::from_millis(20),
            SERVE_LIMIT,
        )
        .await
    }

    /// Applies the probe Ingress at the next generation: `/stable` plus `/p<generation>`.
    /// Returns (request start, answer) instants.
    async fn edit_probe(&mut self) -> Result<(Instant, Instant), Error> {
        self.generation += 1;
        let paths = json!([
            path("/stable", "Prefix"),
            path(&format!("/p{}", self.generation), "Exact")
        ]);
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        let sent = Instant::now();
        apply(&api, "probe", ingress("probe", PROBE_HOST, paths, false)).await?;
        Ok((sent, Instant::now()))
    }

    /// One edit and the wait until its new path is served; returns (from request, from ack).
    async fn timed_edit(&mut self) -> Result<(f64, f64), Error> {
        let (sent, acked) = self.edit_probe().await?;
        let path = format!("/p{}", self.generation);
        probe::wait_status(self.peer.http, PROBE_HOST, &path, 200, POLL, SERVE_LIMIT).await?;
        let served = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok((
            ms(served - sent),
            ms(served.saturating_duration_since(acked)),
        ))
    }

    async fn series(&mut self, edits: usize) -> Result<Propagation, Error> {
        let mut p = Propagation {
            ingresses: self.fillers,
            ..Propagation::default()
        };
        for _ in 0..edits {
            let (from_request, from_ack) = self.timed_edit().await?;
            p.from_request_ms.push(from_request);
            p.from_ack_ms.push(from_ack);
            // Let the controller's follow-up work (status, events) settle between edits.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(p)
    }

    /// Edit → served times with `fillers` Ingresses in the cluster.
    pub async fn propagation(
        &mut self,
        fillers: usize,
        edits: usize,
    ) -> Result<Propagation, Error> {
        self.fillers(fillers).await?;
        // Make sure the probe Ingress exists before timing edits of it.
        self.timed_edit().await?;
        self.series(edits).await
    }

    /// `edits` edits of the probe Ingress while paced load runs against its `/stable` path.
    pub async fn edits_under_load(&mut self, edits: usize) -> Result<EditsUnderLoad, Error> {
        self.timed_edit().await?;
        let load = probe::Load::start(
            self.peer.http,
            PROBE_HOST,
            "/stable",
            4,
            Duration::from_millis(1),
        );
        let series = self.series(edits).await;
        // Keep the load up a moment past the last edit, then count.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (requests, failed) = load.stop().await;
        Ok(EditsUnderLoad {
            ingresses: self.fillers,
            edits,
            requests,
            failed,
            propagation: series?,
        })
    }
}
