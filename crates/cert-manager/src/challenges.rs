//! ACME Challenges (HTTP-01): present the token, self-check the public path, tell the ACME
//! server to validate, record the outcome and clean up (upstream's acmechallenges controller).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use instant_acme::{AuthorizationStatus, ChallengeStatus as AcmeChallengeStatus, ChallengeType};
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::finalizer::{self, finalizer};
use kube::{Resource, ResourceExt};

use crate::api::{Challenge, ChallengeStatus, Order};
use crate::context::Context;
use crate::http01::Http01Error;
use crate::issuers::{self, IssuerError};

pub const FINALIZER: &str = "acme.cert-manager.io/finalizer";

#[derive(Debug, thiserror::Error)]
pub enum ChallengeError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error(transparent)]
    Http01(#[from] Http01Error),
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
    #[error("finalizer: {0}")]
    Finalizer(Box<kube::runtime::finalizer::Error<ChallengeError>>),
}

/// Self-check passes so far, per Challenge uid (in memory: a restart starts counting again).
#[derive(Default)]
pub struct SelfChecks(Mutex<HashMap<String, u32>>);

impl SelfChecks {
    fn pass(&self, uid: &str) -> u32 {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.entry(uid.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    fn reset(&self, uid: &str) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).remove(uid);
    }
}

fn is_final(state: &str) -> bool {
    matches!(state, "valid" | "invalid" | "expired" | "errored")
}

async fn patch_status(
    ctx: &Context,
    ch: &Challenge,
    status: &ChallengeStatus,
) -> Result<(), kube::Error> {
    crate::status::apply(&ctx.client, ch, status).await
}

async fn event(ctx: &Context, ch: &Challenge, type_: EventType, reason: &str, note: String) {
    kube_common::events::publish(
        &ctx.recorder,
        &ch.object_ref(&()),
        type_,
        reason,
        reason,
        note,
    )
    .await;
}

pub async fn reconcile(ch: Arc<Challenge>, ctx: Arc<Context>) -> Result<Action, ChallengeError> {
    ctx.metrics.sync_call("challenges");
    let api: Api<Challenge> =
        Api::namespaced(ctx.client.clone(), &ch.namespace().unwrap_or_default());
    let Some(ch) = api.get_opt(&ch.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let state = ch
        .status
        .as_ref()
        .and_then(|s| s.state.clone())
        .unwrap_or_default();
    // A finished challenge is cleaned up and left alone. It gets no finalizer: as upstream,
    // only a challenge in progress holds its own deletion back.
    if ch.meta().deletion_timestamp.is_none() && is_final(&state) {
        return finished(&ctx, &ch).await;
    }
    finalizer(&api, FINALIZER, Arc::new(ch), |event| async {
        match event {
            finalizer::Event::Apply(ch) => solve(&ch, &ctx).await,
            finalizer::Event::Cleanup(ch) => cleanup(&ch, &ctx).await,
        }
    })
    .await
    .map_err(|e| ChallengeError::Finalizer(Box::new(e)))
}

/// Deleted: the token is no longer answered (the finalizer goes once this succeeds).
async fn cleanup(ch: &Challenge, ctx: &Context) -> Result<Action, ChallengeError> {
    ctx.solver.cleanup(&ctx.client, ch).await?;
    ctx.self_checks.reset(&ch.uid().unwrap_or_default());
    Ok(Action::await_change())
}

/// Valid, invalid, expired or errored: stop presenting the token.
async fn finished(ctx: &Context, ch: &Challenge) -> Result<Action, ChallengeError> {
    let mut status = ch.status.clone().unwrap_or_default();
    // Whatever the status says, this process stops answering the token.
    ctx.solver.remove(&ch.spec.token);
    if status.presented == Some(true) {
        ctx.solver.cleanup(&ctx.client, ch).await?;
        status.presented = Some(false);
        status.processing = Some(false);
        patch_status(ctx, ch, &status).await?;
    }
    Ok(Action::await_change())
}

/// Present the token, self-check, ask the ACME server to validate, record the outcome.
async fn solve(ch: &Challenge, ctx: &Context) -> Result<Action, ChallengeError> {
    let uid = ch.uid().unwrap_or_default();
    let mut status = ch.status.clone().unwrap_or_default();
    if ch.spec.type_ != "HTTP-01" || ch.spec.solver.http01.is_none() {
        status.reason = Some("Only HTTP-01 challenges are supported by this implementation".into());
        status.state = Some("errored".into());
        patch_status(ctx, ch, &status).await?;
        return Ok(Action::await_change());
    }

    // Presented by an earlier process (a restart, or another pod now leading) points at that
    // pod: apply again, so the solver Service reaches this one.
    let presented = status.presented == Some(true);
    if !presented || !ctx.solver.points_here(&ctx.client, ch).await? {
        if let Err(e) = ctx.solver.present(&ctx.client, ch).await {
            status.reason = Some(format!("Error presenting challenge: {e}"));
            status.processing = Some(true);
            patch_status(ctx, ch, &status).await?;
            event(
                ctx,
                ch,
                EventType::Warning,
                "PresentError",
                format!("Error presenting challenge: {e}"),
            )
            .await;
            return Ok(Action::requeue(Duration::from_secs(10)));
        }
        status.presented = Some(true);
        status.presented_at = Some(crate::time::now());
        status.processing = Some(true);
        status.state = Some("pending".into());
        status.reason = Some("Waiting for HTTP-01 challenge propagation".into());
        patch_status(ctx, ch, &status).await?;
        event(
            ctx,
            ch,
            EventType::Normal,
            "Presented",
            "Presented challenge using HTTP-01 challenge mechanism".to_string(),
        )
        .await;
        return Ok(Action::requeue(Duration::from_millis(50)));
    }

    let issuer = issuers::resolve(
        ctx,
        &ch.namespace().unwrap_or_default(),
        &ch.spec.issuer_ref,
    )
    .await?;
    let Some(issuer) = issuer else {
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let account = issuers::account(ctx, &issuer).await?;

    // Has the ACME server been told already? Look at the authorization.
    let Some(order_url) = order_url(ctx, ch).await? else {
        return Ok(Action::requeue(Duration::from_secs(5)));
    };
    let mut acme_order = account.order(order_url).await?;
    let mut authzs = acme_order.authorizations();
    let mut found = None;
    while let Some(a) = authzs.next().await {
        let mut a = a?;
        if a.url() != ch.spec.authorization_url {
            continue;
        }
        let authz_status = a.status;
        let challenge = a.challenge(ChallengeType::Http01);
        let (ch_status, error) = match &challenge {
            Some(c) => (Some(c.status), c.error.as_ref().map(|e| e.to_string())),
            None => (None, None),
        };
        if authz_status == AuthorizationStatus::Pending
            && ch_status == Some(AcmeChallengeStatus::Pending)
        {
            // Not accepted yet: self-check first (unless the solver says to just wait).
            let wait = ch
                .spec
                .solver
                .wait_instead_of_self_check
                .as_deref()
                .and_then(|d| crate::time::parse_go_duration(d).ok());
            if let Some(wait) = wait {
                let presented = status
                    .presented_at
                    .as_deref()
                    .and_then(crate::time::parse_secs)
                    .unwrap_or(0);
                let due = presented + wait.as_secs() as i64;
                let now = crate::time::now_secs();
                if now < due {
                    return Ok(Action::requeue(Duration::from_secs((due - now) as u64)));
                }
            } else {
                match ctx.solver.self_check(ch).await {
                    Ok(()) => {
                        let passes = ctx.self_checks.pass(&uid);
                        if passes < ctx.args.acme_http01_self_check_passes {
                            return Ok(Action::requeue(ctx.args.acme_http01_self_check_interval));
                        }
                    }
                    Err(e) => {
                        tracing::debug!(challenge = %ch.name_any(), error = %e, "self-check failed");
                        ctx.self_checks.reset(&uid);
                        let reason = format!("Waiting for HTTP-01 challenge propagation: {e}");
                        if status.reason.as_deref() != Some(reason.as_str()) {
                            status.reason = Some(reason);
                            patch_status(ctx, ch, &status).await?;
                        }
                        return Ok(Action::requeue(ctx.args.acme_http01_self_check_interval));
                    }
                }
            }
            if let Some(mut c) = challenge {
                c.set_ready().await?;
            }
            tracing::info!(challenge = %ch.name_any(), domain = %ch.spec.dns_name, "self-check passed, ACME server asked to validate");
            ctx.self_checks.reset(&uid);
            status.reason = Some("Waiting for authorization to be valid".into());
            status.state = Some("processing".into());
            patch_status(ctx, ch, &status).await?;
            return Ok(Action::requeue(Duration::from_millis(250)));
        }
        found = Some((authz_status, error));
        break;
    }
    let Some((authz_status, error)) = found else {
        status.state = Some("errored".into());
        status.reason = Some("authorization not found in the ACME order".into());
        patch_status(ctx, ch, &status).await?;
        return Ok(Action::await_change());
    };
    match authz_status {
        AuthorizationStatus::Valid => {
            status.state = Some("valid".into());
            status.reason = Some("Successfully authorized domain".into());
            status.processing = Some(false);
            event(
                ctx,
                ch,
                EventType::Normal,
                "DomainVerified",
                format!(
                    "Domain {:?} verified with \"HTTP-01\" validation",
                    ch.spec.dns_name
                ),
            )
            .await;
        }
        AuthorizationStatus::Pending => {
            return Ok(Action::requeue(Duration::from_millis(250)));
        }
        other => {
            let detail = error.unwrap_or_else(|| format!("authorization is {other:?}"));
            status.state = Some("invalid".into());
            status.reason = Some(format!("Error accepting authorization: {detail}"));
            status.processing = Some(false);
            event(ctx, ch, EventType::Warning, "Failed", detail).await;
        }
    }
    ctx.solver.cleanup(&ctx.client, ch).await?;
    status.presented = Some(false);
    patch_status(ctx, ch, &status).await?;
    Ok(Action::await_change())
}

async fn order_url(ctx: &Context, ch: &Challenge) -> Result<Option<String>, kube::Error> {
    let Some(owner) = ch.owner_references().iter().find(|o| o.kind == "Order") else {
        return Ok(None);
    };
    let api: Api<Order> = Api::namespaced(ctx.client.clone(), &ch.namespace().unwrap_or_default());
    Ok(api
        .get_opt(&owner.name)
        .await?
        .and_then(|o| o.status.and_then(|s| s.url)))
}
