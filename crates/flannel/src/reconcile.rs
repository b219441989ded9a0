//! Level-triggered peer programming: the desired set (one ARP entry, one FDB entry and one onlink
//! route per peer, or a direct route when DirectRouting applies) is computed from the Node cache
//! and diffed against what the kernel has on `flannel.<VNI>` (RTM_GETROUTE, RTM_GETNEIGH for
//! AF_INET and AF_BRIDGE). Only differences are written, so entries removed or changed by hand
//! come back, entries of deleted or re-addressed nodes go, and a restart rewrites nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::annotations::{Lease, Mac};
use crate::netlink::{Fdb, Neigh, Net, Result, Route};

/// A peer and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// The peer's Node name (for conflict warnings).
    pub name: String,
    pub lease: Lease,
    /// DirectRouting on and the peer on-link: a plain route via its public IP.
    pub direct: bool,
}

/// Where this node's entries live.
#[derive(Clone, Copy, Debug)]
pub struct Local {
    pub vxlan_index: u32,
    pub ext_index: u32,
    pub network: Ipv4Net,
    pub own_subnet: Ipv4Net,
    /// DirectRouting on: only then are gateway routes on the external interface ours.
    pub direct_routing: bool,
}

/// The kernel state flanneld owns.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct State {
    pub routes: BTreeSet<Route>,
    pub neighs: BTreeSet<Neigh>,
    pub fdb: BTreeSet<Fdb>,
}

/// One change to make.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DelRoute(Route),
    DelNeigh(Ipv4Addr),
    DelFdb(Mac, Option<Ipv4Addr>),
    SetNeigh(Ipv4Addr, Mac),
    SetFdb(Mac, Ipv4Addr),
    SetRoute(Route),
}

/// A peer left out because it clashes with this node or an earlier peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub peer: String,
    pub reason: String,
}

/// The peers that get entries, in order: a peer whose subnet overlaps ours (it would take our
/// pods' traffic) is dropped, and of peers whose subnets overlap or whose VTEP MACs are equal the
/// first wins (callers pass peers oldest Node first), so entries never flap between them.
pub fn select<'a>(local: &Local, peers: &'a [Peer]) -> (Vec<&'a Peer>, Vec<Conflict>) {
    // Kept subnets never overlap, so by start address the only one that can contain a new
    // subnet is the last starting at or before it, and those inside it start within it:
    // O(log n) per peer, which matters at hundreds of nodes on every pass.
    let mut by_start: BTreeMap<Ipv4Addr, &Peer> = BTreeMap::new();
    let mut by_mac: HashMap<Mac, &Peer> = HashMap::new();
    let mut kept: Vec<&Peer> = Vec::new();
    let mut conflicts = Vec::new();
    for p in peers {
        let l = &p.lease;
        if !local.network.contains(&l.subnet) {
            continue;
        }
        let overlapping = by_start
            .range(..=l.subnet.network())
            .next_back()
            .filter(|(_, k)| k.lease.subnet.contains(&l.subnet))
            .or_else(|| {
                by_start
                    .range(l.subnet.network()..=l.subnet.broadcast())
                    .next()
            })
            .map(|(_, k)| *k);
        let reason = if overlaps(&l.subnet, &local.own_subnet) {
            Some(format!(
                "its subnet {} overlaps this node's {}",
                l.subnet, local.own_subnet
            ))
        } else if let Some(k) = overlapping {
            Some(format!(
                "its subnet {} overlaps {} of node {:?}",
                l.subnet, k.lease.subnet, k.name
            ))
        } else if p.direct {
            None
        } else {
            by_mac
                .get(&l.vtep_mac)
                .map(|k| format!("its VtepMAC {} is also node {:?}'s", l.vtep_mac, k.name))
        };
        match reason {
            Some(reason) => conflicts.push(Conflict {
                peer: p.name.clone(),
                reason,
            }),
            None => {
                by_start.insert(l.subnet.network(), p);
                if !p.direct {
                    by_mac.entry(l.vtep_mac).or_insert(p);
                }
                kept.push(p);
            }
        }
    }
    (kept, conflicts)
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(b) || b.contains(a)
}

/// The entries `peers` need (after [`select`]).
pub fn desired(local: &Local, peers: &[Peer]) -> State {
    let mut s = State::default();
    for p in select(local, peers).0 {
        let l = &p.lease;
        if p.direct {
            s.routes.insert(Route {
                dst: l.subnet,
                gateway: Some(l.public_ip),
                oif: local.ext_index,
                onlink: false,
            });
            continue;
        }
        let vtep = l.subnet.network();
        s.neighs.insert(Neigh {
            ip: vtep,
            mac: Some(l.vtep_mac),
            permanent: true,
        });
        s.fdb.insert(Fdb {
            mac: l.vtep_mac,
            dst: Some(l.public_ip),
            permanent: true,
        });
        s.routes.insert(Route {
            dst: l.subnet,
            gateway: Some(vtep),
            oif: local.vxlan_index,
            onlink: true,
        });
    }
    s
}

/// Changes turning `actual` into `want`: removals first (routes before their neighbours), then
/// additions with the route last, so the kernel never ARPs for a gateway (upstream's order).
pub fn plan(want: &State, actual: &State) -> Vec<Op> {
    let mut ops = Vec::new();
    for r in actual.routes.difference(&want.routes) {
        ops.push(Op::DelRoute(r.clone()));
    }
    for n in actual.neighs.difference(&want.neighs) {
        if !want.neighs.iter().any(|w| w.ip == n.ip) {
            ops.push(Op::DelNeigh(n.ip));
        }
    }
    for f in actual.fdb.difference(&want.fdb) {
        ops.push(Op::DelFdb(f.mac, f.dst));
    }
    for n in want.neighs.difference(&actual.neighs) {
        if let Some(mac) = n.mac {
            ops.push(Op::SetNeigh(n.ip, mac));
        }
    }
    for f in want.fdb.difference(&actual.fdb) {
        if let Some(dst) = f.dst {
            ops.push(Op::SetFdb(f.mac, dst));
        }
    }
    for r in want.routes.difference(&actual.routes) {
        ops.push(Op::SetRoute(r.clone()));
    }
    ops
}

/// Public IPs whose direct routes are ours: those of current peers and those already seen as
/// gateways of our routes (a deleted peer's route must still go), the latter kept only while
/// such a route exists, so the set stays bounded.
#[derive(Clone, Debug, Default)]
pub struct Gateways(BTreeSet<Ipv4Addr>);

/// Whether flanneld owns `r`: a route into the cluster network (other than our own subnet)
/// through the VXLAN device or, with DirectRouting on, through the external interface via a
/// peer's public IP (other components' static routes there are left alone).
fn owned(local: &Local, gateways: &Gateways, r: &Route) -> bool {
    r.dst.prefix_len() > 0
        && local.network.contains(&r.dst)
        && r.dst != local.own_subnet
        && (r.oif == local.vxlan_index
            || (local.direct_routing
                && r.oif == local.ext_index
                && r.gateway.is_some_and(|g| gateways.0.contains(&g))))
}

/// Reads what the kernel has that flanneld owns: the routes [`owned`] picks; every ARP and FDB
/// entry on the VXLAN device.
pub async fn observe(net: &Net, local: &Local, gateways: &Gateways) -> Result<State> {
    let routes = net
        .owned_routes(&[local.vxlan_index, local.ext_index])
        .await?
        .into_iter()
        .filter(|r| owned(local, gateways, r))
        .collect();
    let neighs = net
        .neighbours(local.vxlan_index)
        .await?
        .into_iter()
        .collect();
    let fdb = net.fdb(local.vxlan_index).await?.into_iter().collect();
    Ok(State {
        routes,
        neighs,
        fdb,
    })
}

impl Gateways {
    /// Adds the peers' public IPs (DirectRouting on), before observing.
    fn learn(&mut self, local: &Local, peers: &[Peer]) {
        if local.direct_routing {
            self.0.extend(peers.iter().map(|p| p.lease.public_ip));
        }
    }

    /// Keeps the IPs of current peers and of routes still in place, after observing.
    fn prune(&mut self, peers: &[Peer], actual: &State) {
        self.0.retain(|ip| {
            peers.iter().any(|p| p.lease.public_ip == *ip)
                || actual.routes.iter().any(|r| r.gateway == Some(*ip))
        });
    }
}

/// What one apply did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    pub written: usize,
    pub failed: usize,
}

/// Applies `ops`. A failed op is logged and skipped, so one peer the kernel rejects (say an odd
/// public IP) never blocks the entries of the others; the next pass retries it.
pub async fn apply(net: &Net, local: &Local, ops: &[Op]) -> Applied {
    apply_with(ops, |op| exec(net, local, op)).await
}

async fn exec(net: &Net, local: &Local, op: &Op) -> Result<()> {
    match op {
        Op::DelRoute(r) => net.del_route(r).await,
        Op::DelNeigh(ip) => net.del_neigh(local.vxlan_index, *ip).await,
        Op::DelFdb(mac, dst) => net.del_fdb(local.vxlan_index, *mac, *dst).await,
        Op::SetNeigh(ip, mac) => net.replace_neigh(local.vxlan_index, *ip, *mac).await,
        Op::SetFdb(mac, dst) => net.replace_fdb(local.vxlan_index, *mac, *dst).await,
        Op::SetRoute(r) => net.replace_route(r).await,
    }
}

async fn apply_with<'a, F, Fut>(ops: &'a [Op], mut exec: F) -> Applied
where
    F: FnMut(&'a Op) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let mut done = Applied::default();
    for op in ops {
        tracing::info!(?op, "programming peer entry");
        match exec(op).await {
            Ok(()) => done.written += 1,
            Err(e) => {
                tracing::warn!(?op, error = %e, "programming peer entry failed; continuing");
                done.failed += 1;
            }
        }
    }
    done
}

/// One pass: observe, plan, apply.
pub async fn reconcile(
    net: &Net,
    local: &Local,
    peers: &[Peer],
    gateways: &mut Gateways,
) -> Result<Applied> {
    let want = desired(local, peers);
    gateways.learn(local, peers);
    let actual = observe(net, local, gateways).await?;
    gateways.prune(peers, &actual);
    Ok(apply(net, local, &plan(&want, &actual)).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> Local {
        Local {
            vxlan_index: 10,
            ext_index: 2,
            network: "10.244.0.0/16".parse().unwrap(),
            own_subnet: "10.244.1.0/24".parse().unwrap(),
            direct_routing: false,
        }
    }

    fn peer(n: u8, direct: bool) -> Peer {
        Peer {
            name: format!("node-{n}"),
            lease: Lease {
                subnet: format!("10.244.{n}.0/24").parse().unwrap(),
                public_ip: Ipv4Addr::new(172, 31, 250, 10 + n),
                vni: 1,
                vtep_mac: Mac([2, 0, 0, 0, 0, n]),
            },
            direct,
        }
    }

    #[test]
    fn desired_has_three_entries_per_vxlan_peer_and_skips_self() {
        let s = desired(&local(), &[peer(1, false), peer(2, false), peer(3, true)]);
        assert_eq!(s.neighs.len(), 1);
        assert_eq!(s.fdb.len(), 1);
        assert_eq!(s.routes.len(), 2);
        let r = s.routes.iter().find(|r| r.oif == 10).unwrap();
        assert_eq!(r.gateway, Some(Ipv4Addr::new(10, 244, 2, 0)));
        assert!(r.onlink);
        let d = s.routes.iter().find(|r| r.oif == 2).unwrap();
        assert_eq!(d.gateway, Some(Ipv4Addr::new(172, 31, 250, 13)));
    }

    #[test]
    fn plan_is_empty_when_state_matches_and_orders_route_last() {
        let want = desired(&local(), &[peer(2, false)]);
        assert!(plan(&want, &want).is_empty());
        let ops = plan(&want, &State::default());
        assert!(matches!(ops.last(), Some(Op::SetRoute(_))), "{ops:?}");
        assert!(matches!(ops.first(), Some(Op::SetNeigh(..))), "{ops:?}");
    }

    #[test]
    fn plan_removes_gone_peers_and_fixes_changed_mac() {
        let actual = desired(&local(), &[peer(2, false), peer(3, false)]);
        let mut moved = peer(2, false);
        moved.lease.vtep_mac = Mac([2, 0, 0, 0, 0, 99]);
        let want = desired(&local(), &[moved]);
        let ops = plan(&want, &actual);
        assert!(ops.contains(&Op::DelNeigh(Ipv4Addr::new(10, 244, 3, 0))));
        assert!(
            ops.iter()
                .any(|o| matches!(o, Op::DelRoute(r) if r.dst.to_string() == "10.244.3.0/24"))
        );
        // The old MAC's FDB entry goes (upstream leaves it behind); the ARP entry is replaced.
        assert!(ops.contains(&Op::DelFdb(
            Mac([2, 0, 0, 0, 0, 2]),
            Some(Ipv4Addr::new(172, 31, 250, 12))
        )));
        assert!(ops.contains(&Op::SetNeigh(
            Ipv4Addr::new(10, 244, 2, 0),
            Mac([2, 0, 0, 0, 0, 99])
        )));
        assert!(!ops.contains(&Op::DelNeigh(Ipv4Addr::new(10, 244, 2, 0))));
    }

    #[test]
    fn peers_overlapping_us_or_each_other_are_dropped_first_one_wins() {
        let mut inside_ours = peer(7, false);
        inside_ours.lease.subnet = "10.244.1.0/25".parse().unwrap();
        let mut whole = peer(8, false);
        whole.lease.subnet = "10.244.0.0/16".parse().unwrap();
        let mut same_subnet = peer(9, false);
        same_subnet.lease.subnet = "10.244.2.0/24".parse().unwrap();
        let mut same_mac = peer(4, false);
        same_mac.lease.vtep_mac = peer(2, false).lease.vtep_mac;
        let peers = [
            inside_ours,
            whole,
            peer(2, false),
            same_subnet,
            same_mac,
            peer(3, false),
        ];
        let (kept, conflicts) = select(&local(), &peers);
        let names: Vec<&str> = kept.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["node-2", "node-3"]);
        let dropped: Vec<&str> = conflicts.iter().map(|c| c.peer.as_str()).collect();
        assert_eq!(dropped, ["node-7", "node-8", "node-9", "node-4"]);
        assert!(
            conflicts[0].reason.contains("overlaps this node's"),
            "{conflicts:?}"
        );
        assert!(conflicts[3].reason.contains("VtepMAC"), "{conflicts:?}");
        let s = desired(&local(), &peers);
        assert_eq!((s.routes.len(), s.neighs.len(), s.fdb.len()), (2, 2, 2));
    }

    /// The ordered lookups in `select` keep exactly the peers a pairwise scan would.
    #[test]
    fn select_agrees_with_a_pairwise_scan() {
        let naive = |local: &Local, peers: &[Peer]| -> Vec<String> {
            let mut kept: Vec<&Peer> = Vec::new();
            for p in peers {
                let l = &p.lease;
                let clash = !local.network.contains(&l.subnet)
                    || overlaps(&l.subnet, &local.own_subnet)
                    || kept.iter().any(|k| {
                        overlaps(&k.lease.subnet, &l.subnet)
                            || (!p.direct && !k.direct && k.lease.vtep_mac == l.vtep_mac)
                    });
                if !clash {
                    kept.push(p);
                }
            }
            kept.iter().map(|p| p.name.clone()).collect()
        };
        let mut seed = 0x2545_f491_u32;
        let mut next = move |m: u32| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
            (seed >> 8) % m
        };
        for _ in 0..200 {
            let peers: Vec<Peer> = (0..40)
                .map(|i| {
                    let len = 22 + next(4) as u8; // /22../25: some contain others
                    let net = Ipv4Net::new(Ipv4Addr::new(10, 244, next(16) as u8, 0), len)
                        .unwrap()
                        .trunc();
                    let mut p = peer(1, next(5) == 0);
                    p.name = format!("n{i}");
                    p.lease.subnet = net;
                    p.lease.vtep_mac = Mac([2, 0, 0, 0, 0, next(30) as u8]);
                    p
                })
                .collect();
            let ours: Vec<String> = select(&local(), &peers)
                .0
                .iter()
                .map(|p| p.name.clone())
                .collect();
            assert_eq!(ours, naive(&local(), &peers), "{peers:?}");
        }
    }

    #[tokio::test]
    async fn a_failing_op_does_not_block_the_rest() {
        let ops = plan(
            &desired(&local(), &[peer(2, false), peer(3, false)]),
            &State::default(),
        );
        let mut seen = Vec::new();
        let bad = Op::SetFdb(Mac([2, 0, 0, 0, 0, 2]), Ipv4Addr::new(172, 31, 250, 12));
        let done = apply_with(&ops, |op| {
            seen.push(op.clone());
            let fail = *op == bad;
            async move {
                if fail {
                    Err(crate::netlink::NetlinkError::Other("rejected".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert_eq!(seen, ops, "every op is tried");
        assert_eq!(
            done,
            Applied {
                written: ops.len() - 1,
                failed: 1
            }
        );
    }

    #[test]
    fn gateway_routes_on_the_external_interface_are_ours_only_via_known_peers() {
        let route = |gw: [u8; 4]| Route {
            dst: "10.244.9.0/24".parse().unwrap(),
            gateway: Some(gw.into()),
            oif: 2,
            onlink: false,
        };
        let (peer_route, static_route) = (route([172, 31, 250, 13]), route([192, 168, 1, 1]));
        let peers = [peer(3, true)];
        let mut gw = Gateways::default();
        gw.learn(&local(), &peers);
        assert!(
            !owned(&local(), &gw, &peer_route),
            "DirectRouting off: none are ours"
        );
        let direct = Local {
            direct_routing: true,
            ..local()
        };
        gw.learn(&direct, &peers);
        assert!(owned(&direct, &gw, &peer_route));
        assert!(
            !owned(&direct, &gw, &static_route),
            "another component's route"
        );
        // The peer goes: its route is still ours (to delete) while it exists, then forgotten.
        let actual = State {
            routes: BTreeSet::from([peer_route.clone()]),
            ..State::default()
        };
        gw.prune(&[], &actual);
        assert!(owned(&direct, &gw, &peer_route));
        gw.prune(&[], &State::default());
        assert!(!owned(&direct, &gw, &peer_route));
    }
}
