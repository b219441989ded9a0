//! Service backends from EndpointSlices, as ingress-nginx resolves them: the Service's slices
//! (label `kubernetes.io/service-name`), port matched by name, else by numeric target port;
//! only endpoints not marked `ready: false`; de-duplicated by address.
//!
//! Slices are read as `discovery.k8s.io/v1` and, where the server serves only `v1beta1`
//! (Kubernetes < 1.21), as `v1beta1`: both carry the fields used here under the same names.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use kube::core::DynamicObject;

pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// EndpointSlices as `discovery.k8s.io/v1` where served, else `v1beta1` (the 1.20 test server).
pub use kube_common::discovery::endpoint_slice_resource as slice_resource;

/// One port of a slice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    pub name: String,
    pub port: u16,
    pub protocol: String,
}

/// The parts of an EndpointSlice the proxy needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub service: String,
    pub ports: Vec<SlicePort>,
    /// Addresses of ready endpoints (unset `ready` counts as ready).
    pub ready: Vec<IpAddr>,
}

impl Slice {
    /// Reads a v1 or v1beta1 EndpointSlice; None if it belongs to no Service.
    pub fn from_dynamic(obj: &DynamicObject) -> Option<Slice> {
        let service = obj
            .metadata
            .labels
            .as_ref()?
            .get(SERVICE_NAME_LABEL)?
            .clone();
        let namespace = obj.metadata.namespace.clone()?;
        let ports = obj
            .data
            .get("ports")
            .and_then(|p| p.as_array())
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| {
                        Some(SlicePort {
                            name: p.get("name").and_then(|n| n.as_str()).unwrap_or("").into(),
                            port: u16::try_from(p.get("port")?.as_u64()?).ok()?,
                            protocol: p
                                .get("protocol")
                                .and_then(|n| n.as_str())
                                .unwrap_or("TCP")
                                .into(),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let ready = obj
            .data
            .get("endpoints")
            .and_then(|e| e.as_array())
            .map(|eps| {
                eps.iter()
                    .filter(|ep| {
                        ep.get("conditions")
                            .and_then(|c| c.get("ready"))
                            .and_then(|r| r.as_bool())
                            != Some(false)
                    })
                    .flat_map(|ep| {
                        ep.get("addresses")
                            .and_then(|a| a.as_array())
                            .into_iter()
                            .flatten()
                            .filter_map(|a| a.as_str()?.parse::<IpAddr>().ok())
                    })
                    .collect()
            })
            .unwrap_or_default();
        Some(Slice {
            namespace,
            service,
            ports,
            ready,
        })
    }
}

/// The Service port an Ingress backend refers to (by name or number).
pub fn service_port<'a>(
    service: &'a Service,
    name: Option<&str>,
    number: Option<i32>,
) -> Option<&'a ServicePort> {
    let ports = service.spec.as_ref()?.ports.as_ref()?;
    match (name, number) {
        (Some(n), _) => ports.iter().find(|p| p.name.as_deref() == Some(n)),
        (None, Some(num)) => ports.iter().find(|p| p.port == num),
        // `--default-backend-service` names no port: upstream takes the first.
        (None, None) => ports.first(),
    }
}

/// Ready endpoint addresses for `port` of the Service, from its slices.
pub fn resolve<'a>(
    port: &ServicePort,
    slices: impl IntoIterator<Item = &'a Slice>,
) -> Vec<SocketAddr> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let name = port.name.as_deref().unwrap_or("");
    let target_number = match &port.target_port {
        Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
        None => u16::try_from(port.port).ok(),
        Some(IntOrString::String(_)) => None,
    };
    let mut out = BTreeSet::new();
    for slice in slices {
        let Some(slice_port) = slice.ports.iter().find(|sp| {
            sp.protocol == protocol
                && if name.is_empty() {
                    // Unnamed Service port: the slice port is unnamed too; a numeric target
                    // port must agree (ingress-nginx's workaround for #7390).
                    sp.name.is_empty() && target_number.is_none_or(|t| t == sp.port)
                } else {
                    sp.name == name
                }
        }) else {
            continue;
        };
        for ip in &slice.ready {
            out.insert(SocketAddr::new(*ip, slice_port.port));
        }
    }
    out.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(version: &str, ports: serde_json::Value, endpoints: serde_json::Value) -> Slice {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("discovery.k8s.io/{version}"),
            "kind": "EndpointSlice",
            "metadata": {"name": "s", "namespace": "ns", "labels": {SERVICE_NAME_LABEL: "web"}},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .expect("slice json");
        Slice::from_dynamic(&obj).expect("slice")
    }

    fn port(name: Option<&str>, port: i32, target: Option<IntOrString>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            port,
            target_port: target,
            protocol: Some("TCP".into()),
            ..Default::default()
        }
    }

    #[test]
    fn ready_endpoints_by_port_name_and_dedup() {
        for version in ["v1", "v1beta1"] {
            let s = slice(
                version,
                json!([{"name": "http", "port": 8080, "protocol": "TCP"}]),
                json!([
                    {"addresses": ["10.0.0.1"], "conditions": {"ready": true}},
                    {"addresses": ["10.0.0.2"], "conditions": {}},
                    {"addresses": ["10.0.0.3"], "conditions": {"ready": false}},
                    {"addresses": ["10.0.0.1"]},
                ]),
            );
            let got = resolve(&port(Some("http"), 80, None), [&s]);
            assert_eq!(
                got,
                vec![
                    "10.0.0.1:8080".parse::<SocketAddr>().expect("addr"),
                    "10.0.0.2:8080".parse().expect("addr")
                ],
                "{version}"
            );
            assert!(resolve(&port(Some("https"), 443, None), [&s]).is_empty());
        }
    }

    #[test]
    fn unnamed_port_matches_target_port() {
        let s = slice(
            "v1",
            json!([{"name": "", "port": 9000, "protocol": "TCP"}]),
            json!([{"addresses": ["10.0.0.9"]}]),
        );
        let p = port(None, 80, Some(IntOrString::Int(9000)));
        assert_eq!(
            resolve(&p, [&s]),
            vec!["10.0.0.9:9000".parse().expect("addr")]
        );
        let other = port(None, 80, Some(IntOrString::Int(9001)));
        assert!(resolve(&other, [&s]).is_empty());
    }
}
