//! Node objects registered the way a kubelet registers its Node (labels, addresses, capacity,
//! Ready), for tests where the control plane must see nodes but no kubelet runs: the scheduler
//! places pods on them, node IPAM gives them a podCIDR, flanneld reads their annotations.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use crate::Result;

/// What a test node looks like to the API.
#[derive(Clone, Debug)]
pub struct TestNode {
    pub name: String,
    /// The node's InternalIP, if any.
    pub internal_ip: Option<String>,
    /// Extra labels; `kubernetes.io/hostname` and `kubernetes.io/os` are always set.
    pub labels: BTreeMap<String, String>,
}

impl TestNode {
    pub fn new(name: &str) -> TestNode {
        TestNode {
            name: name.into(),
            internal_ip: None,
            labels: BTreeMap::new(),
        }
    }

    pub fn with_internal_ip(mut self, ip: &str) -> TestNode {
        self.internal_ip = Some(ip.into());
        self
    }

    /// The Node object as a kubelet would register it: Ready, 2 CPUs, 4 GiB, 110 pods.
    pub fn to_node(&self) -> Node {
        let mut labels = self.labels.clone();
        labels.insert("kubernetes.io/hostname".into(), self.name.clone());
        labels.insert("kubernetes.io/os".into(), "linux".into());
        labels.insert("kubernetes.io/arch".into(), std::env::consts::ARCH.into());
        let capacity: BTreeMap<String, Quantity> = [
            ("cpu", "2"),
            ("memory", "4Gi"),
            ("pods", "110"),
            ("ephemeral-storage", "100Gi"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), Quantity(v.into())))
        .collect();
        let mut addresses = vec![NodeAddress {
            type_: "Hostname".into(),
            address: self.name.clone(),
        }];
        if let Some(ip) = &self.internal_ip {
            addresses.push(NodeAddress {
                type_: "InternalIP".into(),
                address: ip.clone(),
            });
        }
        Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: None,
            status: Some(NodeStatus {
                addresses: Some(addresses),
                allocatable: Some(capacity.clone()),
                capacity: Some(capacity),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    reason: Some("KubeletReady".into()),
                    message: Some("registered by the test harness".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
        }
    }
}

/// Registers `node` (status included, as a kubelet's create does); an existing Node of that name
/// is left as it is.
pub async fn register(client: &Client, node: &TestNode) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    match api.create(&PostParams::default(), &node.to_node()).await {
        Ok(n) => Ok(n),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(api.get(&node.name).await?),
        Err(e) => Err(e.into()),
    }
}

/// Removes the `node.kubernetes.io/not-ready` taint the apiserver's admission puts on a new Node,
/// as the node lifecycle controller does once the Node reports Ready (that controller is off
/// in the test control plane), so the scheduler can place pods on it.
pub async fn make_schedulable(client: &Client, name: &str) -> Result<Node> {
    let api: Api<Node> = Api::all(client.clone());
    let node = api.get(name).await?;
    let taints: Vec<_> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t.key != "node.kubernetes.io/not-ready")
        .collect();
    let patch = serde_json::json!({"spec": {"taints": taints}});
    Ok(api
        .patch(
            name,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await?)
}
