//! A real Kubernetes control plane on loopback: etcd + kube-apiserver v1.20.2 (token auth for an
//! admin user, RBAC, generated service-account keys), optionally kube-controller-manager and
//! kube-scheduler. There is no kubelet: tests play its part where pods matter.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use tokio::sync::OnceCell;

use crate::paths::k8s_bin_dir;
use crate::pki::{TestCa, key_pair_pem};
use crate::process::{ManagedProcess, free_port, which};
use crate::{HarnessError, Result};

/// Temp dirs are named `homecluster-k8s-<pid>-…` so a later run can remove those of dead
/// processes (the shared cluster lives in a `static` and is never dropped).
const DIR_PREFIX: &str = "homecluster-k8s-";
const READY_TIMEOUT: Duration = Duration::from_secs(90);
const ADMIN_TOKEN_LEN: usize = 32;
/// Generous: the shared apiserver is busy with other tests on 2 cores.
const CRD_ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(60);

/// What to start besides etcd and the apiserver.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClusterOptions {
    pub controller_manager: bool,
    pub scheduler: bool,
    /// Cluster pod CIDR: enables the controller-manager's node IPAM
    /// (`--allocate-node-cidrs --cluster-cidr=… --node-cidr-mask-size=24`), so every Node gets
    /// `spec.podCIDR` as on a kubeadm cluster.
    pub cluster_cidr: Option<&'static str>,
    /// An address besides loopback the apiserver must be reachable on (network-namespace nodes
    /// reach it over their underlay bridge): it then binds 0.0.0.0 and the serving certificate
    /// names that address too.
    pub extra_address: Option<std::net::Ipv4Addr>,
    /// Real kubelets will run ([`crate::kubelet`]): the service range is a routable
    /// [`SERVICE_CIDR`] (kube-proxy programs it on the nodes), the apiserver advertises
    /// `extra_address` (the `kubernetes` Service's endpoint, reached from pods), and node
    /// lifecycle runs (the kubelets post heartbeats).
    pub real_nodes: bool,
}

/// The service range when real nodes run (kubeadm's default).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The `kubernetes` Service's ClusterIP in [`SERVICE_CIDR`].
pub const KUBERNETES_SERVICE_IP: &str = "10.96.0.1";

/// A running control plane; everything is stopped and deleted on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    apiserver_port: u16,
    apiserver_args: Vec<String>,
    etcd: Mutex<ManagedProcess>,
    apiserver: Mutex<Option<ManagedProcess>>,
    others: Mutex<Vec<ManagedProcess>>,
    kubeconfig: PathBuf,
    ca_pem: String,
    /// How long `start` took, for the record.
    pub startup: Duration,
}

static SHARED: OnceCell<Cluster> = OnceCell::const_new();
static NAMESPACE_SEQ: AtomicU32 = AtomicU32::new(0);

impl Cluster {
    /// One control plane per test binary (controller-manager included), started on first use.
    /// Tests stay independent by working in their own namespaces ([`Cluster::namespace`]).
    pub async fn shared() -> Result<&'static Cluster> {
        SHARED
            .get_or_try_init(|| {
                Cluster::start(ClusterOptions {
                    controller_manager: true,
                    ..Default::default()
                })
            })
            .await
    }

    /// Starts a private control plane (for tests that stop or break the apiserver).
    pub async fn start(opts: ClusterOptions) -> Result<Cluster> {
        crate::install_crypto_provider();
        let started = Instant::now();
        let bin = k8s_bin_dir();
        for name in [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            if !bin.join(name).is_file() {
                return Err(HarnessError::MissingPeer {
                    what: name.into(),
                    path: bin.join(name).display().to_string(),
                });
            }
        }
        let etcd_bin = which("etcd")?;
        remove_stale_dirs(DIR_PREFIX);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{DIR_PREFIX}{}-", std::process::id()))
            .tempdir()?;
        let d = dir.path().to_path_buf();
        let d = d.as_path();

        // PKI: one CA for the serving cert, admin token, service-account signing keys.
        let ca = TestCa::new("homecluster-test-ca")?;
        let extra = opts.extra_address.map(|a| a.to_string());
        let mut names = vec![
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
            "127.96.0.1",
        ];
        names.extend(extra.as_deref());
        if opts.real_nodes {
            names.push(KUBERNETES_SERVICE_IP);
        }
        let serving = ca.leaf("kube-apiserver", &names)?;
        write(d, "ca.crt", &ca.cert_pem)?;
        write(d, "apiserver.crt", &serving.cert_pem)?;
        write(d, "apiserver.key", &serving.key_pem)?;
        let (sa_key, sa_pub) = key_pair_pem()?;
        write(d, "sa.key", &sa_key)?;
        write(d, "sa.pub", &sa_pub)?;
        let token = random_token()?;
        write(
            d,
            "tokens.csv",
            &format!("{token},admin,admin-uid,system:masters\n"),
        )?;

        let etcd_client = free_port()?;
        let etcd_peer = free_port()?;
        let etcd = ManagedProcess::spawn(
            "etcd",
            &etcd_bin,
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                "--name=default".into(),
                format!("--listen-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--advertise-client-urls=http://127.0.0.1:{etcd_client}"),
                format!("--listen-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{etcd_peer}"),
                "--log-level=warn".into(),
            ],
            &[],
            &d.join("etcd.log"),
        )?;

        let port = free_port()?;
        let p = |f: &str| d.join(f).display().to_string();
        let apiserver_args = vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_client}"),
            format!(
                "--bind-address={}",
                if extra.is_some() {
                    "0.0.0.0"
                } else {
                    "127.0.0.1"
                }
            ),
            format!(
                "--advertise-address={}",
                match (&extra, opts.real_nodes) {
                    (Some(extra), true) => extra.as_str(),
                    _ => "127.0.0.1",
                }
            ),
            format!("--secure-port={port}"),
            "--insecure-port=0".into(),
            format!("--tls-cert-file={}", p("apiserver.crt")),
            format!("--tls-private-key-file={}", p("apiserver.key")),
            format!("--client-ca-file={}", p("ca.crt")),
            format!("--token-auth-file={}", p("tokens.csv")),
            "--authorization-mode=RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", p("sa.pub")),
            format!("--service-account-signing-key-file={}", p("sa.key")),
            // A loopback service range: ClusterIPs are then reachable on this machine without
            // kube-proxy (a test binds its backend on the ClusterIP), and no test traffic ever
            // leaves loopback.
            format!(
                "--service-cluster-ip-range={}",
                if opts.real_nodes {
                    SERVICE_CIDR
                } else {
                    "127.96.0.0/16"
                }
            ),
            "--allow-privileged=true".into(),
            // Nodes' names do not resolve here: logs and exec reach a kubelet by its address.
            "--kubelet-preferred-address-types=InternalIP,Hostname".into(),
            // Webhooks (cert-manager's) are reached at their pods' addresses: this host has no
            // kube-proxy for ClusterIPs, but routes to every node's pod network.
            format!("--enable-aggregator-routing={}", opts.real_nodes),
            "--enable-priority-and-fairness=false".into(),
            "--profiling=false".into(),
            "--v=1".into(),
        ];
        let kubeconfig = d.join("kubeconfig");
        write(
            d,
            "kubeconfig",
            &kubeconfig_yaml(&format!("https://127.0.0.1:{port}"), &ca.cert_pem, &token),
        )?;

        let cluster = Cluster {
            apiserver_port: port,
            apiserver_args,
            etcd: Mutex::new(etcd),
            apiserver: Mutex::new(None),
            others: Mutex::new(Vec::new()),
            kubeconfig,
            ca_pem: ca.cert_pem.clone(),
            startup: Duration::ZERO,
            dir,
        };
        cluster.start_apiserver().await?;

        let kc = cluster.kubeconfig.display().to_string();
        if opts.controller_manager {
            let mut args = vec![
                format!("--kubeconfig={kc}"),
                "--leader-elect=false".into(),
                "--port=0".into(),
                "--secure-port=0".into(),
                format!("--service-account-private-key-file={}", p("sa.key")),
                format!("--root-ca-file={}", p("ca.crt")),
                "--use-service-account-credentials=false".into(),
                // client-go's default of 20 queries/s makes the PV binder the bottleneck when a
                // test creates many claims at once.
                "--kube-api-qps=100".into(),
                "--kube-api-burst=200".into(),
                "--v=1".into(),
            ];
            // Without kubelets nothing posts heartbeats, so node lifecycle (which would taint
            // every Node NotReady) stays off.
            let lifecycle = if opts.real_nodes {
                "*,-cloud-node-lifecycle"
            } else {
                "*,-nodelifecycle,-cloud-node-lifecycle,-ttl"
            };
            match opts.cluster_cidr {
                Some(cidr) => args.extend([
                    format!("--controllers={lifecycle}"),
                    "--allocate-node-cidrs=true".into(),
                    format!("--cluster-cidr={cidr}"),
                    "--node-cidr-mask-size=24".into(),
                ]),
                None => args.push(
                    "--controllers=*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-ttl".into(),
                ),
            }
            let proc = ManagedProcess::spawn(
                "kube-controller-manager",
                &bin.join("kube-controller-manager"),
                &args,
                &[],
                &d.join("kube-controller-manager.log"),
            )?;
            cluster.others.lock().map_err(poisoned)?.push(proc);
        }
        if opts.scheduler {
            let proc = ManagedProcess::spawn(
                "kube-scheduler",
                &bin.join("kube-scheduler"),
                &[
                    format!("--kubeconfig={kc}"),
                    "--leader-elect=false".into(),
                    "--port=0".into(),
                    "--secure-port=0".into(),
                    "--v=1".into(),
                ],
                &[],
                &d.join("kube-scheduler.log"),
            )?;
            cluster.others.lock().map_err(poisoned)?.push(proc);
        }
        if opts.controller_manager {
            cluster.wait_controller_manager().await?;
        }
        let mut cluster = cluster;
        cluster.startup = started.elapsed();
        tracing::info!(startup = ?cluster.startup, dir = %cluster.dir.path().display(), "test control plane ready");
        Ok(cluster)
    }

    /// Path of an admin kubeconfig for this control plane.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// PEM of the CA that signed the apiserver's serving certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// `https://127.0.0.1:<port>`.
    pub fn server_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.apiserver_port)
    }

    /// An admin kubeconfig (CA inline) for `https://<address>:<port>`, for processes that reach
    /// the apiserver through [`ClusterOptions::extra_address`].
    pub fn kubeconfig_for(&self, address: std::net::Ipv4Addr) -> Result<String> {
        let text = std::fs::read_to_string(&self.kubeconfig)?;
        Ok(text.replace(
            &format!("https://127.0.0.1:{}", self.apiserver_port),
            &format!("https://{address}:{}", self.apiserver_port),
        ))
    }

    /// The directory holding logs, keys and etcd data.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An admin client config; build as many clients as needed, one per test runtime.
    pub async fn config(&self) -> Result<Config> {
        let kc = Kubeconfig::read_from(&self.kubeconfig)
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))?;
        Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|e| HarnessError::Kubeconfig(e.to_string()))
    }

    /// An admin client.
    pub async fn client(&self) -> Result<Client> {
        crate::install_crypto_provider();
        Ok(Client::try_from(self.config().await?)?)
    }

    /// Creates a namespace with a unique name starting with `prefix`.
    pub async fn namespace(&self, prefix: &str) -> Result<String> {
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NAMESPACE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let api: Api<Namespace> = Api::all(self.client().await?);
        api.create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await?;
        Ok(name)
    }

    /// Stops the apiserver (SIGTERM), keeping etcd and its data.
    pub fn stop_apiserver(&self) -> Result<()> {
        if let Some(mut p) = self.apiserver.lock().map_err(poisoned)?.take() {
            p.stop(Duration::from_secs(10));
        }
        Ok(())
    }

    /// (Re)starts the apiserver on the same port with the same flags, and waits until ready.
    pub async fn start_apiserver(&self) -> Result<()> {
        {
            let mut slot = self.apiserver.lock().map_err(poisoned)?;
            if slot.is_some() {
                return Ok(());
            }
            let log = self.dir.path().join("kube-apiserver.log");
            // Keep earlier runs' output: a restart test wants both halves.
            let log = if log.exists() {
                self.dir
                    .path()
                    .join(format!("kube-apiserver.{}.log", unique()))
            } else {
                log
            };
            *slot = Some(ManagedProcess::spawn(
                "kube-apiserver",
                &k8s_bin_dir().join("kube-apiserver"),
                &self.apiserver_args,
                &[],
                &log,
            )?);
        }
        self.wait_apiserver_ready().await
    }

    async fn wait_apiserver_ready(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let client = self.client().await?;
        loop {
            {
                let mut slot = self.apiserver.lock().map_err(poisoned)?;
                if let Some(p) = slot.as_mut() {
                    p.check_running()?;
                }
                self.etcd.lock().map_err(poisoned)?.check_running()?;
            }
            let req = http::Request::get("/readyz")
                .body(Vec::new())
                .map_err(|e| HarnessError::Http(e.to_string()))?;
            if let Ok(body) = client.request_text(req).await
                && body.trim() == "ok"
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .apiserver
                    .lock()
                    .map_err(poisoned)?
                    .as_ref()
                    .map(|p| p.log_tail(3000))
                    .unwrap_or_default();
                return Err(HarnessError::NotReady {
                    what: "kube-apiserver".into(),
                    secs: READY_TIMEOUT.as_secs(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The controller-manager is working once it has made the `default` ServiceAccount.
    async fn wait_controller_manager(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let api: Api<ServiceAccount> = Api::namespaced(self.client().await?, "default");
        loop {
            for p in self.others.lock().map_err(poisoned)?.iter_mut() {
                p.check_running()?;
            }
            if api.get_opt("default").await?.is_some() {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = self
                    .others
                    .lock()
                    .map_err(poisoned)?
                    .first()
                    .map(|p| p.log_tail(3000))
                    .unwrap_or_default();
                return Err(HarnessError::NotReady {
                    what: "kube-controller-manager".into(),
                    secs: READY_TIMEOUT.as_secs(),
                    log,
                });
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(mut others) = self.others.lock() {
            for p in others.iter_mut() {
                p.kill();
            }
        }
        if let Ok(mut api) = self.apiserver.lock()
            && let Some(p) = api.as_mut()
        {
            p.kill();
        }
        if let Ok(mut etcd) = self.etcd.lock() {
            etcd.kill();
        }
    }
}

/// Deletes control-plane dirs left by test processes that have exited.
/// Removes temp dirs named `<prefix><pid>-…` whose process is gone (servers shared by a test
/// binary live in statics and are never dropped).
pub(crate) fn remove_stale_dirs(prefix: &str) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn poisoned<T>(_: std::sync::PoisonError<T>) -> HarnessError {
    HarnessError::Http("harness lock poisoned by a panicking test".into())
}

fn write(dir: &Path, name: &str, contents: &str) -> Result<()> {
    std::fs::write(dir.join(name), contents)?;
    Ok(())
}

fn unique() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

fn random_token() -> Result<String> {
    let mut bytes = [0u8; ADMIN_TOKEN_LEN / 2];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// An admin kubeconfig with the CA inline, so it can be copied anywhere.
pub fn kubeconfig_yaml(server: &str, ca_pem: &str, token: &str) -> String {
    let ca = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: homecluster
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: admin
  user:
    token: {token}
contexts:
- name: homecluster
  context:
    cluster: homecluster
    user: admin
current-context: homecluster
"
    )
}

/// Creates IngressClass `name` for `controller` unless it exists (tests of several binaries
/// share the class names).
pub async fn ensure_ingress_class(client: &Client, name: &str, controller: &str) -> Result<()> {
    use k8s_openapi::api::networking::v1::{IngressClass, IngressClassSpec};
    let api: Api<IngressClass> = Api::all(client.clone());
    let class = IngressClass {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        spec: Some(IngressClassSpec {
            controller: Some(controller.into()),
            ..Default::default()
        }),
    };
    match api.create(&PostParams::default(), &class).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Applies `crds` (server-side, idempotent: tests of one binary share the apiserver) and waits
/// until each is Established, so custom resources can be created right after.
pub async fn install_crds(client: &Client, crds: &[CustomResourceDefinition]) -> Result<()> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.name_any();
        api.patch(
            &name,
            &PatchParams::apply("integration-tests").force(),
            &Patch::Apply(crd),
        )
        .await?;
    }
    for crd in crds {
        let name = crd.name_any();
        let deadline = Instant::now() + CRD_ESTABLISHED_TIMEOUT;
        // A failed GET is retried like a CRD not yet Established (the apiserver may still be
        // settling its new resources); the deadline bounds both.
        while !api.get(&name).await.is_ok_and(|c| established(&c)) {
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("CRD {name}"),
                    secs: CRD_ESTABLISHED_TIMEOUT.as_secs(),
                    log: "not Established".into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

fn established(crd: &CustomResourceDefinition) -> bool {
    crd.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Established" && c.status == "True")
        })
}

/// Labels namespace `ns` `homecluster-test=webhook-<ns>` and returns that value: an admission
/// webhook configuration that selects it (and is named after it) sees only this test's
/// objects, though every test of the binary shares the apiserver.
pub async fn webhook_scope(client: &Client, ns: &str) -> Result<String> {
    let label = format!("webhook-{ns}");
    Api::<Namespace>::all(client.clone())
        .patch(
            ns,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {"homecluster-test": label}}})),
        )
        .await?;
    Ok(label)
}
