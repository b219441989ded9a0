//! `local-path-provisioner start` (the provisioner) and `local-path-provisioner agent` (the
//! node agent DaemonSet).

use clap::Parser;
use local_path::cli::{Cli, Command};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    if cli.debug {
        cli.common.log_level = "debug".into();
    }
    match cli.command {
        Command::Start(args) => local_path::cli::start(cli.common, *args).await,
        Command::Agent(args) => local_path::cli::agent(cli.common, args).await,
    }
}
