//! The kube subnet manager (upstream `pkg/subnet/kube`): the node's subnet is its
//! `spec.podCIDR`; peers are found through a cache of all Nodes; this node publishes its VTEP in
//! annotations through `nodes/status` (the only write flannel's RBAC allows) and finally reports
//! NetworkUnavailable=False.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;

use crate::annotations::{Keys, Lease, lease};

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("{0}")]
    NodeName(String),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("the Node cache did not sync")]
    NotSynced,
}

/// Upstream: `NODE_NAME`, else the pod's `spec.nodeName` from `POD_NAMESPACE`/`POD_NAME`.
pub async fn node_name(client: &Client) -> Result<String, KubeError> {
    if let Ok(n) = std::env::var("NODE_NAME")
        && !n.is_empty()
    {
        return Ok(n);
    }
    let (Ok(pod), Ok(ns)) = (std::env::var("POD_NAME"), std::env::var("POD_NAMESPACE")) else {
        return Err(KubeError::NodeName(
            "set NODE_NAME, or POD_NAME and POD_NAMESPACE (the downward API in the DaemonSet)"
                .into(),
        ));
    };
    let p = Api::<Pod>::namespaced(client.clone(), &ns)
        .get(&pod)
        .await?;
    p.spec
        .and_then(|s| s.node_name)
        .ok_or_else(|| KubeError::NodeName(format!("pod {ns}/{pod} has no spec.nodeName")))
}

/// The Node cache; `changed` fires on every watch event.
#[derive(Clone)]
pub struct Nodes {
    pub store: Store<CachedNode>,
    pub changed: Arc<Notify>,
    /// Each peer's last lease that parsed, kept while its annotations are malformed.
    last_good: Arc<Mutex<Memory>>,
}

impl Nodes {
    /// Starts a list+watch of all Nodes and waits for the first full list.
    pub async fn start(client: Client, keys: &Keys) -> Result<Nodes, KubeError> {
        let (store, writer) = reflector::store::<CachedNode>();
        let changed = Arc::new(Notify::new());
        let notify = changed.clone();
        let stream = reflector::reflector(
            writer,
            watcher(Api::<CachedNode>::all(client), watcher::Config::default()).modify(strip(keys)),
        )
        // After touched_objects: a relist's Init (sent before it lists) must not reset the delay.
        .touched_objects()
        .backoff(kube_common::backoff::WatchRetry::default());
        tokio::spawn(async move {
            futures::pin_mut!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "node watch error (retrying)");
                }
                notify.notify_one();
            }
        });
        if !kube_common::controller::wait_synced(&store).await {
            return Err(KubeError::NotSynced);
        }
        Ok(Nodes {
            store,
            changed,
            last_good: Arc::default(),
        })
    }

    pub fn get(&self, name: &str) -> Option<Arc<CachedNode>> {
        self.store.get(&reflector::ObjectRef::new(name))
    }

    /// Every other flannel vxlan node's name and lease, oldest Node first (then by name): the
    /// order in which peers with clashing subnets or MACs win.
    pub fn peer_leases(&self, keys: &Keys, own: &str) -> Vec<(String, Lease)> {
        let mut good = self
            .last_good
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        peer_leases(self.store.state(), keys, own, &mut good)
    }
}

fn name_of(n: &CachedNode) -> &str {
    n.metadata.name.as_deref().unwrap_or_default()
}

/// Per peer: the last lease that parsed and the last parse error warned about (so a node that
/// stays malformed is warned about once, not every pass).
#[derive(Debug, Default)]
struct Memory {
    good: HashMap<String, Lease>,
    warned: HashMap<String, String>,
}

/// A peer whose annotations turn malformed keeps its last good lease (upstream keeps the old
/// entries too), with a warning; leases of deleted Nodes are forgotten.
fn peer_leases(
    mut nodes: Vec<Arc<CachedNode>>,
    keys: &Keys,
    own: &str,
    mem: &mut Memory,
) -> Vec<(String, Lease)> {
    // Every pass walks all Nodes: borrow names and times, clone nothing per comparison.
    nodes.retain(|n| name_of(n) != own);
    nodes.sort_by(|a, b| {
        let created = |n: &CachedNode| n.metadata.creation_timestamp.as_ref().map(|t| t.0);
        (created(a), name_of(a)).cmp(&(created(b), name_of(b)))
    });
    let present: HashSet<&str> = nodes.iter().map(|n| name_of(n)).collect();
    mem.good.retain(|name, _| present.contains(name.as_str()));
    mem.warned.retain(|name, _| present.contains(name.as_str()));
    let mut out = Vec::new();
    for n in &nodes {
        let name = name_of(n).to_owned();
        let e = match lease(n, keys) {
            Ok(l) => {
                mem.warned.remove(&name);
                match l {
                    Some(l) => {
                        mem.good.insert(name.clone(), l.clone());
                        out.push((name, l));
                    }
                    None => {
                        mem.good.remove(&name);
                    }
                }
                continue;
            }
            Err(e) => e.to_string(),
        };
        let kept = mem.good.get(&name).cloned();
        if mem.warned.get(&name) != Some(&e) {
            match kept {
                Some(_) => {
                    tracing::warn!(node = %name, error = %e, "malformed flannel annotations; keeping the node's last good lease")
                }
                None => {
                    tracing::warn!(node = %name, error = %e, "malformed flannel annotations; node left out")
                }
            }
            mem.warned.insert(name.clone(), e);
        }
        if let Some(l) = kept {
            out.push((name, l));
        }
    }
    out
}

/// What flanneld keeps of a Node: metadata and spec. `status`, most of a Node's bytes
/// (conditions, images, addresses), is skipped while decoding, never allocated.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct CachedNode {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<CachedSpec>,
}

/// The part of `NodeSpec` flanneld reads (other fields are skipped while decoding).
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct CachedSpec {
    #[serde(rename = "podCIDR", default)]
    pub pod_cidr: Option<String>,
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Option<Vec<String>>,
}

impl kube::Resource for CachedNode {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        "Node".into()
    }
    fn group(_: &()) -> Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> Cow<'_, str> {
        "nodes".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// Keeps only what flannel reads (its own annotations, name and age): the other annotations and
/// labels of every Node would otherwise dominate the daemon's memory on a big cluster. (The
/// watcher has taken the resourceVersion before this runs; the store keys by name.)
fn strip(keys: &Keys) -> impl Fn(&mut CachedNode) + use<> {
    let keep: Vec<String> = keys.all().map(str::to_string).to_vec();
    move |n: &mut CachedNode| {
        let m = &mut n.metadata;
        m.managed_fields = None;
        m.labels = None;
        m.owner_references = None;
        m.uid = None;
        m.resource_version = None;
        if let Some(a) = m.annotations.as_mut() {
            a.retain(|k, _| keep.contains(k));
        }
    }
}

/// Whether `node` lacks any of `annotations` (or holds another value).
pub fn differs(node: &CachedNode, annotations: &BTreeMap<String, String>) -> bool {
    let current = node.metadata.annotations.as_ref();
    annotations
        .iter()
        .any(|(k, v)| current.and_then(|c| c.get(k)) != Some(v))
}

/// Writes `annotations` onto the node through `nodes/status` if any differs, trying `attempts`
/// times 3 s apart (upstream `AcquireLease`: every 3 s for up to 30 s).
pub async fn publish(
    client: &Client,
    node: &CachedNode,
    annotations: &BTreeMap<String, String>,
    attempts: u32,
) -> Result<bool, KubeError> {
    if !differs(node, annotations) {
        return Ok(false);
    }
    let api = Api::<Node>::all(client.clone());
    let patch = serde_json::json!({ "metadata": { "annotations": annotations } });
    let mut last = None;
    for attempt in 1..=attempts {
        match api
            .patch_status(
                &node.name_any(),
                &PatchParams::default(),
                &Patch::Strategic(&patch),
            )
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) => {
                tracing::warn!(error = %e, "patching node annotations failed");
                last = Some(e);
                if attempt < attempts {
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
            }
        }
    }
    Err(last.map(KubeError::Api).unwrap_or(KubeError::NotSynced))
}

/// Upstream `CompleteLease`: NetworkUnavailable=False, reason FlannelIsUp.
pub async fn set_network_available(client: &Client, node: &str) -> Result<(), KubeError> {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let patch = serde_json::json!({ "status": { "conditions": [{
        "type": "NetworkUnavailable",
        "status": "False",
        "reason": "FlannelIsUp",
        "message": "Flannel is running on this node",
        "lastTransitionTime": now,
        "lastHeartbeatTime": now,
    }]}});
    Api::<Node>::all(client.clone())
        .patch_status(node, &PatchParams::default(), &Patch::Strategic(&patch))
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::annotations::{DEFAULT_PREFIX, Mac, own_annotations};

    fn node(name: &str, subnet: &str, public_ip: &str) -> Arc<CachedNode> {
        let keys = Keys::new(DEFAULT_PREFIX);
        let mut a = own_annotations(&keys, 1, Mac([2, 0, 0, 0, 0, 1]), [172, 31, 250, 9].into());
        a.insert(keys.public_ip.clone(), public_ip.into());
        Arc::new(CachedNode {
            metadata: kube::api::ObjectMeta {
                name: Some(name.into()),
                annotations: Some(a),
                ..Default::default()
            },
            spec: Some(CachedSpec {
                pod_cidr: Some(subnet.into()),
                ..Default::default()
            }),
        })
    }

    #[test]
    fn the_cache_keeps_only_what_flannel_reads() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let mut n = (*node("a", "10.244.1.0/24", "172.31.250.11")).clone();
        let ours = n.metadata.annotations.clone().unwrap();
        n.metadata
            .annotations
            .get_or_insert_default()
            .insert("node.alpha.kubernetes.io/ttl".into(), "0".into());
        n.metadata.labels = Some(BTreeMap::from([("k".to_string(), "v".to_string())]));
        strip(&keys)(&mut n);
        assert_eq!(n.metadata.annotations, Some(ours));
        assert!(n.metadata.labels.is_none());
        assert_eq!(n.spec.unwrap().pod_cidr.as_deref(), Some("10.244.1.0/24"));
    }

    #[test]
    fn a_node_decodes_without_its_status() {
        let n: CachedNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "a", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"],
                     "providerID": "x", "taints": [{"key": "k", "effect": "NoSchedule"}]},
            "status": {"conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        assert_eq!(n.metadata.name.as_deref(), Some("a"));
        assert!(n.metadata.creation_timestamp.is_some());
        let spec = n.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.1.0/24"));
        assert_eq!(spec.pod_cidrs.unwrap(), ["10.244.1.0/24"]);
    }

    #[test]
    fn malformed_annotations_keep_the_last_good_lease_until_the_node_goes() {
        let keys = Keys::new(DEFAULT_PREFIX);
        let mut good = Memory::default();
        let ok = node("b", "10.244.2.0/24", "172.31.250.12");
        let v = peer_leases(
            vec![ok, node("a", "10.244.1.0/24", "x")],
            &keys,
            "me",
            &mut good,
        );
        assert_eq!(v.len(), 1, "a malformed node never seen good is left out");
        assert_eq!(v[0].1.public_ip.to_string(), "172.31.250.12");
        let bad = node("b", "10.244.2.0/24", "172.31.250.");
        let v = peer_leases(vec![bad.clone()], &keys, "me", &mut good);
        assert_eq!(v.len(), 1, "the last good lease is kept");
        assert!(
            good.warned["b"].contains("not an IPv4 address"),
            "warned once"
        );
        assert_eq!(v[0].1.public_ip.to_string(), "172.31.250.12");
        assert!(peer_leases(vec![], &keys, "me", &mut good).is_empty());
        assert!(
            good.good.is_empty() && good.warned.is_empty(),
            "deleted nodes are forgotten"
        );
        assert!(peer_leases(vec![bad], &keys, "me", &mut good).is_empty());
    }
}
