//! `cargo bench -p flannel --bench overlay`: figures for benches/results/flannel.md.
//! 1. CNI ADD+DEL latency: our `flannel` plugin (delegating) vs Debian's bridge+host-local called
//!    directly with the same delegate config.
//! 2. Node added → its route/ARP/FDB programmed on the other nodes, p50/p99, with 3 and 300
//!    nodes (297 as Node objects without namespaces).
//! 3. flanneld RSS, idle and peak.
//! 4. Pod-to-pod TCP throughput over VXLAN vs over a plain veth pair.
//!
//! Runs as root; everything lives in namespaces the run creates.
#![allow(clippy::unwrap_used)] // test code

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration_tests::netns::{NetNs, VethEnd, veth};
use integration_tests::nodes::{TestNode, register};
use integration_tests::overlay::{DEBIAN_CNI_DIR, Lab, LabOptions};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, Client};

/// The binaries measured: those `xtask bench flannel` built as shipped (`SHIPPED_BIN_DIR`: static,
/// `--profile small`), else the ones cargo built beside this bench.
fn shipped(name: &str, cargo_built: &str) -> String {
    match std::env::var_os("SHIPPED_BIN_DIR") {
        Some(dir) => Path::new(&dir).join(name).display().to_string(),
        None => cargo_built.to_string(),
    }
}

static PLUGIN_PATH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| shipped("flannel", env!("CARGO_BIN_EXE_flannel")));
static FLANNELD_PATH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| shipped("flanneld", env!("CARGO_BIN_EXE_flanneld")));
const SUBNET_ENV: &str = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
const CNI_ROUNDS: usize = 80;
const NODE_SAMPLES: usize = 20;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let md = rt.block_on(run());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../benches/results/flannel.md");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    std::fs::write(&out, &md).unwrap();
    println!("{md}\nwritten to {}", out.display());
}

async fn run() -> String {
    let mut md = String::from("# flannel benchmark\n\n");
    let _ = writeln!(
        md,
        "`cargo run -p xtask -- bench flannel` (`cargo bench -p flannel --bench overlay --profile small`), {} on {} cores. All traffic inside network namespaces created by the run.\n",
        kernel(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    let _ = writeln!(
        md,
        "Binaries measured: {}.\n",
        match std::env::var("SHIPPED_BIN_DIR") {
            // The target triple, not the machine's absolute path.
            Ok(dir) => format!(
                "as shipped by `xtask bench flannel` (static, `--profile small`, `{}`)",
                Path::new(&dir)
                    .parent()
                    .and_then(Path::file_name)
                    .map(|t| t.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            Err(_) => "cargo bench's own (`--profile small`, dynamically linked)".into(),
        }
    );
    cni_latency(&mut md);
    let lab = Lab::start(LabOptions {
        net_conf: r#"{"Network": "10.240.0.0/12", "Backend": {"Type": "vxlan"}}"#.into(),
        cluster_cidr: "10.240.0.0/12",
        flanneld_args: vec![],
        ..LabOptions::new(FLANNELD_PATH.as_str(), PLUGIN_PATH.as_str())
    })
    .await
    .expect("lab");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle: Vec<[u64; 4]> = (0..3).map(|i| rss(&lab, i)).collect();
    throughput(&mut md, &lab);
    let client = lab.client().clone();
    let three = node_added(&lab, &client, "n3").await;
    add_fake_nodes(&lab, &client, 297).await;
    let many = node_added(&lab, &client, "n300").await;
    let _ = writeln!(
        md,
        "## Node added → peer entries programmed on the other nodes\n"
    );
    let _ = writeln!(
        md,
        "Time from the new node's flannel annotations being written (nodes/status patch) until its route is in the kernel of each real node (an RTM_GETROUTE lookup every 1 ms). {NODE_SAMPLES} nodes added one at a time, 3 observers each. Goal: p99 < 50 ms.\n"
    );
    let _ = writeln!(
        md,
        "| cluster | samples | p50 | p99 | max |\n|---|---|---|---|---|"
    );
    for (label, s) in [
        ("3 nodes", three),
        ("300 nodes (297 without namespaces)", many),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {} | {:.1} ms | {:.1} ms | {:.1} ms |",
            s.len(),
            pct(&s, 50.0),
            pct(&s, 99.0),
            pct(&s, 100.0)
        );
    }
    let peak: Vec<[u64; 4]> = (0..3).map(|i| rss(&lab, i)).collect();
    let _ = writeln!(
        md,
        "\n## flanneld memory\n\nVmRSS / VmHWM from /proc of the three flanneld processes, and VmRSS split into RssAnon (heap and stacks) and RssFile (pages of the binary). Goal: < 10 MiB (upstream flanneld, a Go daemon, uses tens of MiB).\n"
    );
    let _ = writeln!(
        md,
        "| when | RSS per node (KiB) | peak RSS per node (KiB) | heap and stacks (KiB) | binary pages (KiB) |\n|---|---|---|---|---|"
    );
    let fmt = |v: &[[u64; 4]], i: usize| {
        v.iter()
            .map(|x| x[i].to_string())
            .collect::<Vec<_>>()
            .join(" / ")
    };
    for (when, v) in [("idle, 3 nodes", &idle), ("after 300 nodes", &peak)] {
        let _ = writeln!(
            md,
            "| {when} | {} | {} | {} | {} |",
            fmt(v, 0),
            fmt(v, 1),
            fmt(v, 2),
            fmt(v, 3)
        );
    }
    md
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| format!("kernel {}", s.trim()))
        .unwrap_or_default()
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[idx.min(s.len() - 1)]
}

/// VmRSS, VmHWM, RssAnon, RssFile (KiB).
fn rss(lab: &Lab, i: usize) -> [u64; 4] {
    let pid = lab.nodes[i].flanneld_pid().unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    ["VmRSS:", "VmHWM:", "RssAnon:", "RssFile:"].map(field)
}

/// Runs `bin` with CNI env and `conf` on stdin (from a thread inside the node namespace).
fn cni(bin: &Path, command: &str, id: &str, netns: &Path, cni_path: &str, conf: &str) -> Duration {
    let start = Instant::now();
    let what = bin.display().to_string();
    let (ok, out) = integration_tests::overlay::cni_run(
        Command::new(bin),
        &what,
        command,
        id,
        netns,
        cni_path,
        conf.as_bytes(),
    )
    .unwrap();
    assert!(ok, "{command} failed: {out}");
    start.elapsed()
}

fn cni_latency(md: &mut String) {
    let node = NetNs::new("flbench").unwrap();
    let pod = NetNs::new("flbenchpod").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::fs::create_dir_all(d.join("run")).unwrap();
    std::fs::write(d.join("run/subnet.env"), SUBNET_ENV).unwrap();
    let ours = serde_json::json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel","subnetFile": d.join("run/subnet.env"),
        "dataDir": d.join("flannel"), "ipam": {"dataDir": d.join("networks")}, "delegate": {"hairpinMode": true, "isDefaultGateway": true}})
    .to_string();
    let direct = serde_json::json!({"cniVersion":"0.3.1","name":"cbr0","type":"bridge","hairpinMode":true,"isDefaultGateway":true,"ipMasq":false,"isGateway":true,"mtu":1450,
        "ipam":{"type":"host-local","dataDir": d.join("networks"),"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}]}})
    .to_string();
    let plugin_dir = Path::new(PLUGIN_PATH.as_str())
        .parent()
        .unwrap()
        .display()
        .to_string();
    let cni_path = format!("{plugin_dir}:{DEBIAN_CNI_DIR}");
    let netns = pod.path();
    let (ours_t, direct_t) = node
        .run_in(move || {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let flannel = PathBuf::from(PLUGIN_PATH.as_str());
            let bridge = Path::new(DEBIAN_CNI_DIR).join("bridge");
            // One warm-up each (creates cni0), then alternate.
            cni(&flannel, "ADD", "w", &netns, &cni_path, &ours);
            cni(&flannel, "DEL", "w", &netns, &cni_path, &ours);
            for i in 0..CNI_ROUNDS {
                let id = format!("c{i}");
                let t = cni(&flannel, "ADD", &id, &netns, &cni_path, &ours)
                    + cni(&flannel, "DEL", &id, &netns, &cni_path, &ours);
                a.push(t.as_secs_f64() * 1000.0);
                let t = cni(&bridge, "ADD", &id, &netns, &cni_path, &direct)
                    + cni(&bridge, "DEL", &id, &netns, &cni_path, &direct);
                b.push(t.as_secs_f64() * 1000.0);
            }
            (a, b)
        })
        .unwrap();
    let (o, dct) = (pct(&ours_t, 50.0), pct(&direct_t, 50.0));
    let _ = writeln!(
        md,
        "## CNI ADD+DEL latency\n\nOne ADD and one DEL into a fresh pod namespace, {CNI_ROUNDS} rounds alternating, plugins started from a thread inside the node namespace. Goal: our overhead under 10% of the delegate chain's time.\n"
    );
    let _ = writeln!(md, "| path | p50 | p99 |\n|---|---|---|");
    let _ = writeln!(
        md,
        "| `flannel` → bridge → host-local | {o:.2} ms | {:.2} ms |",
        pct(&ours_t, 99.0)
    );
    let _ = writeln!(
        md,
        "| bridge → host-local directly | {dct:.2} ms | {:.2} ms |",
        pct(&direct_t, 99.0)
    );
    let _ = writeln!(
        md,
        "\nOverhead of the flannel plugin (p50): {:.2} ms = {:.1}% of the delegate chain.\n",
        o - dct,
        (o - dct) / dct * 100.0
    );
    let (own, noop) = own_cost(&d);
    let _ = writeln!(
        md,
        "The difference of two chains of tens of milliseconds is within their noise (veth teardown waits for RCU), so the plugin's own cost is also measured against a no-op delegate (`/bin/true`), {NOOP_ROUNDS} rounds: `flannel` → no-op ADD+DEL p50 {own:.2} ms vs the no-op alone {noop:.2} ms, i.e. **{:.2} ms per ADD+DEL = {:.1}% of the direct bridge → host-local chain** (process start, subnet.env, writing the saved config, one extra exec).\n",
        own - noop,
        (own - noop) / dct * 100.0
    );
}

const NOOP_ROUNDS: usize = 200;

/// ADD+DEL through `flannel` to a delegate that does nothing, vs that delegate alone (p50 ms).
fn own_cost(dir: &Path) -> (f64, f64) {
    let bin = dir.join("noop-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let noop = bin.join("noop");
    let _ = std::os::unix::fs::symlink("/bin/true", &noop);
    let conf = serde_json::json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
        "subnetFile": dir.join("run/subnet.env"), "dataDir": dir.join("noop-state"), "delegate": {"type": "noop"}})
    .to_string();
    let cni_path = bin.display().to_string();
    let netns = Path::new("/run/netns/none");
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..NOOP_ROUNDS {
        let id = format!("n{i}");
        let t = cni(
            Path::new(PLUGIN_PATH.as_str()),
            "ADD",
            &id,
            netns,
            &cni_path,
            &conf,
        ) + cni(
            Path::new(PLUGIN_PATH.as_str()),
            "DEL",
            &id,
            netns,
            &cni_path,
            &conf,
        );
        a.push(t.as_secs_f64() * 1000.0);
        let t = cni(&noop, "ADD", &id, netns, &cni_path, &conf)
            + cni(&noop, "DEL", &id, netns, &cni_path, &conf);
        b.push(t.as_secs_f64() * 1000.0);
    }
    (pct(&a, 50.0), pct(&b, 50.0))
}

/// Bulk TCP for `secs` from `client` to `server_ip:port` (a listener in `server`): bytes/s.
fn tcp_rate(client: &NetNs, server: &NetNs, server_ip: Ipv4Addr, secs: f64) -> f64 {
    let l = server
        .run_in(move || TcpListener::bind((server_ip, 5201)).unwrap())
        .unwrap();
    let rx = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 1 << 17];
        let mut total = 0u64;
        let start = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        total as f64 / start.elapsed().as_secs_f64()
    });
    client
        .run_in(move || {
            let mut s = TcpStream::connect((server_ip, 5201)).unwrap();
            let buf = vec![7u8; 1 << 17];
            let end = Instant::now() + Duration::from_secs_f64(secs);
            while Instant::now() < end {
                if s.write_all(&buf).is_err() {
                    break;
                }
            }
        })
        .unwrap();
    rx.join().unwrap()
}

fn throughput(md: &mut String, lab: &Lab) {
    let a = lab.pod(0).unwrap();
    let b = lab.pod(1).unwrap();
    let vxlan = tcp_rate(a.ns(), b.ns(), b.ip, 3.0);
    let x = NetNs::new("flbx").unwrap();
    let y = NetNs::new("flby").unwrap();
    veth(
        VethEnd {
            ns: Some(&x),
            ifname: "eth0",
            addr: Some("10.99.0.1/24"),
        },
        VethEnd {
            ns: Some(&y),
            ifname: "eth0",
            addr: Some("10.99.0.2/24"),
        },
    )
    .unwrap();
    let plain = tcp_rate(&x, &y, Ipv4Addr::new(10, 99, 0, 2), 3.0);
    let _ = writeln!(
        md,
        "## Pod-to-pod TCP throughput\n\nOne TCP stream for 3 s, 128 KiB writes. VXLAN path: pod → veth → cni0 → flannel.1 (MTU 1450) → underlay veth → bridge → other node, and back up. Plain: two namespaces joined by one veth pair (MTU 1500).\n"
    );
    let _ = writeln!(md, "| path | throughput |\n|---|---|");
    let _ = writeln!(
        md,
        "| pod to pod across nodes over VXLAN | {:.2} Gbit/s |",
        vxlan * 8.0 / 1e9
    );
    let _ = writeln!(md, "| plain veth pair | {:.2} Gbit/s |", plain * 8.0 / 1e9);
    let _ = writeln!(
        md,
        "\nVXLAN reaches {:.0}% of the plain pair (encapsulation, two extra hops and a bridge on each side, all on the same 2 CPUs).\n",
        vxlan / plain * 100.0
    );
}

fn fake_annotations(i: u32) -> serde_json::Value {
    let ip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8);
    let mac = format!("02:00:00:00:{:02x}:{:02x}", i >> 8, i & 0xff);
    serde_json::json!({"metadata": {"annotations": {
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/backend-data": format!("{{\"VNI\":1,\"VtepMAC\":\"{mac}\"}}"),
        "flannel.alpha.coreos.com/public-ip": ip.to_string(),
    }}})
}

async fn wait_cidr(api: &Api<Node>, name: &str) -> String {
    loop {
        if let Ok(n) = api.get(name).await
            && let Some(c) = n.spec.and_then(|s| s.pod_cidr)
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls node `ns`'s routes over netlink until `dst` is present; returns when it appeared.
fn watch_route(ns: &NetNs, dst: String) -> std::thread::JoinHandle<Option<Instant>> {
    let file = std::fs::File::open(ns.path()).unwrap();
    std::thread::spawn(move || {
        use std::os::fd::AsFd;
        rustix::thread::move_into_link_name_space(
            file.as_fd(),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let net_dst: ipnet::Ipv4Net = dst.parse().unwrap();
        let probe = Ipv4Addr::from(u32::from(net_dst.network()) + 1);
        rt.block_on(async move {
            let net = flannel::netlink::Net::connect().unwrap();
            // A lookup returns a /32 clone; the output device tells whether the peer route exists.
            let vxlan = net
                .link_by_name("flannel.1")
                .await
                .unwrap()
                .unwrap()
                .header
                .index;
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                // One route lookup (not a dump of every route), so polling barely loads the CPUs
                // the daemons under test share.
                let routes = net.route_get(probe).await.unwrap_or_default();
                let via_vxlan = routes.iter().any(|r| {
                    r.attributes.iter().any(|a| {
                        matches!(a, netlink_packet_route::route::RouteAttribute::Oif(i) if *i == vxlan)
                    })
                });
                if via_vxlan {
                    return Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            None
        })
    })
}

/// Adds `NODE_SAMPLES` fake flannel nodes one at a time; per observer, ms until programmed.
async fn node_added(lab: &Lab, client: &Client, tag: &str) -> Vec<f64> {
    let api = Api::<Node>::all(client.clone());
    let mut samples = Vec::new();
    for s in 0..NODE_SAMPLES {
        let name = format!("bench-{tag}-{s}");
        register(client, &TestNode::new(&name)).await.unwrap();
        let cidr = wait_cidr(&api, &name).await;
        let watchers: Vec<_> = lab
            .nodes
            .iter()
            .map(|n| watch_route(&n.ns, cidr.clone()))
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let t0 = Instant::now();
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&fake_annotations(1000 + s as u32)),
        )
        .await
        .unwrap();
        for w in watchers {
            let at = w.join().unwrap().expect("route programmed within 30 s");
            samples.push(at.saturating_duration_since(t0).as_secs_f64() * 1000.0);
        }
        api.delete(&name, &DeleteParams::default()).await.unwrap();
    }
    samples
}

async fn add_fake_nodes(lab: &Lab, client: &Client, n: u32) {
    let api = Api::<Node>::all(client.clone());
    for i in 0..n {
        register(client, &TestNode::new(&format!("fake-{i}")))
            .await
            .unwrap();
    }
    for i in 0..n {
        let name = format!("fake-{i}");
        wait_cidr(&api, &name).await;
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(&fake_annotations(i)),
        )
        .await
        .unwrap();
    }
    let want = 2 + n as usize;
    for node in &lab.nodes {
        let deadline = Instant::now() + Duration::from_secs(120);
        while node
            .ns
            .ip(&["route", "show", "dev", "flannel.1"])
            .unwrap_or_default()
            .lines()
            .count()
            < want
        {
            assert!(
                Instant::now() < deadline,
                "{} did not program {want} peers",
                node.name
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
