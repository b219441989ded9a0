//! The Node annotations flannel nodes use to find each other (`flannel.alpha.coreos.com/…`), in
//! upstream's exact forms, and the "lease" a peer's Node object describes.

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use crate::kube_subnet_mgr::CachedNode;
use ipnet::Ipv4Net;

pub const DEFAULT_PREFIX: &str = "flannel.alpha.coreos.com";

/// Annotation names under one prefix (`--kube-annotation-prefix`).
#[derive(Clone, Debug)]
pub struct Keys {
    pub subnet_manager: String,
    pub backend_type: String,
    pub backend_data: String,
    pub public_ip: String,
    pub public_ip_overwrite: String,
    pub node_public_ip: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        let k = |name: &str| format!("{}/{name}", prefix.trim_end_matches('/'));
        Keys {
            subnet_manager: k("kube-subnet-manager"),
            backend_type: k("backend-type"),
            backend_data: k("backend-data"),
            public_ip: k("public-ip"),
            public_ip_overwrite: k("public-ip-overwrite"),
            node_public_ip: k("node-public-ip"),
        }
    }

    /// Every key flanneld reads.
    pub fn all(&self) -> [&str; 6] {
        [
            &self.subnet_manager,
            &self.backend_type,
            &self.backend_data,
            &self.public_ip,
            &self.public_ip_overwrite,
            &self.node_public_ip,
        ]
    }
}

/// A MAC address, printed lower-case with colons as Go's `net.HardwareAddr`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    pub fn parse(s: &str) -> Option<Mac> {
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for b in &mut out {
            let p = parts.next()?;
            if p.len() != 2 {
                return None;
            }
            *b = u8::from_str_radix(p, 16).ok()?;
        }
        parts.next().is_none().then_some(Mac(out))
    }

    pub fn from_slice(b: &[u8]) -> Option<Mac> {
        <[u8; 6]>::try_from(b).ok().map(Mac)
    }

    /// Random, locally administered, unicast (upstream `pkg/mac`).
    pub fn random() -> std::io::Result<Mac> {
        use std::io::Read;
        let mut b = [0u8; 6];
        std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
        b[0] = (b[0] | 0x02) & 0xfe;
        Ok(Mac(b))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// `backend-data` exactly as Go's `json.Marshal(vxlanLeaseAttrs)` prints it: upstream's
/// `GetStoredMacAddresses` parses this string by hand, so key order and spacing matter.
pub fn backend_data(vni: u32, mac: Mac) -> String {
    format!("{{\"VNI\":{vni},\"VtepMAC\":\"{mac}\"}}")
}

/// VNI and VTEP MAC from a peer's `backend-data` (any JSON layout, keys case-insensitive).
pub fn parse_backend_data(s: &str) -> Option<(u32, Mac)> {
    let v: serde_json::Value = serde_json::from_str(s).ok()?;
    let obj = v.as_object()?;
    let get = |name: &str| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    };
    let vni = get("VNI").and_then(serde_json::Value::as_u64).unwrap_or(0);
    let mac = Mac::parse(get("VtepMAC")?.as_str()?)?;
    Some((u32::try_from(vni).ok()?, mac))
}

/// The annotations this node publishes (upstream `newAnnotations` + AcquireLease).
pub fn own_annotations(
    keys: &Keys,
    vni: u32,
    mac: Mac,
    public_ip: Ipv4Addr,
) -> BTreeMap<String, String> {
    BTreeMap::from([
        (keys.subnet_manager.clone(), "true".to_string()),
        (keys.backend_type.clone(), "vxlan".to_string()),
        (keys.backend_data.clone(), backend_data(vni, mac)),
        (keys.public_ip.clone(), public_ip.to_string()),
    ])
}

/// The IPv4 podCIDR of a node: `spec.podCIDRs` (1–2 entries), else `spec.podCIDR`.
pub fn pod_cidr(node: &CachedNode) -> Result<Option<Ipv4Net>, String> {
    let spec = node.spec.as_ref();
    let cidrs = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    let list = if cidrs.is_empty() {
        spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect()
    } else {
        cidrs
    };
    if list.len() > 2 {
        return Err(format!(
            "node has {} podCIDRs; at most 2 are supported",
            list.len()
        ));
    }
    for c in &list {
        if c.contains(':') {
            continue;
        }
        return c
            .parse::<Ipv4Net>()
            .map(|n| Some(n.trunc()))
            .map_err(|_| format!("podCIDR {c:?} is not a CIDR"));
    }
    Ok(None)
}

fn annotation<'a>(node: &'a CachedNode, key: &str) -> Option<&'a str> {
    node.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// `node-public-ip` (user-set): overrides `--public-ip` and drives interface selection.
pub fn node_public_ip(node: &CachedNode, keys: &Keys) -> Option<Ipv4Addr> {
    annotation(node, &keys.node_public_ip).and_then(|s| s.trim().parse().ok())
}

/// `public-ip-overwrite` (user-set, for NAT): published as `public-ip` instead of ours.
pub fn public_ip_overwrite(node: &CachedNode, keys: &Keys) -> Option<Ipv4Addr> {
    annotation(node, &keys.public_ip_overwrite).and_then(|s| s.trim().parse().ok())
}

/// The VTEP MAC this node published earlier for `vni`, so the device keeps it across restarts.
pub fn stored_mac(node: &CachedNode, keys: &Keys, vni: u32) -> Option<Mac> {
    parse_backend_data(annotation(node, &keys.backend_data)?)
        .filter(|(v, _)| *v == vni)
        .map(|(_, m)| m)
}

/// What a peer's Node tells us: its subnet, VTEP and underlay address.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Lease {
    pub subnet: Ipv4Net,
    pub public_ip: Ipv4Addr,
    pub vni: u32,
    pub vtep_mac: Mac,
}

/// Why a flannel node's annotations give no lease.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    #[error("annotation {key} is missing")]
    Missing { key: String },
    #[error("annotation {key}={value:?} is not an IPv4 address")]
    PublicIp { key: String, value: String },
    #[error("annotation {key}={value:?} is not {{\"VNI\":<n>,\"VtepMAC\":\"<mac>\"}}")]
    BackendData { key: String, value: String },
    #[error("{0}")]
    PodCidr(String),
}

/// Upstream `nodeToLease` for the vxlan backend: `Ok(None)` unless the node runs flannel
/// (`kube-subnet-manager=true`), is vxlan and has a podCIDR; an error when it does but its
/// addresses do not parse.
pub fn lease(node: &CachedNode, keys: &Keys) -> Result<Option<Lease>, LeaseError> {
    if annotation(node, &keys.subnet_manager) != Some("true")
        || annotation(node, &keys.backend_type) != Some("vxlan")
    {
        return Ok(None);
    }
    let get = |key: &String| {
        annotation(node, key).ok_or_else(|| LeaseError::Missing { key: key.clone() })
    };
    let ip = get(&keys.public_ip)?;
    let public_ip = ip.trim().parse().map_err(|_| LeaseError::PublicIp {
        key: keys.public_ip.clone(),
        value: ip.into(),
    })?;
    let data = get(&keys.backend_data)?;
    let (vni, vtep_mac) = parse_backend_data(data).ok_or_else(|| LeaseError::BackendData {
        key: keys.backend_data.clone(),
        value: data.into(),
    })?;
    let Some(subnet) = pod_cidr(node).map_err(LeaseError::PodCidr)? else {
        return Ok(None);
    };
    Ok(Some(Lease {
        subnet,
        public_ip,
        vni,
        vtep_mac,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_data_is_go_marshal_form() {
        let mac = Mac::parse("0A:1b:2c:3d:4e:5f").unwrap();
        assert_eq!(
            backend_data(1, mac),
            r#"{"VNI":1,"VtepMAC":"0a:1b:2c:3d:4e:5f"}"#
        );
        assert_eq!(
            parse_backend_data(r#"{ "vtepmac": "0a:1b:2c:3d:4e:5f", "vni": 1 }"#),
            Some((1, mac))
        );
        assert_eq!(parse_backend_data(r#"{"VNI":1,"VtepMAC":"zz"}"#), None);
    }

    #[test]
    fn random_mac_is_local_unicast() {
        for _ in 0..32 {
            let m = Mac::random().unwrap();
            assert_eq!(m.0[0] & 0x03, 0x02);
        }
    }

    #[test]
    fn lease_needs_flannel_annotations_and_pod_cidr() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let mut node = CachedNode {
            spec: Some(crate::kube_subnet_mgr::CachedSpec {
                pod_cidr: Some("10.244.2.0/24".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(lease(&node, &keys), Ok(None));
        let mac = Mac([2, 0, 0, 0, 0, 1]);
        node.metadata.annotations = Some(own_annotations(
            &keys,
            1,
            mac,
            "172.31.250.12".parse().unwrap(),
        ));
        let l = lease(&node, &keys).unwrap().unwrap();
        assert_eq!(l.subnet.to_string(), "10.244.2.0/24");
        assert_eq!(l.public_ip.to_string(), "172.31.250.12");
        assert_eq!(l.vtep_mac, mac);
        assert_eq!(stored_mac(&node, &keys, 1), Some(mac));
        assert_eq!(stored_mac(&node, &keys, 2), None);
        node.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(keys.public_ip.clone(), "172.31.250".into());
        assert!(
            lease(&node, &keys)
                .unwrap_err()
                .to_string()
                .contains("public-ip=\"172.31.250\" is not an IPv4 address")
        );
        node.metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(keys.backend_type.clone(), "wireguard".into());
        assert_eq!(lease(&node, &keys), Ok(None));
    }
}
