//! Kubernetes client set-up: `--kubeconfig`, then `$KUBECONFIG`/`~/.kube/config`, then in-cluster.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::Error;

/// Installs ring as the process-wide rustls provider so every TLS user (kube client, data plane,
/// ACME client) agrees on one; harmless if a provider is already installed.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Loads the client configuration from an explicit kubeconfig path, else infers it
/// (`$KUBECONFIG`, `~/.kube/config`, then the in-cluster service account).
pub async fn config(kubeconfig: Option<&Path>) -> Result<Config, Error> {
    install_crypto_provider();
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })
        }
        None => Config::infer().await.map_err(Error::InferConfig),
    }
}

/// Builds a client (see [`config`]).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let config = config(kubeconfig).await?;
    Client::try_from(config).map_err(Error::Client)
}
