//! cainjector (placeholder until the cainjector module lands).

use kube_common::Manager;
use kube_common::args::CommonArgs;

#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,
}

pub async fn start(_mgr: &Manager, _args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("cainjector is not implemented yet")
}
