//! Our ingress-controller as production runs it: fed by a real kube-apiserver with an Ingress,
//! a Service, an EndpointSlice and a TLS Secret; plus the Ingress-edit measurements.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use integration_tests::kube::Cluster;
use integration_tests::pki::{Leaf, TestCa};
use integration_tests::process::free_port;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressClass};
use kube::api::{Patch, PatchParams, PostParams};
use kube::core::DynamicObject;
use kube::{Api, Client};
use serde::Serialize;
use serde_json::{Value, json};

use crate::Error;
use crate::peers::{HOST, Peer, PeerKind, Shared};
use crate::{probe, procfs};

const MANAGER: &str = "homecluster-bench";
const SECRET: &str = "bench-tls";
const SERVICE: &str = "backend";
/// The controller's ConfigMap, named as upstream's (`--configmap`).
const CONFIGMAP: &str = "ingress-nginx-controller";
/// Host of the Ingress that the edit measurements change.
pub const PROBE_HOST: &str = "probe.bench.test";
/// Creates in flight at once when filling the cluster: enough that 11,000 objects take well
/// under a minute against the v1.20 apiserver, few enough not to overload it on 2 cores.
const CREATES_IN_FLIGHT: usize = 32;

/// The objects in the apiserver and the running controller.
pub struct IngressEnv {
    pub client: Client,
    pub ns: String,
    pub peer: Peer,
    /// What a restart needs: the controller binary and the apiserver's kubeconfig.
    program: PathBuf,
    kubeconfig: PathBuf,
    /// Filler Ingresses created so far (no TLS).
    fillers: usize,
    /// Filler Ingresses with a `tls` section created so far, each with its own Secret.
    tls_fillers: usize,
    /// Path generation of the probe Ingress.
    generation: usize,
    /// `--configmap`, when settings differ from the defaults.
    configmap: Option<String>,
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

/// An Ingress for `host`; with `tls`, a `tls` section naming that Secret.
fn ingress(name: &str, host: &str, paths: Value, tls: Option<&str>) -> Value {
    let mut spec = json!({
        "ingressClassName": "nginx",
        "rules": [{"host": host, "http": {"paths": paths}}]
    });
    if let Some(secret) = tls {
        spec["tls"] = json!([{"hosts": [host], "secretName": secret}]);
    }
    // The plaintext scenarios measure proxying, not the HTTPS redirect a TLS Ingress gets.
    let annotations = if tls.is_some() {
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

fn tls_secret(name: &str, leaf: &Leaf) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name},
        "stringData": {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem}})
}

/// Creates the objects, starts `program` (the ingress-controller binary) with `settings` in its
/// ConfigMap (none: upstream's defaults) and waits until it serves the benchmark host.
pub async fn start(
    cluster: &Cluster,
    shared: &Shared,
    program: &Path,
    backend: SocketAddr,
    settings: &[(&str, &str)],
) -> Result<IngressEnv, Error> {
    let client = cluster.client().await?;
    let ns = cluster.namespace("bench").await?;
    let classes: Api<IngressClass> = Api::all(client.clone());
    let class = json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}});
    apply(&classes, "nginx", class).await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let leaf = Leaf {
        cert_pem: shared.cert_pem.clone(),
        key_pem: shared.key_pem.clone(),
    };
    apply(&secrets, SECRET, tls_secret(SECRET, &leaf)).await?;
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
        ingress("bench", HOST, json!([path("/", "Prefix")]), Some(SECRET)),
    )
    .await?;

    let configmap = if settings.is_empty() {
        None
    } else {
        let data: serde_json::Map<String, Value> = settings
            .iter()
            .map(|(k, v)| ((*k).to_string(), Value::from(*v)))
            .collect();
        let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": CONFIGMAP}, "data": data});
        apply(
            &Api::<ConfigMap>::namespaced(client.clone(), &ns),
            CONFIGMAP,
            cm,
        )
        .await?;
        Some(format!("{ns}/{CONFIGMAP}"))
    };
    let kubeconfig = cluster.kubeconfig_path().to_path_buf();
    let peer = spawn_controller(shared, program, &kubeconfig, &ns, configmap.as_deref()).await?;
    Ok(IngressEnv {
        client,
        ns,
        peer,
        program: program.to_path_buf(),
        kubeconfig,
        fillers: 0,
        tls_fillers: 0,
        generation: 0,
        configmap,
    })
}

/// Starts the ingress-controller on fresh ports and waits until it serves the benchmark host.
async fn spawn_controller(
    shared: &Shared,
    program: &Path,
    kubeconfig: &Path,
    ns: &str,
    configmap: Option<&str>,
) -> Result<Peer, Error> {
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let mut args = vec![
        format!("--kubeconfig={}", kubeconfig.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--http-port={}", http.port()),
        format!("--https-port={}", https.port()),
        format!("--healthz-port={}", free_port()?),
        "--leader-elect=false".into(),
        // wrk connects by IP, so its SNI names no Ingress host: serve the same certificate then.
        format!("--default-ssl-certificate={ns}/{SECRET}"),
        "--log-level=warn".into(),
    ];
    args.extend(configmap.map(|c| format!("--configmap={c}")));
    let process = shared.spawn("ingress-controller", program, &args, &[])?;
    // The file says which build ran (`xtask bench` passes the image's, symbols kept).
    let cwd = std::env::current_dir().unwrap_or_default();
    let version = format!(
        "ingress-controller {} (this tree: {})",
        env!("CARGO_PKG_VERSION"),
        program.strip_prefix(&cwd).unwrap_or(program).display()
    );
    let mut peer = Peer::new(PeerKind::IngressController, http, https, process, version)?;
    if let Err(e) = probe::wait_status(
        http,
        HOST,
        "/1k",
        200,
        Duration::from_millis(100),
        SERVE_LIMIT,
    )
    .await
    {
        peer.check_running()?;
        return Err(Error::Peer {
            peer: "ingress-controller".into(),
            message: format!("{e}; log: {}", peer.log_tail()),
        });
    }
    Ok(peer)
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

fn filler_host(i: usize) -> String {
    format!("f{i}.bench.test")
}

fn tls_filler_host(j: usize) -> String {
    format!("t{j}.bench.test")
}

/// Creates `obj` (a JSON manifest) through `api`.
async fn create<K>(api: &Api<K>, obj: Value) -> Result<(), Error>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj)?;
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

/// How often the probe polls for the new path.
const POLL: Duration = Duration::from_millis(1);
const SERVE_LIMIT: Duration = Duration::from_secs(60);
/// How long the scale scenario waits for a fresh controller to serve everything: 11,000
/// objects take it seconds, but a slow start should show as a figure, not be cut at a minute.
const LOAD_LIMIT: Duration = Duration::from_secs(300);

impl IngressEnv {
    /// An Ingress without a host, so requests naming any host (an IP address, say) reach the
    /// backend too, as nginx's default server does; waits until it is served.
    pub async fn catch_all(&self) -> Result<(), Error> {
        let ingresses: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        let mut obj = ingress("catch-all", HOST, json!([path("/", "Prefix")]), None);
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

    /// Other Ingresses in the cluster besides the two the benchmark uses.
    fn others(&self) -> usize {
        self.fillers + self.tls_fillers
    }

    /// Grows the filler Ingresses to `n` (one host each, same Service) and waits until the
    /// last one is served.
    pub async fn fillers(&mut self, n: usize) -> Result<(), Error> {
        if n <= self.fillers {
            return Ok(());
        }
        self.create_fillers(n).await?;
        self.wait_filler(n - 1, SERVE_LIMIT).await
    }

    /// Creates filler Ingresses up to `n` (bounded concurrency), without waiting for them.
    async fn create_fillers(&mut self, n: usize) -> Result<(), Error> {
        let api: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        futures::stream::iter(self.fillers..n)
            .map(|i| {
                let api = api.clone();
                async move {
                    let obj = ingress(
                        &format!("filler-{i}"),
                        &filler_host(i),
                        json!([path("/", "Prefix")]),
                        None,
                    );
                    create(&api, obj).await
                }
            })
            .buffer_unordered(CREATES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        self.fillers = self.fillers.max(n);
        Ok(())
    }

    async fn wait_filler(&self, i: usize, limit: Duration) -> Result<(), Error> {
        probe::wait_status(
            self.peer.http,
            &filler_host(i),
            "/",
            200,
            Duration::from_millis(20),
            limit,
        )
        .await
    }

    /// Creates TLS fillers up to `n`: for each a distinct `kubernetes.io/tls` Secret holding
    /// `leaf` and an Ingress whose `tls` section names it (bounded concurrency, no waiting).
    async fn create_tls_fillers(&mut self, n: usize, leaf: &Leaf) -> Result<(), Error> {
        let ingresses: Api<Ingress> = Api::namespaced(self.client.clone(), &self.ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.ns);
        futures::stream::iter(self.tls_fillers..n)
            .map(|j| {
                let (ingresses, secrets) = (ingresses.clone(), secrets.clone());
                async move {
                    let secret = format!("scale-tls-{j}");
                    create(&secrets, tls_secret(&secret, leaf)).await?;
                    let obj = ingress(
                        &format!("tls-filler-{j}"),
                        &tls_filler_host(j),
                        json!([path("/", "Prefix")]),
                        Some(&secret),
                    );
                    create(&ingresses, obj).await
                }
            })
            .buffer_unordered(CREATES_IN_FLIGHT)
            .try_collect::<Vec<()>>()
            .await?;
        self.tls_fillers = self.tls_fillers.max(n);
        Ok(())
    }

    /// Waits until TLS filler `j`'s host is served with its own certificate (one `ca_pem`
    /// signed, not the default certificate).
    async fn wait_tls_filler(&self, j: usize, ca_pem: &str) -> Result<(), Error> {
        probe::wait_tls(
            self.peer.https,
            &tls_filler_host(j),
            ca_pem,
            Duration::from_millis(20),
            LOAD_LIMIT,
        )
        .await
    }

    /// Stops the controller and starts a fresh process against the same apiserver (new ports),
    /// waiting until it serves the benchmark host.
    pub async fn restart(&mut self, shared: &Shared) -> Result<(), Error> {
        self.peer.stop();
        self.peer = spawn_controller(
            shared,
            &self.program,
            &self.kubeconfig,
            &self.ns,
            self.configmap.as_deref(),
        )
        .await?;
        Ok(())
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
        apply(&api, "probe", ingress("probe", PROBE_HOST, paths, None)).await?;
        Ok((sent, Instant::now()))
    }

    /// Waits until the probe Ingress's current generation is served.
    async fn wait_probe(&self, interval: Duration) -> Result<(), Error> {
        let path = format!("/p{}", self.generation);
        probe::wait_status(
            self.peer.http,
            PROBE_HOST,
            &path,
            200,
            interval,
            SERVE_LIMIT,
        )
        .await
    }

    /// One edit and the wait until its new path is served; returns (from request, from ack).
    async fn timed_edit(&mut self) -> Result<(f64, f64), Error> {
        let (sent, acked) = self.edit_probe().await?;
        self.wait_probe(POLL).await?;
        let served = Instant::now();
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        Ok((
            ms(served - sent),
            ms(served.saturating_duration_since(acked)),
        ))
    }

    async fn series(&mut self, edits: usize) -> Result<Propagation, Error> {
        let mut p = Propagation {
            ingresses: self.others(),
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
            ingresses: self.others(),
            edits,
            requests,
            failed,
            propagation: series?,
        })
    }

    /// The scale scenario: `ingresses` other Ingresses, `certs` of them with a `tls` section
    /// naming their own Secret, created while the controller is stopped; then a fresh
    /// controller starts against the filled apiserver (as a restarted pod does, and with none
    /// of the throughput runs' allocations), and `edits` timed edits of the probe Ingress.
    ///
    /// Why not let a running controller take them in: 11,000 objects arrive in about 20 s,
    /// and the controller as this was written needed over 5 minutes at full CPU to catch up
    /// (its work per change grows with the objects); the goal is the steady state with that
    /// many objects, which this reaches in seconds.
    pub async fn scale(
        &mut self,
        shared: &Shared,
        ingresses: usize,
        certs: usize,
        edits: usize,
        profile: bool,
    ) -> Result<Scale, Error> {
        let ca = TestCa::new("homecluster-bench-scale-ca")?;
        // One certificate (generated once) for every TLS host; each Secret is its own object.
        let leaf = ca.leaf("scale.bench.test", &["*.bench.test"])?;
        self.peer.stop();
        let started = Instant::now();
        // The last TLS filler is created after everything else, so its certificate being
        // served shows that the controller has every Secret and Ingress.
        self.create_tls_fillers(certs.saturating_sub(1), &leaf)
            .await?;
        self.create_fillers(ingresses.saturating_sub(certs)).await?;
        self.create_tls_fillers(certs, &leaf).await?;
        let create_seconds = started.elapsed().as_secs_f64();
        eprintln!("      created in {create_seconds:.1} s; starting the controller");
        let spawned = Instant::now();
        self.restart(shared).await?;
        self.wait_loaded(&ca.cert_pem).await?;
        let start_seconds = spawned.elapsed().as_secs_f64();
        let loaded = procfs::stats(self.peer.pid);
        self.timed_edit().await?;
        let recording = match profile {
            true => Some(crate::profile::start(
                &[self.peer.pid],
                &shared.dir.join("scale-edits.perf"),
            )?),
            false => None,
        };
        let propagation = self.series(edits).await;
        let profile = match recording {
            Some(r) => Some(r.finish("scale edits", self.peer.kind.name())?),
            None => None,
        };
        let propagation = propagation?;
        let after = procfs::stats(self.peer.pid);
        let memory = procfs::memory_split(self.peer.pid, "after the edits");
        Ok(Scale {
            ingresses: self.others(),
            tls_secrets: self.tls_fillers,
            create_seconds,
            start_seconds,
            rss_loaded_mib: mib(loaded.rss_bytes),
            rss_after_edits_mib: mib(after.rss_bytes),
            peak_rss_mib: mib(after.peak_rss_bytes),
            propagation,
            memory,
            profile,
        })
    }

    /// Waits until the newest filler of each kind is served (the TLS one with its own
    /// certificate, which `ca_pem` signed).
    async fn wait_loaded(&mut self, ca_pem: &str) -> Result<(), Error> {
        let mut loaded = Ok(());
        if let Some(j) = self.tls_fillers.checked_sub(1) {
            loaded = self.wait_tls_filler(j, ca_pem).await;
        }
        if let (Ok(()), Some(i)) = (&loaded, self.fillers.checked_sub(1)) {
            loaded = self.wait_filler(i, LOAD_LIMIT).await;
        }
        // What the controller logged is the first thing to look at when it never got there.
        loaded.map_err(|e| match self.peer.check_running() {
            Err(exited) => exited,
            Ok(()) => Error::Peer {
                peer: "ingress-controller".into(),
                message: format!("{e}; log: {}", self.peer.log_tail()),
            },
        })
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The scale scenario's figures (our controller only).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Scale {
    /// Other Ingresses in the cluster during the edits (plain and TLS).
    pub ingresses: usize,
    /// Of those, Ingresses with a `tls` section, each naming its own `kubernetes.io/tls` Secret.
    pub tls_secrets: usize,
    /// Creating the Secrets and Ingresses this scenario added (the controller stopped).
    pub create_seconds: f64,
    /// From starting a fresh controller until the newest objects were served (the TLS one
    /// with its own certificate).
    pub start_seconds: f64,
    /// The controller's resident memory then.
    pub rss_loaded_mib: f64,
    /// The same after the timed edits.
    pub rss_after_edits_mib: f64,
    /// Its peak (VmHWM) over start-up and edits.
    pub peak_rss_mib: f64,
    pub propagation: Propagation,
    /// The controller's memory by kind after the edits.
    pub memory: procfs::MemorySplit,
    /// Where its CPU went during the edits (`perf record`), when profiling.
    pub profile: Option<crate::profile::Profile>,
}
