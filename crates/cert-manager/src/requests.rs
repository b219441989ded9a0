//! CertificateRequests: the built-in approver, and the ACME issuer (CSR → Order → chain).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::api::{
    CertificateRequest, CertificateRequestStatus, Condition, GROUP, Order, OrderSpec, condition,
    new_condition, set_condition,
};
use crate::context::Context;
use crate::issuers;

#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

pub const READY: &str = "Ready";
pub const APPROVED: &str = "Approved";
pub const DENIED: &str = "Denied";

/// The request's PEM CSR (base64 in the API).
pub fn csr_of(cr: &CertificateRequest) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(cr.spec.request.trim())
        .ok()
}

fn cond<'a>(cr: &'a CertificateRequest, t: &str) -> Option<&'a Condition> {
    cr.status
        .as_ref()?
        .conditions
        .as_deref()
        .and_then(|c| condition(c, t))
}

/// Ready=True (Issued) or Ready=False with a terminal reason.
pub fn is_final(cr: &CertificateRequest) -> bool {
    cond(cr, READY).is_some_and(|c| {
        c.is_true()
            || matches!(
                c.reason.as_deref(),
                Some("Failed") | Some("Denied") | Some("InvalidRequest")
            )
    })
}

pub fn is_issued(cr: &CertificateRequest) -> bool {
    cond(cr, READY).is_some_and(Condition::is_true)
}

pub fn failure_message(cr: &CertificateRequest) -> Option<String> {
    cond(cr, READY)
        .filter(|c| !c.is_true())
        .and_then(|c| c.message.clone())
}

async fn patch_status(
    ctx: &Context,
    cr: &CertificateRequest,
    status: CertificateRequestStatus,
) -> Result<(), kube::Error> {
    crate::status::apply(&ctx.client, cr, &status).await
}

fn with_condition(cr: &CertificateRequest, c: Condition) -> CertificateRequestStatus {
    let mut status = cr.status.clone().unwrap_or_default();
    let mut conds = status.conditions.take().unwrap_or_default();
    set_condition(&mut conds, c, &crate::time::now());
    status.conditions = Some(conds);
    status
}

pub async fn reconcile(
    cr: Arc<CertificateRequest>,
    ctx: Arc<Context>,
) -> Result<Action, RequestError> {
    ctx.metrics.sync_call("certificaterequests");
    let ns = cr.namespace().unwrap_or_default();
    let Some(cr) = Api::<CertificateRequest>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&cr.name_any())
        .await?
    else {
        return Ok(Action::await_change());
    };
    if cr.spec.issuer_ref.group() != GROUP || is_final(&cr) {
        // External issuers handle their own requests.
        return Ok(Action::await_change());
    }
    // Approver: cert-manager approves requests for its own issuer kinds.
    if cond(&cr, APPROVED).is_none() && cond(&cr, DENIED).is_none() {
        let status = with_condition(
            &cr,
            new_condition(
                APPROVED,
                true,
                "cert-manager.io",
                "Certificate request has been approved by cert-manager.io",
            ),
        );
        patch_status(&ctx, &cr, status).await?;
        return Ok(Action::await_change());
    }
    if cond(&cr, DENIED).is_some_and(Condition::is_true) {
        let mut status = with_condition(
            &cr,
            new_condition(
                READY,
                false,
                "Denied",
                "The CertificateRequest was denied by an approval controller",
            ),
        );
        status.failure_time = Some(crate::time::now());
        patch_status(&ctx, &cr, status).await?;
        return Ok(Action::await_change());
    }
    if !cond(&cr, APPROVED).is_some_and(Condition::is_true) {
        return Ok(Action::await_change());
    }
    let pending = |msg: String| new_condition(READY, false, "Pending", msg);
    let Some(issuer) = issuers::resolve(&ctx, &ns, &cr.spec.issuer_ref).await? else {
        let msg = format!(
            "Referenced \"{}\" not found: {} \"{}\" not found",
            cr.spec.issuer_ref.kind(),
            cr.spec.issuer_ref.kind(),
            cr.spec.issuer_ref.name
        );
        patch_status(&ctx, &cr, with_condition(&cr, pending(msg))).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let Some(acme) = issuer.acme() else {
        let msg = "Referenced issuer does not have an ACME configuration; only ACME issuers are supported".to_string();
        patch_status(&ctx, &cr, with_condition(&cr, pending(msg))).await?;
        return Ok(Action::await_change());
    };
    if !issuer.is_ready() {
        let msg = "Referenced issuer does not have a Ready status condition".to_string();
        patch_status(&ctx, &cr, with_condition(&cr, pending(msg))).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    let Some((names, _)) = csr_of(&cr).and_then(|pem| crate::pki::parse_csr(&pem).ok()) else {
        let mut status = with_condition(
            &cr,
            new_condition(
                READY,
                false,
                "Failed",
                "Failed to decode CSR in spec.request",
            ),
        );
        status.failure_time = Some(crate::time::now());
        patch_status(&ctx, &cr, status).await?;
        return Ok(Action::await_change());
    };

    // The Order, named after the request and a hash of its spec (upstream's ComputeName).
    let spec = OrderSpec {
        request: cr.spec.request.clone(),
        issuer_ref: cr.spec.issuer_ref.clone(),
        common_name: names.common_name.clone(),
        dns_names: Some(names.dns_names.clone()).filter(|d| !d.is_empty()),
        ip_addresses: Some(names.ip_addresses.clone()).filter(|d| !d.is_empty()),
        duration: cr
            .spec
            .duration
            .clone()
            .filter(|_| acme.enable_duration_feature.unwrap_or(false)),
        profile: acme.profile.clone(),
        replaces: None,
    };
    let hash = crate::names::fnv32a(serde_json::to_string(&spec).unwrap_or_default().as_bytes());
    let order_name = crate::names::compute_name(&cr.name_any(), hash);
    let orders: Api<Order> = Api::namespaced(ctx.client.clone(), &ns);
    let order = match orders.get_opt(&order_name).await? {
        Some(o) => o,
        None => {
            let mut order = Order::new(&order_name, spec);
            order.metadata.namespace = Some(ns.clone());
            order.metadata.labels = Some(cr.labels().clone());
            order.metadata.annotations = Some(cr.annotations().clone());
            order.metadata.owner_references = cr.controller_owner_ref(&()).map(|o| vec![o]);
            match orders.create(&PostParams::default(), &order).await {
                Ok(o) => o,
                Err(kube::Error::Api(s)) if s.code == 409 => orders.get(&order_name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let state = order
        .status
        .as_ref()
        .and_then(|s| s.state.clone())
        .unwrap_or_default();
    match state.as_str() {
        "valid" => {
            let Some(chain) = order.status.as_ref().and_then(|s| s.certificate.clone()) else {
                return Ok(Action::requeue(Duration::from_secs(1)));
            };
            let mut status = with_condition(
                &cr,
                new_condition(
                    READY,
                    true,
                    "Issued",
                    "Certificate fetched from issuer successfully",
                ),
            );
            status.certificate = Some(chain);
            patch_status(&ctx, &cr, status).await?;
            Ok(Action::await_change())
        }
        "invalid" | "errored" | "expired" => {
            let reason = order
                .status
                .as_ref()
                .and_then(|s| s.reason.clone())
                .unwrap_or_default();
            let msg = format!(
                "Failed to wait for order resource \"{order_name}\" to become ready: order is in \"{state}\" state: {reason}"
            );
            let mut status = with_condition(&cr, new_condition(READY, false, "Failed", msg));
            status.failure_time = Some(crate::time::now());
            patch_status(&ctx, &cr, status).await?;
            Ok(Action::await_change())
        }
        _ => {
            let msg = format!(
                "Waiting on certificate issuance from order {ns}/{order_name}: \"{state}\""
            );
            if cond(&cr, READY).and_then(|c| c.message.as_deref()) != Some(msg.as_str()) {
                patch_status(&ctx, &cr, with_condition(&cr, pending(msg))).await?;
            }
            Ok(Action::await_change())
        }
    }
}
