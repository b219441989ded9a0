//! Certificates, along upstream's `pkg/controller/certificates/*` seams: `trigger` (whether to
//! issue: policy chain and failure backoff), `key_manager` (next private key Secret),
//! `request_manager` (`<name>-<revision>` CertificateRequest), `issuing` (the Secret) and
//! `readiness` (Ready condition, renewal time). Upstream runs five controllers over one
//! status; here they are steps of one reconcile, so they never race each other's writes.

mod issuing;
mod key_manager;
mod readiness;
mod request_manager;
mod trigger;

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};

use crate::api::{
    Certificate, CertificateRequest, CertificateStatus, Condition, condition, new_condition,
    set_condition,
};
use crate::context::Context;
use crate::pki::LeafInfo;
use crate::policies::{self, Input, SecretData};
use crate::secrets;

pub use trigger::backoff_until;

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("private key: {0}")]
    Key(#[from] crate::pki::PkiError),
    #[error("key generation task failed")]
    Join,
}

pub const ISSUING: &str = "Issuing";
pub const READY: &str = "Ready";

pub async fn reconcile(
    cert: Arc<Certificate>,
    ctx: Arc<Context>,
) -> Result<Action, CertificateError> {
    ctx.metrics.sync_call("certificates");
    // Work from the stored object, not the cache: an owned object's event can arrive before
    // our own last status write is in the cache, and acting on that would repeat work.
    let api: Api<Certificate> =
        Api::namespaced(ctx.client.clone(), &cert.namespace().unwrap_or_default());
    let Some(cert) = api.get_opt(&cert.name_any()).await? else {
        ctx.metrics.forget_certificate(&cert);
        return Ok(Action::await_change());
    };
    let result = sync(&cert, &ctx).await;
    if result.is_err() {
        ctx.metrics.sync_error("certificates");
    }
    result
}

/// One pass: either decide whether to issue (trigger, then readiness), or carry an issuance
/// one step further (key, temporary certificate, request, result). A step that breaks has
/// written something or has to wait; its Action says when to look again.
async fn sync(cert: &Certificate, ctx: &Context) -> Result<Action, CertificateError> {
    if cert.meta().deletion_timestamp.is_some() {
        ctx.metrics.forget_certificate(cert);
        return Ok(Action::await_change());
    }
    let seen = Observed::load(cert, ctx).await?;
    let mut status = cert.status.clone().unwrap_or_default();
    if !seen.issuing {
        return match trigger::check(&seen, &mut status).await? {
            ControlFlow::Break(action) => Ok(action),
            ControlFlow::Continue(backoff_end) => readiness::sync(&seen, status, backoff_end).await,
        };
    }
    let (key, key_secret) = match key_manager::next_key(&seen, &mut status).await? {
        ControlFlow::Continue(next) => next,
        ControlFlow::Break(action) => return Ok(action),
    };
    issuing::temporary_certificate(&seen, &key).await?;
    let request = match request_manager::next_request(&seen, &mut status, &key, &key_secret).await?
    {
        ControlFlow::Continue(request) => request,
        ControlFlow::Break(action) => return Ok(action),
    };
    issuing::complete(&seen, &mut status, &key, &key_secret, &request).await
}

/// What a pass reads before deciding anything; the status being written is kept apart.
struct Observed<'a> {
    cert: &'a Certificate,
    ctx: &'a Context,
    ns: String,
    name: String,
    secrets: Api<Secret>,
    requests: Api<CertificateRequest>,
    /// The target Secret's contents; `None` when it does not exist.
    secret: Option<SecretData>,
    /// The request of the current revision, if it still exists.
    current_request: Option<CertificateRequest>,
    /// The certificate in the target Secret, when it parses.
    leaf: Option<LeafInfo>,
    /// When to renew the current certificate (ARI may bring it forward).
    renewal: Option<i64>,
    issuing: bool,
    revision: i32,
    now: i64,
}

impl<'a> Observed<'a> {
    async fn load(cert: &'a Certificate, ctx: &'a Context) -> Result<Self, CertificateError> {
        let ns = cert.namespace().unwrap_or_default();
        let name = cert.name_any();
        let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
        let requests: Api<CertificateRequest> = Api::namespaced(ctx.client.clone(), &ns);
        let secret = secrets_api.get_opt(&cert.spec.secret_name).await?;
        let status = cert.status.as_ref();
        let current_request = match status.and_then(|s| s.revision) {
            Some(r) => requests.get_opt(&format!("{name}-{r}")).await?,
            None => None,
        };
        let now = crate::time::now_secs();
        let secret = secret.as_ref().map(secrets::secret_data);
        let leaf = secret
            .as_ref()
            .and_then(|s| s.tls_crt.as_deref())
            .and_then(|c| crate::pki::leaf_info(c).ok());
        let conditions = status.and_then(|s| s.conditions.as_deref()).unwrap_or(&[]);
        let issuing = condition(conditions, ISSUING).is_some_and(Condition::is_true);
        let mut renewal = leaf.as_ref().map(|l| policies::renewal_time(cert, l));
        if let (Some(l), Some(r), false) = (&leaf, renewal, issuing)
            && cert.spec.issuer_ref.group() == crate::api::GROUP
            && let Some(suggested) = ctx.ari.suggested_renewal(ctx, cert, l).await
        {
            renewal = Some(r.min(suggested));
        }
        Ok(Observed {
            cert,
            ctx,
            ns,
            name,
            secrets: secrets_api,
            requests,
            secret,
            current_request,
            leaf,
            renewal,
            issuing,
            revision: status.and_then(|s| s.revision).unwrap_or(0),
            now,
        })
    }

    /// What the policy chains look at.
    fn input(&self) -> Input<'_> {
        Input {
            cert: self.cert,
            secret: self.secret.as_ref(),
            current_request: self.current_request.as_ref(),
            now: self.now,
            renewal_time: self.renewal,
        }
    }

    /// The request (and revision) the next issuance works towards.
    fn next_name(&self) -> String {
        format!("{}-{}", self.name, self.revision + 1)
    }

    fn generation(&self) -> Option<i64> {
        self.cert.metadata.generation
    }

    async fn patch_status(&self, status: &CertificateStatus) -> Result<(), kube::Error> {
        crate::status::apply(&self.ctx.client, self.cert, status).await
    }

    async fn event(&self, type_: EventType, reason: &str, action: &str, note: String) {
        kube_common::events::publish(
            &self.ctx.recorder,
            &self.cert.object_ref(&()),
            type_,
            reason,
            action,
            note,
        )
        .await;
    }
}

/// Sets a condition stamped with the generation it was computed for.
fn set(status: &mut CertificateStatus, c: Condition, generation: Option<i64>) {
    let mut conds = status.conditions.take().unwrap_or_default();
    let mut c = c;
    c.observed_generation = generation;
    set_condition(&mut conds, c, &crate::time::now());
    status.conditions = Some(conds);
}

fn remove(status: &mut CertificateStatus, type_: &str) {
    if let Some(c) = status.conditions.as_mut() {
        c.retain(|c| c.type_ != type_);
    }
}

/// Records a failed issuance: Issuing=False, one more failed attempt, backoff from now.
async fn fail(
    seen: &Observed<'_>,
    status: &mut CertificateStatus,
    message: &str,
) -> Result<Action, CertificateError> {
    let cert = seen.cert;
    tracing::warn!(certificate = %cert.name_any(), namespace = ?cert.namespace(), message, "issuance failed");
    status.failed_issuance_attempts = Some(status.failed_issuance_attempts.unwrap_or(0) + 1);
    status.last_failure_time = Some(crate::time::now());
    set(
        status,
        new_condition(ISSUING, false, "Failed", message),
        seen.generation(),
    );
    seen.patch_status(status).await?;
    seen.event(EventType::Warning, "Failed", "Fail", message.to_string())
        .await;
    Ok(Action::requeue(Duration::from_secs(1)))
}
