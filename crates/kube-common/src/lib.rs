//! The shared Kubernetes crate of every component: client set-up, shared flags, controller
//! scaffolding, Lease leader election, the health/metrics server, tracing, shutdown and backoff.

pub mod args;
pub mod backoff;
pub mod client;
pub mod controller;
pub mod discovery;
mod error;
pub mod events;
pub mod health;
pub mod idle;
pub mod leader;
pub mod metrics;
pub mod serve;
pub mod shutdown;
pub mod telemetry;
pub mod tls;

pub use args::{CommonArgs, LeaderElectionArgs, LogFormat};
pub use backoff::Backoff;
pub use controller::Manager;
pub use error::Error;
pub use health::{Readiness, ReadyHandle};
pub use kube::runtime::controller::Action;
