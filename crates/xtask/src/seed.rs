//! The seed cluster for `up`: the components as local processes, and the kubelet's part for the
//! sample app (Nodes, Pods with a Ready status, and the replicas themselves on loopback).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use integration_tests::kube::Cluster;
use integration_tests::process::ManagedProcess;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub const HOST: &str = "household-task-mgr.duckdns.org";
pub const HTTP_PORT: u16 = 18080;
pub const HTTPS_PORT: u16 = 18443;
const FRONTEND_PORT: u16 = 18081;
/// The seed's three nodes: network namespaces on one underlay bridge, each running flanneld.
pub const NODES: [&str; 3] = ["rpi-master-1", "rpi-worker-1", "rpi-worker-2"];

/// Builds the component binaries `up` runs.
pub fn build_binaries() -> Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-q",
            "-p",
            "ingress",
            "--bin",
            "ingress-controller",
            "-p",
            "cert-manager",
            "--bin",
            "cert-manager",
            "-p",
            "flannel",
            "--bin",
            "flanneld",
            "--bin",
            "flannel",
        ])
        .status()
        .context("cargo build ingress-controller cert-manager flanneld flannel")?;
    if !status.success() {
        bail!("building ingress-controller, cert-manager and flannel failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    Ok(target.join("debug"))
}

/// Starts the ingress controller against `cluster`.
pub fn start_ingress(cluster: &Cluster, bin_dir: &Path) -> Result<ManagedProcess> {
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    ManagedProcess::spawn(
        "ingress-controller",
        &bin_dir.join("ingress-controller"),
        &[
            format!("--kubeconfig={kubeconfig}"),
            "--bind-address=127.0.0.1".into(),
            format!("--http-port={HTTP_PORT}"),
            format!("--https-port={HTTPS_PORT}"),
            "--healthz-port=10254".into(),
            "--configmap=ingress-nginx/ingress-nginx-controller".into(),
            "--publish-service=ingress-nginx/ingress-nginx-controller".into(),
            "--leader-election-namespace=ingress-nginx".into(),
        ],
        &[],
        &cluster.dir().join("ingress-controller.log"),
    )
    .context("starting ingress-controller")
}

/// Metrics port of cert-manager in `up` (upstream's 9402).
pub const CERT_MANAGER_METRICS: &str = "127.0.0.1:9402";

/// Points ClusterIssuer `letsencrypt-prod` at the local pebble (its server and CA) and starts
/// the cert-manager controller, which answers HTTP-01 through the ingress controller.
pub async fn start_cert_manager(
    cluster: &Cluster,
    client: &Client,
    bin_dir: &Path,
    pebble: &integration_tests::acme::Pebble,
) -> Result<ManagedProcess> {
    use base64::Engine;
    let issuers: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
            "cert-manager.io",
            "v1",
            "ClusterIssuer",
        )),
    );
    let patch = json!({"spec": {"acme": {
        "server": pebble.directory_url(),
        "caBundle": base64::engine::general_purpose::STANDARD.encode(&pebble.ca_pem),
    }}});
    // Retried: the write goes through the webhook, which needs a moment for its CA to be
    // injected.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        match issuers
            .patch(
                "letsencrypt-prod",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(e).context("pointing ClusterIssuer letsencrypt-prod at pebble");
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(250)).await,
        }
    }
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    ManagedProcess::spawn(
        "cert-manager",
        &bin_dir.join("cert-manager"),
        &[
            "controller".into(),
            format!("--kubeconfig={kubeconfig}"),
            "--cluster-resource-namespace=cert-manager".into(),
            format!("--metrics-listen-address={CERT_MANAGER_METRICS}"),
            "--acme-http01-solver-listen-address=127.0.0.1:8089".into(),
            "--acme-http01-solver-address=127.0.0.1".into(),
            format!("--acme-http01-solver-nameservers={}", pebble.dns_addr()),
            format!("--acme-http01-self-check-port={HTTP_PORT}"),
        ],
        &[],
        &cluster.dir().join("cert-manager.log"),
    )
    .context("starting cert-manager")
}

/// Starts `cert-manager webhook` (serving on 127.0.0.1:10250 with its self-managed CA) and
/// `cert-manager cainjector`, then points the webhook configurations from deploy/ at the local
/// address: the apiserver calls the webhook there, trusting the CA cainjector injects.
pub async fn start_webhook_and_cainjector(
    cluster: &Cluster,
    client: &Client,
    bin_dir: &Path,
) -> Result<Vec<ManagedProcess>> {
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let webhook = ManagedProcess::spawn(
        "cert-manager-webhook",
        &bin_dir.join("cert-manager"),
        &[
            "webhook".into(),
            format!("--kubeconfig={kubeconfig}"),
            "--listen-host=127.0.0.1".into(),
            "--secure-port=10250".into(),
            "--healthz-port=6080".into(),
            "--dynamic-serving-ca-secret-namespace=cert-manager".into(),
            "--dynamic-serving-dns-names=cert-manager-webhook,cert-manager-webhook.cert-manager,cert-manager-webhook.cert-manager.svc,127.0.0.1".into(),
        ],
        &[],
        &cluster.dir().join("cert-manager-webhook.log"),
    )
    .context("starting cert-manager webhook")?;
    let cainjector = ManagedProcess::spawn(
        "cert-manager-cainjector",
        &bin_dir.join("cert-manager"),
        &["cainjector".into(), format!("--kubeconfig={kubeconfig}")],
        &[],
        &cluster.dir().join("cert-manager-cainjector.log"),
    )
    .context("starting cert-manager cainjector")?;
    for (kind, path) in [
        ("ValidatingWebhookConfiguration", "validate"),
        ("MutatingWebhookConfiguration", "mutate"),
    ] {
        let api: Api<kube::api::DynamicObject> = Api::all_with(
            client.clone(),
            &kube::api::ApiResource::from_gvk(&kube::api::GroupVersionKind::gvk(
                "admissionregistration.k8s.io",
                "v1",
                kind,
            )),
        );
        let patch = json!([
            {"op": "remove", "path": "/webhooks/0/clientConfig/service"},
            {"op": "add", "path": "/webhooks/0/clientConfig/url", "value": format!("https://127.0.0.1:10250/{path}")},
        ]);
        api.patch(
            "cert-manager-webhook",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Json::<()>(serde_json::from_value(patch)?),
        )
        .await
        .with_context(|| format!("pointing {kind} cert-manager-webhook at 127.0.0.1:10250"))?;
    }
    Ok(vec![webhook, cainjector])
}

/// Waits until the proxy serves a certificate for the household host that verifies against
/// `root_pem` (pebble's issuing root).
pub async fn wait_issued(root_pem: &str) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(root_pem.as_bytes()).flatten() {
        roots.add(c)?;
    }
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let connector = tokio_rustls::TlsConnector::from(config.clone());
        let attempt = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", HTTPS_PORT)).await?;
            let name = rustls::pki_types::ServerName::try_from(HOST)?;
            connector.connect(name, tcp).await?;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                bail!("no pebble-issued certificate served for {HOST} within 60 s: {e}")
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(200)).await,
        }
    }
}

/// Two frontend replicas on 127.0.0.1 and 127.0.0.2, registered as Ready Pods on the seed's
/// nodes (which the overlay lab registered).
pub async fn frontend(client: &Client) -> Result<()> {
    for (i, ip) in ["127.0.0.1", "127.0.0.2"].into_iter().enumerate() {
        let addr: SocketAddr = format!("{ip}:{FRONTEND_PORT}").parse()?;
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding frontend replica {addr}"))?;
        tokio::spawn(serve_replica(listener, i));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), "household-task-manager");
    for (i, ip) in ["127.0.0.1", "127.0.0.2"].into_iter().enumerate() {
        let name = format!("frontend-{i}");
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "household-task-manager", "labels": {"app": "frontend"}},
            "spec": {"nodeName": NODES[i], "containers": [{"name": "frontend", "image": "household-task-manager/frontend",
                     "ports": [{"containerPort": FRONTEND_PORT, "name": "http"}]}]}
        }))?;
        pods.patch(
            &name,
            &PatchParams::apply("homecluster-up").force(),
            &Patch::Apply(pod),
        )
        .await?;
        // The kubelet's part: the Pod runs and is Ready at its address.
        let status = json!({"status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": ip,
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}]
        }});
        pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(status))
            .await?;
    }
    Ok(())
}

/// A minimal frontend replica: a fixed page naming the replica.
async fn serve_replica(listener: TcpListener, replica: usize) {
    while let Ok((mut s, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut buf = vec![0u8; 8192];
            let mut seen = Vec::new();
            // Read the request head; the body of a GET is empty.
            while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            let body = format!("household-task-manager frontend, replica {replica}\n");
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// Waits until the proxy serves the household host over HTTPS.
pub async fn wait_served() -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("curl")
            .args([
                "-sk",
                "--max-time",
                "2",
                "--resolve",
                &format!("{HOST}:{HTTPS_PORT}:127.0.0.1"),
                &format!("https://{HOST}:{HTTPS_PORT}/"),
            ])
            .output();
        if let Ok(out) = out
            && String::from_utf8_lossy(&out.stdout).contains("frontend, replica")
        {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the ingress controller did not serve {HOST} within 60s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Waits until postgres's claim is Bound: the scheduler picked a node for the postgres pod
/// (WaitForFirstConsumer) and local-path provisioned the volume there.
pub async fn wait_postgres_bound(client: &Client) -> Result<String> {
    let claims: Api<PersistentVolumeClaim> =
        Api::namespaced(client.clone(), "household-task-manager");
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        if let Some(pvc) = claims.get_opt("postgres-data").await?
            && pvc.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound")
        {
            return Ok(pvc.spec.and_then(|s| s.volume_name).unwrap_or_default());
        }
        if std::time::Instant::now() > deadline {
            bail!("claim household-task-manager/postgres-data not Bound within 90s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
