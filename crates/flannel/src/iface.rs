//! External interface selection, in upstream's order: `--iface` (name or IP, repeatable) →
//! `--iface-regex` (IPs first, then names) → `--iface-can-reach` (`ip route get`) → the interface
//! of the default route. Its first IPv4 address is the VTEP's local address.

use std::net::Ipv4Addr;

use netlink_packet_route::route::{RouteAttribute, RouteMessage};
use regex::Regex;

use crate::netlink::{Net, NetlinkError, link_mtu, link_name};

#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("{0}")]
    NotFound(String),
}

/// The chosen underlay interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtIface {
    pub index: u32,
    pub name: String,
    pub addr: Ipv4Addr,
    pub mtu: u32,
}

/// What the flags ask for.
#[derive(Clone, Debug, Default)]
pub struct Selector {
    pub ifaces: Vec<String>,
    pub regexes: Vec<Regex>,
    pub can_reach: Option<Ipv4Addr>,
    /// `node-public-ip` / `--public-ip`: the interface holding it is preferred.
    pub public_ip: Option<Ipv4Addr>,
}

/// Picks the interface as upstream's `LookupExtIface`.
pub async fn select(net: &Net, sel: &Selector) -> Result<ExtIface, IfaceError> {
    let all = candidates(net).await?;
    if !sel.ifaces.is_empty() {
        for want in &sel.ifaces {
            let found = all.iter().find(|c| {
                c.name == *want
                    || want
                        .parse::<Ipv4Addr>()
                        .is_ok_and(|ip| c.addrs.contains(&ip))
            });
            if let Some(c) = found {
                return c.to_ext(want.parse().ok());
            }
        }
        return Err(IfaceError::NotFound(format!(
            "none of --iface {:?} matches an interface with an IPv4 address",
            sel.ifaces
        )));
    }
    if !sel.regexes.is_empty() {
        for re in &sel.regexes {
            let by_ip = all.iter().find_map(|c| {
                c.addrs
                    .iter()
                    .find(|ip| re.is_match(&ip.to_string()))
                    .map(|ip| (c, *ip))
            });
            if let Some((c, ip)) = by_ip {
                return c.to_ext(Some(ip));
            }
            if let Some(c) = all.iter().find(|c| re.is_match(&c.name)) {
                return c.to_ext(None);
            }
        }
        return Err(IfaceError::NotFound(
            "no interface matches --iface-regex".into(),
        ));
    }
    if let Some(ip) = sel.public_ip
        && let Some(c) = all.iter().find(|c| c.addrs.contains(&ip))
    {
        return c.to_ext(Some(ip));
    }
    let oif = match sel.can_reach {
        Some(dst) => route_oif(&net.route_get(dst).await?)
            .ok_or_else(|| IfaceError::NotFound(format!("no route to --iface-can-reach {dst}")))?,
        None => default_route_oif(net).await?.ok_or_else(|| {
            IfaceError::NotFound("no default route: set --iface or --iface-regex".into())
        })?,
    };
    let c = all
        .iter()
        .find(|c| c.index == oif)
        .ok_or_else(|| IfaceError::NotFound(format!("interface {oif} has no IPv4 address")))?;
    c.to_ext(None)
}

struct Candidate {
    index: u32,
    name: String,
    mtu: u32,
    addrs: Vec<Ipv4Addr>,
}

impl Candidate {
    fn to_ext(&self, addr: Option<Ipv4Addr>) -> Result<ExtIface, IfaceError> {
        let addr = addr
            .or_else(|| self.addrs.first().copied())
            .ok_or_else(|| {
                IfaceError::NotFound(format!("interface {} has no IPv4 address", self.name))
            })?;
        Ok(ExtIface {
            index: self.index,
            name: self.name.clone(),
            addr,
            mtu: self.mtu,
        })
    }
}

async fn candidates(net: &Net) -> Result<Vec<Candidate>, IfaceError> {
    let mut out = Vec::new();
    for l in net.links().await? {
        let index = l.header.index;
        let addrs = net
            .addresses_v4(index)
            .await?
            .into_iter()
            .map(|a| a.addr())
            .filter(|a| !a.is_loopback())
            .collect::<Vec<_>>();
        if addrs.is_empty() {
            continue;
        }
        out.push(Candidate {
            index,
            name: link_name(&l).unwrap_or_default().to_string(),
            mtu: link_mtu(&l).unwrap_or(1500),
            addrs,
        });
    }
    Ok(out)
}

fn route_oif(routes: &[RouteMessage]) -> Option<u32> {
    routes.iter().find_map(|r| {
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        })
    })
}

/// The output interface of the first default route in the main table.
async fn default_route_oif(net: &Net) -> Result<Option<u32>, IfaceError> {
    let routes = net.routes_v4().await?;
    Ok(routes
        .iter()
        .filter(|r| r.header.destination_prefix_length == 0)
        .find_map(|r| route_oif(std::slice::from_ref(r))))
}

/// Upstream `ip.DirectRouting`: the peer is on-link when the kernel's route to it has no gateway.
pub async fn on_link(net: &Net, peer: Ipv4Addr) -> Result<bool, NetlinkError> {
    let routes = net.route_get(peer).await?;
    Ok(routes.len() == 1
        && !routes[0]
            .attributes
            .iter()
            .any(|a| matches!(a, RouteAttribute::Gateway(_))))
}
