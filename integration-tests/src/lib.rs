//! The real test environment every crate's tests use: a Kubernetes control plane (etcd +
//! kube-apiserver v1.20.2, optionally controller-manager and scheduler), an ACME server (pebble +
//! pebble-challtestsrv), and network namespaces. Nothing here is a mock; a missing peer is an
//! error naming the set-up command, never a silent pass.

pub mod acme;
pub mod bench_peers;
pub mod faults;
pub mod http;
pub mod ingress;
pub mod kube;
pub mod kubelet;
pub mod netns;
pub mod nodes;
pub mod overlay;
pub mod paths;
pub mod pki;
pub mod poll;
pub mod process;
pub mod seed;

use thiserror::Error;

/// The command that installs every peer the suite needs.
pub const SETUP_COMMAND: &str = "cargo run -p xtask -- test";

#[derive(Debug, Error)]
pub enum HarnessError {
    #[error(
        "{what} not found at {path}: run `{SETUP_COMMAND}` once to install and build the test peers"
    )]
    MissingPeer { what: String, path: String },
    #[error("{0}: needs root (network namespaces); run the suite as root, as CI does")]
    NotRoot(String),
    #[error("starting {what}: {source}")]
    Spawn {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} did not become ready within {secs}s; its log: {log}")]
    NotReady {
        what: String,
        secs: u64,
        log: String,
    },
    #[error("{what} exited early ({status}); its log: {log}")]
    Exited {
        what: String,
        status: String,
        log: String,
    },
    #[error("command `{cmd}` failed: {message}")]
    Command { cmd: String, message: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("certificate generation: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("Kubernetes: {0}")]
    Kube(#[from] ::kube::Error),
    #[error("kubeconfig: {0}")]
    Kubeconfig(String),
    #[error("HTTP: {0}")]
    Http(String),
}

pub type Result<T, E = HarnessError> = std::result::Result<T, E>;

/// Installs ring as the process-wide rustls provider (the one provider of this project).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
