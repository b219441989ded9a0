//! Issuer and ClusterIssuer: resolving an `issuerRef`, and the ACME account behind an issuer.
//!
//! Account keys are ES256 (instant-acme signs with P-256 only). cert-manager keeps RSA keys in
//! `privateKeySecretRef` and refuses anything else, so that Secret is never written here: our
//! key lives in the sibling Secret `<privateKeySecretRef.name>-es256`, and a rollback to
//! upstream finds its own Secret as it left it (or absent, and generates one as it always does).
//! A referenced Secret that already holds a P-256 key (written by another ES256 client) is used
//! as is.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use base64::Engine;
use instant_acme::{Account, AccountBuilder, ExternalAccountKey, Key, NewAccount};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;

use crate::acme_client::{MeteredClient, Trust};
use crate::api::{
    AcmeIssuer, AcmeIssuerStatus, ClusterIssuer, Condition, IssuerConfig, IssuerRef, IssuerStatus,
    condition, new_condition, set_condition,
};
use crate::context::Context;
use crate::pki::{PrivateKey, sha256_b64};

pub const ACCOUNT_KEY_SUFFIX: &str = "-es256";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Config(String),
    #[error("Failed to register ACME account: {0}")]
    Register(String),
    #[error("ACME client: {0}")]
    Acme(#[from] instant_acme::Error),
}

impl IssuerError {
    /// ACME 4xx during registration is not retried (as upstream): it needs a spec change.
    pub fn is_permanent(&self) -> bool {
        match self {
            Self::Config(_) => true,
            Self::Acme(instant_acme::Error::Api(p)) => {
                p.status.is_some_and(|s| (400..500).contains(&s)) && !is_bad_nonce(p)
            }
            _ => false,
        }
    }
}

/// `urn:ietf:params:acme:error:badNonce`: the server wants the request again with a fresh nonce.
pub fn is_bad_nonce(p: &instant_acme::Problem) -> bool {
    p.r#type
        .as_deref()
        .is_some_and(|t| t.ends_with(":badNonce"))
}

/// An Issuer or ClusterIssuer, resolved from a reference.
#[derive(Clone, Debug)]
pub struct ResolvedIssuer {
    pub kind: &'static str,
    pub name: String,
    /// Set for an Issuer.
    pub namespace: Option<String>,
    pub config: IssuerConfig,
    pub status: IssuerStatus,
    /// Where this issuer's Secrets (account key, EAB key) live.
    pub secret_namespace: String,
}

impl ResolvedIssuer {
    pub fn is_ready(&self) -> bool {
        self.status
            .conditions
            .as_deref()
            .and_then(|c| condition(c, "Ready"))
            .is_some_and(Condition::is_true)
    }

    pub fn acme(&self) -> Option<&AcmeIssuer> {
        self.config.acme.as_ref()
    }

    fn cache_key(&self) -> String {
        format!(
            "{}/{}/{}",
            self.kind,
            self.namespace.as_deref().unwrap_or(""),
            self.name
        )
    }

    /// Everything the account depends on; a change means a fresh account set-up.
    fn fingerprint(&self) -> String {
        serde_json::to_string(&self.config.acme).unwrap_or_default()
    }
}

/// Looks up the issuer a resource in `namespace` refers to. `Ok(None)`: it does not exist.
pub async fn resolve(
    ctx: &Context,
    namespace: &str,
    issuer_ref: &IssuerRef,
) -> Result<Option<ResolvedIssuer>, kube::Error> {
    if issuer_ref.is_cluster_issuer() {
        let api: Api<ClusterIssuer> = Api::all(ctx.client.clone());
        Ok(api
            .get_opt(&issuer_ref.name)
            .await?
            .map(|i| ResolvedIssuer {
                kind: "ClusterIssuer",
                name: i.name_any(),
                namespace: None,
                config: i.spec.config,
                status: i.status.unwrap_or_default(),
                secret_namespace: ctx.args.cluster_resource_namespace.clone(),
            }))
    } else {
        let api: Api<crate::api::Issuer> = Api::namespaced(ctx.client.clone(), namespace);
        Ok(api
            .get_opt(&issuer_ref.name)
            .await?
            .map(|i| ResolvedIssuer {
                kind: "Issuer",
                name: i.name_any(),
                namespace: Some(namespace.to_string()),
                config: i.spec.config,
                status: i.status.unwrap_or_default(),
                secret_namespace: namespace.to_string(),
            }))
    }
}

/// Registered ACME accounts, one per issuer, reused until the issuer's ACME spec changes.
#[derive(Default)]
pub struct Accounts {
    cache: Mutex<HashMap<String, (String, Account)>>,
}

/// What setting up an account found, for the issuer's status.
pub struct AccountInfo {
    pub account: Account,
    pub key_secret: String,
    pub key_hash: String,
    /// Set when the referenced Secret holds an RSA key that was left alone.
    pub kept_rsa_secret: Option<String>,
}

impl Accounts {
    pub fn cached(&self, issuer: &ResolvedIssuer) -> Option<Account> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .get(&issuer.cache_key())
            .filter(|(fp, _)| *fp == issuer.fingerprint())
            .map(|(_, a)| a.clone())
    }

    /// Forgets an issuer's account, e.g. after the ACME server said it does not know it.
    pub fn invalidate(&self, issuer: &ResolvedIssuer) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.remove(&issuer.cache_key());
    }

    fn store(&self, issuer: &ResolvedIssuer, account: Account) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.insert(issuer.cache_key(), (issuer.fingerprint(), account));
    }
}

/// The account for an issuer: from the cache, or set up (registering it if needed).
pub async fn account(ctx: &Context, issuer: &ResolvedIssuer) -> Result<Account, IssuerError> {
    if let Some(account) = ctx.accounts.cached(issuer) {
        return Ok(account);
    }
    Ok(setup_account(ctx, issuer).await?.account)
}

fn http_client(ctx: &Context, acme: &AcmeIssuer) -> Result<Box<MeteredClient>, IssuerError> {
    let bundle = acme
        .ca_bundle
        .as_deref()
        .filter(|b| !b.is_empty())
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        .transpose()
        .map_err(|_| IssuerError::Config("spec.acme.caBundle is not valid base64".into()))?;
    let trust = match (&bundle, acme.skip_tls_verify.unwrap_or(false)) {
        (Some(pem), _) => Trust::Bundle(pem),
        (None, true) => Trust::Insecure,
        (None, false) => Trust::System,
    };
    MeteredClient::new(trust, ctx.metrics.clone())
        .map(Box::new)
        .map_err(|e| IssuerError::Config(e.to_string()))
}

/// Finds or creates the ES256 account key and registers (or finds) the account.
pub async fn setup_account(
    ctx: &Context,
    issuer: &ResolvedIssuer,
) -> Result<AccountInfo, IssuerError> {
    let acme = issuer
        .acme()
        .ok_or_else(|| IssuerError::Config("issuer has no spec.acme".into()))?;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &issuer.secret_namespace);
    let key_ref = &acme.private_key_secret_ref;
    if key_ref.name.is_empty() {
        return Err(IssuerError::Config(
            "spec.acme.privateKeySecretRef.name is required".into(),
        ));
    }
    let data_key = key_ref
        .key
        .clone()
        .filter(|k| !k.is_empty())
        .unwrap_or_else(|| "tls.key".into());

    // Which Secret holds our key: the referenced one only if it already has a P-256 key.
    let referenced = secrets.get_opt(&key_ref.name).await?;
    let referenced_key = referenced.as_ref().and_then(|s| secret_bytes(s, &data_key));
    let mut kept_rsa_secret = None;
    let (key_secret, existing_key) = match referenced_key.as_deref().map(PrivateKey::from_pem) {
        Some(Ok(k)) if k.kind == crate::pki::KeySpec::Ecdsa(256) => (key_ref.name.clone(), Some(k)),
        other => {
            if let Some(Ok(k)) = &other
                && matches!(k.kind, crate::pki::KeySpec::Rsa(_))
            {
                kept_rsa_secret = Some(key_ref.name.clone());
            }
            let sibling = format!("{}{ACCOUNT_KEY_SUFFIX}", key_ref.name);
            let key = match secrets.get_opt(&sibling).await? {
                Some(s) => {
                    match secret_bytes(&s, &data_key).map(|pem| PrivateKey::from_pem(&pem)) {
                        Some(Ok(k)) if k.kind == crate::pki::KeySpec::Ecdsa(256) => Some(k),
                        _ => {
                            return Err(IssuerError::Config(format!(
                                "Secret {sibling:?} does not hold a P-256 account key in {data_key:?}; \
                             delete it to have a new account registered"
                            )));
                        }
                    }
                }
                None => None,
            };
            (sibling, key)
        }
    };

    let server = acme.server.clone();
    let email = acme
        .email
        .clone()
        .filter(|e| !e.is_empty())
        .map(|e| e.to_lowercase());
    let contact: Vec<String> = email.iter().map(|e| format!("mailto:{e}")).collect();
    let contact_refs: Vec<&str> = contact.iter().map(String::as_str).collect();
    let builder = || -> Result<AccountBuilder, IssuerError> {
        Ok(Account::builder_with_http(http_client(ctx, acme)?))
    };

    let (account, key_pkcs8) = match existing_key {
        Some(key) => {
            let der = PrivatePkcs8KeyDer::from(key.pkcs8.clone());
            let signing = Key::from_pkcs8_der(der.clone_key())?;
            let (account, _) = builder()?
                .create_from_key((signing, PrivateKeyDer::Pkcs8(der)), server.clone())
                .await?;
            let registered = issuer
                .status
                .acme
                .as_ref()
                .and_then(|a| a.last_registered_email.clone());
            if email.is_some() && registered != email {
                account.update_contacts(&contact_refs).await?;
            }
            (account, key.pkcs8)
        }
        None => {
            if acme.disable_account_key_generation.unwrap_or(false) {
                return Err(IssuerError::Config(format!(
                    "Secret {key_secret:?} not found and account key generation is disabled"
                )));
            }
            let eab = external_account_key(ctx, issuer, acme).await?;
            let (account, credentials) = builder()?
                .create(
                    &NewAccount {
                        contact: &contact_refs,
                        terms_of_service_agreed: true,
                        only_return_existing: false,
                    },
                    server.clone(),
                    eab.as_ref(),
                )
                .await?;
            let pkcs8 = credentials.private_key().secret_pkcs8_der().to_vec();
            store_key(&secrets, &key_secret, &data_key, &pkcs8).await?;
            (account, pkcs8)
        }
    };
    let info = AccountInfo {
        key_hash: sha256_b64(&key_pkcs8),
        account: account.clone(),
        key_secret,
        kept_rsa_secret,
    };
    ctx.accounts.store(issuer, account);
    Ok(info)
}

fn secret_bytes(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret.data.as_ref()?.get(key).map(|b| b.0.clone())
}

/// Creates the key Secret; never replaces one (a concurrent writer wins, we fail and retry).
async fn store_key(
    secrets: &Api<Secret>,
    name: &str,
    data_key: &str,
    pkcs8: &[u8],
) -> Result<(), IssuerError> {
    let pem = crate::pki::pem_block("PRIVATE KEY", pkcs8);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.to_string()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "cert-manager".to_string(),
            )])),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            data_key.to_string(),
            ByteString(pem.into_bytes()),
        )])),
        ..Default::default()
    };
    secrets.create(&PostParams::default(), &secret).await?;
    Ok(())
}

async fn external_account_key(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    acme: &AcmeIssuer,
) -> Result<Option<ExternalAccountKey>, IssuerError> {
    let Some(eab) = &acme.external_account_binding else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &issuer.secret_namespace);
    let name = &eab.key_secret_ref.name;
    let key = eab
        .key_secret_ref
        .key
        .clone()
        .unwrap_or_else(|| "secret".into());
    let secret = secrets.get_opt(name).await?.ok_or_else(|| {
        IssuerError::Config(format!(
            "external account binding Secret {name:?} not found"
        ))
    })?;
    let value = secret_bytes(&secret, &key)
        .ok_or_else(|| IssuerError::Config(format!("Secret {name:?} has no key {key:?}")))?;
    // cert-manager stores the HMAC key as unpadded base64url text.
    let text = String::from_utf8_lossy(&value);
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text.trim().trim_end_matches('='))
        .map_err(|_| {
            IssuerError::Config(format!("Secret {name:?} key {key:?} is not base64url"))
        })?;
    Ok(Some(ExternalAccountKey::new(eab.key_id.clone(), &raw)))
}

/// Reconciles an Issuer or ClusterIssuer: ACME account registered → Ready.
pub async fn reconcile_issuer<K>(
    obj: &K,
    issuer: ResolvedIssuer,
    ctx: &Context,
) -> Result<Action, IssuerError>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    ctx.metrics.sync_call("issuers");
    let Some(acme) = issuer.acme().cloned() else {
        // Other issuer types are not implemented; say so rather than pretend.
        let cond = new_condition(
            "Ready",
            false,
            "NotSupported",
            "Only ACME issuers are supported by this implementation",
        );
        write_status::<K>(ctx, obj, &issuer, cond, None).await?;
        return Ok(Action::await_change());
    };
    let verified = issuer.is_ready()
        && issuer.status.acme.as_ref().is_some_and(|s| {
            s.uri.as_deref().and_then(host_of) == host_of(&acme.server)
                && s.last_registered_email.as_deref().unwrap_or("")
                    == acme.email.as_deref().unwrap_or("").to_lowercase()
        })
        && ctx.accounts.cached(&issuer).is_some();
    if verified {
        return Ok(Action::await_change());
    }
    match setup_account(ctx, &issuer).await {
        Ok(info) => {
            let mut message = "The ACME account was registered with the ACME server".to_string();
            if let Some(rsa) = &info.kept_rsa_secret {
                let note = format!(
                    "Secret {rsa:?} holds an RSA account key (cert-manager's format) and is left untouched; \
                     this controller uses an ES256 account key in Secret {:?}",
                    info.key_secret
                );
                message = format!("{message} ({note})");
                kube_common::events::publish(
                    &ctx.recorder,
                    &obj.object_ref(&()),
                    EventType::Normal,
                    "RSAAccountKeyKept",
                    "RegisterAccount",
                    note,
                )
                .await;
            }
            let status = AcmeIssuerStatus {
                uri: Some(info.account.id().to_string()),
                last_registered_email: acme.email.as_ref().map(|e| e.to_lowercase()),
                last_private_key_hash: Some(info.key_hash),
            };
            let cond = new_condition("Ready", true, "ACMEAccountRegistered", message);
            write_status::<K>(ctx, obj, &issuer, cond, Some(status)).await?;
            Ok(Action::await_change())
        }
        Err(e) => {
            ctx.metrics.sync_error("issuers");
            let reason = if matches!(e, IssuerError::Kube(_)) {
                "ErrVerifyACMEAccount"
            } else {
                "ErrRegisterACMEAccount"
            };
            let message = format!("Failed to register ACME account: {e}");
            let cond = new_condition("Ready", false, reason, message.clone());
            write_status::<K>(ctx, obj, &issuer, cond, issuer.status.acme.clone()).await?;
            kube_common::events::publish(
                &ctx.recorder,
                &obj.object_ref(&()),
                EventType::Warning,
                reason,
                "RegisterAccount",
                message,
            )
            .await;
            if e.is_permanent() {
                Ok(Action::await_change())
            } else {
                Err(e)
            }
        }
    }
}

fn host_of(url: &str) -> Option<&str> {
    let rest = url.split_once("://")?.1;
    Some(rest.split(['/', '?']).next().unwrap_or(rest))
}

async fn write_status<K>(
    ctx: &Context,
    obj: &K,
    issuer: &ResolvedIssuer,
    cond: Condition,
    acme: Option<AcmeIssuerStatus>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut conditions = issuer.status.conditions.clone().unwrap_or_default();
    set_condition(&mut conditions, cond, &crate::time::now());
    let ar = kube::api::ApiResource::erase::<K>(&());
    let api: Api<kube::api::DynamicObject> = match &issuer.namespace {
        Some(ns) => Api::namespaced_with(ctx.client.clone(), ns, &ar),
        None => Api::all_with(ctx.client.clone(), &ar),
    };
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": IssuerStatus { conditions: Some(conditions), acme },
    });
    api.patch_status(
        &obj.name_any(),
        &kube::api::PatchParams::apply(crate::FIELD_MANAGER).force(),
        &kube::api::Patch::Apply(patch),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_of_urls() {
        assert_eq!(
            super::host_of("https://acme-v02.api.letsencrypt.org/directory"),
            Some("acme-v02.api.letsencrypt.org")
        );
        assert_eq!(
            super::host_of("https://localhost:14000/my-account/1"),
            Some("localhost:14000")
        );
        assert_eq!(super::host_of("nonsense"), None);
    }
}
