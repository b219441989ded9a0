//! `cert-manager-controller`: the HTTP-01 solver listener on every replica, and on the Lease
//! holder (`cert-manager-controller`, as upstream, so ours and upstream's never both act) the
//! controllers: issuers, clusterissuers, ingress-shim, certificates, certificaterequests,
//! orders, challenges.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube_common::Manager;
use tokio_util::sync::CancellationToken;

use crate::api::{Certificate, CertificateRequest, Challenge, ClusterIssuer, Issuer, Order};
use crate::cli::ControllerArgs;
use crate::context::Context;
use crate::http01::Solver;
use crate::issuers::{self, ResolvedIssuer};
use crate::metrics::Metrics;

pub const LEASE_NAME: &str = "cert-manager-controller";

/// What `start` hands back (tests use it to find the solver port and stop the controllers).
pub struct Running {
    pub context: Arc<Context>,
    pub metrics_address: std::net::SocketAddr,
}

pub async fn start(mgr: &Manager, args: &ControllerArgs) -> anyhow::Result<Running> {
    let metrics = {
        let mut m = None;
        mgr.register_metrics(|r| m = Some(Metrics::register(r)));
        m.ok_or_else(|| anyhow::anyhow!("metrics registry unavailable"))?
    };
    let metrics_address = mgr.serve_health(args.metrics_listen_address).await?;
    let solver = Solver::start(
        &mgr.client,
        args.acme_http01_solver_listen_address,
        args.acme_http01_solver_address,
        &args.acme_http01_solver_nameservers,
        args.acme_http01_self_check_port,
        mgr.shutdown.clone(),
    )
    .await?;
    let ctx = Arc::new(Context {
        client: mgr.client.clone(),
        args: Arc::new(args.clone()),
        recorder: mgr.recorder("cert-manager"),
        metrics,
        accounts: Default::default(),
        solver,
        self_checks: Default::default(),
        ari: Default::default(),
    });
    let (mgr2, ctx2, le) = (
        mgr.clone(),
        ctx.clone(),
        args.common.leader_election.clone(),
    );
    tokio::spawn(async move {
        while !mgr2.shutdown.is_cancelled() {
            let result = mgr2
                .run_leader_elected(&le, LEASE_NAME, |leading| {
                    run_controllers(mgr2.clone(), ctx2.clone(), leading)
                })
                .await;
            if let Err(e) = result {
                tracing::warn!(error = %e, "leader election ended; standing as a candidate again");
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
            }
        }
    });
    Ok(Running {
        context: ctx,
        metrics_address,
    })
}

async fn run_controllers(mgr: Manager, ctx: Arc<Context>, stop: CancellationToken) {
    let client = mgr.client.clone();
    let wc = watcher::Config::default;

    let certificates = Controller::new(Api::<Certificate>::all(client.clone()), wc())
        .owns(Api::<CertificateRequest>::all(client.clone()), wc());
    let store = certificates.store();
    // Secret changes (deleted, edited) re-check the Certificates that write them. Only
    // cert-manager's own Secrets are watched (upstream's filtered caching label).
    let certificates = certificates.watches(
        Api::<Secret>::all(client.clone()),
        wc().labels("controller.cert-manager.io/fao=true"),
        move |secret: Secret| {
            let ns = secret.metadata.namespace.clone();
            let name = secret.metadata.name.clone().unwrap_or_default();
            store
                .state()
                .into_iter()
                .filter(|c| c.metadata.namespace == ns && c.spec.secret_name == name)
                .map(|c| ObjectRef::from_obj(&*c))
                .collect::<Vec<_>>()
        },
    );
    let requests = Controller::new(Api::<CertificateRequest>::all(client.clone()), wc())
        .owns(Api::<Order>::all(client.clone()), wc());
    let orders = Controller::new(Api::<Order>::all(client.clone()), wc())
        .owns(Api::<Challenge>::all(client.clone()), wc());
    let challenges = Controller::new(Api::<Challenge>::all(client.clone()), wc());
    let shim = Controller::new(Api::<Ingress>::all(client.clone()), wc())
        .owns(Api::<Certificate>::all(client.clone()), wc());
    let issuers_ctl = Controller::new(Api::<Issuer>::all(client.clone()), wc());
    let cluster_issuers = Controller::new(Api::<ClusterIssuer>::all(client.clone()), wc());

    tokio::join!(
        mgr.run(
            "certificates",
            certificates,
            crate::certificates::reconcile,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "certificaterequests",
            requests,
            crate::requests::reconcile,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "orders",
            orders,
            crate::orders::reconcile,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "challenges",
            challenges,
            crate::challenges::reconcile,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "ingress-shim",
            shim,
            crate::ingress_shim::reconcile,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "issuers",
            issuers_ctl,
            reconcile_issuer,
            ctx.clone(),
            stop.clone()
        ),
        mgr.run(
            "clusterissuers",
            cluster_issuers,
            reconcile_cluster_issuer,
            ctx.clone(),
            stop.clone()
        ),
    );
}

async fn reconcile_issuer(
    obj: Arc<Issuer>,
    ctx: Arc<Context>,
) -> Result<kube::runtime::controller::Action, issuers::IssuerError> {
    let ns = kube::ResourceExt::namespace(&*obj).unwrap_or_default();
    let resolved = ResolvedIssuer {
        kind: "Issuer",
        name: kube::ResourceExt::name_any(&*obj),
        namespace: Some(ns.clone()),
        config: obj.spec.config.clone(),
        status: obj.status.clone().unwrap_or_default(),
        secret_namespace: ns,
    };
    issuers::reconcile_issuer(&*obj, resolved, &ctx).await
}

async fn reconcile_cluster_issuer(
    obj: Arc<ClusterIssuer>,
    ctx: Arc<Context>,
) -> Result<kube::runtime::controller::Action, issuers::IssuerError> {
    let resolved = ResolvedIssuer {
        kind: "ClusterIssuer",
        name: kube::ResourceExt::name_any(&*obj),
        namespace: None,
        config: obj.spec.config.clone(),
        status: obj.status.clone().unwrap_or_default(),
        secret_namespace: ctx.args.cluster_resource_namespace.clone(),
    };
    issuers::reconcile_issuer(&*obj, resolved, &ctx).await
}
