//! flannel replacement: `flanneld` (kube subnet manager + VXLAN backend on rtnetlink, masquerade
//! and forward rules, subnet.env) and the `flannel` CNI plugin. Modules follow upstream's
//! concepts.

pub mod annotations;
pub mod args;
pub mod cni;
pub mod config;
pub mod daemon;
pub mod iface;
pub mod kube_subnet_mgr;
pub mod netlink;
pub mod reconcile;
pub mod subnet_env;
pub mod trafficmngr;
pub mod vxlan;
