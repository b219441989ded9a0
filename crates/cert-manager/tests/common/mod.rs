//! One environment per test binary: the real apiserver, pebble + challtestsrv, our ingress
//! controller (the HTTP-01 path and the TLS it serves) and our cert-manager controller, all
//! on a runtime of their own so every test (each with its own runtime) can use them.
#![allow(clippy::unwrap_used)] // test code
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::OnceLock;

use base64::Engine;
use clap::Parser;
use integration_tests::acme::{Pebble, PebbleOptions};
use integration_tests::kube::Cluster;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube_common::Manager;
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[allow(unused_imports)]
pub use cert_manager::api::{Certificate, CertificateRequest, ClusterIssuer, Order};
#[allow(unused_imports)]
pub use integration_tests::poll::{eventually, wait_for};

/// Where the shared pieces listen.
#[derive(Clone)]
pub struct Shared {
    pub ingress_http: SocketAddr,
    pub ingress_https: SocketAddr,
    pub metrics: SocketAddr,
    pub directory_url: String,
    pub pebble_ca_pem: String,
    /// Pebble's issuing root when the environment started.
    pub root_pem: String,
    pub dns: SocketAddr,
    /// Namespace of ClusterIssuer Secrets.
    pub resource_ns: String,
    /// Stops and restarts pebble (runs on the environment's runtime).
    pub pebble_ctl:
        tokio::sync::mpsc::UnboundedSender<(PebbleCmd, std::sync::mpsc::Sender<String>)>,
}

pub enum PebbleCmd {
    Stop,
    Restart,
}

pub const RESOURCE_NS: &str = "cert-manager";

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Options of the binary's environment (the first caller's win).
pub struct EnvOptions {
    pub pebble_env: Vec<(&'static str, &'static str)>,
    pub validity_secs: Option<u64>,
    pub extra_args: Vec<String>,
    pub eab_keys: Vec<(String, String)>,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            pebble_env: vec![("PEBBLE_VA_NOSLEEP", "1")],
            validity_secs: Some(3600),
            extra_args: vec![],
            eab_keys: vec![],
        }
    }
}

pub fn shared(opts: EnvOptions) -> Shared {
    SHARED
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("test-env".into())
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(run_env(opts, tx));
                })
                .expect("env thread");
            rx.recv().expect("test environment starts")
        })
        .clone()
}

async fn run_env(opts: EnvOptions, tx: std::sync::mpsc::Sender<Shared>) {
    kube_common::client::install_crypto_provider();
    let filter = std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into());
    let _ = kube_common::telemetry::init(kube_common::LogFormat::Text, &filter);
    let cluster = Cluster::shared().await.expect("test control plane");
    let client = cluster.client().await.expect("client");
    install_crds(&client).await;
    ensure_namespace(&client, RESOURCE_NS).await;
    ensure_class(&client, "nginx", "k8s.io/ingress-nginx").await;

    let shutdown = CancellationToken::new();
    let ing_args = ingress::cli::Args::parse_from(integration_tests::ingress::controller_args(&[]));
    let ing_mgr = Manager::new("ingress-nginx", client.clone(), shutdown.clone());
    let ing = ingress::app::start(&ing_mgr, &ing_args)
        .await
        .expect("ingress controller");

    let mut pebble = Pebble::start(PebbleOptions {
        http_port: ing.http.port(),
        env: opts
            .pebble_env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        validity_secs: opts.validity_secs,
        eab_keys: opts.eab_keys.clone(),
        ..Default::default()
    })
    .await
    .expect("pebble");

    let mut args = vec![
        "cert-manager".to_string(),
        format!("--cluster-resource-namespace={RESOURCE_NS}"),
        "--leader-elect=false".into(),
        "--metrics-listen-address=127.0.0.1:0".into(),
        "--acme-http01-solver-listen-address=127.0.0.1:0".into(),
        "--acme-http01-solver-address=127.0.0.1".into(),
        format!("--acme-http01-solver-nameservers={}", pebble.dns_addr()),
        format!("--acme-http01-self-check-port={}", ing.http.port()),
        "--acme-http01-self-check-passes=2".into(),
        "--acme-http01-self-check-interval=50ms".into(),
    ];
    // Extra arguments replace defaults of the same flag.
    let flag = |a: &str| a.split('=').next().unwrap_or(a).to_string();
    let overridden: Vec<String> = opts.extra_args.iter().map(|a| flag(a)).collect();
    args.retain(|a| !overridden.contains(&flag(a)));
    args.extend(opts.extra_args.iter().cloned());
    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: cert_manager::cli::ControllerArgs,
    }
    let cm_args = Cli::parse_from(args).args;
    let cm_mgr = Manager::new("cert-manager", client.clone(), shutdown.clone());
    let cm = cert_manager::controller::start(&cm_mgr, &cm_args)
        .await
        .expect("cert-manager controller");

    let (ctl_tx, mut ctl_rx) =
        tokio::sync::mpsc::unbounded_channel::<(PebbleCmd, std::sync::mpsc::Sender<String>)>();
    let shared = Shared {
        ingress_http: ing.http,
        ingress_https: ing.https,
        metrics: cm.metrics_address,
        directory_url: pebble.directory_url(),
        pebble_ca_pem: pebble.ca_pem.clone(),
        root_pem: pebble.issuing_root_pem().await.expect("pebble root"),
        dns: pebble.dns_addr(),
        resource_ns: RESOURCE_NS.into(),
        pebble_ctl: ctl_tx,
    };
    let _ = tx.send(shared);
    let _keep = (ing, cm, ing_mgr, cm_mgr);
    while let Some((cmd, reply)) = ctl_rx.recv().await {
        match cmd {
            PebbleCmd::Stop => {
                pebble.stop();
                let _ = reply.send(String::new());
            }
            PebbleCmd::Restart => {
                pebble.restart().await.expect("pebble restarts");
                let _ = reply.send(pebble.issuing_root_pem().await.unwrap_or_default());
            }
        }
    }
    std::future::pending::<()>().await;
}

/// Sends a command to pebble and waits for it (returns the new root after a restart).
pub async fn pebble(shared: &Shared, cmd: PebbleCmd) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    shared.pebble_ctl.send((cmd, tx)).expect("env alive");
    tokio::task::spawn_blocking(move || rx.recv().unwrap_or_default())
        .await
        .unwrap_or_default()
}

pub async fn client() -> Client {
    Cluster::shared()
        .await
        .expect("cluster")
        .client()
        .await
        .expect("client")
}

pub async fn namespace(prefix: &str) -> String {
    Cluster::shared()
        .await
        .expect("cluster")
        .namespace(prefix)
        .await
        .expect("namespace")
}

pub async fn install_crds(client: &Client) {
    integration_tests::kube::install_crds(client, &cert_manager::crds::all())
        .await
        .expect("cert-manager CRDs");
}

pub async fn ensure_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).expect("ns");
    match api.create(&PostParams::default(), &ns).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating namespace {name}: {e}"),
    }
}

pub async fn ensure_class(client: &Client, name: &str, controller: &str) {
    integration_tests::kube::ensure_ingress_class(client, name, controller)
        .await
        .expect("IngressClass");
}

/// A ClusterIssuer for the shared pebble, named after the test's namespace.
pub async fn cluster_issuer(
    client: &Client,
    shared: &Shared,
    name: &str,
    key_secret: &str,
) -> ClusterIssuer {
    let ci: ClusterIssuer = serde_json::from_value(json!({
        "apiVersion": "cert-manager.io/v1",
        "kind": "ClusterIssuer",
        "metadata": {"name": name},
        "spec": {"acme": {
            "server": shared.directory_url,
            "email": "Admin@Example.test",
            "caBundle": base64::engine::general_purpose::STANDARD.encode(&shared.pebble_ca_pem),
            "privateKeySecretRef": {"name": key_secret},
            "solvers": [{"http01": {"ingress": {"ingressClassName": "nginx"}}}]
        }}
    }))
    .expect("issuer");
    let api: Api<ClusterIssuer> = Api::all(client.clone());
    api.patch(
        name,
        &PatchParams::apply("tests").force(),
        &Patch::Apply(&ci),
    )
    .await
    .expect("issuer applies")
}

pub fn condition<'a>(
    conds: &'a Option<Vec<cert_manager::api::Condition>>,
    t: &str,
) -> Option<&'a cert_manager::api::Condition> {
    conds
        .as_deref()
        .and_then(|c| cert_manager::api::condition(c, t))
}

pub async fn certificate_ready(client: &Client, ns: &str, name: &str) -> Option<Certificate> {
    let api: Api<Certificate> = Api::namespaced(client.clone(), ns);
    let c = api.get_opt(name).await.ok()??;
    let ready = condition(&c.status.as_ref()?.conditions, "Ready")?.is_true();
    ready.then_some(c)
}

pub async fn secret(client: &Client, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .ok()?
}

/// Events (events.k8s.io/v1) about an object, as "reason: note".
pub async fn events_for(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let api: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
    api.list(&Default::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
                .map(|e| {
                    format!(
                        "{}: {}",
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default()
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// TLS handshake to `addr` with SNI `host`, verifying against `root_pem`; the served leaf.
pub async fn served_leaf(addr: SocketAddr, host: &str, root_pem: &str) -> Result<Vec<u8>, String> {
    let config = integration_tests::http::tls_config(Some(root_pem)).map_err(|e| e.to_string())?;
    let tls = integration_tests::http::tls_connect(addr, host, config)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| "no certificate".into())
}

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
