//! Issuer and ClusterIssuer. Only the ACME issuer type is implemented (`acme`).

pub mod acme;

pub use acme::{Accounts, IssuerError, ResolvedIssuer, account, reconcile_issuer, resolve};
