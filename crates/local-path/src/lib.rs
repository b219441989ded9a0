//! rancher/local-path-provisioner, drop-in: StorageClass `local-path` (`rancher.io/local-path`)
//! with upstream's ConfigMap, scripts, PV names and directory layout, and the directory work
//! done by a node agent of this same binary instead of a helper pod per volume.

pub mod agent;
pub mod capacity;
pub mod cli;
pub mod config;
pub mod context;
pub mod delete;
pub mod helper_pod;
pub mod local;
pub mod provision;
pub mod provisioner;
pub mod pv_naming;
pub mod quantity;
pub mod reload;
pub mod script;
pub mod task;
pub mod volume;
