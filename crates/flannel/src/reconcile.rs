//! Level-triggered peer programming: the desired set (one ARP entry, one FDB entry and one onlink
//! route per peer, or a direct route when DirectRouting applies) is computed from the Node cache
//! and diffed against what the kernel has on `flannel.<VNI>` (RTM_GETROUTE, RTM_GETNEIGH for
//! AF_INET and AF_BRIDGE). Only differences are written, so entries removed or changed by hand
//! come back, entries of deleted or re-addressed nodes go, and a restart rewrites nothing.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;

use crate::annotations::{Lease, Mac};
use crate::netlink::{Fdb, Neigh, Net, Result, Route};

/// A peer and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
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

/// The entries `peers` need.
pub fn desired(local: &Local, peers: &[Peer]) -> State {
    let mut s = State::default();
    for p in peers {
        let l = &p.lease;
        if l.subnet == local.own_subnet || !local.network.contains(&l.subnet) {
            continue;
        }
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

/// Reads what the kernel has that flanneld owns: routes into the cluster network (other than our
/// own subnet) through the VXLAN device or, with a gateway, the external interface; every ARP
/// and FDB entry on the VXLAN device.
pub async fn observe(net: &Net, local: &Local) -> Result<State> {
    let routes = net
        .owned_routes(&[local.vxlan_index, local.ext_index])
        .await?
        .into_iter()
        .filter(|r| {
            r.dst.prefix_len() > 0
                && local.network.contains(&r.dst)
                && r.dst != local.own_subnet
                && (r.oif == local.vxlan_index || r.gateway.is_some())
        })
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

/// Applies `ops`; returns how many were written. Stops at the first error (the next pass
/// retries from a fresh observation).
pub async fn apply(net: &Net, local: &Local, ops: &[Op]) -> Result<usize> {
    for op in ops {
        tracing::info!(?op, "programming peer entry");
        match op {
            Op::DelRoute(r) => net.del_route(r).await?,
            Op::DelNeigh(ip) => net.del_neigh(local.vxlan_index, *ip).await?,
            Op::DelFdb(mac, dst) => net.del_fdb(local.vxlan_index, *mac, *dst).await?,
            Op::SetNeigh(ip, mac) => net.replace_neigh(local.vxlan_index, *ip, *mac).await?,
            Op::SetFdb(mac, dst) => net.replace_fdb(local.vxlan_index, *mac, *dst).await?,
            Op::SetRoute(r) => net.replace_route(r).await?,
        }
    }
    Ok(ops.len())
}

/// One pass: observe, plan, apply.
pub async fn reconcile(net: &Net, local: &Local, peers: &[Peer]) -> Result<usize> {
    let want = desired(local, peers);
    let actual = observe(net, local).await?;
    apply(net, local, &plan(&want, &actual)).await
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
        }
    }

    fn peer(n: u8, direct: bool) -> Peer {
        Peer {
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
}
