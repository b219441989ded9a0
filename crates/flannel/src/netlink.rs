//! A small typed layer over rtnetlink: the reads and writes flanneld needs (links, IPv4
//! addresses, routes, ARP neighbours, bridge FDB), each as one short request.

use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::{Handle, RouteMessageBuilder};

use crate::annotations::Mac;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening the netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Request {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = NetlinkError> = std::result::Result<T, E>;

/// `ENOENT`/`ESRCH`: the entry to delete is already gone.
fn is_missing(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -2 || m.raw_code() == -3)
}

fn req(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let what = what.into();
    move |source| NetlinkError::Request { what, source }
}

const MAIN_TABLE: u32 = 254;

/// A route flanneld owns (to a peer's subnet).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Route {
    pub dst: Ipv4Net,
    pub gateway: Option<Ipv4Addr>,
    pub oif: u32,
    pub onlink: bool,
}

/// An ARP entry on the VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Neigh {
    pub ip: Ipv4Addr,
    pub mac: Option<Mac>,
    pub permanent: bool,
}

/// A bridge FDB entry on the VXLAN device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Fdb {
    pub mac: Mac,
    pub dst: Option<Ipv4Addr>,
    pub permanent: bool,
}

/// One netlink connection (its task runs on the current tokio runtime).
#[derive(Clone)]
pub struct Net {
    pub handle: Handle,
}

impl Net {
    pub fn connect() -> Result<Net> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Net { handle })
    }

    pub async fn links(&self) -> Result<Vec<LinkMessage>> {
        self.handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(req("listing links"))
    }

    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkMessage>> {
        match self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute()
            .try_next()
            .await
        {
            Ok(l) => Ok(l),
            Err(e) if is_missing(&e) || is_no_device(&e) => Ok(None),
            Err(e) => Err(req(format!("getting link {name}"))(e)),
        }
    }

    pub async fn link_by_index(&self, index: u32) -> Result<Option<LinkMessage>> {
        match self
            .handle
            .link()
            .get()
            .match_index(index)
            .execute()
            .try_next()
            .await
        {
            Ok(l) => Ok(l),
            Err(e) if is_missing(&e) || is_no_device(&e) => Ok(None),
            Err(e) => Err(req(format!("getting link {index}"))(e)),
        }
    }

    /// IPv4 addresses of a link, with prefix length, in the kernel's order.
    pub async fn addresses_v4(&self, index: u32) -> Result<Vec<Ipv4Net>> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        Ok(msgs
            .iter()
            .filter(|m| m.header.family == AddressFamily::Inet)
            .filter_map(|m| {
                let ip = m.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Local(IpAddr::V4(ip)) => Some(*ip),
                    _ => None,
                })?;
                Ipv4Net::new(ip, m.header.prefix_len).ok()
            })
            .collect())
    }

    pub async fn add_address(&self, index: u32, addr: Ipv4Net) -> Result<()> {
        self.handle
            .address()
            .add(index, IpAddr::V4(addr.addr()), addr.prefix_len())
            .replace()
            .execute()
            .await
            .map_err(req(format!("adding address {addr}")))
    }

    pub async fn del_address(&self, index: u32, addr: Ipv4Net) -> Result<()> {
        let msgs: Vec<AddressMessage> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .set_address_filter(IpAddr::V4(addr.addr()))
            .execute()
            .try_collect()
            .await
            .map_err(req("listing addresses"))?;
        for m in msgs {
            match self.handle.address().del(m).execute().await {
                Err(e) if !is_missing(&e) => return Err(req(format!("deleting {addr}"))(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// `ip route get <dst>`: the routes the kernel would use.
    pub async fn route_get(&self, dst: Ipv4Addr) -> Result<Vec<RouteMessage>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, 32)
            .build();
        self.handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(req(format!("route get {dst}")))
    }

    /// All IPv4 routes of the main table.
    pub async fn routes_v4(&self) -> Result<Vec<RouteMessage>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        let all: Vec<RouteMessage> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .map_err(req("listing routes"))?;
        Ok(all
            .into_iter()
            .filter(|r| route_table(r) == MAIN_TABLE)
            .collect())
    }

    /// Unicast main-table IPv4 routes with an output interface in `oifs`, as [`Route`]s. Each
    /// message is reduced as it arrives: with hundreds of peers the raw dump would be most of
    /// the daemon's peak memory.
    pub async fn owned_routes(&self, oifs: &[u32]) -> Result<Vec<Route>> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new().build();
        self.handle
            .route()
            .get(msg)
            .execute()
            .try_filter_map(|r| {
                let keep = route_table(&r) == MAIN_TABLE && r.header.kind == RouteType::Unicast;
                let route = to_route(&r).filter(|x| keep && oifs.contains(&x.oif));
                futures::future::ready(Ok(route))
            })
            .try_collect()
            .await
            .map_err(req("listing routes"))
    }

    pub async fn replace_route(&self, r: &Route) -> Result<()> {
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst.network(), r.dst.prefix_len())
            .output_interface(r.oif)
            .protocol(RouteProtocol::Boot)
            .scope(RouteScope::Universe);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw);
        }
        if r.onlink {
            b = b.onlink();
        }
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(req(format!("replacing route {}", r.dst)))
    }

    pub async fn del_route(&self, r: &Route) -> Result<()> {
        // As `ip route del`: protocol unspecified and scope "nowhere" match any route to `dst`
        // (the kernel compares both when they are set).
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(r.dst.network(), r.dst.prefix_len())
            .output_interface(r.oif)
            .protocol(RouteProtocol::Unspec)
            .scope(RouteScope::NoWhere);
        if let Some(gw) = r.gateway {
            b = b.gateway(gw);
        }
        match self.handle.route().del(b.build()).execute().await {
            Err(e) if !is_missing(&e) => Err(req(format!("deleting route {}", r.dst))(e)),
            _ => Ok(()),
        }
    }

    /// The `family` neighbour entries on `index`, each reduced by `f` as it arrives (as
    /// [`Net::owned_routes`]).
    async fn neigh_entries<T>(
        &self,
        family: AddressFamily,
        index: u32,
        what: &str,
        f: impl Fn(&NeighbourMessage) -> Option<T>,
    ) -> Result<Vec<T>> {
        self.handle
            .neighbours()
            .get()
            .set_address_family(family)
            .execute()
            .try_filter_map(|m| {
                let entry = (m.header.ifindex == index).then(|| f(&m)).flatten();
                futures::future::ready(Ok(entry))
            })
            .try_collect()
            .await
            .map_err(req(what))
    }

    /// IPv4 neighbours on `index`.
    pub async fn neighbours(&self, index: u32) -> Result<Vec<Neigh>> {
        self.neigh_entries(AddressFamily::Inet, index, "listing neighbours", |m| {
            Some(Neigh {
                ip: neigh_ip(m)?,
                mac: neigh_mac(m),
                permanent: m.header.state == NeighbourState::Permanent,
            })
        })
        .await
    }

    /// Bridge FDB entries on `index` (AF_BRIDGE neighbours).
    pub async fn fdb(&self, index: u32) -> Result<Vec<Fdb>> {
        self.neigh_entries(AddressFamily::Bridge, index, "listing FDB", |m| {
            Some(Fdb {
                mac: neigh_mac(m)?,
                dst: neigh_ip(m),
                permanent: m.header.state == NeighbourState::Permanent,
            })
        })
        .await
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub async fn replace_neigh(&self, index: u32, ip: Ipv4Addr, mac: Mac) -> Result<()> {
        self.handle
            .neighbours()
            .add(index, IpAddr::V4(ip))
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .kind(RouteType::Unicast)
            .replace()
            .execute()
            .await
            .map_err(req(format!("replacing neighbour {ip}")))
    }

    /// `bridge fdb replace <mac> dev <index> dst <ip> self permanent`.
    pub async fn replace_fdb(&self, index: u32, mac: Mac, dst: Ipv4Addr) -> Result<()> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(IpAddr::V4(dst))
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(req(format!("replacing FDB entry {mac}")))
    }

    pub async fn del_neigh(&self, index: u32, ip: Ipv4Addr) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Inet;
        m.header.ifindex = index;
        m.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        match self.handle.neighbours().del(m).execute().await {
            Err(e) if !is_missing(&e) => Err(req(format!("deleting neighbour {ip}"))(e)),
            _ => Ok(()),
        }
    }

    pub async fn del_fdb(&self, index: u32, mac: Mac, dst: Option<Ipv4Addr>) -> Result<()> {
        let mut m = NeighbourMessage::default();
        m.header.family = AddressFamily::Bridge;
        m.header.ifindex = index;
        m.header.flags = NeighbourFlags::Own;
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        if let Some(ip) = dst {
            m.attributes
                .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        }
        match self.handle.neighbours().del(m).execute().await {
            Err(e) if !is_missing(&e) => Err(req(format!("deleting FDB entry {mac}"))(e)),
            _ => Ok(()),
        }
    }
}

fn is_no_device(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m) if m.raw_code() == -19)
}

fn route_table(r: &RouteMessage) -> u32 {
    r.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table))
}

/// A route message as a [`Route`], if it is a plain IPv4 route with an output interface.
pub fn to_route(r: &RouteMessage) -> Option<Route> {
    let mut dst = None;
    let mut gateway = None;
    let mut oif = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = Some(*ip),
            RouteAttribute::Gateway(RouteAddress::Inet(ip)) => gateway = Some(*ip),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    let dst = Ipv4Net::new(
        dst.unwrap_or(Ipv4Addr::UNSPECIFIED),
        r.header.destination_prefix_length,
    )
    .ok()?;
    Some(Route {
        dst,
        gateway,
        oif: oif?,
        onlink: r.header.flags.contains(RouteFlags::Onlink),
    })
}

fn neigh_ip(m: &NeighbourMessage) -> Option<Ipv4Addr> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
        // AF_BRIDGE (FDB) dumps carry the VXLAN destination as raw bytes.
        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
            <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from)
        }
        _ => None,
    })
}

fn neigh_mac(m: &NeighbourMessage) -> Option<Mac> {
    m.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => Mac::from_slice(b),
        _ => None,
    })
}

/// Name, MTU and MAC of a link message.
pub fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

pub fn link_mtu(l: &LinkMessage) -> Option<u32> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Mtu(m) => Some(*m),
        _ => None,
    })
}

pub fn link_mac(l: &LinkMessage) -> Option<Mac> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(b) => Mac::from_slice(b),
        _ => None,
    })
}
