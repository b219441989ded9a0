//! ACME Orders: create the order, one Challenge per pending authorization, finalize with the
//! request's CSR, and store the chain (upstream's acmeorders controller).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use instant_acme::{
    AuthorizationStatus, ChallengeType, Identifier, NewOrder, OrderStatus as AcmeStatus,
};
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use crate::api::{
    AcmeAuthorization, AcmeChallenge, AcmeChallengeSolver, Challenge, ChallengeSpec, Order,
    OrderStatus,
};
use crate::context::Context;
use crate::issuers::{self, IssuerError};

#[derive(Debug, thiserror::Error)]
pub enum OrderError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Issuer(#[from] IssuerError),
    #[error("ACME: {0}")]
    Acme(#[from] instant_acme::Error),
}

pub const OVERRIDE_INGRESS_NAME: &str = "acme.cert-manager.io/http01-override-ingress-name";
pub const OVERRIDE_INGRESS_CLASS: &str = "acme.cert-manager.io/http01-override-ingress-class";
pub const OVERRIDE_INGRESS_CLASS_NAME: &str =
    "acme.cert-manager.io/http01-override-ingress-ingressclassname";

fn is_final(state: &str) -> bool {
    matches!(state, "valid" | "invalid" | "expired" | "errored")
}

fn state_name(s: AcmeStatus) -> &'static str {
    match s {
        AcmeStatus::Pending => "pending",
        AcmeStatus::Ready => "ready",
        AcmeStatus::Processing => "processing",
        AcmeStatus::Valid => "valid",
        AcmeStatus::Invalid => "invalid",
    }
}

fn authz_state(s: AuthorizationStatus) -> &'static str {
    match s {
        AuthorizationStatus::Pending => "pending",
        AuthorizationStatus::Valid => "valid",
        AuthorizationStatus::Invalid => "invalid",
        AuthorizationStatus::Revoked => "revoked",
        AuthorizationStatus::Expired => "expired",
        AuthorizationStatus::Deactivated => "deactivated",
    }
}

async fn patch_status(
    ctx: &Context,
    order: &Order,
    status: &OrderStatus,
) -> Result<(), kube::Error> {
    crate::status::apply(&ctx.client, order, status).await
}

/// A failure the ACME server reported for this order (4xx): final, as upstream's `errored`.
/// A rejected nonce is not the server refusing the order: it is retried like a network error.
fn is_acme_rejection(e: &instant_acme::Error) -> bool {
    matches!(e, instant_acme::Error::Api(p)
        if p.status.is_some_and(|s| (400..500).contains(&s)) && !crate::issuers::acme::is_bad_nonce(p))
}

pub async fn reconcile(order: Arc<Order>, ctx: Arc<Context>) -> Result<Action, OrderError> {
    ctx.metrics.sync_call("orders");
    // The stored object, not the cache: a Challenge event can arrive before our last status
    // write (the order URL) is cached, and a stale view would open a second ACME order.
    let api: Api<Order> =
        Api::namespaced(ctx.client.clone(), &order.namespace().unwrap_or_default());
    let Some(order) = api.get_opt(&order.name_any()).await? else {
        return Ok(Action::await_change());
    };
    let order = Arc::new(order);
    let mut status = order.status.clone().unwrap_or_default();
    let state = status.state.clone().unwrap_or_default();
    if is_final(&state) {
        return Ok(Action::await_change());
    }
    let ns = order.namespace().unwrap_or_default();
    let Some(issuer) = issuers::resolve(&ctx, &ns, &order.spec.issuer_ref).await? else {
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    let account = issuers::account(&ctx, &issuer).await?;

    let result = step(&ctx, &order, &issuer, &account, &mut status).await;
    if matches!(result, Err(OrderError::Acme(_))) {
        // The server may have lost the account (e.g. a restarted test CA): set it up afresh.
        ctx.accounts.invalidate(&issuer);
    }
    match result {
        Ok(action) => {
            if order.status.as_ref() != Some(&status) {
                patch_status(&ctx, &order, &status).await?;
            }
            Ok(action)
        }
        Err(OrderError::Acme(e)) if is_acme_rejection(&e) => {
            status.state = Some("errored".into());
            status.reason = Some(e.to_string());
            status.failure_time = Some(crate::time::now());
            patch_status(&ctx, &order, &status).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.metrics.sync_error("orders");
            Err(e)
        }
    }
}

async fn step(
    ctx: &Context,
    order: &Order,
    issuer: &issuers::ResolvedIssuer,
    account: &instant_acme::Account,
    status: &mut OrderStatus,
) -> Result<Action, OrderError> {
    let mut acme_order = match &status.url {
        None => {
            let mut ids: Vec<Identifier> = Vec::new();
            for d in order.spec.dns_names.iter().flatten() {
                ids.push(Identifier::Dns(d.clone()));
            }
            for ip in order.spec.ip_addresses.iter().flatten() {
                if let Ok(ip) = ip.parse() {
                    ids.push(Identifier::Ip(ip));
                }
            }
            if ids.is_empty()
                && let Some(cn) = &order.spec.common_name
            {
                ids.push(Identifier::Dns(cn.clone()));
            }
            let mut new = NewOrder::new(&ids);
            if let Some(p) = order.spec.profile.as_deref() {
                new = new.profile(p);
            }
            let o = account.new_order(&new).await?;
            tracing::info!(order = %order.name_any(), url = %o.url(), "ACME order created");
            status.url = Some(o.url().to_string());
            // Recorded before anything else can fail: a retry that does not know the URL would
            // open a second ACME order and spend the CA's new-orders limit.
            patch_status(ctx, order, status).await?;
            o
        }
        Some(url) => account.order(url.clone()).await?,
    };
    let acme_state = acme_order.state().status;
    status.finalize_url = Some(acme_order.state().finalize.clone());
    status.state = Some(state_name(acme_state).into());

    // Authorizations (first time: record them with their initial state).
    let mut authorizations = Vec::new();
    let mut failed_authz = None;
    {
        let mut authzs = acme_order.authorizations();
        while let Some(a) = authzs.next().await {
            let a = a?;
            let ident = a.identifier();
            let wildcard = ident.wildcard;
            let name = match ident.identifier {
                Identifier::Dns(d) => d.clone(),
                Identifier::Ip(ip) => ip.to_string(),
                other => format!("{other:?}"),
            };
            if a.status == AuthorizationStatus::Invalid {
                let detail = a
                    .challenges
                    .iter()
                    .find_map(|c| c.error.as_ref().map(|e| e.to_string()))
                    .unwrap_or_else(|| "authorization is invalid".into());
                failed_authz = Some(format!("Failed to finalize Order: {name}: {detail}"));
            }
            let prior = status
                .authorizations
                .iter()
                .flatten()
                .find(|p| p.url == a.url())
                .and_then(|p| p.initial_state.clone());
            authorizations.push(AcmeAuthorization {
                url: a.url().to_string(),
                identifier: Some(name),
                wildcard: Some(wildcard),
                initial_state: Some(prior.unwrap_or_else(|| authz_state(a.status).into())),
                challenges: Some(
                    a.challenges
                        .iter()
                        .map(|c| AcmeChallenge {
                            url: c.url.clone(),
                            token: c.token.clone(),
                            type_: match &c.r#type {
                                ChallengeType::Http01 => "http-01".into(),
                                ChallengeType::Dns01 => "dns-01".into(),
                                ChallengeType::TlsAlpn01 => "tls-alpn-01".into(),
                                other => format!("{other:?}"),
                            },
                        })
                        .collect(),
                ),
            });
        }
    }
    // Recorded once, at creation, as upstream (its webhook keeps them immutable afterwards).
    if status.authorizations.is_none() {
        status.authorizations = Some(authorizations.clone());
    }

    match acme_state {
        AcmeStatus::Pending => {
            ensure_challenges(ctx, order, issuer, account, &authorizations).await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        AcmeStatus::Ready => {
            let csr = base64::engine::general_purpose::STANDARD
                .decode(order.spec.request.trim())
                .ok()
                .and_then(|pem| {
                    rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(&pem).ok()
                });
            let Some(csr) = csr else {
                status.state = Some("errored".into());
                status.reason = Some("Failed to decode the CSR in spec.request".into());
                status.failure_time = Some(crate::time::now());
                return Ok(Action::await_change());
            };
            acme_order.finalize_csr(csr.as_ref()).await?;
            status.state = Some(state_name(acme_order.state().status).into());
            fetch_certificate(&mut acme_order, status).await
        }
        AcmeStatus::Processing | AcmeStatus::Valid => {
            fetch_certificate(&mut acme_order, status).await
        }
        AcmeStatus::Invalid => {
            status.reason = Some(
                acme_order
                    .state()
                    .error
                    .as_ref()
                    .map(|e| e.to_string())
                    .or(failed_authz)
                    .unwrap_or_else(|| "order is invalid".into()),
            );
            status.failure_time = Some(crate::time::now());
            Ok(Action::await_change())
        }
    }
}

use rustls_pki_types::pem::PemObject;

async fn fetch_certificate(
    acme_order: &mut instant_acme::Order,
    status: &mut OrderStatus,
) -> Result<Action, OrderError> {
    match acme_order.certificate().await? {
        Some(chain) => {
            status.certificate =
                Some(base64::engine::general_purpose::STANDARD.encode(chain.as_bytes()));
            status.state = Some("valid".into());
            Ok(Action::await_change())
        }
        None => Ok(Action::requeue(Duration::from_millis(250))),
    }
}

/// Creates the Challenge objects for authorizations that still need solving.
async fn ensure_challenges(
    ctx: &Context,
    order: &Order,
    issuer: &issuers::ResolvedIssuer,
    account: &instant_acme::Account,
    authorizations: &[AcmeAuthorization],
) -> Result<(), OrderError> {
    let ns = order.namespace().unwrap_or_default();
    let api: Api<Challenge> = Api::namespaced(ctx.client.clone(), &ns);
    let solvers = issuer
        .acme()
        .and_then(|a| a.solvers.clone())
        .unwrap_or_default();
    for authz in authorizations {
        if authz.initial_state.as_deref() != Some("pending") {
            // Reused valid authorizations need no challenge (as upstream).
            continue;
        }
        let domain = authz.identifier.clone().unwrap_or_default();
        let Some(solver) = select_solver(
            &solvers,
            &domain,
            authz.wildcard.unwrap_or(false),
            order.labels(),
        ) else {
            tracing::warn!(order = %order.name_any(), %domain, "no HTTP-01 solver matches this domain");
            continue;
        };
        let solver = apply_overrides(solver, order.annotations());
        let Some(ch) = authz
            .challenges
            .iter()
            .flatten()
            .find(|c| c.type_ == "http-01")
        else {
            continue;
        };
        let name = crate::names::compute_name(
            &order.name_any(),
            crate::names::fnv32a(format!("{}{}", authz.url, ch.url).as_bytes()),
        );
        if api.get_opt(&name).await?.is_some() {
            continue;
        }
        let mut challenge = Challenge::new(
            &name,
            ChallengeSpec {
                url: ch.url.clone(),
                authorization_url: authz.url.clone(),
                dns_name: domain.clone(),
                wildcard: authz.wildcard,
                type_: "HTTP-01".into(),
                token: ch.token.clone(),
                key: format!("{}.{}", ch.token, account.key_thumbprint()),
                solver,
                issuer_ref: order.spec.issuer_ref.clone(),
            },
        );
        challenge.metadata.namespace = Some(ns.clone());
        challenge.metadata.labels = Some(order.labels().clone());
        challenge.metadata.owner_references = order.controller_owner_ref(&()).map(|o| vec![o]);
        challenge.metadata.finalizers = Some(vec![crate::challenges::FINALIZER.into()]);
        match api.create(&PostParams::default(), &challenge).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Picks the most specific HTTP-01 solver for a domain: dnsNames match beats the longest
/// dnsZones match, which beats matchLabels, which beats an empty selector (as upstream).
pub fn select_solver(
    solvers: &[AcmeChallengeSolver],
    domain: &str,
    wildcard: bool,
    labels: &BTreeMap<String, String>,
) -> Option<AcmeChallengeSolver> {
    let full = if wildcard {
        format!("*.{domain}")
    } else {
        domain.to_string()
    };
    let mut best: Option<(u64, &AcmeChallengeSolver)> = None;
    for s in solvers.iter().filter(|s| s.http01.is_some()) {
        let sel = s.selector.clone().unwrap_or_default();
        let labels_ok = sel
            .match_labels
            .iter()
            .flatten()
            .all(|(k, v)| labels.get(k) == Some(v));
        if !labels_ok {
            continue;
        }
        let label_score = sel.match_labels.as_ref().map_or(0, |m| m.len() as u64);
        let names = sel.dns_names.clone().unwrap_or_default();
        let zones = sel.dns_zones.clone().unwrap_or_default();
        let score = if !names.is_empty() {
            if !names.iter().any(|n| n.eq_ignore_ascii_case(&full)) {
                continue;
            }
            3_000_000 + label_score
        } else if !zones.is_empty() {
            let longest = zones
                .iter()
                .filter(|z| domain == z.as_str() || domain.ends_with(&format!(".{z}")))
                .map(|z| z.len() as u64)
                .max();
            match longest {
                Some(l) => 2_000_000 + l * 100 + label_score,
                None => continue,
            }
        } else if label_score > 0 {
            1_000_000 + label_score
        } else {
            0
        };
        if best.is_none_or(|(b, _)| score > b) {
            best = Some((score, s));
        }
    }
    best.map(|(_, s)| s.clone())
}

/// The Order's (from the Certificate's) annotations override the solver's Ingress settings.
fn apply_overrides(
    mut solver: AcmeChallengeSolver,
    annotations: &BTreeMap<String, String>,
) -> AcmeChallengeSolver {
    let Some(http) = solver.http01.as_mut() else {
        return solver;
    };
    let ing = http.ingress.get_or_insert_with(Default::default);
    if let Some(name) = annotations.get(OVERRIDE_INGRESS_NAME) {
        *ing = crate::api::AcmeChallengeSolverHttp01Ingress {
            name: Some(name.clone()),
            ..ing.clone()
        };
        ing.class = None;
        ing.ingress_class_name = None;
    } else if let Some(class) = annotations.get(OVERRIDE_INGRESS_CLASS) {
        ing.class = Some(class.clone());
        ing.ingress_class_name = None;
        ing.name = None;
    } else if let Some(class) = annotations.get(OVERRIDE_INGRESS_CLASS_NAME) {
        ing.ingress_class_name = Some(class.clone());
        ing.class = None;
        ing.name = None;
    }
    solver
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AcmeChallengeSolverHttp01, CertificateDnsNameSelector};

    fn solver(tag: &str, sel: Option<CertificateDnsNameSelector>) -> AcmeChallengeSolver {
        AcmeChallengeSolver {
            selector: sel,
            http01: Some(AcmeChallengeSolverHttp01 {
                ingress: Some(crate::api::AcmeChallengeSolverHttp01Ingress {
                    ingress_class_name: Some(tag.into()),
                    ..Default::default()
                }),
                gateway_http_route: None,
            }),
            ..Default::default()
        }
    }

    fn class(s: &AcmeChallengeSolver) -> String {
        s.http01
            .as_ref()
            .unwrap()
            .ingress
            .as_ref()
            .unwrap()
            .ingress_class_name
            .clone()
            .unwrap_or_default()
    }

    #[test]
    fn most_specific_solver_wins() {
        let solvers = vec![
            solver("default", None),
            solver(
                "zone",
                Some(CertificateDnsNameSelector {
                    dns_zones: Some(vec!["example.org".into()]),
                    ..Default::default()
                }),
            ),
            solver(
                "subzone",
                Some(CertificateDnsNameSelector {
                    dns_zones: Some(vec!["www.example.org".into()]),
                    ..Default::default()
                }),
            ),
            solver(
                "name",
                Some(CertificateDnsNameSelector {
                    dns_names: Some(vec!["a.www.example.org".into()]),
                    ..Default::default()
                }),
            ),
        ];
        let none = BTreeMap::new();
        assert_eq!(
            class(&select_solver(&solvers, "a.www.example.org", false, &none).unwrap()),
            "name"
        );
        assert_eq!(
            class(&select_solver(&solvers, "b.www.example.org", false, &none).unwrap()),
            "subzone"
        );
        assert_eq!(
            class(&select_solver(&solvers, "x.example.org", false, &none).unwrap()),
            "zone"
        );
        assert_eq!(
            class(&select_solver(&solvers, "other.test", false, &none).unwrap()),
            "default"
        );
        assert!(select_solver(&solvers[1..2], "other.test", false, &none).is_none());
    }

    #[test]
    fn annotations_override_the_solver_ingress() {
        let s = solver("nginx", None);
        let a = BTreeMap::from([(OVERRIDE_INGRESS_NAME.to_string(), "web".to_string())]);
        let out = apply_overrides(s.clone(), &a);
        let ing = out.http01.unwrap().ingress.unwrap();
        assert_eq!(
            (ing.name.as_deref(), ing.ingress_class_name),
            (Some("web"), None)
        );
        let a = BTreeMap::from([(OVERRIDE_INGRESS_CLASS.to_string(), "public".to_string())]);
        let ing = apply_overrides(s, &a).http01.unwrap().ingress.unwrap();
        assert_eq!(ing.class.as_deref(), Some("public"));
    }
}
