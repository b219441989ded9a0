//! upstream's command line (`start`, `--config`, `--provisioner-name`, `--namespace`,
//! `--configmap-name`, `--helper-image`, `--service-account-name`, `--worker-threads`,
//! `--provisioning-retry-count`, `--deletion-retry-count`, `POD_NAMESPACE`), plus `agent`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use kube_common::leader::{LeaseConfig, default_identity};
use kube_common::{CommonArgs, Manager};

use crate::agent::{self, AgentOptions};
use crate::context::{Mode, Options};
use crate::provisioner::{self, ConfigSource, lease_name};

/// upstream's health port (`HEALTH_PORT`).
pub const HEALTH_ADDRESS: &str = "0.0.0.0:8080";

#[derive(Parser, Debug)]
#[command(
    name = "local-path-provisioner",
    version,
    about = "Local Path Provisioner (rancher.io/local-path), Rust drop-in"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: CommonArgs,
    /// upstream's `--debug`: same as `--log-level debug`.
    #[arg(long, global = true, env = "RANCHER_DEBUG")]
    pub debug: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start the provisioner.
    Start(Box<StartArgs>),
    /// Run the node agent (DaemonSet): executes setup/teardown for volumes on this node.
    Agent(AgentArgs),
}

#[derive(Args, Debug)]
pub struct StartArgs {
    /// Mounted config.json (re-read periodically); without it the ConfigMap is watched via the API.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(
        long,
        default_value = "rancher.io/local-path",
        env = "PROVISIONER_NAME"
    )]
    pub provisioner_name: String,
    #[arg(long, default_value = "local-path-storage", env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long, default_value = "local-path-config", env = "CONFIGMAP_NAME")]
    pub configmap_name: String,
    /// Namespace of the task ConfigMaps (default: the --namespace). deploy/ gives them their own,
    /// so the node agents need no write access where `local-path-config` is.
    #[arg(long, env = "TASK_NAMESPACE")]
    pub task_namespace: Option<String>,
    /// Parsed for compatibility; upstream ignores it too (helperPod.yaml's image wins).
    #[arg(
        long,
        default_value = "rancher/mirrored-library-busybox:1.36.1",
        env = "HELPER_IMAGE"
    )]
    pub helper_image: String,
    #[arg(
        long,
        default_value = "local-path-provisioner-service-account",
        env = "SERVICE_ACCOUNT_NAME"
    )]
    pub service_account_name: String,
    /// upstream's threadiness: claims (and volumes) reconciled at once, on one async runtime.
    #[arg(long, default_value_t = 4, env = "WORKER_THREADS",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: u16,
    #[arg(long, default_value_t = 15, env = "PROVISIONING_RETRY_COUNT")]
    pub provisioning_retry_count: u32,
    #[arg(long, default_value_t = 15, env = "DELETION_RETRY_COUNT")]
    pub deletion_retry_count: u32,
    /// Who makes the directories: the node agent (default) or upstream's helper pod.
    #[arg(long, value_enum, default_value_t = Mode::Agent, env = "LOCAL_PATH_MODE")]
    pub mode: Mode,
    /// How often directories made for claims deleted mid-provisioning are looked for (and torn down).
    #[arg(long, default_value = "30s", value_parser = kube_common::args::parse_duration)]
    pub task_sweep_interval: Duration,
}

#[derive(Args, Debug)]
pub struct AgentArgs {
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[arg(long, default_value = "local-path-storage", env = "POD_NAMESPACE")]
    pub namespace: String,
    #[arg(long, default_value = "local-path-config", env = "CONFIGMAP_NAME")]
    pub configmap_name: String,
    /// Namespace of the task ConfigMaps (default: the --namespace). deploy/ gives them their own,
    /// so the node agents need no write access where `local-path-config` is.
    #[arg(long, env = "TASK_NAMESPACE")]
    pub task_namespace: Option<String>,
    /// Mounted config.json (for the paths to report on); else read via the API.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// How often free space, usage and orphans are reported.
    #[arg(long, default_value = "60s", value_parser = kube_common::args::parse_duration)]
    pub report_interval: Duration,
    /// The provisioner (the PVs' `pv.kubernetes.io/provisioned-by`) whose volumes may be torn down.
    #[arg(
        long,
        default_value = "rancher.io/local-path",
        env = "PROVISIONER_NAME"
    )]
    pub provisioner_name: String,
}

async fn manager(common: &CommonArgs) -> anyhow::Result<Manager> {
    let mgr = Manager::from_args("local-path-provisioner", common).await?;
    let addr: SocketAddr = match common.health_address {
        Some(a) => a,
        None => HEALTH_ADDRESS.parse()?,
    };
    mgr.serve_health(addr).await?;
    Ok(mgr)
}

pub async fn start(common: CommonArgs, args: StartArgs) -> anyhow::Result<()> {
    let mgr = manager(&common).await?;
    let le = &common.leader_election;
    // The Lease lives in the provisioner's namespace, as the library's (pod namespace).
    let lease = le.leader_elect.then(|| LeaseConfig {
        namespace: args.namespace.clone(),
        name: le
            .leader_election_id
            .clone()
            .unwrap_or_else(|| lease_name(&args.provisioner_name)),
        identity: default_identity(),
        lease_duration: le.leader_elect_lease_duration,
        renew_deadline: le.leader_elect_renew_deadline,
        retry_period: le.leader_elect_retry_period,
    });
    let opts = Options {
        provisioner_name: args.provisioner_name,
        task_namespace: args
            .task_namespace
            .unwrap_or_else(|| args.namespace.clone()),
        namespace: args.namespace,
        service_account: args.service_account_name,
        mode: args.mode,
        provisioning_retry_count: args.provisioning_retry_count,
        deletion_retry_count: args.deletion_retry_count,
        configmap: args.configmap_name.clone(),
        sweep_interval: args.task_sweep_interval,
        worker_threads: args.worker_threads,
    };
    let source = ConfigSource {
        configmap: args.configmap_name,
        file: args.config,
    };
    provisioner::run(&mgr, opts, source, lease).await?;
    Ok(())
}

pub async fn agent(common: CommonArgs, args: AgentArgs) -> anyhow::Result<()> {
    let mgr = manager(&common).await?;
    agent::run(
        &mgr,
        AgentOptions {
            node: args.node_name,
            task_namespace: args
                .task_namespace
                .unwrap_or_else(|| args.namespace.clone()),
            namespace: args.namespace,
            configmap: args.configmap_name,
            config_file: args.config,
            report_interval: args.report_interval,
            provisioner_name: args.provisioner_name,
        },
    )
    .await;
    Ok(())
}
