//! Drop-in replacement for cert-manager: the same CRDs, annotations and Secret format, with the
//! ACME HTTP-01 challenges answered by the controller itself instead of a pod per challenge.

pub mod acme_client;
pub mod api;
pub mod cainjector;
pub mod cli;
pub mod context;
pub mod controller;
pub mod crds;
pub mod duration;
pub mod http01;
pub mod issuers;
pub mod metrics;
pub mod pki;
pub mod roles;
pub mod time;
pub mod webhook;

/// Field manager of everything written with server-side apply (upstream's user-agent prefix).
pub const FIELD_MANAGER: &str = "cert-manager-certificates-issuing";
pub mod ari;
pub mod certificates;
pub mod challenges;
pub mod ingress_shim;
pub mod names;
pub mod orders;
pub mod policies;
pub mod requests;
pub mod secrets;
pub mod status;
