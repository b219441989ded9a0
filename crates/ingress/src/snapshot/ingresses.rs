//! Ingresses phase: the Ingresses of our class, each validated (or replaced by its last good
//! version), in the order that settles conflicts.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use super::{Builder, Inputs, Problem, key_of};
use crate::annotations::Annotations;
use crate::path_rules::{PathKind, RegexCache, path_pattern};

/// Exact and Prefix paths must look like this (ingress-nginx `strict-validate-path-type`).
fn strict_path_ok(path: &str) -> bool {
    path.starts_with('/')
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
}

/// A DNS name, optionally with `*.` as its whole first label.
fn host_ok(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Checks one Ingress; returns every problem found.
pub fn validate(ingress: &Ingress) -> Result<Arc<Annotations>, Vec<String>> {
    validate_cached(ingress, &mut RegexCache::default())
}

/// [`validate`], compiling regex paths through `regexes` (the builder's cache, shared with
/// the router it builds).
pub(super) fn validate_cached(
    ingress: &Ingress,
    regexes: &mut RegexCache,
) -> Result<Arc<Annotations>, Vec<String>> {
    let mut problems = Vec::new();
    let annotations = match Annotations::parse(ingress.metadata.annotations.as_ref()) {
        Ok(a) => Some(a),
        Err(errs) => {
            problems.extend(errs.into_iter().map(|e| format!("annotation {e}")));
            None
        }
    };
    let regex = annotations.as_ref().is_some_and(Annotations::forces_regex);
    let spec = ingress.spec.as_ref();
    for rule in spec.and_then(|s| s.rules.as_ref()).into_iter().flatten() {
        if let Some(host) = rule.host.as_deref()
            && !host_ok(host)
        {
            problems.push(format!(
                "host {host:?}: not a DNS name (a wildcard must be a whole first label, like *.example.com)"
            ));
        }
        for path in rule.http.iter().flat_map(|h| h.paths.iter()) {
            let p = path.path.as_deref().unwrap_or("/");
            match PathKind::parse(Some(path.path_type.as_str())) {
                None => problems.push(format!("path {p:?}: unknown pathType {:?}", path.path_type)),
                Some(PathKind::Exact | PathKind::Prefix) if !regex && !strict_path_ok(p) => {
                    problems.push(format!(
                        "path {p:?}: Exact and Prefix paths may only contain letters, digits and . _ - /; use ImplementationSpecific"
                    ))
                }
                Some(_) if regex => {
                    if let Err(e) = regexes.compile(&path_pattern(p)) {
                        problems.push(format!("path {p:?} is not a valid regular expression: {e}"));
                    }
                }
                Some(_) if !p.starts_with('/') => problems.push(format!("path {p:?} must start with /")),
                Some(_) => {}
            }
            if path.backend.service.is_none() {
                problems.push(format!("path {p:?}: only Service backends are supported"));
            }
        }
    }
    match annotations {
        Some(a) if problems.is_empty() => Ok(Arc::new(a)),
        _ => Err(problems),
    }
}

impl Builder {
    /// Our Ingresses with their annotations, oldest first (the oldest wins a conflict, as
    /// upstream). An invalid Ingress is reported and its last valid version used, if any.
    pub(super) fn ingresses(
        &mut self,
        inputs: &Inputs,
        problems: &mut Vec<Problem>,
    ) -> Vec<(Arc<Ingress>, Arc<Annotations>)> {
        let classes: Vec<&IngressClass> = inputs.classes.iter().map(Arc::as_ref).collect();
        let mut current_keys = HashSet::new();
        let mut effective: Vec<(Arc<Ingress>, Arc<Annotations>)> = Vec::new();
        for ing in &inputs.ingresses {
            if !self.opts.class.accepts(ing, classes.iter().copied()) {
                continue;
            }
            let key = key_of(ing.as_ref());
            current_keys.insert(key.clone());
            match validate_cached(ing, &mut self.regexes) {
                Ok(ann) => {
                    self.last_good_ingress.insert(key, ing.clone());
                    effective.push((ing.clone(), ann));
                }
                Err(errs) => {
                    let kept = self.last_good_ingress.get(&key).cloned();
                    let suffix = if kept.is_some() {
                        "; its last valid version stays in effect"
                    } else {
                        "; it is not served"
                    };
                    self.report(
                        problems,
                        ing.as_ref(),
                        "InvalidIngress",
                        format!("{}{suffix}", errs.join("; ")),
                    );
                    if let Some(old) = kept
                        && let Ok(ann) = validate_cached(&old, &mut self.regexes)
                    {
                        effective.push((old, ann));
                    }
                }
            }
        }
        // Deleted Ingresses (and those no longer of our class) keep no last good version.
        self.last_good_ingress
            .retain(|k, _| current_keys.contains(k));
        effective.sort_by(|(a, _), (b, _)| {
            let ta = a.metadata.creation_timestamp.as_ref().map(|t| t.0);
            let tb = b.metadata.creation_timestamp.as_ref().map(|t| t.0);
            ta.cmp(&tb)
                .then_with(|| key_of(a.as_ref()).cmp(&key_of(b.as_ref())))
        });
        effective
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::tests::{class, ingress, inputs};
    use super::super::{Builder, Options};

    /// A use-regex Ingress with one rule per path.
    fn regex_ingress(paths: &[&str]) -> serde_json::Value {
        let mut ing = ingress(
            "web",
            json!({"nginx.ingress.kubernetes.io/use-regex": "true"}),
        );
        let path = |p: &str| {
            json!({"path": p, "pathType": "ImplementationSpecific",
                                    "backend": {"service": {"name": "web", "port": {"number": 80}}}})
        };
        let paths: Vec<_> = paths.iter().map(|p| path(p)).collect();
        ing["spec"]["rules"][0]["http"]["paths"] = json!(paths);
        ing
    }

    /// Validation and the router share one compiled regex per pattern, kept across builds
    /// while some build uses it.
    #[test]
    fn regexes_are_compiled_once_across_builds() {
        let fake = crate::tls_store::fake_certificate().expect("fake");
        let mut builder = Builder::new(Options::default(), fake);
        let first = inputs(json!([class(), regex_ingress(&["/a/(.*)", "/b"])]));
        builder.build(&first);
        assert_eq!(
            builder.regexes.compilations(),
            2,
            "validation and router share"
        );
        builder.build(&first);
        assert_eq!(builder.regexes.compilations(), 2, "nothing compiled again");

        let changed = inputs(json!([class(), regex_ingress(&["/a/(.*)", "/c"])]));
        let built = builder.build(&changed);
        assert_eq!(builder.regexes.compilations(), 3, "only the new path");
        assert_eq!(builder.regexes.len(), 2, "/b dropped");
        assert!(matches!(
            built.snapshot.router.lookup("a.example", "/A/x"),
            crate::path_rules::Match::Rule(r, _) if r.path == "/a/(.*)"
        ));

        builder.build(&inputs(json!([class()])));
        assert!(
            builder.regexes.is_empty(),
            "deleted Ingress: no patterns kept"
        );
    }
}
