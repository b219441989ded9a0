//! Starts the controllers of `cert-manager controller`.

use kube_common::Manager;

use crate::cli::ControllerArgs;

pub async fn start(_mgr: &Manager, _args: &ControllerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
