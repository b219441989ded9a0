//! The seed cluster, whole, on this machine (issue 11): the control plane, the seed's nodes as
//! real nodes ([`crate::kubelet`]: containerd, kubelet and kube-proxy each, in their own network
//! and mount namespaces on one underlay bridge), our images imported on every node, `deploy/`
//! applied as a user would (`kubectl apply -k`), and pebble standing in for Let's Encrypt
//! behind ClusterIssuer `letsencrypt-prod`. Used by `cargo run -p xtask -- up` and the
//! end-to-end test.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use serde::Deserialize;

use crate::acme::{Pebble, PebbleOptions};
use crate::overlay::{Kubelets, Lab, LabOptions};
use crate::paths::{IMAGES_COMMAND, images_dir, k8s_bin_dir};
use crate::{HarnessError, Result};

/// The seed's nodes.
pub const NODES: [&str; 3] = ["rpi-master-1", "rpi-worker-1", "rpi-worker-2"];
/// The household app's public name.
pub const HOST: &str = "household-task-mgr.duckdns.org";
/// ingress-nginx-controller's NodePorts in the seed.
pub const HTTP_NODE_PORT: u16 = 30158;
pub const HTTPS_NODE_PORT: u16 = 30894;
/// The images every node imports (`target/images/<name>.oci.tar`).
pub const IMAGES: [&str; 9] = [
    "pause",
    "flannel",
    "local-path-provisioner",
    "cert-manager-controller",
    "cert-manager-cainjector",
    "cert-manager-webhook",
    "ingress-controller",
    "household-frontend",
    "household-postgres",
];
/// The tag of our images.
pub const TAG: &str = "0.1.0";

/// How much of the seed to start.
#[derive(Clone, Debug)]
pub struct SeedOptions {
    pub nodes: usize,
    /// The repository's `deploy/`.
    pub deploy_dir: PathBuf,
}

impl Default for SeedOptions {
    fn default() -> Self {
        SeedOptions {
            nodes: NODES.len(),
            deploy_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy"),
        }
    }
}

/// The running seed cluster; everything is stopped and removed on drop.
pub struct Seed {
    // Drop order: pebble, then the nodes and control plane.
    pub pebble: Pebble,
    pub lab: Lab,
    deploy_dir: PathBuf,
    /// From the start of [`Seed::start`] to `deploy/` applied and every node Ready.
    pub startup: Duration,
}

impl Seed {
    /// Starts everything and applies `deploy/`; returns once every node is Ready (workloads
    /// may still be starting: see [`Seed::wait_rollouts`]).
    pub async fn start(opts: SeedOptions) -> Result<Seed> {
        let started = Instant::now();
        let images = archives()?;
        let names: Vec<&str> = NODES.iter().copied().take(opts.nodes).collect();
        let lab = Lab::start(
            LabOptions::new("unused", "unused")
                .nodes(opts.nodes)
                .node_names(&names)
                .kubelets(Kubelets {
                    sandbox_image: format!("docker.io/homecluster/pause:{TAG}"),
                    images,
                }),
        )
        .await?;
        lab.route_pod_networks().await?;
        let pebble = Pebble::start(PebbleOptions {
            http_port: HTTP_NODE_PORT,
            listen_address: Some(lab.host_ip()),
            ..Default::default()
        })
        .await?;
        // The household name resolves to the first node (the router forwards to it).
        pebble.set_dns_a(HOST, &lab.nodes[0].ip.to_string()).await?;
        let mut seed = Seed {
            pebble,
            lab,
            deploy_dir: opts.deploy_dir,
            startup: Duration::ZERO,
        };
        seed.apply_deploy().await?;
        seed.wait_nodes_ready().await?;
        seed.startup = started.elapsed();
        Ok(seed)
    }

    pub fn kubeconfig(&self) -> &Path {
        self.lab.cluster.kubeconfig_path()
    }

    /// `kubectl ARGS` against the cluster; its stdout.
    pub fn kubectl(&self, args: &[&str]) -> Result<String> {
        self.kubectl_stdin(args, "")
    }

    /// The CRDs, then `deploy/` as `kubectl kustomize` renders it, with ClusterIssuer
    /// `letsencrypt-prod` pointed at pebble and cert-manager's HTTP-01 self-check at pebble's
    /// DNS and the NodePort (where the seed's router forwards port 80) before anything is
    /// applied: Let's Encrypt itself is never contacted. Retried while cert-manager's webhook
    /// (which admits the ClusterIssuer) is not serving yet.
    async fn apply_deploy(&self) -> Result<()> {
        let crds = self.deploy_dir.join("cert-manager/crds.yaml");
        let crds = crds.display().to_string();
        self.kubectl(&["apply", "-f", &crds])?;
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "-f",
            &crds,
        ])?;
        let rendered = self.kubectl(&["kustomize", &self.deploy_dir.display().to_string()])?;
        let manifest = self.for_pebble(&rendered)?;
        self.retry("applying deploy/", Duration::from_secs(240), || {
            self.kubectl_stdin(&["apply", "-f", "-"], &manifest)
                .map(drop)
        })
        .await
    }

    /// `rendered` (a multi-document manifest) with the ACME server and the self-check moved to
    /// pebble.
    fn for_pebble(&self, rendered: &str) -> Result<String> {
        let bad = |e: serde_yaml::Error| HarnessError::Command {
            cmd: "kubectl kustomize deploy/".into(),
            message: e.to_string(),
        };
        let mut out = String::new();
        for doc in serde_yaml::Deserializer::from_str(rendered) {
            let mut v = serde_yaml::Value::deserialize(doc).map_err(bad)?;
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            if kind == "ClusterIssuer" && name == "letsencrypt-prod" {
                v["spec"]["acme"]["server"] = self.pebble.directory_url().into();
                v["spec"]["acme"]["caBundle"] = base64::engine::general_purpose::STANDARD
                    .encode(&self.pebble.ca_pem)
                    .into();
            }
            if kind == "Deployment" && name == "cert-manager" {
                let args = &mut v["spec"]["template"]["spec"]["containers"][0]["args"];
                if let serde_yaml::Value::Sequence(args) = args {
                    args.push(
                        format!(
                            "--acme-http01-solver-nameservers={}",
                            self.pebble.dns_addr()
                        )
                        .into(),
                    );
                    args.push(format!("--acme-http01-self-check-port={HTTP_NODE_PORT}").into());
                }
            }
            out.push_str("---\n");
            out.push_str(&serde_yaml::to_string(&v).map_err(bad)?);
        }
        Ok(out)
    }

    /// `kubectl ARGS` with `input` on stdin; its stdout.
    fn kubectl_stdin(&self, args: &[&str], input: &str) -> Result<String> {
        use std::io::Write;
        let mut child = Command::new(k8s_bin_dir().join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            return Err(HarnessError::Command {
                cmd: format!("kubectl {}", args.join(" ")),
                message: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    async fn wait_nodes_ready(&self) -> Result<()> {
        self.retry("every node Ready", Duration::from_secs(120), || {
            self.kubectl(&[
                "wait",
                "--for=condition=Ready",
                "--timeout=5s",
                "nodes",
                "--all",
            ])
            .map(drop)
        })
        .await
    }

    /// Waits until every Deployment and DaemonSet of `deploy/` has rolled out.
    pub async fn wait_rollouts(&self, timeout: Duration) -> Result<()> {
        for (ns, what) in [
            ("kube-flannel", "daemonset/kube-flannel-ds"),
            ("local-path-storage", "deployment/local-path-provisioner"),
            ("cert-manager", "deployment/cert-manager-webhook"),
            ("cert-manager", "deployment/cert-manager-cainjector"),
            ("cert-manager", "deployment/cert-manager"),
            ("ingress-nginx", "deployment/ingress-nginx-controller"),
            ("household-task-manager", "deployment/frontend"),
            ("household-task-manager", "deployment/postgres"),
        ] {
            let t = format!("--timeout={}s", timeout.as_secs());
            self.kubectl(&["rollout", "status", "-n", ns, what, &t])
                .map_err(|e| HarnessError::NotReady {
                    what: format!("{ns} {what}"),
                    secs: timeout.as_secs(),
                    log: format!(
                        "{e}\n{}",
                        self.kubectl(&["get", "pods", "-A", "-o", "wide"])
                            .unwrap_or_default()
                    ),
                })?;
        }
        Ok(())
    }

    /// The address the household name resolves to (the first node).
    pub fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.lab.nodes[i].ip
    }

    /// The curl line that gets the app over HTTPS through a node's NodePort, trusting
    /// `root_pem_path` (pebble's issuing root).
    pub fn curl_line(&self, root_pem_path: &Path) -> String {
        format!(
            "curl --cacert {} --resolve {HOST}:{HTTPS_NODE_PORT}:{} https://{HOST}:{HTTPS_NODE_PORT}/",
            root_pem_path.display(),
            self.node_ip(0)
        )
    }

    async fn retry(
        &self,
        what: &str,
        timeout: Duration,
        mut f: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            match f() {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => {
                    return Err(HarnessError::NotReady {
                        what: what.into(),
                        secs: timeout.as_secs(),
                        log: e.to_string(),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// A TLS client configuration trusting only `root_pem` (pebble's issuing root).
pub fn tls_config(root_pem: &str) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    crate::http::tls_config(Some(root_pem)).map(std::sync::Arc::new)
}

/// `GET /` of the household app over HTTPS through node address `ip`'s NodePort, verifying
/// the certificate with `config`: the status line, or what went wrong.
pub async fn get_app(
    config: &std::sync::Arc<rustls::ClientConfig>,
    ip: Ipv4Addr,
) -> std::result::Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::time::timeout(
        Duration::from_secs(3),
        tokio::net::TcpStream::connect((ip, HTTPS_NODE_PORT)),
    )
    .await
    .map_err(|_| "connect timeout".to_string())?
    .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(HOST).map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut out))
        .await
        .map_err(|_| "read timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    if text.starts_with("HTTP/1.1 200") && text.contains("household-task-manager frontend") {
        Ok(text.lines().next().unwrap_or_default().to_string())
    } else {
        Err(text.chars().take(300).collect())
    }
}

impl Seed {
    /// Waits until node 0's HTTPS NodePort serves the app with a certificate that verifies
    /// against pebble's issuing root; returns that root (PEM).
    pub async fn wait_https(&self, timeout: Duration) -> Result<String> {
        let root = self.pebble.issuing_root_pem().await?;
        let config = tls_config(&root)?;
        let deadline = Instant::now() + timeout;
        loop {
            match get_app(&config, self.node_ip(0)).await {
                Ok(_) => return Ok(root),
                Err(e) if Instant::now() > deadline => {
                    let state = self
                        .kubectl(&[
                            "get",
                            "certificate,certificaterequest,order,challenge",
                            "-A",
                            "-o",
                            "wide",
                        ])
                        .unwrap_or_default();
                    let log = self
                        .kubectl(&[
                            "logs",
                            "-n",
                            "cert-manager",
                            "deploy/cert-manager",
                            "--tail=40",
                        ])
                        .unwrap_or_default();
                    return Err(HarnessError::NotReady {
                        what: format!("HTTPS for {HOST} with a pebble-issued certificate"),
                        secs: timeout.as_secs(),
                        log: format!("{e}\n{state}\n{log}"),
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    }
}

/// Memory of one component's processes on this machine (all nodes), KiB.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Footprint {
    pub component: &'static str,
    pub processes: u64,
    /// Resident set, summed.
    pub rss: u64,
    /// Of it, anonymous memory (heap, stacks, relocated data): each process's own.
    pub anon: u64,
    /// Proportional set size: pages shared by several processes (one binary's code, in
    /// the page cache once) counted once in all.
    pub pss: u64,
    /// The processes one instance of the component runs (cert-manager: its three
    /// Deployments' pods; local-path: the provisioner and one agent), at their mean RSS.
    pub instance_rss: u64,
    /// The containers' working set as the kubelet reports it (`kubectl top`, and the figures
    /// upstream publishes): the memory cgroup's usage less its inactive page cache. The
    /// binary's code pages are charged to containerd, which wrote them when unpacking the
    /// image, so this is the processes' own memory plus what they cached themselves.
    pub working_set: u64,
    /// [`Footprint::working_set`] of one instance, at the containers' mean.
    pub instance_working_set: u64,
}

/// Our components' processes by name (comm: the program name cut to 15 bytes; cert-manager's
/// are upstream's `/app/cmd/<role>/<role>`), and how many make one instance.
const COMPONENTS: [(&str, &[&str], u64); 4] = [
    (
        "ingress-nginx (ingress-controller)",
        &["nginx-ingress-c"],
        1,
    ),
    (
        "cert-manager (controller, cainjector, webhook)",
        &["controller", "cainjector", "webhook"],
        3,
    ),
    ("flannel (flanneld)", &["flanneld"], 1),
    // One instance: the provisioner and one node agent.
    ("local-path (provisioner, agents)", &["local-path-prov"], 2),
];

/// The RSS, anonymous and proportional figures of every process of our four components.
pub fn footprint() -> Vec<Footprint> {
    let mut out: Vec<Footprint> = COMPONENTS
        .iter()
        .map(|(component, ..)| Footprint {
            component,
            ..Default::default()
        })
        .collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    // A container's cgroup is counted once, whatever number of processes it holds.
    let mut counted = std::collections::HashSet::new();
    for entry in procs.flatten() {
        let dir = entry.path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        let Some(i) = COMPONENTS
            .iter()
            .position(|(_, c, _)| c.contains(&comm.trim()))
        else {
            continue;
        };
        // Only pods of our nodes (their kubelets' cgroup roots are `/hc…`): names such as
        // `controller` or `webhook` are common on a host.
        let cgroup = std::fs::read_to_string(dir.join("cgroup")).unwrap_or_default();
        if !cgroup.contains(":/hc") {
            continue;
        }
        if let Some(path) = memory_cgroup(&cgroup)
            && counted.insert(path.clone())
        {
            out[i].working_set += working_set_kib(&path);
        }
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let rollup = std::fs::read_to_string(dir.join("smaps_rollup")).unwrap_or_default();
        out[i].processes += 1;
        out[i].rss += crate::process::kib_field(&status, "VmRSS:");
        out[i].anon += crate::process::kib_field(&status, "RssAnon:");
        out[i].pss += crate::process::kib_field(&rollup, "Pss:");
    }
    for (f, (.., per_instance)) in out.iter_mut().zip(COMPONENTS) {
        f.instance_rss = (f.rss * per_instance).checked_div(f.processes).unwrap_or(0);
        f.instance_working_set = (f.working_set * per_instance)
            .checked_div(f.processes)
            .unwrap_or(0);
    }
    out
}

/// The directory of a process's memory cgroup, from its `/proc/<pid>/cgroup` text: cgroup
/// v1's `memory` hierarchy, or the unified one.
fn memory_cgroup(cgroup: &str) -> Option<PathBuf> {
    let v1 = cgroup.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        let (controllers, path) = rest.split_once(':')?;
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    });
    let (root, path) = match v1 {
        Some(path) => ("/sys/fs/cgroup/memory", path),
        None => (
            "/sys/fs/cgroup",
            cgroup.lines().find_map(|l| l.strip_prefix("0::"))?,
        ),
    };
    Some(PathBuf::from(format!("{root}{path}")))
}

/// The kubelet's (cAdvisor's) working set of a memory cgroup, KiB: usage less inactive file
/// pages; 0 if unreadable.
fn working_set_kib(dir: &Path) -> u64 {
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
    let stat = read("memory.stat");
    let field = |name: &str| {
        stat.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    // v1 names the hierarchical figure `total_inactive_file`; v2 has only `inactive_file`.
    let (usage, inactive) = match read("memory.usage_in_bytes").trim().parse::<u64>() {
        Ok(usage) => (usage, field("total_inactive_file")),
        Err(_) => (
            read("memory.current").trim().parse().unwrap_or(0),
            field("inactive_file"),
        ),
    };
    usage.saturating_sub(inactive.unwrap_or(0)) / 1024
}

/// [`footprint`] as a table (MiB), with the sums.
pub fn footprint_table() -> String {
    let rows = footprint();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let mut text = format!(
        "{:<48}{:>6}{:>9}{:>8}{:>8}{:>11}{:>9}{:>11}\n",
        "component (MiB)", "procs", "RSS", "anon", "PSS", "one, RSS", "WS", "one, WS"
    );
    let mut total = Footprint::default();
    for f in &rows {
        text.push_str(&format!(
            "{:<48}{:>6}{:>9.1}{:>8.1}{:>8.1}{:>11.1}{:>9.1}{:>11.1}\n",
            f.component,
            f.processes,
            mib(f.rss),
            mib(f.anon),
            mib(f.pss),
            mib(f.instance_rss),
            mib(f.working_set),
            mib(f.instance_working_set)
        ));
        total.processes += f.processes;
        total.rss += f.rss;
        total.anon += f.anon;
        total.pss += f.pss;
        total.instance_rss += f.instance_rss;
        total.working_set += f.working_set;
        total.instance_working_set += f.instance_working_set;
    }
    text.push_str(&format!(
        "{:<48}{:>6}{:>9.1}{:>8.1}{:>8.1}{:>11.1}{:>9.1}{:>11.1}\n",
        "all four",
        total.processes,
        mib(total.rss),
        mib(total.anon),
        mib(total.pss),
        mib(total.instance_rss),
        mib(total.working_set),
        mib(total.instance_working_set)
    ));
    text
}

/// The image archives, or an error naming the command that builds them.
fn archives() -> Result<Vec<PathBuf>> {
    IMAGES
        .iter()
        .map(|name| {
            let path = images_dir().join(format!("{name}.oci.tar"));
            if path.is_file() {
                Ok(path)
            } else {
                Err(HarnessError::Command {
                    cmd: format!("image {name}"),
                    message: format!("{} missing: run `{IMAGES_COMMAND}`", path.display()),
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_memory_cgroup_is_found_on_v1_and_v2() {
        let v1 = "12:pids:/hc1/pod1/c1\n7:memory:/hc1/pod1/c1\n1:name=systemd:/hc1/pod1/c1\n";
        assert_eq!(
            memory_cgroup(v1),
            Some(PathBuf::from("/sys/fs/cgroup/memory/hc1/pod1/c1"))
        );
        let joined = "5:cpu,memory:/hc2/p\n";
        assert_eq!(
            memory_cgroup(joined),
            Some(PathBuf::from("/sys/fs/cgroup/memory/hc2/p"))
        );
        assert_eq!(
            memory_cgroup("0::/kubepods/pod1/c1\n"),
            Some(PathBuf::from("/sys/fs/cgroup/kubepods/pod1/c1"))
        );
        assert_eq!(memory_cgroup("3:cpu:/x\n"), None);
    }

    #[test]
    fn working_set_is_usage_less_inactive_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.usage_in_bytes"), "3145728\n").unwrap();
        std::fs::write(
            dir.path().join("memory.stat"),
            "inactive_file 4096\ntotal_inactive_file 1048576\n",
        )
        .unwrap();
        assert_eq!(working_set_kib(dir.path()), 2048);
        let v2 = tempfile::tempdir().unwrap();
        std::fs::write(v2.path().join("memory.current"), "2097152\n").unwrap();
        std::fs::write(v2.path().join("memory.stat"), "inactive_file 1048576\n").unwrap();
        assert_eq!(working_set_kib(v2.path()), 1024);
    }
}
