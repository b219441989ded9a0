//! Network namespaces as test hosts (nodes, pods), with veth pairs and bridges, via iproute2.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::process::run;
use crate::{HarnessError, Result};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Fails unless we are root (namespaces, veth and VXLAN need CAP_NET_ADMIN).
pub fn require_root(what: &str) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(HarnessError::NotRoot(what.into()))
    }
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates `hc<pid>-<seq>-<label>` (unique per test process), with loopback up.
    pub fn new(label: &str) -> Result<NetNs> {
        require_root("network namespaces")?;
        let name = format!(
            "hc{}-{}-{label}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion.
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.name.as_str(), program];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// One end of a veth pair: which namespace (None = the host), interface name, CIDR address.
pub struct VethEnd<'a> {
    pub ns: Option<&'a NetNs>,
    pub ifname: &'a str,
    pub addr: Option<&'a str>,
}

/// Creates a veth pair, moves each end into its namespace, names, addresses and brings it up.
/// The pair is created under temporary names, since final names like `eth0` usually exist on
/// the host already, and renamed once inside its namespace.
pub fn veth(a: VethEnd<'_>, b: VethEnd<'_>) -> Result<()> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let tmp_a = format!("hct{}x{seq}a", std::process::id() % 100_000);
    let tmp_b = format!("hct{}x{seq}b", std::process::id() % 100_000);
    run(
        "ip",
        &[
            "link", "add", &tmp_a, "type", "veth", "peer", "name", &tmp_b,
        ],
    )?;
    let placed = place_ends(&a, &b, &tmp_a, &tmp_b);
    if placed.is_err() {
        // Never leave the pair behind under its temporary names (deleting one end deletes
        // both; the end may already be inside a namespace).
        let _ = run("ip", &["link", "del", &tmp_a]);
        let _ = run("ip", &["link", "del", &tmp_b]);
        for ns in [a.ns, b.ns].into_iter().flatten() {
            let _ = ns.ip(&["link", "del", &tmp_a]);
            let _ = ns.ip(&["link", "del", &tmp_b]);
        }
    }
    placed
}

fn place_ends(a: &VethEnd<'_>, b: &VethEnd<'_>, tmp_a: &str, tmp_b: &str) -> Result<()> {
    for (end, tmp) in [(a, tmp_a), (b, tmp_b)] {
        let ip = |args: &[&str]| match end.ns {
            Some(ns) => ns.ip(args),
            None => run("ip", args),
        };
        if let Some(ns) = end.ns {
            run("ip", &["link", "set", tmp, "netns", ns.name()])?;
        }
        ip(&["link", "set", tmp, "name", end.ifname])?;
        if let Some(addr) = end.addr {
            ip(&["addr", "add", addr, "dev", end.ifname])?;
        }
        ip(&["link", "set", end.ifname, "up"])?;
    }
    Ok(())
}

/// Creates a bridge in `ns` (or the host), with an optional address, and brings it up.
pub fn bridge(ns: Option<&NetNs>, name: &str, addr: Option<&str>) -> Result<()> {
    let ip = |args: &[&str]| match ns {
        Some(ns) => ns.ip(args),
        None => run("ip", args),
    };
    ip(&["link", "add", name, "type", "bridge"])?;
    if let Some(addr) = addr {
        ip(&["addr", "add", addr, "dev", name])?;
    }
    ip(&["link", "set", name, "up"])?;
    Ok(())
}

/// Attaches interface `ifname` in `ns` to bridge `bridge`.
pub fn attach(ns: Option<&NetNs>, ifname: &str, bridge: &str) -> Result<()> {
    let args = ["link", "set", ifname, "master", bridge];
    match ns {
        Some(ns) => ns.ip(&args).map(drop),
        None => run("ip", &args).map(drop),
    }
}

impl NetNs {
    /// `/run/netns/<name>`: what a runtime passes as `CNI_NETNS`.
    pub fn path(&self) -> std::path::PathBuf {
        std::path::Path::new("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace, so sockets it creates live
    /// there (they stay in it when handed back to other threads).
    pub fn run_in<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let file = std::fs::File::open(self.path())?;
        let joined = std::thread::spawn(move || {
            use std::os::fd::AsFd;
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .map_err(std::io::Error::from)?;
            Ok::<T, std::io::Error>(f())
        })
        .join()
        .map_err(|_| HarnessError::Command {
            cmd: "thread in namespace".into(),
            message: "panicked".into(),
        })?;
        Ok(joined?)
    }
}
