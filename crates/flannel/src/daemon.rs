//! flanneld's start-up sequence (upstream `main.go`, step by step) and its loops: peers
//! reconciled on every Node event and every `--reconcile-interval`, rules every
//! `--iptables-resync`. Stopping leaves the data path in place, as upstream does.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use ipnet::Ipv4Net;
use kube::Client;
use kube_common::backoff::Backoff;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::annotations::{self, Keys};
use crate::args::Args;
use crate::config::NetConf;
use crate::iface::{self, ExtIface, Selector};
use crate::kube_subnet_mgr::{self as ksm, CachedNode, Nodes};
use crate::netlink::Net;
use crate::reconcile::{self, Local, Peer};
use crate::subnet_env::SubnetEnv;
use crate::trafficmngr::{Rules, TrafficManager};
use crate::vxlan::{self, Device, Wanted};

const BR_NETFILTER: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";

#[derive(Clone, Default)]
struct Metrics {
    passes: Counter,
    changes: Counter,
    errors: Counter,
    peers: Gauge,
}

impl Metrics {
    fn register(r: &mut Registry) -> Metrics {
        let m = Metrics::default();
        r.register(
            "flannel_reconcile_passes",
            "Peer reconcile passes",
            m.passes.clone(),
        );
        r.register(
            "flannel_reconcile_changes",
            "Routes, ARP and FDB entries written or removed",
            m.changes.clone(),
        );
        r.register(
            "flannel_reconcile_errors",
            "Failed reconcile passes and failed route, ARP or FDB writes",
            m.errors.clone(),
        );
        r.register("flannel_peers", "Peer nodes programmed", m.peers.clone());
        m
    }
}

/// Everything the loops need once the node is set up.
struct Node0 {
    name: String,
    client: Client,
    /// Public IPs whose direct routes are ours (only touched by `pass`, never across an await).
    gateways: Mutex<reconcile::Gateways>,
    /// The peer conflicts of the last pass, so each is warned about once.
    conflicts: Mutex<Vec<reconcile::Conflict>>,
    /// What this node publishes; re-published whenever the Node stops showing it.
    annotations: std::collections::BTreeMap<String, String>,
    keys: Keys,
    conf: NetConf,
    ext: ExtIface,
    public_ip: std::net::Ipv4Addr,
    pod_cidr: Ipv4Net,
    dev: Device,
}

/// Runs flanneld until `shutdown`.
pub async fn run(args: Args, shutdown: CancellationToken) -> Result<()> {
    args.refuse_unsupported().map_err(anyhow::Error::msg)?;
    let conf = crate::config::load(&args.net_config_path)
        .with_context(|| format!("net-conf {}", args.net_config_path.display()))?;
    let readiness = kube_common::health::Readiness::default();
    let ready = readiness.register("rules-and-subnet-env");
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    if args.healthz_port != 0 {
        let state = kube_common::health::HealthState {
            readiness: readiness.clone(),
            registry: Arc::new(Mutex::new(registry)),
        };
        let addr = SocketAddr::new(args.healthz_ip, args.healthz_port);
        kube_common::health::serve(addr, state, shutdown.clone()).await?;
    }
    let client = kube_common::client::client(args.kubeconfig_file.as_deref()).await?;
    let name = ksm::node_name(&client).await?;
    tracing::info!(node = %name, network = %conf.network, "starting");
    let keys = Keys::new(&args.kube_annotation_prefix);
    let nodes = Nodes::start(client.clone(), &keys).await?;
    if !conf.enable_nftables && !std::path::Path::new(BR_NETFILTER).exists() {
        bail!(
            "{BR_NETFILTER} is missing: load the br_netfilter module (modprobe br_netfilter), as upstream flannel requires"
        );
    }
    let Some(node) = wait_for_pod_cidr(&nodes, &name, &shutdown).await else {
        return Ok(());
    };
    let me = setup_node(&args, &client, conf, keys, &node, name).await?;
    let net = Net::connect()?;
    let rules = Rules {
        network: me.conf.network,
        subnet: me.pod_cidr,
        masq: args.ip_masq,
        forward: args.iptables_forward_rules,
        fully_random: !args.ip_masq_fully_random_disable,
    };
    let env = SubnetEnv::new(me.conf.network, me.pod_cidr, me.dev.mtu, args.ip_masq);
    // iptables/nft child processes and file writes: off the runtime thread, so /healthz and
    // the Node watch keep going.
    let (tm, rules) = {
        let (args, nft) = (args.clone(), me.conf.enable_nftables);
        tokio::task::spawn_blocking(move || -> Result<(TrafficManager, Rules)> {
            let tm = TrafficManager::new(nft);
            let mut rules = rules;
            if rules.fully_random && !tm.supports_random_fully() {
                tracing::warn!(
                    "this iptables has no --random-fully (before 1.6.2); masquerading without it"
                );
                rules.fully_random = false;
            }
            setup_rules(&args, &tm, &rules)?;
            env.write(&args.subnet_file)?;
            Ok((tm, rules))
        })
        .await??
    };
    let local = local(&me);
    pass(&net, &me, &local, &nodes, &metrics).await;
    ready.set(true);
    tracing::info!(subnet = %me.pod_cidr, device = %me.dev.name, mac = %me.dev.mac, "network is up");
    if args.set_node_network_unavailable {
        let (client, name, stop) = (client.clone(), me.name.clone(), shutdown.clone());
        tokio::spawn(async move {
            let set = || ksm::set_network_available(&client, &name);
            retry(
                "setting NetworkUnavailable=False",
                REPORT_BACKOFF,
                &stop,
                set,
            )
            .await
        });
    }
    run_loops(&args, &net, &me, &nodes, &tm, &rules, &metrics, &shutdown).await;
    tracing::info!("stopping; routes, ARP/FDB entries, rules and the device stay in place");
    Ok(())
}

/// Retries for the NetworkUnavailable=False write: 1 s doubling up to a minute.
const REPORT_BACKOFF: Backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));

/// Runs `f` until it succeeds (true) or `stop` fires (false), waiting `backoff` between tries.
async fn retry<F, Fut, E>(what: &str, backoff: Backoff, stop: &CancellationToken, f: F) -> bool
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::result::Result<(), E>>,
    E: std::fmt::Display,
{
    for delay in backoff.iter() {
        match f().await {
            Ok(()) => return true,
            Err(e) => tracing::warn!(error = %e, ?delay, "{what} failed; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    false
}

/// Upstream exits with "pod cidr not assigned" and crash-loops; waiting with a log line keeps
/// the pod Running and starts as soon as node IPAM assigns one.
async fn wait_for_pod_cidr(
    nodes: &Nodes,
    name: &str,
    shutdown: &CancellationToken,
) -> Option<Arc<CachedNode>> {
    let mut logged = tokio::time::Instant::now() - Duration::from_secs(60);
    loop {
        let node = nodes.get(name);
        let msg = match node.as_deref().map(annotations::pod_cidr) {
            Some(Ok(Some(_))) => return node,
            None => format!("node {name:?} not found; waiting for it"),
            Some(Ok(None)) => format!("node {name:?} pod cidr not assigned; waiting for it"),
            Some(Err(e)) => format!("node {name:?}: {e}; waiting for a fix"),
        };
        if logged.elapsed() >= Duration::from_secs(30) {
            tracing::warn!("{msg}");
            logged = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = nodes.changed.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Steps 6–8: public IP, external interface, VXLAN device, annotations, device address.
async fn setup_node(
    args: &Args,
    client: &Client,
    conf: NetConf,
    keys: Keys,
    node: &CachedNode,
    name: String,
) -> Result<Node0> {
    let pod_cidr = annotations::pod_cidr(node)
        .map_err(anyhow::Error::msg)?
        .context("pod cidr not assigned")?;
    if !conf.network.contains(&pod_cidr) {
        bail!(
            "the node's podCIDR {pod_cidr} is not inside Network {} of net-conf.json",
            conf.network
        );
    }
    let net = Net::connect()?;
    let node_public_ip = annotations::node_public_ip(node, &keys);
    let selector = Selector {
        ifaces: args.iface.clone(),
        regexes: args
            .iface_regex
            .iter()
            .filter_map(|r| regex::Regex::new(r).ok())
            .collect(),
        can_reach: args.iface_can_reach,
        public_ip: node_public_ip.or(args.public_ip),
    };
    let ext = iface::select(&net, &selector).await?;
    let public_ip = node_public_ip.or(args.public_ip).unwrap_or(ext.addr);
    tracing::info!(iface = %ext.name, addr = %ext.addr, %public_ip, "using external interface");
    let stored = annotations::stored_mac(node, &keys, conf.backend.vni);
    let dev = vxlan::ensure(
        &net,
        &Wanted {
            conf: &conf.backend,
            ext: &ext,
            mac: stored,
        },
    )
    .await?;
    let published = annotations::public_ip_overwrite(node, &keys).unwrap_or(public_ip);
    let wanted = annotations::own_annotations(&keys, conf.backend.vni, dev.mac, published);
    ksm::publish(client, node, &wanted, 10).await?;
    vxlan::ensure_address(&net, &dev, pod_cidr, conf.network).await?;
    Ok(Node0 {
        name,
        client: client.clone(),
        annotations: wanted,
        gateways: Mutex::default(),
        conflicts: Mutex::default(),
        keys,
        conf,
        ext,
        public_ip,
        pod_cidr,
        dev,
    })
}

/// Step 9: the other mode's rules go, rules of a previous subnet go, ours are installed.
fn setup_rules(args: &Args, tm: &TrafficManager, rules: &Rules) -> Result<()> {
    tm.cleanup_other()?;
    if let Ok(prev) = SubnetEnv::read(&args.subnet_file)
        && (prev.network != rules.network || prev.pod_cidr() != rules.subnet)
    {
        tracing::info!(network = %prev.network, subnet = %prev.pod_cidr(), "removing rules of the previous subnet");
        tm.remove_stale(&Rules {
            network: prev.network,
            subnet: prev.pod_cidr(),
            ..rules.clone()
        })?;
    }
    tm.remove_other_variant(rules)?;
    tm.ensure(rules)?;
    Ok(())
}

fn local(me: &Node0) -> Local {
    Local {
        vxlan_index: me.dev.index,
        ext_index: me.ext.index,
        network: me.conf.network,
        own_subnet: me.pod_cidr,
        direct_routing: me.conf.backend.direct_routing,
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_loops(
    args: &Args,
    net: &Net,
    me: &Node0,
    nodes: &Nodes,
    tm: &TrafficManager,
    rules: &Rules,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let mut reconcile_tick = tokio::time::interval(Duration::from_secs(args.reconcile_interval));
    let mut rules_tick = tokio::time::interval(Duration::from_secs(args.iptables_resync));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = nodes.changed.notified() => pass(net, me, &local(me), nodes, metrics).await,
            _ = reconcile_tick.tick() => {
                pass(net, me, &local(me), nodes, metrics).await;
            }
            _ = rules_tick.tick() => {
                // iptables/nft are child processes: off the (single) runtime thread, so health
                // probes and peer reconciles never wait for them.
                let (tm, rules) = (tm.clone(), rules.clone());
                match tokio::task::spawn_blocking(move || tm.ensure(&rules)).await {
                    Ok(Ok(true)) => tracing::info!("masquerade/forward rules were missing; re-applied"),
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "checking rules failed"),
                    Err(e) => tracing::warn!(error = %e, "rule check task failed"),
                }
            }
        }
    }
}

/// One reconcile: our annotations (re-published if the Node was re-registered or they were
/// removed or overwritten: without them every peer drops this node), the device (recreated if
/// deleted), then every peer's entries.
async fn pass(net: &Net, me: &Node0, local: &Local, nodes: &Nodes, metrics: &Metrics) {
    metrics.passes.inc();
    if let Some(node) = nodes.get(&me.name)
        && ksm::differs(&node, &me.annotations)
    {
        tracing::warn!("this node's flannel annotations are missing or changed; re-publishing");
        if let Err(e) = ksm::publish(&me.client, &node, &me.annotations, 1).await {
            metrics.errors.inc();
            tracing::warn!(error = %e, "re-publishing annotations failed; retrying on the next pass");
        }
    }
    let result = async {
        let dev = vxlan::ensure(
            net,
            &Wanted {
                conf: &me.conf.backend,
                ext: &me.ext,
                mac: Some(me.dev.mac),
            },
        )
        .await?;
        vxlan::ensure_address(net, &dev, me.pod_cidr, me.conf.network).await?;
        let local = Local {
            vxlan_index: dev.index,
            ..*local
        };
        let peers = peers(net, me, nodes).await;
        warn_conflicts(me, reconcile::select(&local, &peers).1);
        metrics.peers.set(peers.len() as i64);
        let mut gateways = lock(&me.gateways).clone();
        let done = reconcile::reconcile(net, &local, &peers, &mut gateways).await;
        *lock(&me.gateways) = gateways;
        done
    }
    .await;
    match result {
        Ok(done) => {
            metrics.changes.inc_by(done.written as u64);
            metrics.errors.inc_by(done.failed as u64);
        }
        Err(e) => {
            metrics.errors.inc();
            tracing::warn!(error = %e, "reconcile failed; retrying on the next pass");
        }
    }
}

/// Warns about each new peer conflict once (they are recomputed every pass).
fn warn_conflicts(me: &Node0, conflicts: Vec<reconcile::Conflict>) {
    let mut warned = lock(&me.conflicts);
    for c in conflicts.iter().filter(|c| !warned.contains(c)) {
        tracing::warn!(peer = %c.peer, reason = %c.reason, "peer left out");
    }
    *warned = conflicts;
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn peers(net: &Net, me: &Node0, nodes: &Nodes) -> Vec<Peer> {
    let mut out = Vec::new();
    for (name, lease) in nodes.peer_leases(&me.keys, &me.name) {
        if lease.vni != me.conf.backend.vni {
            continue;
        }
        let direct = me.conf.backend.direct_routing
            && lease.public_ip != me.public_ip
            && iface::on_link(net, lease.public_ip).await.unwrap_or(false);
        out.push(Peer {
            name,
            lease,
            direct,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retry_keeps_trying_until_the_write_succeeds_or_shutdown() {
        let tries = std::sync::atomic::AtomicU32::new(0);
        let backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(4));
        let stop = CancellationToken::new();
        let ok = retry("test", backoff, &stop, || {
            let n = tries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move { if n < 3 { Err("apiserver down") } else { Ok(()) } }
        })
        .await;
        assert!(ok);
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 4);
        stop.cancel();
        let ok = retry("test", backoff, &stop, || async { Err::<(), _>("down") }).await;
        assert!(!ok, "shutdown ends the retries");
    }
}
