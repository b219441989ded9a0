//! The `flannel` CNI plugin against the real delegates (Debian's bridge, host-local, portmap) in
//! a node network namespace, called exactly as a runtime calls it. No control plane needed:
//! subnet.env is written in flanneld's format.
#![allow(clippy::unwrap_used)] // test code

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use integration_tests::netns::NetNs;
use integration_tests::overlay::{DEBIAN_CNI_DIR, cni_conflist, cni_exec};
use serde_json::{Value, json};

const PLUGIN: &str = env!("CARGO_BIN_EXE_flannel");
const FLANNELD: &str = env!("CARGO_BIN_EXE_flanneld");

fn cni_path() -> String {
    let dir = Path::new(PLUGIN).parent().unwrap().display().to_string();
    format!("{dir}:{DEBIAN_CNI_DIR}")
}

/// A node namespace with a subnet.env for 10.244.1.0/24 and per-node state directories.
struct Node {
    ns: NetNs,
    dir: tempfile::TempDir,
}

impl Node {
    fn new() -> Node {
        let ns = NetNs::new("flcni").expect("node namespace (run as root)");
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("run/flannel")).unwrap();
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/subnet.env"),
            dir.path().join("run/flannel/subnet.env"),
        )
        .unwrap();
        Node { ns, dir }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn flannel_conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version, "name": "cbr0", "type": "flannel",
            "subnetFile": self.path("run/flannel/subnet.env"),
            "dataDir": self.path("flannel"),
            "ipam": {"dataDir": self.path("networks")},
            "delegate": {"hairpinMode": true, "isDefaultGateway": true}
        })
    }

    fn conflist(&self) -> Value {
        let mut flannel = self.flannel_conf("0.3.1");
        let obj = flannel.as_object_mut().unwrap();
        obj.remove("cniVersion");
        obj.remove("name");
        json!({"name": "cbr0", "cniVersion": "0.3.1", "plugins": [flannel, {"type": "portmap", "capabilities": {"portMappings": true}}]})
    }

    fn call(&self, command: &str, id: &str, netns: &Path, stdin: &[u8]) -> (bool, Value) {
        let (ok, out) = cni_exec(
            self.ns.name(),
            &cni_path(),
            "flannel",
            command,
            id,
            netns,
            stdin,
        )
        .unwrap();
        let v = if out.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("stdout not JSON ({e}): {out:?}"))
        };
        (ok, v)
    }

    fn allocated(&self) -> Vec<String> {
        let dir = self.path("networks/cbr0");
        let mut v: Vec<String> = std::fs::read_dir(&dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("10."))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
}

#[test]
fn bad_input_gets_cni_error_json_with_spec_codes() {
    let node = Node::new();
    let netns = Path::new("/run/netns").join(node.ns.name());
    let good = node.flannel_conf("0.3.1").to_string();
    let cases: Vec<(&str, Vec<u8>, u64)> = vec![
        ("garbage", b"\x00\xffnot json".to_vec(), 6),
        ("truncated", good.as_bytes()[..good.len() / 2].to_vec(), 6),
        ("empty", Vec::new(), 6),
        (
            "unknown cniVersion",
            node.flannel_conf("9.9.9").to_string().into_bytes(),
            1,
        ),
        (
            "delegate sets ipam",
            br#"{"cniVersion":"0.3.1","name":"cbr0","delegate":{"ipam":{}}}"#.to_vec(),
            7,
        ),
    ];
    for (what, stdin, code) in cases {
        let (ok, v) = node.call("ADD", "bad1", &netns, &stdin);
        assert!(!ok, "{what}");
        assert_eq!(v["code"], code, "{what}: {v}");
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {v}"
        );
        println!("{what}: {v}");
    }
    std::fs::remove_file(node.path("run/flannel/subnet.env")).unwrap();
    let (ok, v) = node.call("ADD", "bad2", &netns, good.as_bytes());
    assert!(!ok);
    assert_eq!(v["code"], 11, "missing subnet.env: {v}");
    assert_eq!(v["cniVersion"], "0.3.1");
    // No partial set-up: nothing saved, nothing allocated, no bridge created.
    assert!(
        !node.path("flannel").exists()
            || std::fs::read_dir(node.path("flannel")).unwrap().count() == 0
    );
    assert!(node.allocated().is_empty());
    assert!(node.ns.ip(&["link", "show", "cni0"]).is_err());
    let (ok, v) = node.call("VERSION", "", &netns, br#"{"cniVersion":"1.1.0"}"#);
    assert!(ok);
    assert_eq!(
        v["supportedVersions"],
        json!([
            "0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"
        ])
    );
    // STATUS (1.1.0) reports "not available" (50) while subnet.env is missing.
    let (ok, v) = node.call(
        "STATUS",
        "",
        &netns,
        node.flannel_conf("1.1.0").to_string().as_bytes(),
    );
    assert!(!ok);
    assert_eq!(v["code"], 50);
}

#[test]
fn seed_conflist_add_check_del_through_real_bridge_host_local_portmap() {
    let node = Node::new();
    let pod = NetNs::new("flcnipod").unwrap();
    let conflist = node.conflist();
    let result = cni_conflist(
        node.ns.name(),
        &cni_path(),
        "ADD",
        "pod1",
        &pod.path(),
        &conflist,
        None,
    )
    .unwrap()
    .unwrap();
    // The 0.3.1 layout the seed's conflist asks for, passed through portmap as prevResult.
    assert_eq!(result["cniVersion"], "0.3.1");
    assert_eq!(result["ips"][0]["version"], "4");
    assert_eq!(result["ips"][0]["address"], "10.244.1.2/24");
    assert_eq!(result["ips"][0]["gateway"], "10.244.1.1");
    let routes: Vec<String> = result["routes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["dst"].as_str().unwrap().to_string())
        .collect();
    assert!(
        routes.contains(&"10.244.0.0/16".to_string()) && routes.contains(&"0.0.0.0/0".to_string()),
        "{routes:?}"
    );
    // The saved delegate config is upstream's (DEL of a Go-plugin node reads the same file).
    let saved = std::fs::read_to_string(node.path("flannel/pod1")).unwrap();
    let want = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/delegate-seed.json"),
    )
    .unwrap()
    .replace("DATADIR", &node.path("networks").display().to_string());
    assert_eq!(
        serde_json::from_str::<Value>(&saved).unwrap(),
        serde_json::from_str::<Value>(&want).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(node.path("flannel/pod1"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // The pod reaches its gateway on cni0, MTU 1450 from subnet.env.
    let out = pod
        .exec("ping", &["-c", "1", "-W", "2", "10.244.1.1"])
        .unwrap();
    assert!(out.contains("1 received"), "{out}");
    assert!(
        pod.ip(&["link", "show", "eth0"])
            .unwrap()
            .contains("mtu 1450")
    );
    assert_eq!(node.allocated(), vec!["10.244.1.2"]);
    // DEL in reverse order with the cached result; the saved config and the address are freed.
    // A second DEL (a runtime retry) succeeds with nothing saved.
    for _ in 0..2 {
        let del = cni_conflist(
            node.ns.name(),
            &cni_path(),
            "DEL",
            "pod1",
            &pod.path(),
            &conflist,
            Some(&result),
        );
        del.unwrap();
        assert!(!node.path("flannel/pod1").exists());
        assert!(node.allocated().is_empty());
    }
}

#[test]
fn fifty_concurrent_adds_then_dels_leave_no_duplicate_or_leak() {
    let node = std::sync::Arc::new(Node::new());
    let pods: Vec<NetNs> = (0..50)
        .map(|i| NetNs::new(&format!("flp{i}")).unwrap())
        .collect();
    let paths: Vec<PathBuf> = pods.iter().map(NetNs::path).collect();
    let conf = node.flannel_conf("1.0.0").to_string();
    let started = std::time::Instant::now();
    let adds: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (node, p, conf) = (node.clone(), p.clone(), conf.clone());
            std::thread::spawn(move || node.call("ADD", &format!("ctr{i}"), &p, conf.as_bytes()))
        })
        .collect();
    let mut ips = Vec::new();
    for h in adds {
        let (ok, v) = h.join().unwrap();
        assert!(ok, "ADD failed: {v}");
        ips.push(v["ips"][0]["address"].as_str().unwrap().to_string());
    }
    println!("50 concurrent ADDs: {:?}", started.elapsed());
    let unique: HashSet<&String> = ips.iter().collect();
    assert_eq!(unique.len(), 50, "an address was handed out twice: {ips:?}");
    assert_eq!(node.allocated().len(), 50);
    let dels: Vec<_> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (node, p, conf) = (node.clone(), p.clone(), conf.clone());
            std::thread::spawn(move || node.call("DEL", &format!("ctr{i}"), &p, conf.as_bytes()))
        })
        .collect();
    for h in dels {
        let (ok, v) = h.join().unwrap();
        assert!(ok, "DEL failed: {v}");
    }
    assert!(
        node.allocated().is_empty(),
        "leaked: {:?}",
        node.allocated()
    );
    assert_eq!(std::fs::read_dir(node.path("flannel")).unwrap().count(), 0);
    println!("50 ADDs + 50 DELs: 50 unique addresses, 0 leaked");
}

#[test]
fn flanneld_refuses_bad_net_conf_and_unsupported_modes_with_one_message() {
    let dir = tempfile::tempdir().unwrap();
    let run = |conf: &str, extra: &[&str]| {
        let p = dir.path().join("net-conf.json");
        std::fs::write(&p, conf).unwrap();
        let out = std::process::Command::new(FLANNELD)
            .arg(format!("--net-config-path={}", p.display()))
            .args(extra)
            .env("NODE_NAME", "x")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run("{\"Network\": \"10.244.0.0/16\", ", &["--kube-subnet-mgr"]);
    assert!(
        e.contains("net-conf") && e.contains("not valid JSON"),
        "{e}"
    );
    let e = run(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}"#,
        &["--kube-subnet-mgr"],
    );
    assert!(e.contains("Backend.Type \"wireguard\""), "{e}");
    let e = run(
        r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#,
        &[],
    );
    assert!(e.contains("--kube-subnet-mgr"), "{e}");
}
