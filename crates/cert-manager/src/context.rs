//! What every controller of `cert-manager-controller` shares.

use std::sync::Arc;

use kube::Client;
use kube_common::events::Recorder;

use crate::cli::ControllerArgs;
use crate::http01::Solver;
use crate::issuers::Accounts;
use crate::metrics::Metrics;

pub struct Context {
    pub client: Client,
    pub args: Arc<ControllerArgs>,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub accounts: Accounts,
    pub solver: Solver,
    pub self_checks: crate::challenges::SelfChecks,
    pub ari: crate::ari::Ari,
}
