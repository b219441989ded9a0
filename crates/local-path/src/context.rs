//! What the provisioner's controllers share, and the task helpers both use.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use k8s_openapi::api::core::v1::{ConfigMap, ObjectReference};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::events::{EventType, Recorder};
use kube::{Api, Client};
use thiserror::Error;

use crate::reload::ConfigRx;
use crate::task::{self, Op, Task, TaskState};

/// How volume directories are made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// The node agent (DaemonSet of this binary) runs the scripts: no image pull per volume.
    Agent,
    /// upstream's helper pod per create/delete (image from `helperPod.yaml`).
    HelperPod,
}

/// Settings of `start`.
#[derive(Clone, Debug)]
pub struct Options {
    pub provisioner_name: String,
    pub namespace: String,
    pub service_account: String,
    pub mode: Mode,
    pub provisioning_retry_count: u32,
    pub deletion_retry_count: u32,
}

#[derive(Debug, Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("no valid configuration loaded yet")]
    NoConfig,
    #[error("{0}")]
    Retry(String),
}

pub struct Ctx {
    pub client: Client,
    pub opts: Options,
    pub config: ConfigRx,
    pub recorder: Recorder,
    /// Failed script runs per volume, against the retry counts.
    failures: Mutex<HashMap<String, u32>>,
}

impl Ctx {
    pub fn new(client: Client, opts: Options, config: ConfigRx, recorder: Recorder) -> Self {
        Self {
            client,
            opts,
            config,
            recorder,
            failures: Mutex::default(),
        }
    }

    pub fn tasks(&self) -> Api<ConfigMap> {
        Api::namespaced(self.client.clone(), &self.opts.namespace)
    }

    pub async fn get_task(&self, op: Op, pv: &str) -> Result<Option<TaskState>, Error> {
        let cm = self.tasks().get_opt(&task::name(op, pv)).await?;
        Ok(cm.as_ref().and_then(task::parse))
    }

    /// Creates the task; an existing one of the same name (ours, from before a restart) wins.
    pub async fn create_task(&self, t: &Task) -> Result<(), Error> {
        let cm = t.to_configmap(&self.opts.namespace);
        match self.tasks().create(&PostParams::default(), &cm).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn delete_task(&self, op: Op, pv: &str) -> Result<(), Error> {
        match self
            .tasks()
            .delete(&task::name(op, pv), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Counts a failed run; true while retries are left.
    pub fn count_failure(&self, pv: &str, limit: u32) -> bool {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let n = f.entry(pv.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        limit == 0 || *n < limit
    }

    pub fn forget_failures(&self, pv: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pv);
    }

    pub async fn event(
        &self,
        regarding: &ObjectReference,
        warning: bool,
        reason: &str,
        note: String,
    ) {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        kube_common::events::publish(&self.recorder, regarding, type_, reason, reason, note).await;
    }
}
