use thiserror::Error;

/// Errors of the shared scaffolding.
#[derive(Debug, Error)]
pub enum Error {
    #[error("cannot load kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found (tried $KUBECONFIG, ~/.kube/config, in-cluster): {0}"
    )]
    InferConfig(#[source] kube::config::InferConfigError),
    #[error("cannot build Kubernetes client: {0}")]
    Client(#[source] kube::Error),
    #[error("Kubernetes API error: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid log filter {filter:?}: {message}")]
    LogFilter { filter: String, message: String },
    #[error("invalid leader election settings: {0}")]
    LeaderElectionConfig(String),
    #[error("leadership of Lease {namespace}/{name} lost")]
    LeadershipLost { namespace: String, name: String },
}
