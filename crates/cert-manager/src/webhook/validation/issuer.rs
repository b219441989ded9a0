//! Issuer and ClusterIssuer (`ValidateIssuer`, `ValidateClusterIssuer`, which share the spec):
//! exactly one issuer type, then that type's rules; for ACME the server, account key, external
//! account binding and solvers.

use base64::Engine;
use serde_json::Value;

use super::{BadValue, ErrorList, dns1123_subdomain_errors, forbidden, invalid, required, s};
use crate::api::{
    AcmeChallengeSolver, AcmeChallengeSolverHttp01, AcmeChallengeSolverHttp01Ingress, AcmeIssuer,
    IssuerConfig,
};
use crate::duration::{DurationError, parse_go_duration};

/// `ValidateIssuerConfig`: exactly one issuer type, then that type's rules.
pub fn validate_issuer_config(config: &IssuerConfig) -> ErrorList {
    let mut el = ErrorList::new();
    let types: [(&str, bool); 5] = [
        ("acme", config.acme.is_some()),
        ("ca", config.ca.is_some()),
        ("selfSigned", config.self_signed.is_some()),
        ("vault", config.vault.is_some()),
        ("venafi", config.venafi.is_some()),
    ];
    let mut seen = 0;
    for (name, set) in types {
        if !set {
            continue;
        }
        if seen > 0 {
            el.push(forbidden(
                format!("spec.{name}"),
                "may not specify more than one issuer type",
            ));
            continue;
        }
        seen += 1;
        match name {
            "acme" => {
                if let Some(acme) = &config.acme {
                    el.extend(validate_acme_issuer(acme));
                }
            }
            "ca" => {
                let secret = config
                    .ca
                    .as_ref()
                    .and_then(|v| v.get("secretName"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                if secret.is_empty() {
                    el.push(required("spec.ca.secretName", ""));
                }
            }
            _ => {}
        }
    }
    if seen == 0 {
        el.push(required("spec", "at least one issuer must be configured"));
    }
    el
}

/// `ValidateACMEIssuerConfig`.
pub fn validate_acme_issuer(acme: &AcmeIssuer) -> ErrorList {
    let mut el = ErrorList::new();
    let bundle = acme.ca_bundle.as_deref().unwrap_or("");
    if !bundle.is_empty() && acme.skip_tls_verify == Some(true) {
        const MSG: &str =
            "caBundle and skipTLSVerify are mutually exclusive and cannot both be set";
        el.push(invalid("spec.acme.caBundle", s(""), MSG));
        el.push(invalid(
            "spec.acme.skipTLSVerify",
            BadValue::Bool(true),
            MSG,
        ));
    }
    if !bundle.is_empty() && !bundle_has_certificate(bundle) {
        el.push(invalid(
            "spec.acme.caBundle",
            s(""),
            "cert bundle didn't contain any valid certificates",
        ));
    }
    if acme.private_key_secret_ref.name.is_empty() {
        el.push(required(
            "spec.acme.privateKeySecretRef.name",
            "private key secret name is a required field",
        ));
    }
    if acme.server.is_empty() {
        el.push(required(
            "spec.acme.server",
            "acme server URL is a required field",
        ));
    }
    if let Some(eab) = &acme.external_account_binding {
        if eab.key_id.is_empty() {
            el.push(required(
                "spec.acme.externalAccountBinding.keyID",
                "the keyID field is required when using externalAccountBinding",
            ));
        }
        if eab.key_secret_ref.name.is_empty() {
            el.push(required(
                "spec.acme.externalAccountBinding.keySecretRef.name",
                "secret name is required",
            ));
        }
    }
    for (i, solver) in acme.solvers.iter().flatten().enumerate() {
        el.extend(validate_solver(solver, &format!("spec.acme.solvers[{i}]")));
    }
    el
}

fn bundle_has_certificate(bundle_b64: &str) -> bool {
    let Ok(pem) = base64::engine::general_purpose::STANDARD.decode(bundle_b64.trim()) else {
        return false;
    };
    x509_parser::pem::Pem::iter_from_buffer(&pem)
        .filter_map(Result::ok)
        .any(|p| p.label == "CERTIFICATE" && p.parse_x509().is_ok())
}

/// `ValidateACMEIssuerChallengeSolverConfig`.
pub fn validate_solver(solver: &AcmeChallengeSolver, path: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let mut providers = 0;
    if let Some(http01) = &solver.http01 {
        providers += 1;
        el.extend(validate_http01(http01, &format!("{path}.http01")));
    }
    if solver.dns01.is_some() {
        if providers > 0 {
            el.push(forbidden(
                path,
                "may not specify more than one solver type in a single solver",
            ));
        } else {
            providers += 1;
        }
    }
    if providers == 0 {
        el.push(required(path, "no solver type configured"));
    }
    if let Some(wait) = solver.wait_instead_of_self_check.as_deref() {
        let field = format!("{path}.waitInsteadOfSelfCheck");
        match parse_go_duration(wait) {
            Ok(_) => {}
            Err(DurationError::Negative(_)) => el.push(invalid(
                field,
                s(wait),
                "waitInsteadOfSelfCheck must not be negative",
            )),
            Err(e) => el.push(invalid(field, s(wait), e.to_string())),
        }
    }
    el
}

/// Exactly one of ingress and gatewayHTTPRoute, each valid.
fn validate_http01(http01: &AcmeChallengeSolverHttp01, http_path: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let defined =
        usize::from(http01.ingress.is_some()) + usize::from(http01.gateway_http_route.is_some());
    if let Some(ingress) = &http01.ingress {
        el.extend(validate_http01_ingress(
            ingress,
            &format!("{http_path}.ingress"),
        ));
    }
    if let Some(service_type) = http01
        .gateway_http_route
        .as_ref()
        .and_then(|g| g.get("serviceType"))
        .and_then(Value::as_str)
    {
        el.extend(validate_service_type(
            service_type,
            &format!("{http_path}.gateway.serviceType"),
        ));
    }
    match defined {
        0 => el.push(required(http_path, "no HTTP01 solver type configured")),
        1 => {}
        _ => el.push(required(
            http_path,
            "only 1 HTTP01 solver type may be configured",
        )),
    }
    el
}

fn validate_service_type(service_type: &str, path: &str) -> ErrorList {
    match service_type {
        "" | "ClusterIP" | "NodePort" => vec![],
        other => vec![invalid(
            path,
            s(other),
            r#"must be empty, "ClusterIP" or "NodePort""#,
        )],
    }
}

fn validate_http01_ingress(ingress: &AcmeChallengeSolverHttp01Ingress, path: &str) -> ErrorList {
    let mut el = ErrorList::new();
    let specified = usize::from(ingress.class.is_some())
        + usize::from(ingress.ingress_class_name.is_some())
        + usize::from(ingress.name.as_deref().is_some_and(|n| !n.is_empty()));
    if specified > 1 {
        el.push(forbidden(
            path,
            "only one of 'ingressClassName', 'name' or 'class' should be specified",
        ));
    }
    if let Some(class_name) = &ingress.ingress_class_name {
        let errs = dns1123_subdomain_errors(class_name);
        if !errs.is_empty() {
            el.push(invalid(
                format!("{path}.ingressClassName"),
                s(class_name),
                format!("must be a valid IngressClass name: {}", errs.join(", ")),
            ));
        }
    }
    el.extend(validate_service_type(
        ingress.service_type.as_deref().unwrap_or(""),
        &format!("{path}.serviceType"),
    ));
    el
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ExternalAccountBinding, SecretKeySelector};
    use crate::webhook::validation::tests::messages;

    fn acme() -> IssuerConfig {
        IssuerConfig {
            acme: Some(AcmeIssuer {
                server: "https://acme.example/dir".into(),
                private_key_secret_ref: SecretKeySelector {
                    name: "account".into(),
                    key: None,
                },
                solvers: Some(vec![AcmeChallengeSolver {
                    http01: Some(crate::api::AcmeChallengeSolverHttp01 {
                        ingress: Some(AcmeChallengeSolverHttp01Ingress {
                            ingress_class_name: Some("nginx".into()),
                            ..Default::default()
                        }),
                        gateway_http_route: None,
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn test_ca_b64() -> String {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("cert");
        base64::engine::general_purpose::STANDARD.encode(cert.pem())
    }

    #[test]
    fn issuer_rules() {
        type Case = (&'static str, fn(&mut IssuerConfig), &'static [&'static str]);
        let cases: &[Case] = &[
            ("valid", |_| {}, &[]),
            (
                "no type",
                |c| c.acme = None,
                &["spec: Required value: at least one issuer must be configured"],
            ),
            (
                "two types",
                |c| c.self_signed = Some(serde_json::json!({})),
                &["spec.selfSigned: Forbidden: may not specify more than one issuer type"],
            ),
            (
                "server and key required",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.server.clear();
                    a.private_key_secret_ref.name.clear();
                },
                &[
                    "spec.acme.privateKeySecretRef.name: Required value: private key secret name is a required field",
                    "spec.acme.server: Required value: acme server URL is a required field",
                ],
            ),
            (
                "caBundle and skipTLSVerify",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.ca_bundle = Some(test_ca_b64());
                    a.skip_tls_verify = Some(true);
                },
                &[
                    "spec.acme.caBundle: Invalid value: \"\": caBundle and skipTLSVerify are mutually exclusive",
                    "spec.acme.skipTLSVerify: Invalid value: true: caBundle and skipTLSVerify are mutually exclusive",
                ],
            ),
            (
                "caBundle alone",
                |c| c.acme.as_mut().expect("acme").ca_bundle = Some(test_ca_b64()),
                &[],
            ),
            (
                "caBundle without certificates",
                |c| c.acme.as_mut().expect("acme").ca_bundle = Some("aGVsbG8=".into()),
                &[
                    "spec.acme.caBundle: Invalid value: \"\": cert bundle didn't contain any valid certificates",
                ],
            ),
            (
                "eab needs keyID and secret",
                |c| {
                    c.acme.as_mut().expect("acme").external_account_binding =
                        Some(ExternalAccountBinding::default())
                },
                &[
                    "spec.acme.externalAccountBinding.keyID: Required value",
                    "spec.acme.externalAccountBinding.keySecretRef.name: Required value",
                ],
            ),
            (
                "solver without type",
                |c| {
                    c.acme.as_mut().expect("acme").solvers =
                        Some(vec![AcmeChallengeSolver::default()])
                },
                &["spec.acme.solvers[0]: Required value: no solver type configured"],
            ),
            (
                "solver with two types",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].dns01 = Some(serde_json::json!({}));
                },
                &[
                    "spec.acme.solvers[0]: Forbidden: may not specify more than one solver type in a single solver",
                ],
            ),
            (
                "http01 without ingress",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].http01 = Some(Default::default());
                },
                &["spec.acme.solvers[0].http01: Required value: no HTTP01 solver type configured"],
            ),
            (
                "class and ingressClassName",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    let s = &mut a.solvers.as_mut().expect("solvers")[0];
                    if let Some(i) = s.http01.as_mut().and_then(|h| h.ingress.as_mut()) {
                        i.class = Some("nginx".into());
                    }
                },
                &[
                    "spec.acme.solvers[0].http01.ingress: Forbidden: only one of 'ingressClassName', 'name' or 'class' should be specified",
                ],
            ),
            (
                "serviceType LoadBalancer",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    let s = &mut a.solvers.as_mut().expect("solvers")[0];
                    if let Some(i) = s.http01.as_mut().and_then(|h| h.ingress.as_mut()) {
                        i.service_type = Some("LoadBalancer".into());
                    }
                },
                &[
                    "spec.acme.solvers[0].http01.ingress.serviceType: Invalid value: \"LoadBalancer\": must be empty, \"ClusterIP\" or \"NodePort\"",
                ],
            ),
            (
                "negative wait",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].wait_instead_of_self_check =
                        Some("-5s".into());
                },
                &[
                    "spec.acme.solvers[0].waitInsteadOfSelfCheck: Invalid value: \"-5s\": waitInsteadOfSelfCheck must not be negative",
                ],
            ),
            (
                "zero wait",
                |c| {
                    let a = c.acme.as_mut().expect("acme");
                    a.solvers.as_mut().expect("solvers")[0].wait_instead_of_self_check =
                        Some("0s".into());
                },
                &[],
            ),
        ];
        for (name, mutate, want) in cases {
            let mut config = acme();
            mutate(&mut config);
            let got = messages(&validate_issuer_config(&config));
            assert_eq!(got.len(), want.len(), "{name}: {got:#?}");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!(g.starts_with(w), "{name}: got {g:?}, want prefix {w:?}");
            }
        }
    }
}
