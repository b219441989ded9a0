//! A flannel lab: an underlay bridge (like a home LAN) with N node network namespaces, the real
//! apiserver + controller-manager with node IPAM (10.244.0.0/16, a /24 per Node), one `flanneld`
//! per node namespace, a "LAN host" namespace, and pods as namespaces set up by calling the CNI
//! conflist (`flannel` then `portmap`) exactly as a container runtime does.
//!
//! ```ignore
//! let lab = Lab::start(LabOptions::new(flanneld, flannel_plugin)).await?;
//! let a = lab.pod(0)?;
//! let b = lab.pod(1)?;
//! println!("{}", a.ping_command(b.ip));
//! ```
//!
//! Everything lives in namespaces this lab creates; the root namespace only gets the underlay
//! bridge (its address is how nodes reach the apiserver). All of it is removed on drop.

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::{Value, json};

use crate::kube::{Cluster, ClusterOptions};
use crate::kubelet::{KubeletNode, KubeletOptions};
use crate::netns::{NetNs, VethEnd, attach, bridge, veth};
use crate::nodes::{TestNode, make_schedulable, register};
use crate::process::{ManagedProcess, run};
use crate::{HarnessError, Result};

/// The seed cluster's network config.
pub const SEED_NET_CONF: &str =
    r#"{"Network": "10.244.0.0/16", "EnableNFTables": false, "Backend": {"Type": "vxlan"}}"#;
/// The seed cluster's pod network.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// Where Debian's containernetworking-plugins live.
pub const DEBIAN_CNI_DIR: &str = "/usr/lib/cni";
/// flanneld's health port inside each node namespace (the DaemonSet's).
pub const HEALTHZ_PORT: u16 = 8081;

static UNDERLAY_LOCK: Mutex<()> = Mutex::new(());
static POD_SEQ: AtomicU32 = AtomicU32::new(0);

/// How to build the lab.
#[derive(Clone, Debug)]
pub struct LabOptions {
    pub nodes: usize,
    /// The `flanneld` binary.
    pub flanneld: PathBuf,
    /// The `flannel` CNI plugin binary (its directory goes first in `CNI_PATH`).
    pub cni_plugin: PathBuf,
    /// net-conf.json contents.
    pub net_conf: String,
    /// Extra flanneld flags (after `--kube-subnet-mgr --ip-masq` and the paths).
    pub flanneld_args: Vec<String>,
    /// The controller-manager's cluster CIDR (node IPAM, /24 per node); must match `net_conf`.
    pub cluster_cidr: &'static str,
    /// Node names by index; nodes past the list are `flnode-<n>`.
    pub node_names: Vec<String>,
    /// Also run kube-scheduler (for pods and WaitForFirstConsumer claims on the lab's nodes).
    pub scheduler: bool,
    /// Real nodes: each node runs containerd and a kubelet ([`crate::kubelet`]) instead of a
    /// flanneld process, registers itself, and gets flannel from its DaemonSet.
    pub kubelets: Option<Kubelets>,
}

/// What every real node's containerd gets.
#[derive(Clone, Debug)]
pub struct Kubelets {
    /// containerd's sandbox image (in one of `images`).
    pub sandbox_image: String,
    /// OCI archives imported on every node.
    pub images: Vec<PathBuf>,
}

impl LabOptions {
    /// Three nodes, the seed's net-conf.json, flanneld reconciling every second.
    pub fn new(flanneld: impl Into<PathBuf>, cni_plugin: impl Into<PathBuf>) -> LabOptions {
        LabOptions {
            nodes: 3,
            flanneld: flanneld.into(),
            cni_plugin: cni_plugin.into(),
            net_conf: SEED_NET_CONF.into(),
            flanneld_args: vec![
                "--reconcile-interval=1".into(),
                "--iptables-resync=1".into(),
            ],
            cluster_cidr: CLUSTER_CIDR,
            node_names: Vec::new(),
            scheduler: false,
            kubelets: None,
        }
    }

    /// Real nodes (containerd + kubelet each) with these images; implies the scheduler.
    pub fn kubelets(mut self, kubelets: Kubelets) -> LabOptions {
        self.kubelets = Some(kubelets);
        self.scheduler = true;
        self
    }

    pub fn node_names(mut self, names: &[&str]) -> LabOptions {
        self.node_names = names.iter().map(|n| n.to_string()).collect();
        self
    }

    pub fn scheduler(mut self, on: bool) -> LabOptions {
        self.scheduler = on;
        self
    }

    pub fn nodes(mut self, n: usize) -> LabOptions {
        self.nodes = n;
        self
    }
}

/// One node namespace and its flanneld.
pub struct LabNode {
    /// containerd + kubelet, on a lab with [`LabOptions::kubelets`]. First, so it stops
    /// before the namespace is deleted.
    pub kubelet: Option<KubeletNode>,
    pub name: String,
    pub ns: NetNs,
    /// The node's underlay address (its InternalIP and flannel public-ip).
    pub ip: Ipv4Addr,
    /// Per-node files: `run/flannel/subnet.env`, `var/lib/cni/...`, flanneld's log.
    pub dir: PathBuf,
    flanneld: Option<ManagedProcess>,
    restarts: u32,
}

impl LabNode {
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("run/flannel/subnet.env")
    }

    pub fn flannel_data_dir(&self) -> PathBuf {
        self.dir.join("var/lib/cni/flannel")
    }

    pub fn ipam_data_dir(&self) -> PathBuf {
        self.dir.join("var/lib/cni/networks")
    }

    /// The seed's conflist with this node's paths (subnetFile, dataDir, host-local dataDir).
    pub fn conflist(&self) -> Value {
        json!({
            "name": "cbr0",
            "cniVersion": "0.3.1",
            "plugins": [
                {
                    "type": "flannel",
                    "subnetFile": self.subnet_file(),
                    "dataDir": self.flannel_data_dir(),
                    "ipam": { "dataDir": self.ipam_data_dir() },
                    "delegate": { "hairpinMode": true, "isDefaultGateway": true }
                },
                { "type": "portmap", "capabilities": { "portMappings": true } }
            ]
        })
    }

    /// flanneld's process id while it runs (for RSS figures).
    pub fn flanneld_pid(&self) -> Option<u32> {
        self.flanneld.as_ref().and_then(ManagedProcess::pid)
    }

    /// flanneld's log so far.
    pub fn flanneld_log(&self) -> String {
        self.flanneld
            .as_ref()
            .map(|p| p.log_tail(20_000))
            .unwrap_or_default()
    }
}

/// The running lab.
pub struct Lab {
    // Field order is drop order: pods are owned by callers, then flanneld, namespaces, bridge.
    pub nodes: Vec<LabNode>,
    /// A host on the underlay that is not a node (at `.100`): the LAN behind masquerade.
    pub lan: NetNs,
    pub lan_ip: Ipv4Addr,
    opts: LabOptions,
    bridge: String,
    octet: u8,
    cni_path: String,
    kubeconfig: PathBuf,
    net_conf: PathBuf,
    dir: tempfile::TempDir,
    pub cluster: Cluster,
    client: Client,
}

impl Lab {
    /// Starts the control plane, the underlay, the nodes and their flanneld; returns once every
    /// flanneld reports ready and every node has its peers' routes.
    pub async fn start(opts: LabOptions) -> Result<Lab> {
        let lab = Self::start_inner(opts).await?;
        lab.wait_converged().await?;
        Ok(lab)
    }

    async fn start_inner(opts: LabOptions) -> Result<Lab> {
        crate::netns::require_root("flannel lab")?;
        let processes = [
            ("flanneld", &opts.flanneld),
            ("flannel CNI plugin", &opts.cni_plugin),
        ];
        // Real nodes get flannel from its DaemonSet.
        let processes = if opts.kubelets.is_some() {
            &processes[..0]
        } else {
            &processes[..]
        };
        for (what, p) in processes {
            if !p.is_file() {
                return Err(HarnessError::MissingPeer {
                    what: (*what).into(),
                    path: p.display().to_string(),
                });
            }
        }
        for plugin in ["bridge", "host-local", "portmap"] {
            let p = Path::new(DEBIAN_CNI_DIR).join(plugin);
            if !p.is_file() {
                return Err(HarnessError::MissingPeer {
                    what: format!("CNI plugin {plugin}"),
                    path: p.display().to_string(),
                });
            }
        }
        let (octet, bridge_name) = create_underlay()?;
        let host = Ipv4Addr::new(172, 31, octet, 1);
        let cluster = match Cluster::start(ClusterOptions {
            controller_manager: true,
            scheduler: opts.scheduler,
            cluster_cidr: Some(opts.cluster_cidr),
            extra_address: Some(host),
            real_nodes: opts.kubelets.is_some(),
        })
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let _ = run("ip", &["link", "del", &bridge_name]);
                return Err(e);
            }
        };
        let client = cluster.client().await?;
        let dir = tempfile::Builder::new()
            .prefix("homecluster-flannel-")
            .tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, cluster.kubeconfig_for(host)?)?;
        let net_conf = dir.path().join("net-conf.json");
        std::fs::write(&net_conf, &opts.net_conf)?;
        let plugin_dir = opts
            .cni_plugin
            .parent()
            .unwrap_or(Path::new("."))
            .display()
            .to_string();
        let lan = NetNs::new("fl-lan")?;
        let lan_ip = Ipv4Addr::new(172, 31, octet, 100);
        let mut lab = Lab {
            nodes: Vec::new(),
            lan,
            lan_ip,
            bridge: bridge_name,
            octet,
            cni_path: format!("{plugin_dir}:{DEBIAN_CNI_DIR}"),
            kubeconfig,
            net_conf,
            dir,
            cluster,
            client,
            opts: opts.clone(),
        };
        lab.plug(None, "lan", lan_ip)?;
        for _ in 0..opts.nodes {
            lab.add_node().await?;
        }
        Ok(lab)
    }

    /// Like [`Lab::start`] without waiting for routes on `flannel.1` (with DirectRouting, peers
    /// on the same underlay get plain routes instead).
    pub async fn start_without_convergence(opts: LabOptions) -> Result<Lab> {
        Self::start_inner(opts).await
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The underlay bridge's address in the root namespace (where nodes reach the apiserver).
    pub fn host_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, self.octet, 1)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(172, 31, self.octet, 11 + i as u8)
    }

    /// A veth from `ns` (None: the LAN namespace) to the underlay bridge.
    fn plug(&self, ns: Option<&NetNs>, label: &str, ip: Ipv4Addr) -> Result<()> {
        let ns = ns.unwrap_or(&self.lan);
        let root_end = format!("fl{}{label}", self.octet);
        let addr = format!("{ip}/24");
        veth(
            VethEnd {
                ns: None,
                ifname: &root_end,
                addr: None,
            },
            VethEnd {
                ns: Some(ns),
                ifname: "eth0",
                addr: Some(&addr),
            },
        )?;
        attach(None, &root_end, &self.bridge)?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            &self.host_ip().to_string(),
        ])?;
        Ok(())
    }

    /// Adds a node: namespace on the underlay, Node object (IPAM gives it a /24), flanneld.
    /// Returns its index. Does not wait for the others to program it.
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.add_node_unregistered()?;
        if let Some(kubelets) = self.opts.kubelets.clone() {
            self.start_kubelet(i, kubelets).await?;
            return Ok(i);
        }
        self.register_node(i).await?;
        self.start_flanneld(i)?;
        self.wait_ready(i).await?;
        Ok(i)
    }

    /// A node namespace on the underlay without its Node object (no flanneld yet): for
    /// starting flanneld before the node is registered. See [`Lab::register_node`].
    pub fn add_node_unregistered(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let name = self
            .opts
            .node_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("flnode-{}", i + 1));
        let ns = NetNs::new(&format!("fl-n{}", i + 1))?;
        let ip = self.node_ip(i);
        self.plug(Some(&ns), &format!("n{}", i + 1), ip)?;
        ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let dir = self.dir.path().join(&name);
        std::fs::create_dir_all(&dir)?;
        self.nodes.push(LabNode {
            name,
            ns,
            ip,
            dir,
            flanneld: None,
            restarts: 0,
            kubelet: None,
        });
        Ok(i)
    }

    /// Starts node `i`'s containerd and kubelet (which registers the Node).
    async fn start_kubelet(&mut self, i: usize, kubelets: Kubelets) -> Result<()> {
        let node = &self.nodes[i];
        let opts = KubeletOptions {
            name: node.name.clone(),
            ip: node.ip,
            kubeconfig: self.kubeconfig.clone(),
            sandbox_image: kubelets.sandbox_image,
            images: kubelets.images,
        };
        let kubelet = KubeletNode::start(&node.ns, &node.dir, opts).await?;
        self.nodes[i].kubelet = Some(kubelet);
        Ok(())
    }

    /// Routes this host to every node's pod network (`spec.podCIDR` via the node's address),
    /// once node IPAM has given each one: the apiserver then reaches webhook pods, and a
    /// shell here reaches any pod, as on a node of the cluster.
    pub async fn route_pod_networks(&self) -> Result<()> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for n in &self.nodes {
            let cidr = loop {
                if let Some(cidr) = nodes
                    .get_opt(&n.name)
                    .await?
                    .and_then(|node| node.spec.and_then(|s| s.pod_cidr))
                {
                    break cidr;
                }
                if tokio::time::Instant::now() > deadline {
                    return Err(HarnessError::NotReady {
                        what: format!("a podCIDR for node {}", n.name),
                        secs: 60,
                        log: String::new(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            // `add`, not `replace`: a route this host already has (a real node of another
            // network, a lab running at once) is an error, never overwritten.
            run("ip", &["route", "add", &cidr, "via", &n.ip.to_string()])?;
        }
        Ok(())
    }

    /// Registers node `i`'s Node object (node IPAM then gives it a podCIDR).
    pub async fn register_node(&self, i: usize) -> Result<()> {
        let n = &self.nodes[i];
        register(
            &self.client,
            &TestNode::new(&n.name).with_internal_ip(&n.ip.to_string()),
        )
        .await?;
        // The apiserver taints a new Node not-ready; node lifecycle (off here) would lift it.
        make_schedulable(&self.client, &n.name).await?;
        Ok(())
    }

    /// Whether node `i`'s flanneld is still running.
    pub fn flanneld_running(&mut self, i: usize) -> bool {
        self.nodes[i]
            .flanneld
            .as_mut()
            .is_some_and(|p| p.check_running().is_ok())
    }

    /// Starts node `i`'s flanneld (after [`Lab::stop_flanneld`]).
    pub fn start_flanneld(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        node.restarts += 1;
        let mut args = vec![
            "netns".to_string(),
            "exec".into(),
            node.ns.name().into(),
            self.opts.flanneld.display().to_string(),
            "--kube-subnet-mgr".into(),
            "--ip-masq".into(),
            format!("--kubeconfig-file={}", self.kubeconfig.display()),
            format!("--net-config-path={}", self.net_conf.display()),
            format!("--subnet-file={}", node.subnet_file().display()),
            format!("--healthz-ip={}", node.ip),
            format!("--healthz-port={HEALTHZ_PORT}"),
        ];
        args.extend(self.opts.flanneld_args.iter().cloned());
        let log = node.dir.join(format!("flanneld-{}.log", node.restarts));
        node.flanneld = Some(ManagedProcess::spawn(
            &format!("flanneld {}", node.name),
            &crate::process::which("ip")?,
            &args,
            &[("NODE_NAME".into(), node.name.clone())],
            &log,
        )?);
        Ok(())
    }

    /// SIGTERM to node `i`'s flanneld (the data path stays, as with upstream).
    pub fn stop_flanneld(&mut self, i: usize) {
        if let Some(mut p) = self.nodes[i].flanneld.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Stops and starts node `i`'s flanneld, waiting until it is ready again.
    pub async fn restart_flanneld(&mut self, i: usize) -> Result<()> {
        self.stop_flanneld(i);
        self.start_flanneld(i)?;
        self.wait_ready(i).await
    }

    /// Deletes node `i`'s Node object and stops its flanneld (its namespace stays).
    pub async fn delete_node(&mut self, i: usize) -> Result<()> {
        self.stop_flanneld(i);
        Api::<Node>::all(self.client.clone())
            .delete(&self.nodes[i].name, &DeleteParams::default())
            .await?;
        Ok(())
    }

    /// GET `path` on node `i`'s health server: (status, body).
    pub fn health(&self, i: usize, path: &str) -> Result<(u16, String)> {
        use std::io::{Read, Write};
        let mut s = TcpStream::connect_timeout(
            &(self.nodes[i].ip, HEALTHZ_PORT).into(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )?;
        let mut buf = String::new();
        s.read_to_string(&mut buf)?;
        let status = buf
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = buf
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// Waits for node `i`'s `/readyz` (rules and subnet.env in place).
    pub async fn wait_ready(&mut self, i: usize) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(p) = self.nodes[i].flanneld.as_mut() {
                p.check_running()?;
            }
            if matches!(self.health(i, "/readyz"), Ok((200, _))) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("flanneld on {}", self.nodes[i].name),
                    secs: 60,
                    log: self.nodes[i].flanneld_log(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every running node has a route to every other running node's subnet.
    pub async fn wait_converged(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let running: Vec<&LabNode> =
                self.nodes.iter().filter(|n| n.flanneld.is_some()).collect();
            let mut ok = true;
            for n in &running {
                let routes =
                    n.ns.ip(&["route", "show", "dev", "flannel.1"])
                        .unwrap_or_default();
                ok &= routes.lines().count() >= running.len().saturating_sub(1);
            }
            if ok {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: "flannel routes on every node".into(),
                    secs: 60,
                    log: String::new(),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A pod on node `i`: a namespace wired by the conflist's ADD, as a runtime does.
    pub fn pod(&self, i: usize) -> Result<Pod> {
        let node = &self.nodes[i];
        let seq = POD_SEQ.fetch_add(1, Ordering::Relaxed);
        let ns = NetNs::new(&format!("fl-pod{seq}"))?;
        let id = format!("c{}x{seq}", std::process::id());
        let conflist = node.conflist();
        let result = match cni_conflist(
            node.ns.name(),
            &self.cni_path,
            "ADD",
            &id,
            &ns.path(),
            &conflist,
            None,
        ) {
            Ok(r) => r.unwrap_or(Value::Null),
            Err(e) => {
                // A failed ADD is followed by DEL, as the spec asks of a runtime.
                let _ = cni_conflist(
                    node.ns.name(),
                    &self.cni_path,
                    "DEL",
                    &id,
                    &ns.path(),
                    &conflist,
                    None,
                );
                return Err(e);
            }
        };
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| HarnessError::Command {
                cmd: "CNI ADD".into(),
                message: format!("no IP in result {result}"),
            })?;
        Ok(Pod {
            ns: Some(ns),
            ip,
            id,
            result,
            node_ns: node.ns.name().to_string(),
            cni_path: self.cni_path.clone(),
            conflist,
        })
    }

    /// Rewrites net-conf.json (takes effect when a flanneld starts).
    pub fn set_net_conf(&self, text: &str) -> Result<()> {
        std::fs::write(&self.net_conf, text)?;
        Ok(())
    }

    /// `cni_path` (our plugin's directory, then Debian's).
    pub fn cni_path(&self) -> &str {
        &self.cni_path
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.stop_flanneld(i);
        }
        self.nodes.clear();
        let _ = run("ip", &["link", "del", &self.bridge]);
    }
}

/// Picks a free 172.31.X.0/24 (X in 200..=254) for the bridge `hcfl<X>` with `.1` in the root
/// namespace, so concurrent labs (and processes) never share a subnet.
fn create_underlay() -> Result<(u8, String)> {
    let _guard = UNDERLAY_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let addrs = run("ip", &["-4", "-o", "addr", "show"])?;
    let links = run("ip", &["-o", "link", "show"])?;
    for octet in 200u8..=254 {
        let prefix = format!("172.31.{octet}.");
        let name = format!("hcfl{octet}");
        // A node namespace of an earlier lab can outlive it for minutes (the kernel keeps it
        // while orphaned TCP sockets retransmit), with its `fl<octet>n<i>` veth end here.
        let veth_prefix = format!(": fl{octet}");
        if addrs.contains(&prefix)
            || links.contains(&veth_prefix)
            || run("ip", &["link", "show", &name]).is_ok()
        {
            continue;
        }
        bridge(None, &name, Some(&format!("172.31.{octet}.1/24")))?;
        return Ok((octet, name));
    }
    Err(HarnessError::Command {
        cmd: "underlay".into(),
        message: "no free 172.31.200-254.0/24".into(),
    })
}

/// Runs one CNI plugin in `node_ns` as a runtime does: `CNI_*` env, the config on stdin.
/// Returns (exit success, stdout).
pub fn cni_exec(
    node_ns: &str,
    cni_path: &str,
    plugin: &str,
    command: &str,
    id: &str,
    netns: &Path,
    conf: &[u8],
) -> Result<(bool, String)> {
    let bin = cni_path
        .split(':')
        .map(|d| Path::new(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| HarnessError::MissingPeer {
            what: format!("CNI plugin {plugin}"),
            path: cni_path.into(),
        })?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node_ns]).arg(&bin);
    cni_run(cmd, plugin, command, id, netns, cni_path, conf)
}

/// Runs `cmd` (a CNI plugin, or a wrapper running one) with the `CNI_*` env of `command` and
/// `conf` on stdin. Returns (exit success, stdout).
pub fn cni_run(
    mut cmd: Command,
    what: &str,
    command: &str,
    id: &str,
    netns: &Path,
    cni_path: &str,
    conf: &[u8],
) -> Result<(bool, String)> {
    use std::io::Write;
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            what: what.into(),
            source,
        })?;
    // A plugin that exits without reading stdin (a no-op) gives EPIPE: not an error.
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(conf);
    }
    let out = child.wait_with_output()?;
    Ok((
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    ))
}

/// libcni's conflist handling: ADD runs the plugins in order, each getting `name`,
/// `cniVersion` and the previous result as `prevResult`; DEL runs them in reverse with the
/// cached ADD result. Returns the final result of ADD.
pub fn cni_conflist(
    node_ns: &str,
    cni_path: &str,
    command: &str,
    id: &str,
    netns: &Path,
    conflist: &Value,
    prev: Option<&Value>,
) -> Result<Option<Value>> {
    let plugins = conflist["plugins"].as_array().cloned().unwrap_or_default();
    let ordered: Vec<Value> = if command == "DEL" {
        plugins.into_iter().rev().collect()
    } else {
        plugins
    };
    let mut prev_result = prev.cloned();
    for p in ordered {
        let mut conf = p.clone();
        conf["name"] = conflist["name"].clone();
        conf["cniVersion"] = conflist["cniVersion"].clone();
        if let Some(r) = &prev_result {
            conf["prevResult"] = r.clone();
        }
        let plugin = p["type"].as_str().unwrap_or_default().to_string();
        let (ok, out) = cni_exec(
            node_ns,
            cni_path,
            &plugin,
            command,
            id,
            netns,
            conf.to_string().as_bytes(),
        )?;
        if !ok {
            return Err(HarnessError::Command {
                cmd: format!("CNI {command} {plugin}"),
                message: out,
            });
        }
        if command == "ADD" {
            prev_result = Some(
                serde_json::from_str(&out).map_err(|e| HarnessError::Command {
                    cmd: format!("CNI ADD {plugin}"),
                    message: format!("result is not JSON ({e}): {out}"),
                })?,
            );
        }
    }
    Ok(if command == "ADD" { prev_result } else { None })
}

/// A pod: a network namespace with `eth0` from the CNI ADD; DEL and namespace removal on drop.
pub struct Pod {
    pub ns: Option<NetNs>,
    pub ip: Ipv4Addr,
    pub id: String,
    /// The conflist's final ADD result.
    pub result: Value,
    node_ns: String,
    cni_path: String,
    conflist: Value,
}

impl Pod {
    pub fn ns(&self) -> &NetNs {
        self.ns.as_ref().expect("pod namespace present until drop")
    }

    /// A shell command that pings `target` from this pod.
    pub fn ping_command(&self, target: Ipv4Addr) -> String {
        format!("sudo ip netns exec {} ping {target}", self.ns().name())
    }

    /// Pings `target` `count` times at `interval`: (sent, received).
    pub fn ping(&self, target: Ipv4Addr, count: u32, interval: &str) -> Result<(u32, u32)> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                self.ns().name(),
                "ping",
                "-n",
                "-q",
                "-W",
                "1",
                "-i",
                interval,
                "-c",
                &count.to_string(),
                &target.to_string(),
            ])
            .output()?;
        Ok(parse_ping(&String::from_utf8_lossy(&out.stdout)))
    }

    /// Runs the conflist DEL for this pod (once; drop does it too) and removes its namespace.
    pub fn delete(&mut self) -> Result<()> {
        let Some(ns) = self.ns.as_ref() else {
            return Ok(());
        };
        cni_conflist(
            &self.node_ns,
            &self.cni_path,
            "DEL",
            &self.id,
            &ns.path(),
            &self.conflist,
            Some(&self.result),
        )?;
        self.ns = None;
        Ok(())
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = self.delete();
    }
}

/// `N packets transmitted, M received` from ping's summary.
pub fn parse_ping(out: &str) -> (u32, u32) {
    let line = out
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or("");
    let nums: Vec<u32> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|s| s.parse().ok())
        .collect();
    (
        nums.first().copied().unwrap_or(0),
        nums.get(1).copied().unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn ping_summary() {
        assert_eq!(
            super::parse_ping("x\n10 packets transmitted, 9 received, 10% packet loss, time 9ms\n"),
            (10, 9)
        );
    }
}
