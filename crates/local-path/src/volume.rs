//! The PersistentVolume upstream creates for a claim, and reading node and path back from any
//! local-path PV (ours, upstream's, k3s's `local` ones) for deletion.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    HostPathVolumeSource, LocalVolumeSource, NodeSelector, NodeSelectorRequirement,
    NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim,
    PersistentVolumeSpec, VolumeNodeAffinity,
};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::ResourceExt;
use kube::api::ObjectMeta;

pub const ANN_SELECTED_NODE: &str = "local.path.provisioner/selected-node";
pub const ANN_PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VolumeType {
    HostPath,
    Local,
}

impl VolumeType {
    /// PVC annotation `volumeType`, else StorageClass annotation `defaultVolumeType`, else
    /// hostPath (case-insensitive, as upstream).
    pub fn for_claim(claim: &PersistentVolumeClaim, class: &StorageClass) -> Result<Self, String> {
        let value = claim
            .annotations()
            .get("volumeType")
            .or_else(|| class.annotations().get("defaultVolumeType"));
        match value.map(|v| v.to_ascii_lowercase()).as_deref() {
            None | Some("hostpath") => Ok(VolumeType::HostPath),
            Some("local") => Ok(VolumeType::Local),
            Some(other) => Err(format!(
                "volume type {other:?} is not supported (use local or hostPath)"
            )),
        }
    }
}

/// Everything a new PV is made from.
pub struct NewVolume<'a> {
    pub name: &'a str,
    pub provisioner: &'a str,
    pub claim: &'a PersistentVolumeClaim,
    pub class: &'a StorageClass,
    pub path: &'a str,
    pub volume_type: VolumeType,
    /// `(node name, affinity key, affinity value)`; `None` for the shared filesystem.
    pub node: Option<(&'a str, &'a str, &'a str)>,
}

pub fn build(v: &NewVolume<'_>) -> PersistentVolume {
    let spec = v.claim.spec.clone().unwrap_or_default();
    let mut annotations = BTreeMap::from([(ANN_PROVISIONED_BY.to_string(), v.provisioner.into())]);
    if let Some((node, _, _)) = v.node {
        annotations.insert(ANN_SELECTED_NODE.into(), node.into());
    }
    let capacity = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .cloned()
        .map(|q| BTreeMap::from([("storage".to_string(), q)]));
    let (host_path, local) = match v.volume_type {
        VolumeType::HostPath => (
            Some(HostPathVolumeSource {
                path: v.path.into(),
                type_: Some("DirectoryOrCreate".into()),
            }),
            None,
        ),
        VolumeType::Local => (
            None,
            Some(LocalVolumeSource {
                path: v.path.into(),
                fs_type: None,
            }),
        ),
    };
    let node_affinity = v.node.map(|(_, key, value)| VolumeNodeAffinity {
        required: Some(NodeSelector {
            node_selector_terms: vec![NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: key.into(),
                    operator: "In".into(),
                    values: Some(vec![value.into()]),
                }]),
                match_fields: None,
            }],
        }),
    });
    PersistentVolume {
        metadata: ObjectMeta {
            name: Some(v.name.into()),
            annotations: Some(annotations),
            ..Default::default()
        },
        spec: Some(PersistentVolumeSpec {
            access_modes: spec.access_modes.clone(),
            capacity,
            claim_ref: Some(ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("PersistentVolumeClaim".into()),
                namespace: v.claim.namespace(),
                name: Some(v.claim.name_any()),
                uid: v.claim.uid(),
                resource_version: v.claim.resource_version(),
                ..Default::default()
            }),
            host_path,
            local,
            mount_options: v.class.mount_options.clone(),
            node_affinity,
            persistent_volume_reclaim_policy: Some(
                v.class
                    .reclaim_policy
                    .clone()
                    .unwrap_or_else(|| "Delete".into()),
            ),
            storage_class_name: Some(v.class.name_any()),
            volume_mode: Some("Filesystem".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The volume's directory (`hostPath.path` or `local.path`).
pub fn path_of(pv: &PersistentVolume) -> Option<String> {
    let spec = pv.spec.as_ref()?;
    spec.host_path
        .as_ref()
        .map(|h| h.path.clone())
        .or_else(|| spec.local.as_ref().map(|l| l.path.clone()))
}

/// The node holding the volume: our/upstream's `selected-node` annotation, else the first `In`
/// value of the required node affinity (upstream's source; may be a custom label's value).
/// `None` for shared-filesystem volumes (no affinity).
pub fn node_of(pv: &PersistentVolume) -> Option<String> {
    if let Some(n) = pv
        .annotations()
        .get(ANN_SELECTED_NODE)
        .filter(|n| !n.is_empty())
    {
        return Some(n.clone());
    }
    let terms = &pv
        .spec
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required
        .as_ref()?
        .node_selector_terms;
    terms
        .iter()
        .flat_map(|t| t.match_expressions.iter().flatten())
        .find(|e| e.operator == "In")
        .and_then(|e| e.values.as_ref()?.first().cloned())
}

/// Whether the PV has node affinity at all (shared-filesystem PVs have none).
pub fn has_affinity(pv: &PersistentVolume) -> bool {
    pv.spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimSpec, VolumeResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn claim() -> PersistentVolumeClaim {
        PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("db".into()),
                uid: Some("u1".into()),
                ..Default::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                access_modes: Some(vec!["ReadWriteOnce".into()]),
                resources: Some(VolumeResourceRequirements {
                    requests: Some(BTreeMap::from([(
                        "storage".to_string(),
                        Quantity("10Gi".into()),
                    )])),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            status: None,
        }
    }

    #[test]
    fn pv_like_upstream() {
        let c = claim();
        let mut class = StorageClass::default();
        class.metadata.name = Some("local-path".into());
        let pv = build(&NewVolume {
            name: "pvc-u1",
            provisioner: "rancher.io/local-path",
            claim: &c,
            class: &class,
            path: "/opt/local-path-provisioner/pvc-u1_db_data",
            volume_type: VolumeType::HostPath,
            node: Some(("n1", HOSTNAME_KEY, "n1")),
        });
        let spec = pv.spec.as_ref().unwrap();
        assert_eq!(
            spec.persistent_volume_reclaim_policy.as_deref(),
            Some("Delete")
        );
        assert_eq!(
            spec.host_path.as_ref().unwrap().type_.as_deref(),
            Some("DirectoryOrCreate")
        );
        assert_eq!(spec.capacity.as_ref().unwrap()["storage"].0, "10Gi");
        assert_eq!(node_of(&pv).as_deref(), Some("n1"));
        assert_eq!(
            path_of(&pv).as_deref(),
            Some("/opt/local-path-provisioner/pvc-u1_db_data")
        );
        // Upstream-made PV without our annotation: node from the affinity.
        let mut old = pv.clone();
        old.metadata
            .annotations
            .as_mut()
            .unwrap()
            .remove(ANN_SELECTED_NODE);
        assert_eq!(node_of(&old).as_deref(), Some("n1"));
    }

    #[test]
    fn volume_type_choice() {
        let mut c = claim();
        let mut class = StorageClass::default();
        assert_eq!(VolumeType::for_claim(&c, &class), Ok(VolumeType::HostPath));
        class.metadata.annotations = Some(BTreeMap::from([(
            "defaultVolumeType".into(),
            "local".into(),
        )]));
        assert_eq!(VolumeType::for_claim(&c, &class), Ok(VolumeType::Local));
        c.metadata.annotations = Some(BTreeMap::from([("volumeType".into(), "HostPath".into())]));
        assert_eq!(VolumeType::for_claim(&c, &class), Ok(VolumeType::HostPath));
        c.metadata.annotations = Some(BTreeMap::from([("volumeType".into(), "nfs".into())]));
        assert!(VolumeType::for_claim(&c, &class).is_err());
    }
}
