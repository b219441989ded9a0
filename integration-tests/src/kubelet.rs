//! Real nodes: one containerd and one kubelet (v1.20.2, built by set-up) per node network
//! namespace, each node with its own mount namespace, as kind gets from a container per node.
//!
//! A node's mount namespace is held by a `sleep` started in it (the *holder*); containerd and
//! the kubelet join it and the node's network namespace with `nsenter`. Inside, a fresh sysfs
//! shows the node's own interfaces (the CNI bridge plugin writes under `/sys/class/net`), the
//! host's cgroup hierarchies are bound back under it, and the paths a node owns are bound to
//! per-node directories: `/etc/cni/net.d`, `/opt/cni/bin`, `/var/lib/cni`, `/run/flannel`,
//! `/var/lib/kubelet`, `/var/log/pods`, `/var/log/containers`,
//! `/opt/local-path-provisioner`. hostPath volumes of the node's pods therefore land in its
//! directory, and nothing a node mounts is seen by the host or by another node.
//!
//! containerd: its own root, state and socket, `SystemdCgroup = false`, overlayfs,
//! `restrict_oom_score_adj` (this sandbox lacks CAP_SYS_RESOURCE), pod network namespaces under
//! its state dir, a locally built pause image. Images come from OCI archives imported with
//! `ctr images import` (no registry is reachable); pods use `imagePullPolicy: Never` or
//! `IfNotPresent`.
//!
//! kubelet: its own cgroup root (created beforehand in every cgroup v1 hierarchy), cgroupfs,
//! no swap check, no image GC, no iptables util chains, anonymous + AlwaysAllow on its own API
//! (the apiserver reaches it for logs and exec), the admin token towards the apiserver.
//!
//! On drop every container, shim, process, cgroup and mount of the node is gone, and the
//! sysctls the kubelet changes are restored.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::netns::NetNs;
use crate::paths::k8s_bin_dir;
use crate::process::{ManagedProcess, run, which};
use crate::{HarnessError, Result};

/// Paths a node owns, bound to `<node dir>/fs/<path>` inside its mount namespace.
pub const NODE_PATHS: &[&str] = &[
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/var/lib/cni",
    "/run/flannel",
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/opt/local-path-provisioner",
];

/// The CNI plugins every node gets from Debian's containernetworking-plugins (flannel's own
/// plugin is installed by its DaemonSet, as upstream's).
const DEBIAN_PLUGINS: &[&str] = &["bridge", "host-local", "portmap", "loopback"];

/// The sysctls the kubelet sets (`setupKernelTunables`), restored when the last node stops.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// What a node runs with.
#[derive(Clone, Debug)]
pub struct KubeletOptions {
    /// Node name (the kubelet's `--hostname-override`).
    pub name: String,
    /// The node's address on the underlay (InternalIP, the kubelet's address).
    pub ip: Ipv4Addr,
    /// Kubeconfig reaching the apiserver from the node namespace.
    pub kubeconfig: PathBuf,
    /// The image containerd runs as each pod's sandbox (already in the archives imported).
    pub sandbox_image: String,
    /// OCI archives imported into the node's containerd before the kubelet starts.
    pub images: Vec<PathBuf>,
}

/// A running node: its holder, containerd and kubelet.
pub struct KubeletNode {
    pub name: String,
    pub ip: Ipv4Addr,
    /// `<node dir>`: `fs/` (the node's own paths), `containerd/`, logs.
    pub dir: PathBuf,
    // Field order is drop order after `Drop::drop` has stopped the workloads.
    kube_proxy: Option<ManagedProcess>,
    kubelet: Option<ManagedProcess>,
    containerd: Option<ManagedProcess>,
    holder: Option<ManagedProcess>,
    cgroup_root: String,
    netns: String,
    /// Counted in [`HOST`] (so its drop un-counts it exactly once).
    registered: bool,
}

impl KubeletNode {
    /// Starts containerd and the kubelet in `ns` (whose `eth0` carries `opts.ip`).
    pub async fn start(ns: &NetNs, dir: &Path, opts: KubeletOptions) -> Result<KubeletNode> {
        crate::netns::require_root("real nodes")?;
        let kubelet_bin = k8s_bin_dir().join("kubelet");
        if !kubelet_bin.is_file() {
            return Err(HarnessError::MissingPeer {
                what: "kubelet".into(),
                path: kubelet_bin.display().to_string(),
            });
        }
        for program in [
            "containerd",
            "containerd-shim-runc-v2",
            "runc",
            "ctr",
            "nsenter",
        ] {
            which(program)?;
        }
        std::fs::create_dir_all(dir)?;
        // Named after the node's namespace (process id and sequence): labs running at once
        // never share one.
        let cgroup_root = format!("/{}", ns.name());
        let mut node = KubeletNode {
            name: opts.name.clone(),
            ip: opts.ip,
            dir: dir.to_path_buf(),
            kube_proxy: None,
            kubelet: None,
            containerd: None,
            holder: None,
            cgroup_root,
            netns: ns.name().to_string(),
            registered: false,
        };
        node.registered = register_node()?;
        // Sockets orphaned at teardown keep a namespace alive while they retransmit: keep that
        // short (these sysctls are per network namespace).
        ns.exec(
            "sysctl",
            &[
                "-qw",
                "net.ipv4.tcp_orphan_retries=1",
                "net.ipv4.tcp_fin_timeout=5",
            ],
        )?;
        node.prepare_fs()?;
        create_cgroup_root(&node.cgroup_root)?;
        node.holder = Some(node.start_holder(ns)?);
        node.containerd = Some(node.start_containerd(&opts).await?);
        for image in &opts.images {
            node.import(image)?;
        }
        node.kubelet = Some(node.start_kubelet(&kubelet_bin, &opts)?);
        node.kube_proxy = Some(node.start_kube_proxy(&opts)?);
        Ok(node)
    }

    fn fs(&self, path: &str) -> PathBuf {
        self.dir.join("fs").join(path.trim_start_matches('/'))
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("containerd/containerd.sock")
    }

    /// The node's own directories, and Debian's CNI plugins in its `/opt/cni/bin`.
    fn prepare_fs(&self) -> Result<()> {
        for path in NODE_PATHS {
            std::fs::create_dir_all(self.fs(path))?;
        }
        for plugin in DEBIAN_PLUGINS {
            let from = Path::new(crate::overlay::DEBIAN_CNI_DIR).join(plugin);
            if !from.is_file() {
                return Err(HarnessError::MissingPeer {
                    what: format!("CNI plugin {plugin}"),
                    path: from.display().to_string(),
                });
            }
            std::fs::copy(&from, self.fs("/opt/cni/bin").join(plugin))?;
        }
        std::fs::create_dir_all(self.dir.join("containerd"))?;
        Ok(())
    }

    /// The holder: `sleep` in a new mount namespace joined to `ns`, after the mounts above.
    fn start_holder(&self, ns: &NetNs) -> Result<ManagedProcess> {
        let cgroup_keep = self.dir.join("cgroup");
        std::fs::create_dir_all(&cgroup_keep)?;
        // The paths go in as positional parameters, never into the script's text.
        let mut script = String::from(
            "set -e\nkeep=\"$1\"; shift\n\
             mount --rbind /sys/fs/cgroup \"$keep\"\n\
             mount -t sysfs sysfs /sys\n\
             mount --rbind \"$keep\" /sys/fs/cgroup\n\
             while [ \"$#\" -gt 1 ]; do mount --bind \"$1\" \"$2\"; shift 2; done\n",
        );
        // Keep the host's cgroup hierarchies, mount a sysfs of this network namespace, put the
        // hierarchies back under it, bind the node's paths; then shared inside the node (new
        // peer groups: the host's mounts were copied private), as on a systemd host, since
        // volumes with mountPropagation need it.
        script.push_str(&format!(
            "mount --make-rshared /\necho {HOLDER_READY}\nexec sleep infinity\n"
        ));
        let mut args: Vec<String> = [
            "--mount",
            "--propagation",
            "private",
            "nsenter",
            &format!("--net=/run/netns/{}", ns.name()),
            "sh",
            "-c",
            &script,
            "holder",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(cgroup_keep.display().to_string());
        for path in NODE_PATHS {
            args.push(self.fs(path).display().to_string());
            args.push(path.to_string());
        }
        let log = self.dir.join("holder.log");
        let mut holder = ManagedProcess::spawn(
            &format!("node {}", self.name),
            &which("unshare")?,
            &args,
            &[],
            &log,
        )?;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .any(|l| l == HOLDER_READY)
        {
            holder.check_running()?;
            if std::time::Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("node {} namespaces", self.name),
                    secs: 10,
                    log: holder.log_tail(2000),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(holder)
    }

    fn holder_pid(&self) -> Result<u32> {
        self.holder
            .as_ref()
            .and_then(ManagedProcess::pid)
            .ok_or_else(|| HarnessError::Command {
                cmd: format!("node {}", self.name),
                message: "the node's namespace holder is not running".into(),
            })
    }

    /// `nsenter` arguments that run a program in the node's mount and network namespaces.
    fn enter_args(&self) -> Result<Vec<String>> {
        Ok(vec![
            format!("--target={}", self.holder_pid()?),
            "--mount".into(),
            "--net".into(),
        ])
    }

    /// A command running `program` on the node (its mount and network namespaces).
    pub fn command(&self, program: &str) -> Result<Command> {
        let mut cmd = Command::new("nsenter");
        cmd.args(self.enter_args()?).arg(program);
        Ok(cmd)
    }

    /// Runs `program args` on the node to completion; its stdout.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full: Vec<String> = self.enter_args()?;
        full.push(program.into());
        full.extend(args.iter().map(|a| a.to_string()));
        let full: Vec<&str> = full.iter().map(String::as_str).collect();
        run("nsenter", &full)
    }

    async fn start_containerd(&self, opts: &KubeletOptions) -> Result<ManagedProcess> {
        let config = self.dir.join("containerd/config.toml");
        std::fs::write(&config, containerd_config(&self.dir, &opts.sandbox_image))?;
        let mut args = self.enter_args()?;
        args.extend([
            which("containerd")?.display().to_string(),
            "--config".into(),
            config.display().to_string(),
        ]);
        let mut containerd = ManagedProcess::spawn(
            &format!("containerd {}", self.name),
            &which("nsenter")?,
            &args,
            &[],
            &self.dir.join("containerd.log"),
        )?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.ctr(&["version"]).is_err() {
            containerd.check_running()?;
            if tokio::time::Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: format!("containerd on {}", self.name),
                    secs: 30,
                    log: containerd.log_tail(4000),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(containerd)
    }

    /// `ctr` against this node's containerd, in the CRI namespace `k8s.io`.
    pub fn ctr(&self, args: &[&str]) -> Result<String> {
        let socket = self.socket().display().to_string();
        let mut full = vec!["--address", socket.as_str(), "--namespace", "k8s.io"];
        full.extend_from_slice(args);
        run("ctr", &full)
    }

    /// Imports an OCI (or docker) archive into the node's containerd.
    pub fn import(&self, archive: &Path) -> Result<()> {
        if !archive.is_file() {
            return Err(HarnessError::MissingPeer {
                what: "container image archive".into(),
                path: archive.display().to_string(),
            });
        }
        let archive = archive.display().to_string();
        self.ctr(&["images", "import", "--no-unpack", &archive])?;
        Ok(())
    }

    fn start_kubelet(&self, kubelet: &Path, opts: &KubeletOptions) -> Result<ManagedProcess> {
        let config = self.dir.join("kubelet.yaml");
        std::fs::write(&config, kubelet_config(&self.cgroup_root, opts.ip))?;
        let mut args = self.enter_args()?;
        args.extend([
            kubelet.display().to_string(),
            format!("--config={}", config.display()),
            format!("--kubeconfig={}", opts.kubeconfig.display()),
            "--container-runtime=remote".into(),
            format!(
                "--container-runtime-endpoint=unix://{}",
                self.socket().display()
            ),
            format!("--hostname-override={}", opts.name),
            format!("--node-ip={}", opts.ip),
            "--v=1".into(),
        ]);
        ManagedProcess::spawn(
            &format!("kubelet {}", self.name),
            &which("nsenter")?,
            &args,
            &[],
            &self.dir.join("kubelet.log"),
        )
    }

    /// kube-proxy in iptables mode (Services and NodePorts in the node's namespace), a process
    /// of the node as the kubelet is.
    fn start_kube_proxy(&self, opts: &KubeletOptions) -> Result<ManagedProcess> {
        let bin = k8s_bin_dir().join("kube-proxy");
        if !bin.is_file() {
            return Err(HarnessError::MissingPeer {
                what: "kube-proxy".into(),
                path: bin.display().to_string(),
            });
        }
        let mut args = self.enter_args()?;
        args.extend([
            bin.display().to_string(),
            format!("--kubeconfig={}", opts.kubeconfig.display()),
            format!("--hostname-override={}", opts.name),
            "--proxy-mode=iptables".into(),
            format!("--cluster-cidr={}", crate::overlay::CLUSTER_CIDR),
            format!("--bind-address={}", opts.ip),
            format!("--healthz-bind-address={}:10256", opts.ip),
            format!("--metrics-bind-address={}:10249", opts.ip),
            // nf_conntrack_max is global (not per namespace): left as the host has it.
            "--conntrack-max-per-core=0".into(),
            "--v=1".into(),
        ]);
        ManagedProcess::spawn(
            &format!("kube-proxy {}", self.name),
            &which("nsenter")?,
            &args,
            &[],
            &self.dir.join("kube-proxy.log"),
        )
    }

    /// The kubelet's log so far (last `max` bytes).
    pub fn kubelet_log(&self, max: usize) -> String {
        self.kubelet
            .as_ref()
            .map(|p| p.log_tail(max))
            .unwrap_or_default()
    }

    /// Whether the kubelet and containerd still run.
    pub fn check_running(&mut self) -> Result<()> {
        for p in [
            &mut self.containerd,
            &mut self.kubelet,
            &mut self.kube_proxy,
        ]
        .into_iter()
        .flatten()
        {
            p.check_running()?;
        }
        Ok(())
    }

    /// Stops the kubelet (SIGTERM, as a node shutting down), leaving its pods running.
    pub fn stop_kubelet(&mut self) {
        if let Some(mut k) = self.kubelet.take() {
            k.stop(Duration::from_secs(5));
        }
    }

    /// Every process of the node's pods and shims, killed.
    fn kill_workloads(&self) {
        // Shims outlive containerd (they re-parent); each names the node's socket.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f", &self.socket().display().to_string()])
            .status();
        for _ in 0..3 {
            for pid in cgroup_pids(&self.cgroup_root)
                .into_iter()
                .filter_map(rustix::process::Pid::from_raw)
                .filter(|p| !p.is_init())
            {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        for mut p in [self.kube_proxy.take(), self.kubelet.take()]
            .into_iter()
            .flatten()
        {
            p.kill();
        }
        self.kill_workloads();
        if let Some(mut c) = self.containerd.take() {
            c.kill();
        }
        self.kill_workloads();
        if let Some(mut h) = self.holder.take() {
            h.kill();
        }
        // Whatever sockets are left in the node's namespace (best effort: needs the kernel's
        // sock_diag destroy).
        let _ = Command::new("ip")
            .args(["netns", "exec", &self.netns, "ss", "-K", "state", "all"])
            .output();
        remove_cgroup_root(&self.cgroup_root);
        if self.registered {
            release_node();
        }
    }
}

/// The holder's line once its mounts are in place.
const HOLDER_READY: &str = "homecluster-node-ready";

/// What real nodes change on the host, shared by all of this process's nodes: how many run,
/// the host directories created as mount points, and the sysctls as they were before the first
/// node's kubelet changed them. The last node to stop puts both back (removing a directory
/// another node's namespace mounts on would detach that mount; restoring sysctls while a
/// kubelet runs would be undone or, worse, saved as the host's).
struct HostState {
    nodes: usize,
    created: Vec<PathBuf>,
    sysctls: Vec<(String, String)>,
}

static HOST: std::sync::Mutex<HostState> = std::sync::Mutex::new(HostState {
    nodes: 0,
    created: Vec::new(),
    sysctls: Vec::new(),
});

fn host() -> std::sync::MutexGuard<'static, HostState> {
    HOST.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Counts a starting node; the first saves the sysctls and creates the mount points.
fn register_node() -> Result<bool> {
    let mut host = host();
    if host.nodes == 0 {
        host.sysctls = read_sysctls();
        for path in NODE_PATHS {
            let mut missing = Vec::new();
            let mut p = Some(Path::new(path));
            while let Some(dir) = p.filter(|d| !d.exists()) {
                missing.push(dir.to_path_buf());
                p = dir.parent();
            }
            std::fs::create_dir_all(path)?;
            // Deepest last, so removal in reverse goes deepest first.
            host.created.extend(missing.into_iter().rev());
        }
    }
    host.nodes += 1;
    Ok(true)
}

/// Un-counts a stopped node; the last restores the sysctls and removes the mount points.
fn release_node() {
    let mut host = host();
    host.nodes = host.nodes.saturating_sub(1);
    if host.nodes == 0 {
        restore_sysctls(&host.sysctls);
        for dir in host.created.drain(..).rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn containerd_config(dir: &Path, sandbox_image: &str) -> String {
    let d = dir.join("containerd");
    let d = d.display();
    format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{d}/containerd.sock"

[ttrpc]
  address = "{d}/containerd.sock.ttrpc"

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/opt/cni/bin"
    conf_dir = "/etc/cni/net.d"
"#
    )
}

fn kubelet_config(cgroup_root: &str, ip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: {ip}
readOnlyPort: 0
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
makeIPTablesUtilChains: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "1Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
nodeStatusUpdateFrequency: 2s
syncFrequency: 10s
serializeImagePulls: false
clusterDomain: cluster.local
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
authorization:
  mode: AlwaysAllow
"#
    )
}

/// The cgroup v1 hierarchies mounted under /sys/fs/cgroup (each a directory with tasks).
fn hierarchies() -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("tasks").is_file())
        .collect();
    out.sort();
    out
}

/// Creates `root` in every hierarchy (cpuset's gets its parent's cpus and mems).
fn create_cgroup_root(root: &str) -> Result<()> {
    for h in hierarchies() {
        let dir = h.join(root.trim_start_matches('/'));
        std::fs::create_dir_all(&dir)?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            if let Ok(value) = std::fs::read_to_string(h.join(file)) {
                std::fs::write(dir.join(file), value.trim())?;
            }
        }
    }
    Ok(())
}

/// Every process in `root`'s subtree (any hierarchy that has it).
fn cgroup_pids(root: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for h in hierarchies() {
        let mut stack = vec![h.join(root.trim_start_matches('/'))];
        while let Some(dir) = stack.pop() {
            if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Removes `root`'s subtree, deepest first, in every hierarchy.
fn remove_cgroup_root(root: &str) {
    for h in hierarchies() {
        let top = h.join(root.trim_start_matches('/'));
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if let Ok(entries) = std::fs::read_dir(&dir) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            dirs.push(dir);
        }
        for dir in dirs.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

fn read_sysctls() -> Vec<(String, String)> {
    KUBELET_SYSCTLS
        .iter()
        .filter_map(|k| {
            std::fs::read_to_string(Path::new("/proc/sys").join(k))
                .ok()
                .map(|v| (k.to_string(), v.trim().to_string()))
        })
        .collect()
}

fn restore_sysctls(values: &[(String, String)]) {
    for (key, value) in values {
        let _ = std::fs::write(Path::new("/proc/sys").join(key), value);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn configs_name_the_node_paths() {
        let c = super::containerd_config(std::path::Path::new("/x/n1"), "docker.io/a/pause:1");
        assert!(c.contains(r#"address = "/x/n1/containerd/containerd.sock""#));
        assert!(c.contains("restrict_oom_score_adj = true"));
        let k = super::kubelet_config("/hc-n1", "10.0.0.2".parse().unwrap());
        assert!(k.contains("cgroupRoot: /hc-n1") && k.contains("address: 10.0.0.2"));
    }
}
