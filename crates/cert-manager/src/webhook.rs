//! Admission webhook (placeholder until the webhook module lands).

use kube_common::Manager;
use kube_common::args::CommonArgs;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn start(_mgr: &Manager, _args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("the webhook is not implemented yet")
}
