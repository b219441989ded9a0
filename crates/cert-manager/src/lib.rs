//! Drop-in replacement for cert-manager: the same CRDs, annotations and Secret format, with the
//! ACME HTTP-01 challenges answered by the controller itself instead of a pod per challenge.

pub mod api;
pub mod cainjector;
pub mod cli;
pub mod controller;
pub mod crds;
pub mod duration;
pub mod webhook;
