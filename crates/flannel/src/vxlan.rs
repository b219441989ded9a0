//! The VXLAN device `flannel.<VNI>` as upstream's `newVXLANDevice`/`ensureLink` makes it: an
//! existing compatible device is reused (with its MAC), an incompatible one recreated; MTU is
//! the underlay MTU − 50 and the only address inside the cluster network is `<podCIDR .0>/32`.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::{LinkUnspec, LinkVxlan};

use crate::annotations::Mac;
use crate::config::VxlanConf;
use crate::iface::ExtIface;
use crate::netlink::{Net, NetlinkError, Result, link_mac, link_mtu};

/// VXLAN encapsulation overhead upstream subtracts (outer IPv4 + UDP + VXLAN + inner Ethernet).
pub const OVERHEAD: u32 = 50;

/// The device as it is after [`ensure`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    pub name: String,
    pub index: u32,
    pub mac: Mac,
    pub mtu: u32,
}

/// What the device must look like.
#[derive(Clone, Debug)]
pub struct Wanted<'a> {
    pub conf: &'a VxlanConf,
    pub ext: &'a ExtIface,
    /// The MAC published before (annotation), kept across restarts; else a random one.
    pub mac: Option<Mac>,
}

impl Wanted<'_> {
    pub fn mtu(&self) -> u32 {
        let underlay = if self.conf.mtu == 0 {
            self.ext.mtu
        } else {
            self.conf.mtu
        };
        underlay.saturating_sub(OVERHEAD)
    }
}

/// Creates or reuses the device; brings it up with the right MTU. Its address is set later
/// ([`ensure_address`]), after the subnet is known to be ours.
pub async fn ensure(net: &Net, want: &Wanted<'_>) -> Result<Device> {
    let name = want.conf.device_name();
    let existing = net.link_by_name(&name).await?;
    let reuse = existing.as_ref().filter(|l| compatible(l, want));
    let index = match (reuse, existing.as_ref()) {
        (Some(l), _) => {
            tracing::info!(device = %name, "reusing the existing VXLAN device");
            l.header.index
        }
        (None, old) => {
            if let Some(old) = old {
                tracing::warn!(device = %name, "existing device is not compatible; recreating it");
                net.handle
                    .link()
                    .del(old.header.index)
                    .execute()
                    .await
                    .map_err(req(format!("deleting {name}")))?;
            }
            create(net, &name, want).await?
        }
    };
    let link = net
        .link_by_index(index)
        .await?
        .ok_or_else(|| NetlinkError::Other(format!("{name} vanished after creation")))?;
    let wrong_mac = want.mac.filter(|m| link_mac(&link) != Some(*m));
    let up = link.header.flags.contains(LinkFlags::Up);
    // Only touch what is wrong: a restart must not disturb a device that is already right.
    if wrong_mac.is_some() || !up || link_mtu(&link) != Some(want.mtu()) {
        let mut set = LinkUnspec::new_with_index(index).mtu(want.mtu()).up();
        if let Some(mac) = wrong_mac {
            set = set.address(mac.0.to_vec());
        }
        net.handle
            .link()
            .set(set.build())
            .execute()
            .await
            .map_err(req(format!("setting up {name}")))?;
    }
    // Upstream: no router advertisements on the overlay device. Best effort (IPv6 may be off).
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_ra"), "0");
    let link = net
        .link_by_index(index)
        .await?
        .ok_or_else(|| NetlinkError::Other(format!("{name} vanished")))?;
    let mac = link_mac(&link).ok_or_else(|| NetlinkError::Other(format!("{name} has no MAC")))?;
    Ok(Device {
        name,
        index,
        mac,
        mtu: want.mtu(),
    })
}

fn req(what: String) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    move |source| NetlinkError::Request { what, source }
}

async fn create(net: &Net, name: &str, want: &Wanted<'_>) -> Result<u32> {
    let mac = match want.mac {
        Some(m) => m,
        None => Mac::random().map_err(|e| NetlinkError::Other(format!("random MAC: {e}")))?,
    };
    let mut b = LinkVxlan::new(name, want.conf.vni)
        .dev(want.ext.index)
        .local(want.ext.addr)
        .learning(want.conf.learning);
    if want.conf.port != 0 {
        b = b.port(want.conf.port);
    }
    let msg = b.address(mac.0.to_vec()).mtu(want.mtu()).build();
    net.handle
        .link()
        .add(msg)
        .execute()
        .await
        .map_err(req(format!("creating {name}")))?;
    tracing::info!(device = %name, %mac, "created the VXLAN device");
    net.link_by_name(name)
        .await?
        .map(|l| l.header.index)
        .ok_or_else(|| NetlinkError::Other(format!("{name} missing after creation")))
}

/// The attributes upstream compares before reusing a device.
fn compatible(l: &LinkMessage, want: &Wanted<'_>) -> bool {
    let Some(data) = vxlan_data(l) else {
        return false;
    };
    let mut id = None;
    let mut link = None;
    let mut local = None;
    let mut port = None;
    let mut learning = None;
    let mut group = None;
    for a in data {
        match a {
            InfoVxlan::Id(v) => id = Some(*v),
            InfoVxlan::Link(v) => link = Some(*v),
            InfoVxlan::Local(v) => local = Some(*v),
            InfoVxlan::Port(v) => port = Some(*v),
            InfoVxlan::Learning(v) => learning = Some(*v),
            InfoVxlan::Group(v) => group = Some(*v),
            _ => {}
        }
    }
    id == Some(want.conf.vni)
        && link == Some(want.ext.index)
        && local == Some(want.ext.addr)
        && port.unwrap_or(crate::config::DEFAULT_VXLAN_PORT) == want.conf.effective_port()
        && learning.unwrap_or(false) == want.conf.learning
        && group.is_none_or(|g| g == Ipv4Addr::UNSPECIFIED)
}

fn vxlan_data(l: &LinkMessage) -> Option<&Vec<InfoVxlan>> {
    let infos = l.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkInfo(i) => Some(i),
        _ => None,
    })?;
    if !infos
        .iter()
        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)))
    {
        return None;
    }
    infos.iter().find_map(|i| match i {
        LinkInfo::Data(InfoData::Vxlan(d)) => Some(d),
        _ => None,
    })
}

/// Upstream `EnsureV4AddressOnLink`: `<podCIDR network>/32` on the device, any other address
/// inside the cluster network removed.
pub async fn ensure_address(
    net: &Net,
    dev: &Device,
    pod_cidr: Ipv4Net,
    network: Ipv4Net,
) -> Result<()> {
    let want = Ipv4Net::new(pod_cidr.network(), 32).unwrap_or(pod_cidr);
    let have = net.addresses_v4(dev.index).await?;
    for a in &have {
        if *a != want && network.contains(&a.addr()) {
            tracing::info!(device = %dev.name, address = %a, "removing a stale address");
            net.del_address(dev.index, *a).await?;
        }
    }
    if !have.contains(&want) {
        net.add_address(dev.index, want).await?;
    }
    Ok(())
}
