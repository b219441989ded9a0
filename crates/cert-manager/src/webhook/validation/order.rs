//! Order (ACME, UPDATE only): the spec is immutable, and so is each status field upstream
//! freezes once set.

use super::{ErrorList, forbidden};
use crate::api::{OrderSpec, OrderStatus};

/// Order UPDATE: the spec is immutable, and status fields upstream freezes once set stay put.
pub fn validate_order_update(
    old: &OrderSpec,
    new: &OrderSpec,
    old_status: Option<&OrderStatus>,
    new_status: Option<&OrderStatus>,
) -> ErrorList {
    let mut el = ErrorList::new();
    if !old.request.is_empty() && old.request != new.request {
        el.push(forbidden("spec.request", "field is immutable once set"));
    } else if old != new {
        el.push(forbidden("spec", "field is immutable once set"));
    }
    let default = OrderStatus::default();
    let (o, n) = (
        old_status.unwrap_or(&default),
        new_status.unwrap_or(&default),
    );
    let frozen = |field: &str, before: &Option<String>, after: &Option<String>| {
        let set = before.as_deref().is_some_and(|v| !v.is_empty());
        (set && before != after)
            .then(|| forbidden(format!("status.{field}"), "field is immutable once set"))
    };
    el.extend(frozen("url", &o.url, &n.url));
    el.extend(frozen("finalizeURL", &o.finalize_url, &n.finalize_url));
    el.extend(frozen("certificate", &o.certificate, &n.certificate));
    if let Some(before) = o.authorizations.as_ref().filter(|a| !a.is_empty())
        && n.authorizations.as_ref() != Some(before)
    {
        el.push(forbidden(
            "status.authorizations",
            "field is immutable once set",
        ));
    }
    el
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::IssuerRef;
    use crate::webhook::validation::tests::messages;

    #[test]
    fn order_immutability() {
        let spec = OrderSpec {
            request: "Y3Ny".into(),
            issuer_ref: IssuerRef {
                name: "le".into(),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(validate_order_update(&spec, &spec, None, None).is_empty());
        let mut changed = spec.clone();
        changed.request = "b3RoZXI=".into();
        assert_eq!(
            messages(&validate_order_update(&spec, &changed, None, None)),
            ["spec.request: Forbidden: field is immutable once set"]
        );
        let mut changed = spec.clone();
        changed.dns_names = Some(vec!["x".into()]);
        assert_eq!(
            messages(&validate_order_update(&spec, &changed, None, None)),
            ["spec: Forbidden: field is immutable once set"]
        );
        let with_url = OrderStatus {
            url: Some("https://acme/order/1".into()),
            ..Default::default()
        };
        assert_eq!(
            messages(&validate_order_update(
                &spec,
                &spec,
                Some(&with_url),
                Some(&OrderStatus::default())
            )),
            ["status.url: Forbidden: field is immutable once set"]
        );
    }
}
