//! ingress-shim: an Ingress annotated with an issuer gets one Certificate per `spec.tls` entry,
//! named after its secretName and owned by the Ingress (upstream's certificate-shim).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::Ingress;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;

use crate::api::{
    Certificate, CertificatePrivateKey, CertificateSpec, IssuerRef, SecretTemplate, X509Subject,
};
use crate::context::Context;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
}

const ISSUER: &str = "cert-manager.io/issuer";
const CLUSTER_ISSUER: &str = "cert-manager.io/cluster-issuer";
const ISSUER_KIND: &str = "cert-manager.io/issuer-kind";
const ISSUER_GROUP: &str = "cert-manager.io/issuer-group";
const EDIT_IN_PLACE: &str = "acme.cert-manager.io/http01-edit-in-place";
const INGRESS_CLASS: &str = "acme.cert-manager.io/http01-ingress-class";
const INGRESS_CLASS_NAME: &str = "acme.cert-manager.io/http01-ingress-ingressclassname";

/// Go's `strconv.ParseBool` true values.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// The issuer an Ingress asks for, or why its annotations are contradictory.
pub fn issuer_for(
    annotations: &BTreeMap<String, String>,
    defaults: &IssuerRef,
    auto: &[String],
) -> Result<Option<IssuerRef>, String> {
    let issuer = annotations.get(ISSUER);
    let cluster = annotations.get(CLUSTER_ISSUER);
    let auto_on = auto
        .iter()
        .any(|a| annotations.get(a).and_then(|v| parse_bool(v)) == Some(true));
    if issuer.is_none() && cluster.is_none() && !auto_on {
        return Ok(None);
    }
    let mut r = defaults.clone();
    if let Some(n) = issuer {
        r.name = n.clone();
        r.kind = Some("Issuer".into());
    }
    if let Some(n) = cluster {
        r.name = n.clone();
        r.kind = Some("ClusterIssuer".into());
    }
    if let Some(k) = annotations.get(ISSUER_KIND) {
        r.kind = Some(k.clone());
    }
    if let Some(g) = annotations.get(ISSUER_GROUP) {
        r.group = Some(g.clone());
    }
    if issuer.is_some() && cluster.is_some() {
        return Err(format!(
            "both {ISSUER:?} and {CLUSTER_ISSUER:?} may not be set"
        ));
    }
    if cluster.is_some() && annotations.contains_key(ISSUER_GROUP) {
        return Err(format!(
            "both {CLUSTER_ISSUER:?} and {ISSUER_GROUP:?} may not be set"
        ));
    }
    if cluster.is_some() && annotations.contains_key(ISSUER_KIND) {
        return Err(format!(
            "both {CLUSTER_ISSUER:?} and {ISSUER_KIND:?} may not be set"
        ));
    }
    if r.name.is_empty() {
        return Err("failed to determine issuer name to be used for ingress resource".into());
    }
    Ok(Some(r))
}

fn csv(v: &str) -> Vec<String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

/// Applies the `cert-manager.io/*` annotations to the Certificate spec, or says which is bad.
pub fn translate(a: &BTreeMap<String, String>, spec: &mut CertificateSpec) -> Result<(), String> {
    let get = |k: &str| a.get(&format!("cert-manager.io/{k}")).map(String::as_str);
    let bad =
        |k: &str, why: &str| format!("{:?} annotation: {why}", format!("cert-manager.io/{k}"));
    if let Some(cn) = get("common-name") {
        if cn.len() > 64 {
            return Err(bad("common-name", "must be 64 bytes or fewer"));
        }
        spec.common_name = Some(cn.into());
    }
    if let Some(v) = get("alt-names") {
        spec.dns_names.get_or_insert_with(Vec::new).extend(csv(v));
    }
    if let Some(v) = get("ip-sans") {
        for ip in csv(v) {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(bad("ip-sans", &format!("invalid IP address {ip:?}")));
            }
            spec.ip_addresses.get_or_insert_with(Vec::new).push(ip);
        }
    }
    if let Some(v) = get("email-sans") {
        spec.email_addresses = Some(csv(v));
    }
    let mut subject = X509Subject::default();
    let mut any_subject = false;
    for (key, field) in [
        ("subject-organizations", &mut subject.organizations),
        (
            "subject-organizationalunits",
            &mut subject.organizational_units,
        ),
        ("subject-countries", &mut subject.countries),
        ("subject-provinces", &mut subject.provinces),
        ("subject-localities", &mut subject.localities),
        ("subject-postalcodes", &mut subject.postal_codes),
        ("subject-streetaddresses", &mut subject.street_addresses),
    ] {
        if let Some(v) = get(key) {
            *field = Some(csv(v));
            any_subject = true;
        }
    }
    if let Some(v) = get("subject-serialnumber") {
        subject.serial_number = Some(v.into());
        any_subject = true;
    }
    if any_subject {
        spec.subject = Some(subject);
    }
    if let Some(v) = get("duration") {
        let d = crate::time::parse_go_duration(v).map_err(|e| bad("duration", &e.to_string()))?;
        if d.as_secs() < 3600 {
            return Err(bad("duration", "must be at least 1h"));
        }
        spec.duration = Some(v.into());
    }
    if let Some(v) = get("renew-before") {
        let d =
            crate::time::parse_go_duration(v).map_err(|e| bad("renew-before", &e.to_string()))?;
        if d.as_secs() < 300 {
            return Err(bad("renew-before", "must be at least 5m"));
        }
        spec.renew_before = Some(v.into());
    }
    if let Some(v) = get("renew-before-percentage") {
        let p: i32 = v
            .parse()
            .map_err(|_| bad("renew-before-percentage", "not an integer"))?;
        spec.renew_before_percentage = Some(p);
    }
    if let Some(v) = get("usages") {
        spec.usages = Some(csv(v));
    }
    if let Some(v) = get("revision-history-limit") {
        let l: i32 = v
            .parse()
            .map_err(|_| bad("revision-history-limit", "not an integer"))?;
        if l < 1 {
            return Err(bad("revision-history-limit", "must be at least 1"));
        }
        spec.revision_history_limit = Some(l);
    }
    let mut pk = CertificatePrivateKey::default();
    let mut any_pk = false;
    if let Some(v) = get("private-key-algorithm") {
        if !matches!(v, "RSA" | "ECDSA" | "Ed25519") {
            return Err(bad(
                "private-key-algorithm",
                "must be RSA, ECDSA or Ed25519",
            ));
        }
        pk.algorithm = Some(v.into());
        any_pk = true;
    }
    if let Some(v) = get("private-key-encoding") {
        if !matches!(v, "PKCS1" | "PKCS8") {
            return Err(bad("private-key-encoding", "must be PKCS1 or PKCS8"));
        }
        pk.encoding = Some(v.into());
        any_pk = true;
    }
    if let Some(v) = get("private-key-size") {
        let s: i32 = v
            .parse()
            .map_err(|_| bad("private-key-size", "not an integer"))?;
        pk.size = Some(s);
        any_pk = true;
    }
    if let Some(v) = get("private-key-rotation-policy") {
        if !matches!(v, "Never" | "Always") {
            return Err(bad(
                "private-key-rotation-policy",
                "must be Never or Always",
            ));
        }
        pk.rotation_policy = Some(v.into());
        any_pk = true;
    }
    if any_pk {
        spec.private_key = Some(pk);
    }
    if let Some(v) = get("secret-template") {
        let t: SecretTemplate =
            serde_json::from_str(v).map_err(|e| bad("secret-template", &e.to_string()))?;
        let keys = t
            .annotations
            .iter()
            .flatten()
            .chain(t.labels.iter().flatten())
            .map(|(k, _)| k);
        if keys.clone().any(|k| k.starts_with("cert-manager.io/")) {
            return Err(bad(
                "secret-template",
                "keys may not start with cert-manager.io/",
            ));
        }
        spec.secret_template = Some(t);
    }
    Ok(())
}

async fn event(ctx: &Context, ing: &Ingress, type_: EventType, reason: &str, note: String) {
    // One series per message: BadConfig events differ in what is wrong.
    let action = format!("Sync{:08x}", crate::names::fnv32a(note.as_bytes()));
    kube_common::events::publish(
        &ctx.recorder,
        &ing.object_ref(&()),
        type_,
        reason,
        &action,
        note,
    )
    .await;
}

/// The Certificates an Ingress asks for (empty when it asks for none), or a BadConfig message.
pub fn desired(
    ing: &Ingress,
    ctx_defaults: &IssuerRef,
    auto: &[String],
    extra: &[String],
) -> Result<Vec<Certificate>, String> {
    let a = ing.annotations();
    let Some(issuer) = issuer_for(a, ctx_defaults, auto)? else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Certificate> = Vec::new();
    let mut skipped = Vec::new();
    for (i, tls) in ing
        .spec
        .as_ref()
        .and_then(|s| s.tls.clone())
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let hosts = tls.hosts.unwrap_or_default();
        let secret = tls.secret_name.unwrap_or_default();
        if hosts.is_empty() {
            skipped.push(format!(
                "Skipped a TLS block: spec.tls[{i}].hosts: Required value"
            ));
            continue;
        }
        if secret.is_empty() {
            skipped.push(format!(
                "Skipped a TLS block: spec.tls[{i}].secretName: Required value"
            ));
            continue;
        }
        if out.iter().any(|c| c.spec.secret_name == secret) {
            return Err(format!(
                "spec.tls[{i}].secretName: Duplicate value: {secret:?}"
            ));
        }
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for h in hosts {
            let list = if h.parse::<std::net::IpAddr>().is_ok() {
                &mut ips
            } else {
                &mut dns
            };
            if !list.contains(&h) {
                list.push(h);
            }
        }
        let mut spec = CertificateSpec {
            secret_name: secret.clone(),
            issuer_ref: issuer.clone(),
            dns_names: Some(dns).filter(|d| !d.is_empty()),
            ip_addresses: Some(ips).filter(|d| !d.is_empty()),
            usages: Some(vec!["digital signature".into(), "key encipherment".into()]),
            ..Default::default()
        };
        translate(a, &mut spec)?;
        let mut cert = Certificate::new(&secret, spec);
        cert.metadata.namespace = ing.namespace();
        let mut labels = ing.labels().clone();
        labels.remove("applyset.kubernetes.io/part-of");
        cert.metadata.labels = Some(labels);
        let mut ann: BTreeMap<String, String> = extra
            .iter()
            .filter_map(|k| a.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        if a.get(EDIT_IN_PLACE).and_then(|v| parse_bool(v)) == Some(true) {
            ann.insert(crate::orders::OVERRIDE_INGRESS_NAME.into(), ing.name_any());
            ann.insert(
                "cert-manager.io/issue-temporary-certificate".into(),
                "true".into(),
            );
        }
        if let Some(c) = a.get(INGRESS_CLASS) {
            ann.insert(crate::orders::OVERRIDE_INGRESS_CLASS.into(), c.clone());
        }
        if let Some(c) = a.get(INGRESS_CLASS_NAME) {
            ann.insert(crate::orders::OVERRIDE_INGRESS_CLASS_NAME.into(), c.clone());
        }
        cert.metadata.annotations = Some(ann).filter(|a| !a.is_empty());
        cert.metadata.owner_references = ing.controller_owner_ref(&()).map(|o| vec![o]);
        out.push(cert);
    }
    if !skipped.is_empty() && out.is_empty() {
        return Err(skipped.join("; "));
    }
    Ok(out)
}

pub async fn reconcile(ing: Arc<Ingress>, ctx: Arc<Context>) -> Result<Action, ShimError> {
    ctx.metrics.sync_call("ingress-shim");
    if ing.meta().deletion_timestamp.is_some()
        || ing.finalizers().iter().any(|f| f == "foregroundDeletion")
    {
        return Ok(Action::await_change());
    }
    let defaults = IssuerRef {
        name: ctx.args.default_issuer_name.clone(),
        kind: Some(ctx.args.default_issuer_kind.clone()),
        group: Some(ctx.args.default_issuer_group.clone()),
    };
    let want = match desired(
        &ing,
        &defaults,
        &ctx.args.auto_certificate_annotations,
        &ctx.args.extra_certificate_annotations,
    ) {
        Ok(w) => w,
        Err(msg) => {
            event(&ctx, &ing, EventType::Warning, "BadConfig", msg).await;
            return Ok(Action::await_change());
        }
    };
    let has_issuer = issuer_for(
        ing.annotations(),
        &defaults,
        &ctx.args.auto_certificate_annotations,
    )
    .ok()
    .flatten()
    .is_some();
    if !has_issuer {
        return Ok(Action::await_change());
    }
    let ns = ing.namespace().unwrap_or_default();
    let uid = ing.uid().unwrap_or_default();
    let api: Api<Certificate> = Api::namespaced(ctx.client.clone(), &ns);
    for cert in &want {
        let name = cert.name_any();
        match api.get_opt(&name).await? {
            Some(existing) => {
                let ours = existing
                    .owner_references()
                    .iter()
                    .any(|o| o.uid == uid && o.controller == Some(true));
                if !ours {
                    tracing::info!(certificate = %name, "certificate resource is not owned by this object, refusing to update it");
                    continue;
                }
                if existing.spec != cert.spec
                    || existing.labels() != cert.labels()
                    || cert
                        .annotations()
                        .iter()
                        .any(|(k, v)| existing.annotations().get(k) != Some(v))
                {
                    apply(&api, cert).await?;
                    event(
                        &ctx,
                        &ing,
                        EventType::Normal,
                        "UpdateCertificate",
                        format!("Successfully updated Certificate {name:?}"),
                    )
                    .await;
                }
            }
            None => {
                apply(&api, cert).await?;
                event(
                    &ctx,
                    &ing,
                    EventType::Normal,
                    "CreateCertificate",
                    format!("Successfully created Certificate {name:?}"),
                )
                .await;
            }
        }
    }
    // Certificates this Ingress made for TLS entries it no longer has.
    for existing in api.list(&ListParams::default()).await? {
        let ours = existing
            .owner_references()
            .iter()
            .any(|o| o.uid == uid && o.controller == Some(true));
        if ours && !want.iter().any(|w| w.name_any() == existing.name_any()) {
            match api
                .delete(&existing.name_any(), &DeleteParams::background())
                .await
            {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            event(
                &ctx,
                &ing,
                EventType::Normal,
                "DeleteCertificate",
                format!(
                    "Successfully deleted unrequired Certificate {:?}",
                    existing.name_any()
                ),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

async fn apply(api: &Api<Certificate>, cert: &Certificate) -> Result<(), kube::Error> {
    let mut body = serde_json::to_value(cert).unwrap_or_default();
    body["apiVersion"] = json!("cert-manager.io/v1");
    body["kind"] = json!("Certificate");
    if let Some(m) = body["metadata"].as_object_mut() {
        m.remove("resourceVersion");
    }
    api.patch(
        &cert.name_any(),
        &PatchParams::apply("cert-manager-ingress-shim").force(),
        &Patch::Apply(body),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::networking::v1::{IngressSpec, IngressTLS};

    fn ingress(annotations: &[(&str, &str)], tls: Vec<IngressTLS>) -> Ingress {
        Ingress {
            metadata: kube::api::ObjectMeta {
                name: Some("web".into()),
                namespace: Some("ns".into()),
                uid: Some("u1".into()),
                annotations: Some(
                    annotations
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                ),
                labels: Some(BTreeMap::from([
                    ("app".into(), "web".into()),
                    ("applyset.kubernetes.io/part-of".into(), "x".into()),
                ])),
                ..Default::default()
            },
            spec: Some(IngressSpec {
                tls: Some(tls),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn tls(hosts: &[&str], secret: &str) -> IngressTLS {
        IngressTLS {
            hosts: Some(hosts.iter().map(|s| s.to_string()).collect()),
            secret_name: Some(secret.into()),
        }
    }

    fn defaults() -> IssuerRef {
        IssuerRef {
            name: String::new(),
            kind: Some("Issuer".into()),
            group: Some("cert-manager.io".into()),
        }
    }

    fn auto() -> Vec<String> {
        vec!["kubernetes.io/tls-acme".into()]
    }

    #[test]
    fn household_ingress_becomes_one_certificate() {
        let ing = ingress(
            &[("cert-manager.io/cluster-issuer", "letsencrypt-prod")],
            vec![tls(
                &[
                    "household-task-mgr.duckdns.org",
                    "household-task-mgr.duckdns.org",
                ],
                "household-task-manager-tls",
            )],
        );
        let certs = desired(&ing, &defaults(), &auto(), &[]).unwrap();
        assert_eq!(certs.len(), 1);
        let c = &certs[0];
        assert_eq!(c.name_any(), "household-task-manager-tls");
        assert_eq!(
            c.spec.dns_names.as_deref(),
            Some(&["household-task-mgr.duckdns.org".to_string()][..])
        );
        assert_eq!(
            c.spec.issuer_ref,
            IssuerRef {
                name: "letsencrypt-prod".into(),
                kind: Some("ClusterIssuer".into()),
                group: Some("cert-manager.io".into())
            }
        );
        assert_eq!(
            c.spec.usages.as_deref().unwrap(),
            ["digital signature", "key encipherment"]
        );
        assert_eq!(c.labels().get("app").map(String::as_str), Some("web"));
        assert!(!c.labels().contains_key("applyset.kubernetes.io/part-of"));
        let owner = &c.owner_references()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.controller, owner.uid.as_str()),
            ("Ingress", Some(true), "u1")
        );
    }

    #[test]
    fn issuer_annotation_rules() {
        let a = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert_eq!(issuer_for(&a(&[]), &defaults(), &auto()), Ok(None));
        assert!(
            issuer_for(
                &a(&[(ISSUER, "a"), (CLUSTER_ISSUER, "b")]),
                &defaults(),
                &auto()
            )
            .is_err()
        );
        assert!(
            issuer_for(
                &a(&[(CLUSTER_ISSUER, "b"), (ISSUER_KIND, "X")]),
                &defaults(),
                &auto()
            )
            .is_err()
        );
        assert!(
            issuer_for(
                &a(&[(CLUSTER_ISSUER, "b"), (ISSUER_GROUP, "x.io")]),
                &defaults(),
                &auto()
            )
            .is_err()
        );
        // tls-acme needs a default issuer name.
        assert!(
            issuer_for(
                &a(&[("kubernetes.io/tls-acme", "true")]),
                &defaults(),
                &auto()
            )
            .is_err()
        );
        let mut d = defaults();
        d.name = "le".into();
        assert_eq!(
            issuer_for(&a(&[("kubernetes.io/tls-acme", "true")]), &d, &auto())
                .unwrap()
                .unwrap()
                .name,
            "le"
        );
        assert_eq!(
            issuer_for(&a(&[("kubernetes.io/tls-acme", "false")]), &d, &auto()),
            Ok(None)
        );
        let ext = issuer_for(
            &a(&[
                (ISSUER, "x"),
                (ISSUER_KIND, "AWSPCAIssuer"),
                (ISSUER_GROUP, "awspca.cert-manager.io"),
            ]),
            &d,
            &auto(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (ext.kind(), ext.group()),
            ("AWSPCAIssuer", "awspca.cert-manager.io")
        );
    }

    #[test]
    fn annotations_translate_or_fail() {
        let ing = ingress(
            &[
                (CLUSTER_ISSUER, "le"),
                ("cert-manager.io/common-name", "a.test"),
                ("cert-manager.io/duration", "2160h"),
                ("cert-manager.io/renew-before", "360h"),
                ("cert-manager.io/private-key-algorithm", "ECDSA"),
                ("cert-manager.io/private-key-size", "384"),
                ("cert-manager.io/revision-history-limit", "3"),
                ("cert-manager.io/usages", "server auth,digital signature"),
                (EDIT_IN_PLACE, "true"),
                (INGRESS_CLASS, "public"),
            ],
            vec![tls(&["a.test", "10.0.0.1"], "a-tls")],
        );
        let c = &desired(&ing, &defaults(), &auto(), &[]).unwrap()[0];
        assert_eq!(c.spec.common_name.as_deref(), Some("a.test"));
        assert_eq!(
            c.spec.ip_addresses.as_deref(),
            Some(&["10.0.0.1".to_string()][..])
        );
        assert_eq!(c.spec.private_key.as_ref().unwrap().size, Some(384));
        assert_eq!(c.spec.revision_history_limit, Some(3));
        assert_eq!(
            c.spec.usages.as_deref().unwrap(),
            ["server auth", "digital signature"]
        );
        assert_eq!(
            c.annotations()
                .get(crate::orders::OVERRIDE_INGRESS_NAME)
                .map(String::as_str),
            Some("web")
        );
        assert_eq!(
            c.annotations()
                .get("cert-manager.io/issue-temporary-certificate")
                .map(String::as_str),
            Some("true")
        );
        assert_eq!(
            c.annotations()
                .get(crate::orders::OVERRIDE_INGRESS_CLASS)
                .map(String::as_str),
            Some("public")
        );

        for (k, v) in [
            ("cert-manager.io/duration", "30m"),
            ("cert-manager.io/duration", "forever"),
            ("cert-manager.io/renew-before", "1m"),
            ("cert-manager.io/private-key-algorithm", "DSA"),
            ("cert-manager.io/revision-history-limit", "0"),
            ("cert-manager.io/ip-sans", "not-an-ip"),
            (
                "cert-manager.io/secret-template",
                "{\"labels\":{\"cert-manager.io/x\":\"y\"}}",
            ),
            ("cert-manager.io/secret-template", "{\"unknown\":1"),
        ] {
            let ing = ingress(
                &[(CLUSTER_ISSUER, "le"), (k, v)],
                vec![tls(&["a.test"], "a-tls")],
            );
            assert!(desired(&ing, &defaults(), &auto(), &[]).is_err(), "{k}={v}");
        }
        let dup = ingress(
            &[(CLUSTER_ISSUER, "le")],
            vec![tls(&["a.test"], "x"), tls(&["b.test"], "x")],
        );
        assert!(desired(&dup, &defaults(), &auto(), &[]).is_err());
        let no_hosts = ingress(&[(CLUSTER_ISSUER, "le")], vec![tls(&[], "x")]);
        assert!(
            desired(&no_hosts, &defaults(), &auto(), &[])
                .unwrap_err()
                .contains("Skipped a TLS block")
        );
    }
}
