//! `cert-manager-cainjector`: keeps CA bundles injected into ValidatingWebhookConfigurations,
//! MutatingWebhookConfigurations, CRD conversion webhooks and APIServices that ask for one by
//! annotation (upstream's `pkg/controller/cainjector`):
//!
//! - `cert-manager.io/inject-ca-from-secret: <ns>/<secret>`: `ca.crt` of that Secret, which must
//!   carry `cert-manager.io/allow-direct-injection: "true"`;
//! - `cert-manager.io/inject-ca-from: <ns>/<certificate>`: `ca.crt` of the Certificate's Secret,
//!   only if that Secret's `cert-manager.io/certificate-name` names the Certificate;
//! - `cert-manager.io/inject-apiserver-ca: "true"`: the CA this process trusts the apiserver with.
//!
//! When several are set the first in that order wins, as upstream. Bundles are merged, not
//! overwritten ([`bundle`]). One writer at a time: the controllers run under the Lease
//! `cert-manager-cainjector-leader-election`.

pub mod bundle;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use futures::future::join4;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::kube_aggregator::pkg::apis::apiregistration::v1::APIService;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource, ResourceExt};
use kube_common::Manager;
use kube_common::args::CommonArgs;
use kube_common::controller::trimmed_controller;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::api::Certificate;

pub const INJECT_CA_FROM: &str = "cert-manager.io/inject-ca-from";
pub const INJECT_CA_FROM_SECRET: &str = "cert-manager.io/inject-ca-from-secret";
pub const INJECT_APISERVER_CA: &str = "cert-manager.io/inject-apiserver-ca";
pub const ALLOW_DIRECT_INJECTION: &str = "cert-manager.io/allow-direct-injection";
pub const CERTIFICATE_NAME: &str = "cert-manager.io/certificate-name";
pub const LEASE_NAME: &str = "cert-manager-cainjector-leader-election";
const FIELD_MANAGER: &str = "cert-manager-cainjector";

#[derive(Clone, Debug, clap::Parser)]
#[command(name = "cainjector")]
pub struct Args {
    #[command(flatten)]
    pub common: CommonArgs,

    /// Only read Secrets and Certificates in this namespace (empty: all namespaces).
    #[arg(long, default_value = "")]
    pub namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

/// Where a target wants its CA from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Secret { namespace: String, name: String },
    Certificate { namespace: String, name: String },
    ApiServer,
}

/// A value the user must fix; reported as a Warning Event on the target, never retried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    pub reason: &'static str,
    pub message: String,
}

fn refuse(reason: &'static str, message: String) -> Refusal {
    Refusal { reason, message }
}

/// The configured source, in upstream's precedence; None when the target asks for nothing.
pub fn source_of(annotations: &BTreeMap<String, String>) -> Option<Result<Source, Refusal>> {
    let split = |key: &str, value: &str| match value.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(refuse(
            "InvalidAnnotation",
            format!("{key}: {value:?} is not of the form <namespace>/<name>"),
        )),
    };
    if let Some(v) = annotations.get(INJECT_CA_FROM_SECRET) {
        return Some(
            split(INJECT_CA_FROM_SECRET, v)
                .map(|(namespace, name)| Source::Secret { namespace, name }),
        );
    }
    if let Some(v) = annotations.get(INJECT_CA_FROM) {
        return Some(
            split(INJECT_CA_FROM, v)
                .map(|(namespace, name)| Source::Certificate { namespace, name }),
        );
    }
    (annotations.get(INJECT_APISERVER_CA).map(String::as_str) == Some("true"))
        .then_some(Ok(Source::ApiServer))
}

/// A kind cainjector writes CA bundles into.
pub trait Injectable:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + Serialize + Debug + Send + Sync + 'static
{
    /// The current bundle of every place a CA goes; None when the object has no such place
    /// (a CRD without webhook conversion).
    fn bundles(&self) -> Option<Vec<Vec<u8>>>;
    /// A patch setting those places to `bundles` (same order), guarded by resourceVersion.
    fn patch(&self, bundles: &[Vec<u8>]) -> Patch<Value>;
    /// Drops what the cache need not keep (the injector reads annotations and bundles, and
    /// writes merge patches).
    fn trim(&mut self) {}
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Strategic merge by webhook name: only each webhook's caBundle is touched.
fn webhooks_patch<'a>(
    rv: Option<&String>,
    names: impl Iterator<Item = &'a str>,
    bundles: &[Vec<u8>],
) -> Patch<Value> {
    let webhooks: Vec<Value> = names
        .zip(bundles)
        .map(|(name, b)| json!({"name": name, "clientConfig": {"caBundle": b64(b)}}))
        .collect();
    Patch::Strategic(json!({"metadata": {"resourceVersion": rv}, "webhooks": webhooks}))
}

impl Injectable for ValidatingWebhookConfiguration {
    fn bundles(&self) -> Option<Vec<Vec<u8>>> {
        let hooks = self.webhooks.as_deref().unwrap_or_default();
        (!hooks.is_empty()).then(|| {
            hooks
                .iter()
                .map(|w| w.client_config.ca_bundle.clone().unwrap_or_default().0)
                .collect()
        })
    }

    fn patch(&self, bundles: &[Vec<u8>]) -> Patch<Value> {
        let names = self.webhooks.iter().flatten().map(|w| w.name.as_str());
        webhooks_patch(self.metadata.resource_version.as_ref(), names, bundles)
    }
}

impl Injectable for MutatingWebhookConfiguration {
    fn bundles(&self) -> Option<Vec<Vec<u8>>> {
        let hooks = self.webhooks.as_deref().unwrap_or_default();
        (!hooks.is_empty()).then(|| {
            hooks
                .iter()
                .map(|w| w.client_config.ca_bundle.clone().unwrap_or_default().0)
                .collect()
        })
    }

    fn patch(&self, bundles: &[Vec<u8>]) -> Patch<Value> {
        let names = self.webhooks.iter().flatten().map(|w| w.name.as_str());
        webhooks_patch(self.metadata.resource_version.as_ref(), names, bundles)
    }
}

impl Injectable for APIService {
    fn bundles(&self) -> Option<Vec<Vec<u8>>> {
        let spec = self.spec.as_ref()?;
        Some(vec![spec.ca_bundle.clone().unwrap_or_default().0])
    }

    fn patch(&self, bundles: &[Vec<u8>]) -> Patch<Value> {
        let bundle = bundles.first().map(|b| b64(b));
        Patch::Merge(json!({
            "metadata": {"resourceVersion": self.metadata.resource_version},
            "spec": {"caBundle": bundle},
        }))
    }
}

impl Injectable for CustomResourceDefinition {
    fn bundles(&self) -> Option<Vec<Vec<u8>>> {
        // Only a CRD converting through a webhook has anywhere to put a CA (as upstream).
        let conversion = self.spec.conversion.as_ref()?;
        if conversion.strategy != "Webhook" {
            return None;
        }
        let bundle = conversion
            .webhook
            .as_ref()
            .and_then(|w| w.client_config.as_ref())
            .and_then(|c| c.ca_bundle.clone())
            .unwrap_or_default();
        Some(vec![bundle.0])
    }

    fn patch(&self, bundles: &[Vec<u8>]) -> Patch<Value> {
        let bundle = bundles.first().map(|b| b64(b));
        Patch::Merge(json!({
            "metadata": {"resourceVersion": self.metadata.resource_version},
            "spec": {"conversion": {"webhook": {"clientConfig": {"caBundle": bundle}}}},
        }))
    }

    /// The schemas: most of a CRD's bytes, and nothing here reads them.
    fn trim(&mut self) {
        for version in &mut self.spec.versions {
            version.schema = None;
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    /// `--namespace`: sources outside it are refused.
    pub namespace: Option<String>,
    /// PEM of the apiserver's CA, for `inject-apiserver-ca`.
    pub apiserver_ca: Option<Vec<u8>>,
}

impl Context {
    fn check_scope(&self, kind: &str, namespace: &str) -> Result<(), Refusal> {
        match &self.namespace {
            Some(ns) if ns != namespace => Err(refuse(
                "Forbidden",
                format!(
                    "cannot read CA data from {kind} in namespace {namespace}, cainjector is scoped to namespace {ns}"
                ),
            )),
            _ => Ok(()),
        }
    }

    /// The CA to inject: Ok(None) when the source does not exist (yet) or has no `ca.crt`; a
    /// watch brings us back when it appears.
    pub async fn read_ca(
        &self,
        source: &Source,
    ) -> Result<Result<Option<Vec<u8>>, Refusal>, kube::Error> {
        match source {
            Source::ApiServer => Ok(Ok(self.apiserver_ca.clone())),
            Source::Secret { namespace, name } => {
                if let Err(r) = self.check_scope("Secret", namespace) {
                    return Ok(Err(r));
                }
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let Some(secret) = secrets.get_opt(name).await? else {
                    return Ok(Ok(None));
                };
                if secret
                    .annotations()
                    .get(ALLOW_DIRECT_INJECTION)
                    .map(String::as_str)
                    != Some("true")
                {
                    return Ok(Err(refuse(
                        "SecretNotAllowed",
                        format!(
                            "Secret {namespace}/{name} does not allow direct injection (needs annotation {ALLOW_DIRECT_INJECTION}: \"true\")"
                        ),
                    )));
                }
                Ok(Ok(ca_crt(&secret)))
            }
            Source::Certificate { namespace, name } => {
                if let Err(r) = self.check_scope("Certificate", namespace) {
                    return Ok(Err(r));
                }
                let certs: Api<Certificate> = Api::namespaced(self.client.clone(), namespace);
                let Some(cert) = certs.get_opt(name).await? else {
                    return Ok(Ok(None));
                };
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
                let Some(secret) = secrets.get_opt(&cert.spec.secret_name).await? else {
                    return Ok(Ok(None));
                };
                // Only a Secret issued for this Certificate counts, so a Certificate cannot be
                // pointed at an unrelated Secret to smuggle a CA in.
                if secret.annotations().get(CERTIFICATE_NAME) != Some(name) {
                    return Ok(Err(refuse(
                        "SecretMismatch",
                        format!(
                            "Secret {namespace}/{} is not owned by Certificate {name} ({CERTIFICATE_NAME} does not match)",
                            cert.spec.secret_name
                        ),
                    )));
                }
                Ok(Ok(ca_crt(&secret)))
            }
        }
    }
}

fn ca_crt(secret: &Secret) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca.crt"))
        .map(|b| b.0.clone())
        .filter(|b| !b.is_empty())
}

/// Records a Warning Event on a (cluster-scoped) target, through the crate's one Event writer.
async fn warn(
    client: &Client,
    regarding: &ObjectReference,
    refusal: &Refusal,
) -> Result<(), kube::Error> {
    let recorder = kube_common::events::Recorder::new(client.clone(), FIELD_MANAGER);
    kube_common::events::publish(
        &recorder,
        regarding,
        kube::runtime::events::EventType::Warning,
        refusal.reason,
        "InjectCA",
        refusal.message.clone(),
    )
    .await;
    Ok(())
}

/// Brings one target's bundles up to date; patches only when something changes.
pub async fn reconcile<K: Injectable>(
    obj: Arc<K>,
    ctx: Arc<Context>,
) -> Result<Action, InjectError> {
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(source) = source_of(obj.annotations()) else {
        return Ok(Action::await_change());
    };
    let Some(current) = obj.bundles() else {
        return Ok(Action::await_change());
    };
    let ca = match source {
        Ok(source) => ctx.read_ca(&source).await?,
        Err(refusal) => Err(refusal),
    };
    let ca = match ca {
        Ok(Some(ca)) => ca,
        Ok(None) => return Ok(Action::await_change()),
        Err(refusal) => {
            tracing::warn!(kind = %K::kind(&()), name = %obj.name_any(), %refusal, "not injecting");
            if let Err(e) = warn(&ctx.client, &obj.object_ref(&()), &refusal).await {
                tracing::debug!(error = %e, "publishing event");
            }
            return Ok(Action::await_change());
        }
    };
    let now = time::OffsetDateTime::now_utc();
    let wanted: Vec<Vec<u8>> = current.iter().map(|b| bundle::merge(b, &ca, now)).collect();
    if wanted == current {
        return Ok(Action::await_change());
    }
    let api: Api<K> = Api::all(ctx.client.clone());
    api.patch(
        &obj.name_any(),
        &PatchParams::apply(FIELD_MANAGER),
        &obj.patch(&wanted),
    )
    .await?;
    tracing::info!(kind = %K::kind(&()), name = %obj.name_any(), "injected CA bundle");
    Ok(Action::await_change())
}

/// Targets of kind K whose annotations point at `key` (`<ns>/<name>`) under `annotation`.
fn targets_referencing<K: Injectable>(
    store: &Store<K>,
    annotation: &str,
    key: &str,
) -> Vec<ObjectRef<K>> {
    store
        .state()
        .iter()
        .filter(|t| t.annotations().get(annotation).map(String::as_str) == Some(key))
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

async fn run_controller<K: Injectable>(
    mgr: &Manager,
    ctx: Arc<Context>,
    source_namespace: Option<String>,
    stop: CancellationToken,
) {
    let client = ctx.client.clone();
    let scoped = |c: Client| -> (Api<Secret>, Api<Certificate>) {
        match &source_namespace {
            Some(ns) => (Api::namespaced(c.clone(), ns), Api::namespaced(c, ns)),
            None => (Api::all(c.clone()), Api::all(c)),
        }
    };
    let (secrets, certificates) = scoped(client.clone());
    let controller = trimmed_controller(Api::<K>::all(client), watcher::Config::default(), K::trim);
    let (by_secret, by_cert) = (controller.store(), controller.store());
    let controller = controller
        .watches(
            secrets,
            watcher::Config::default(),
            move |secret: Secret| {
                let ns = secret.namespace().unwrap_or_default();
                let key = format!("{ns}/{}", secret.name_any());
                let mut refs = targets_referencing(&by_secret, INJECT_CA_FROM_SECRET, &key);
                if let Some(cert) = secret.annotations().get(CERTIFICATE_NAME) {
                    refs.extend(targets_referencing(
                        &by_secret,
                        INJECT_CA_FROM,
                        &format!("{ns}/{cert}"),
                    ));
                }
                refs
            },
        )
        .watches(
            certificates,
            watcher::Config::default(),
            move |cert: Certificate| {
                let key = format!(
                    "{}/{}",
                    cert.namespace().unwrap_or_default(),
                    cert.name_any()
                );
                targets_referencing(&by_cert, INJECT_CA_FROM, &key)
            },
        );
    let name = format!("cainjector-{}", K::kind(&()).to_lowercase());
    mgr.run(&name, controller, reconcile::<K>, ctx, stop).await;
}

/// PEM of the CA the client trusts the apiserver with: the kubeconfig's cluster CA, or the
/// service account's `ca.crt` in a pod (what upstream injects for `inject-apiserver-ca`).
pub fn apiserver_ca(config: &kube::Config) -> Option<Vec<u8>> {
    if let Some(ders) = &config.root_cert
        && !ders.is_empty()
    {
        return Some(
            ders.iter()
                .map(|d| bundle::pem_encode(d))
                .collect::<String>()
                .into_bytes(),
        );
    }
    config
        .root_cert_file
        .as_ref()
        .and_then(|p| std::fs::read(p).ok())
        .filter(|b| !b.is_empty())
}

/// Entry point of `cert-manager-cainjector`: runs the four controllers while holding the Lease.
pub async fn start(mgr: &Manager, args: &Args) -> anyhow::Result<()> {
    let config = kube_common::client::config(args.common.kubeconfig.as_deref()).await?;
    let apiserver_ca = apiserver_ca(&config);
    if apiserver_ca.is_none() {
        tracing::warn!(
            "no apiserver CA in the client configuration; inject-apiserver-ca does nothing"
        );
    }
    if let Some(addr) = args.common.health_address {
        // Upstream's chart has no probes for cainjector; this serves /metrics when asked for.
        mgr.serve_health(addr).await?;
    }
    let namespace = Some(args.namespace.clone()).filter(|n| !n.is_empty());
    let ctx = Arc::new(Context {
        client: mgr.client.clone(),
        namespace: namespace.clone(),
        apiserver_ca,
    });
    let mgr = mgr.clone();
    let election = args.common.leader_election.clone();
    tokio::spawn(async move {
        let work = |stop: CancellationToken| {
            let (mgr, ctx, namespace) = (mgr.clone(), ctx.clone(), namespace.clone());
            async move {
                join4(
                    run_controller::<ValidatingWebhookConfiguration>(
                        &mgr,
                        ctx.clone(),
                        namespace.clone(),
                        stop.clone(),
                    ),
                    run_controller::<MutatingWebhookConfiguration>(
                        &mgr,
                        ctx.clone(),
                        namespace.clone(),
                        stop.clone(),
                    ),
                    run_controller::<CustomResourceDefinition>(
                        &mgr,
                        ctx.clone(),
                        namespace.clone(),
                        stop.clone(),
                    ),
                    run_controller::<APIService>(&mgr, ctx, namespace, stop),
                )
                .await;
            }
        };
        if let Err(e) = mgr.run_leader_elected(&election, LEASE_NAME, work).await {
            // Like upstream, stop the process so a fresh one rejoins the election.
            tracing::error!(error = %e, "leader election ended");
            mgr.shutdown.cancel();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn sources_in_upstream_precedence() {
        let secret = Source::Secret {
            namespace: "cert-manager".into(),
            name: "ca".into(),
        };
        type Case<'a> = (&'a [(&'a str, &'a str)], Option<Result<Source, &'a str>>);
        let cases: &[Case] = &[
            (&[], None),
            (&[(INJECT_APISERVER_CA, "false")], None),
            (
                &[(INJECT_APISERVER_CA, "true")],
                Some(Ok(Source::ApiServer)),
            ),
            (
                &[
                    (INJECT_CA_FROM_SECRET, "cert-manager/ca"),
                    (INJECT_APISERVER_CA, "true"),
                ],
                Some(Ok(secret.clone())),
            ),
            (
                &[(INJECT_CA_FROM, "ns/cert"), (INJECT_APISERVER_CA, "true")],
                Some(Ok(Source::Certificate {
                    namespace: "ns".into(),
                    name: "cert".into(),
                })),
            ),
            (
                &[
                    (INJECT_CA_FROM_SECRET, "cert-manager/ca"),
                    (INJECT_CA_FROM, "ns/cert"),
                ],
                Some(Ok(secret)),
            ),
            (
                &[(INJECT_CA_FROM, "no-namespace")],
                Some(Err("InvalidAnnotation")),
            ),
            (
                &[(INJECT_CA_FROM_SECRET, "/name")],
                Some(Err("InvalidAnnotation")),
            ),
            (
                &[(INJECT_CA_FROM_SECRET, "a/b/c")],
                Some(Err("InvalidAnnotation")),
            ),
        ];
        for (pairs, want) in cases {
            let got = source_of(&ann(pairs)).map(|r| r.map_err(|e| e.reason));
            assert_eq!(&got, want, "{pairs:?}");
        }
    }

    #[test]
    fn crd_without_webhook_conversion_has_no_slot() {
        let mut crd = CustomResourceDefinition::default();
        assert_eq!(crd.bundles(), None);
        let mut conversion =
            k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceConversion {
                strategy: "None".into(),
                ..Default::default()
            };
        crd.spec.conversion = Some(conversion.clone());
        assert_eq!(crd.bundles(), None);
        conversion.strategy = "Webhook".into();
        crd.spec.conversion = Some(conversion);
        assert_eq!(crd.bundles(), Some(vec![vec![]]));
    }

    #[test]
    fn webhook_patch_touches_only_ca_bundles() {
        let vwc: ValidatingWebhookConfiguration = serde_json::from_value(json!({
            "metadata": {"name": "v", "resourceVersion": "7"},
            "webhooks": [
                {"name": "a", "clientConfig": {"url": "https://a"}, "sideEffects": "None", "admissionReviewVersions": ["v1"]},
                {"name": "b", "clientConfig": {"url": "https://b", "caBundle": "eA=="}, "sideEffects": "None", "admissionReviewVersions": ["v1"]}
            ]
        }))
        .expect("vwc");
        assert_eq!(vwc.bundles(), Some(vec![vec![], b"x".to_vec()]));
        let Patch::Strategic(p) = vwc.patch(&[b"1".to_vec(), b"2".to_vec()]) else {
            panic!("strategic merge patch expected");
        };
        assert_eq!(
            p,
            json!({"metadata": {"resourceVersion": "7"}, "webhooks": [
                {"name": "a", "clientConfig": {"caBundle": "MQ=="}},
                {"name": "b", "clientConfig": {"caBundle": "Mg=="}}
            ]})
        );
    }
}
