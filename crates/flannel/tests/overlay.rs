//! flanneld against real peers: node network namespaces on one underlay bridge (three Pis on
//! one LAN), the real kube-apiserver and kube-controller-manager with node IPAM, one flanneld
//! per node, pods set up through the CNI conflist. See `integration_tests::overlay`.
#![allow(clippy::unwrap_used)] // test code

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use integration_tests::overlay::{Lab, LabOptions, Pod};
use k8s_openapi::api::core::v1::Node;
use kube::Api;

fn opts() -> LabOptions {
    LabOptions::new(
        env!("CARGO_BIN_EXE_flanneld"),
        env!("CARGO_BIN_EXE_flannel"),
    )
}

async fn node(lab: &Lab, i: usize) -> Node {
    Api::<Node>::all(lab.client().clone())
        .get(&lab.nodes[i].name)
        .await
        .unwrap()
}

fn pod_cidr(n: &Node) -> String {
    n.spec.as_ref().unwrap().pod_cidr.clone().unwrap()
}

fn vtep_mac(lab: &Lab, i: usize) -> String {
    let out = lab.nodes[i]
        .ns
        .ip(&["-o", "link", "show", "flannel.1"])
        .unwrap();
    out.split("link/ether ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Entries on node `i`'s flannel.1: (routes, neighbours, fdb) as iproute2 prints them.
fn entries(lab: &Lab, i: usize) -> (String, String, String) {
    let ns = &lab.nodes[i].ns;
    (
        ns.ip(&["route", "show", "dev", "flannel.1"]).unwrap(),
        ns.ip(&["neigh", "show", "dev", "flannel.1"]).unwrap(),
        ns.exec("bridge", &["fdb", "show", "dev", "flannel.1"])
            .unwrap(),
    )
}

/// TCP echo from pod `a` to `addr` (a listener created in namespace `server`).
fn tcp_roundtrip(
    client: &Pod,
    listener: TcpListener,
    target: (Ipv4Addr, u16),
) -> std::net::SocketAddr {
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf).unwrap();
        peer
    });
    let echoed = client
        .ns()
        .run_in(move || {
            let mut s = TcpStream::connect_timeout(&target.into(), Duration::from_secs(5)).unwrap();
            s.write_all(b"hello").unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).unwrap();
            buf
        })
        .unwrap();
    assert_eq!(&echoed, b"hello");
    server.join().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_pods_ping_tcp_masquerade_and_upstream_formats() {
    let lab = Lab::start(opts()).await.unwrap();
    let pods: Vec<Pod> = (0..3).map(|i| lab.pod(i).unwrap()).collect();
    // Ping every pod from every other (all cross-node, over VXLAN).
    let (mut sent, mut received) = (0, 0);
    for a in &pods {
        for b in &pods {
            if a.ip != b.ip {
                let (s, r) = a.ping(b.ip, 3, "0.2").unwrap();
                sent += s;
                received += r;
            }
        }
    }
    println!("cross-node pod pings: {received}/{sent} received");
    assert_eq!((sent, received), (18, 18));
    // TCP from a pod on node 1 to a pod on node 2: the server sees the pod's own address.
    let b_ip = pods[1].ip;
    let l = pods[1]
        .ns()
        .run_in(move || TcpListener::bind((b_ip, 8080)).unwrap())
        .unwrap();
    let peer = tcp_roundtrip(&pods[0], l, (b_ip, 8080));
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(pods[0].ip),
        "pod to pod keeps its source"
    );
    // Pod to the LAN: masqueraded to the node's address.
    let lan_ip = lab.lan_ip;
    let l = lab
        .lan
        .run_in(move || TcpListener::bind((lan_ip, 9000)).unwrap())
        .unwrap();
    let peer = tcp_roundtrip(&pods[0], l, (lan_ip, 9000));
    println!("LAN host saw pod {} as {}", pods[0].ip, peer.ip());
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(lab.nodes[0].ip),
        "masqueraded to the node IP"
    );

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    for i in 0..3 {
        let n = node(&lab, i).await;
        let cidr = pod_cidr(&n);
        let prefix = cidr.trim_end_matches("0/24");
        // subnet.env byte for byte.
        let want = std::fs::read_to_string(fixtures.join("subnet.env"))
            .unwrap()
            .replace("10.244.1.", prefix);
        assert_eq!(
            std::fs::read_to_string(lab.nodes[i].subnet_file()).unwrap(),
            want
        );
        // Annotations byte for byte (VtepMAC is the device's MAC, public-ip the node's).
        let fixture: std::collections::BTreeMap<String, String> = serde_json::from_str(
            &std::fs::read_to_string(fixtures.join("node-annotations.json")).unwrap(),
        )
        .unwrap();
        let ann = n.metadata.annotations.clone().unwrap();
        for (k, v) in fixture {
            let v = v
                .replace("0a:58:0a:f4:01:00", &vtep_mac(&lab, i))
                .replace("172.31.250.11", &lab.nodes[i].ip.to_string());
            assert_eq!(ann.get(&k), Some(&v), "{k}");
        }
        // NetworkUnavailable=False, reason FlannelIsUp.
        let cond = n
            .status
            .unwrap()
            .conditions
            .unwrap()
            .into_iter()
            .find(|c| c.type_ == "NetworkUnavailable")
            .unwrap();
        assert_eq!(
            (cond.status.as_str(), cond.reason.as_deref()),
            ("False", Some("FlannelIsUp"))
        );
        // Upstream's rules, as iptables-save shows them.
        let save = lab.nodes[i].ns.exec("iptables-save", &[]).unwrap();
        for line in std::fs::read_to_string(fixtures.join("iptables-rules.txt"))
            .unwrap()
            .lines()
        {
            let line = line.replace("SUB", &cidr);
            assert!(
                save.lines().any(|l| l == line),
                "missing rule {line:?} in\n{save}"
            );
        }
        // The device as upstream makes it.
        let dev = lab.nodes[i]
            .ns
            .ip(&["-d", "link", "show", "flannel.1"])
            .unwrap();
        assert!(
            dev.contains("mtu 1450") && dev.contains("dstport 8472") && dev.contains("nolearning"),
            "{dev}"
        );
        let addr = lab.nodes[i]
            .ns
            .ip(&["-4", "-o", "addr", "show", "flannel.1"])
            .unwrap();
        assert!(addr.contains(&format!("{prefix}0/32")), "{addr}");
        // Health and metrics.
        assert_eq!(lab.health(i, "/healthz").unwrap().0, 200);
        let (status, metrics) = lab.health(i, "/metrics").unwrap();
        assert_eq!(status, 200);
        assert!(metrics.contains("flannel_peers 2"), "{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_added_is_reachable_and_deleted_node_entries_go_everywhere() {
    let mut lab = Lab::start(opts().nodes(2)).await.unwrap();
    let a = lab.pod(0).unwrap();
    let i = lab.add_node().await.unwrap();
    lab.wait_converged().await.unwrap();
    let c = lab.pod(i).unwrap();
    let (s, r) = a.ping(c.ip, 3, "0.2").unwrap();
    println!("pod on the added node: {r}/{s} pings");
    assert_eq!((s, r), (3, 3));
    let (s, r) = c.ping(a.ip, 3, "0.2").unwrap();
    assert_eq!((s, r), (3, 3));
    let cidr = pod_cidr(&node(&lab, i).await);
    let net = cidr.trim_end_matches("/24").to_string();
    let mac = vtep_mac(&lab, i);
    drop(c);
    lab.delete_node(i).await.unwrap();
    for n in 0..2 {
        integration_tests::poll::eventually(
            "deleted node's entries removed",
            Duration::from_secs(30),
            || {
                let (routes, neigh, fdb) = entries(&lab, n);
                let gone = !routes.contains(&cidr) && !neigh.contains(&net) && !fdb.contains(&mac);
                async move { gone }
            },
        )
        .await;
    }
    println!("node deleted: route, neighbour and FDB entry gone on both remaining nodes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_deleted_or_changed_entries_are_restored() {
    let lab = Lab::start(opts().nodes(2)).await.unwrap();
    let peer_cidr = pod_cidr(&node(&lab, 1).await);
    let vtep = peer_cidr.trim_end_matches("/24").to_string();
    let mac = vtep_mac(&lab, 1);
    let ns = &lab.nodes[0].ns;
    let before = entries(&lab, 0);
    ns.ip(&["route", "del", &peer_cidr, "dev", "flannel.1"])
        .unwrap();
    ns.ip(&["neigh", "del", &vtep, "dev", "flannel.1"]).unwrap();
    ns.exec(
        "bridge",
        &[
            "fdb",
            "del",
            &mac,
            "dev",
            "flannel.1",
            "dst",
            &lab.nodes[1].ip.to_string(),
        ],
    )
    .unwrap();
    // A wrong MAC on the neighbour entry is corrected too.
    ns.ip(&[
        "neigh",
        "add",
        &vtep,
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "flannel.1",
        "nud",
        "permanent",
    ])
    .unwrap();
    integration_tests::poll::eventually("entries restored", Duration::from_secs(30), || {
        let same = entries(&lab, 0) == before;
        async move { same }
    })
    .await;
    // And the device itself: deleted by hand, recreated with its MAC and all peer entries.
    ns.ip(&["link", "del", "flannel.1"]).unwrap();
    integration_tests::poll::eventually(
        "device and entries recreated",
        Duration::from_secs(30),
        || {
            let same = ns.ip(&["link", "show", "flannel.1"]).is_ok() && entries(&lab, 0) == before;
            async move { same }
        },
    )
    .await;
    // Our annotations removed or overwritten on the Node: re-published, so peers keep us.
    let ours = |n: Node| {
        let a = n.metadata.annotations.unwrap_or_default();
        let get = |k: &str| a.get(&format!("flannel.alpha.coreos.com/{k}")).cloned();
        (get("backend-data"), get("public-ip"))
    };
    let published = ours(node(&lab, 0).await);
    assert!(published.0.is_some() && published.1.is_some());
    let peer_entries = entries(&lab, 1);
    let key = "flannel.alpha.coreos.com/backend-data";
    let patch = serde_json::json!({ "metadata": { "annotations": {
        key: null,
        "flannel.alpha.coreos.com/public-ip": "172.31.250.250",
    } } });
    Api::<Node>::all(lab.client().clone())
        .patch(
            &lab.nodes[0].name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
    integration_tests::poll::eventually(
        "annotations re-published",
        Duration::from_secs(30),
        || async { ours(node(&lab, 0).await) == published && entries(&lab, 1) == peer_entries },
    )
    .await;
    let a = lab.pod(0).unwrap();
    let b = lab.pod(1).unwrap();
    assert_eq!(a.ping(b.ip, 2, "0.2").unwrap(), (2, 2));
    println!("route, neighbour, FDB entry, the device itself and the annotations restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_on_both_nodes_keeps_mac_and_loses_no_ping() {
    let mut lab = Lab::start(opts().nodes(2)).await.unwrap();
    let a = lab.pod(0).unwrap();
    let b = lab.pod(1).unwrap();
    let macs = (vtep_mac(&lab, 0), vtep_mac(&lab, 1));
    let before = (entries(&lab, 0), entries(&lab, 1));
    // 20 pings a second while flanneld restarts on both nodes.
    let ping_ns = a.ns().name().to_string();
    let target = b.ip.to_string();
    let pinger = std::thread::spawn(move || {
        let out = std::process::Command::new("ip")
            .args([
                "netns", "exec", &ping_ns, "ping", "-n", "-q", "-i", "0.05", "-W", "1", "-c",
                "200", &target,
            ])
            .output()
            .unwrap();
        integration_tests::overlay::parse_ping(&String::from_utf8_lossy(&out.stdout))
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    lab.restart_flanneld(0).await.unwrap();
    lab.restart_flanneld(1).await.unwrap();
    let (sent, received) = pinger.join().unwrap();
    println!(
        "pings during restart of flanneld on both nodes: {received}/{sent} received, {} lost",
        sent - received
    );
    assert_eq!(sent, 200);
    assert_eq!(
        received,
        sent,
        "a ping was lost during the restart; logs:\n{}\n{}",
        lab.nodes[0].flanneld_log(),
        lab.nodes[1].flanneld_log()
    );
    assert_eq!(
        (vtep_mac(&lab, 0), vtep_mac(&lab, 1)),
        macs,
        "VTEP MAC kept"
    );
    assert_eq!((entries(&lab, 0), entries(&lab, 1)), before);
    // The restarted daemons found nothing to change.
    for i in 0..2 {
        let (_, metrics) = lab.health(i, "/metrics").unwrap();
        assert!(
            metrics.contains("flannel_reconcile_changes_total 0"),
            "node {i} rewrote entries:\n{metrics}\n{}",
            lab.nodes[i].flanneld_log()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_nftables_and_back_cleans_up_the_other_modes_rules() {
    let mut lab = Lab::start(opts().nodes(2)).await.unwrap();
    let a = lab.pod(0).unwrap();
    let b = lab.pod(1).unwrap();
    let has_chains = |lab: &Lab| {
        let save = lab.nodes[0].ns.exec("iptables-save", &[]).unwrap();
        save.contains("FLANNEL-POSTRTG") || save.contains("FLANNEL-FWD")
    };
    let has_table = |lab: &Lab| {
        lab.nodes[0]
            .ns
            .exec("nft", &["list", "table", "ip", "flannel-ipv4"])
            .is_ok()
    };
    assert!(has_chains(&lab) && !has_table(&lab));
    // A table left behind by another run (say upstream's, for an older Network) is rewritten.
    let stale = "add table ip flannel-ipv4\n\
        add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority srcnat ; }\n\
        add rule ip flannel-ipv4 postrtg ip saddr 10.99.0.0/16 masquerade\n";
    let script = std::env::temp_dir().join(format!("flannel-stale-{}.nft", std::process::id()));
    std::fs::write(&script, stale).unwrap();
    lab.nodes[0]
        .ns
        .exec("nft", &["-f", script.to_str().unwrap()])
        .unwrap();
    let _ = std::fs::remove_file(&script);
    lab.set_net_conf(
        r#"{"Network": "10.244.0.0/16", "EnableNFTables": true, "Backend": {"Type": "vxlan"}}"#,
    )
    .unwrap();
    lab.restart_flanneld(0).await.unwrap();
    assert!(
        !has_chains(&lab),
        "iptables chains left behind after switching to nftables"
    );
    assert!(has_table(&lab));
    let table = lab.nodes[0]
        .ns
        .exec("nft", &["list", "table", "ip", "flannel-ipv4"])
        .unwrap();
    assert!(
        table.contains("chain postrtg")
            && table.contains("masquerade")
            && table.contains("chain forward")
            && !table.contains("10.99.0.0"),
        "{table}"
    );
    // A chain emptied by hand is refilled on the next resync (every second in the lab).
    lab.nodes[0]
        .ns
        .exec("nft", &["flush", "chain", "ip", "flannel-ipv4", "postrtg"])
        .unwrap();
    let mut refilled = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = lab.nodes[0]
            .ns
            .exec("nft", &["list", "chain", "ip", "flannel-ipv4", "postrtg"])
            .unwrap();
        if t.contains("masquerade") {
            refilled = true;
            break;
        }
    }
    assert!(refilled, "flushed postrtg chain was not refilled");
    assert_eq!(a.ping(b.ip, 2, "0.2").unwrap(), (2, 2));
    // Pod to the LAN is still masqueraded, now by nft.
    let lan_ip = lab.lan_ip;
    let l = lab
        .lan
        .run_in(move || TcpListener::bind((lan_ip, 9001)).unwrap())
        .unwrap();
    let peer = tcp_roundtrip(&a, l, (lan_ip, 9001));
    assert_eq!(peer.ip(), std::net::IpAddr::V4(lab.nodes[0].ip));
    lab.set_net_conf(integration_tests::overlay::SEED_NET_CONF)
        .unwrap();
    lab.restart_flanneld(0).await.unwrap();
    assert!(
        has_chains(&lab) && !has_table(&lab),
        "nft table left behind after switching back"
    );
    println!(
        "iptables -> nftables -> iptables: each mode removed the other's rules; pods kept working"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_cidr_outside_network_is_one_clear_error() {
    let mut o = opts().nodes(1);
    o.net_conf = r#"{"Network": "10.100.0.0/16", "Backend": {"Type": "vxlan"}}"#.into();
    let e = match Lab::start(o).await {
        Ok(_) => panic!("flanneld started with a podCIDR outside Network"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("is not inside Network 10.100.0.0/16 of net-conf.json"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_routing_uses_plain_routes_between_on_link_peers() {
    let mut o = opts().nodes(2);
    o.net_conf =
        r#"{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "DirectRouting": true}}"#
            .into();
    let lab = Lab::start_without_convergence(o).await.unwrap();
    let peer = pod_cidr(&node(&lab, 1).await);
    let via = format!("{peer} via {} dev eth0", lab.nodes[1].ip);
    integration_tests::poll::eventually(
        "direct route to the on-link peer",
        Duration::from_secs(30),
        || {
            let routes = lab.nodes[0].ns.ip(&["route", "show"]).unwrap_or_default();
            let ok = routes.lines().any(|l| l.starts_with(&via));
            async move { ok }
        },
    )
    .await;
    let (routes, neigh, fdb) = entries(&lab, 0);
    assert!(
        routes.trim().is_empty() && neigh.trim().is_empty() && fdb.trim().is_empty(),
        "no VXLAN entries: {routes}{neigh}{fdb}"
    );
    // Another component's static route into the Network, via a gateway that is no peer: not
    // flanneld's, so it stays through reconcile passes (every second in the lab).
    let other = format!("10.244.200.0/24 via {} dev eth0", lab.lan_ip);
    let args: Vec<&str> = ["route", "add"]
        .into_iter()
        .chain(other.split(' '))
        .collect();
    lab.nodes[0].ns.ip(&args).unwrap();
    let a = lab.pod(0).unwrap();
    let b = lab.pod(1).unwrap();
    assert_eq!(a.ping(b.ip, 3, "0.2").unwrap(), (3, 3));
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let routes = lab.nodes[0].ns.ip(&["route", "show"]).unwrap();
    assert!(routes.contains(&other), "static route removed: {routes}");
    println!("DirectRouting: {via}; pods ping 3/3 without encapsulation");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flanneld_waits_for_its_node_and_pod_cidr_instead_of_crash_looping() {
    let mut lab = Lab::start(opts().nodes(1)).await.unwrap();
    let i = lab.add_node_unregistered().unwrap();
    lab.start_flanneld(i).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        lab.flanneld_running(i),
        "flanneld exited: {}",
        lab.nodes[i].flanneld_log()
    );
    assert_eq!(
        lab.health(i, "/readyz").unwrap().0,
        503,
        "ready without a podCIDR"
    );
    assert!(
        lab.nodes[i].flanneld_log().contains("waiting"),
        "{}",
        lab.nodes[i].flanneld_log()
    );
    lab.register_node(i).await.unwrap();
    lab.wait_ready(i).await.unwrap();
    lab.wait_converged().await.unwrap();
    let a = lab.pod(0).unwrap();
    let b = lab.pod(i).unwrap();
    assert_eq!(a.ping(b.ip, 2, "0.2").unwrap(), (2, 2));
    println!(
        "flanneld waited (not ready, still running) until its Node and podCIDR existed, then came up"
    );
}
