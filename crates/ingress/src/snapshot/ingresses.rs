//! Ingresses phase: the Ingresses of our class, each validated (or replaced by its last good
//! version), in the order that settles conflicts.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::networking::v1::{Ingress, IngressClass};

use super::{Builder, Inputs, ObjectKey, Problem, key_of};
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
        let mut effective: Vec<(Arc<Ingress>, Arc<Annotations>)> = Vec::new();
        self.validated.start_round();
        for ing in &inputs.ingresses {
            if !self.opts.class.accepts(ing, classes.iter().copied()) {
                continue;
            }
            let (key, outcome) =
                self.validated
                    .check(ing, &mut self.regexes, &mut self.last_good_ingress);
            let (key, errs) = match outcome {
                Ok(ann) => {
                    effective.push((ing.clone(), ann.clone()));
                    continue;
                }
                Err(errs) => (key.clone(), errs.clone()),
            };
            let kept = self.last_good_ingress.get(&key).cloned();
            let suffix = if kept.is_some() {
                "; its last valid version stays in effect"
            } else {
                "; it is not served"
            };
            let message = format!("{}{suffix}", errs.join("; "));
            self.report(problems, ing.as_ref(), "InvalidIngress", message);
            if let Some(old) = kept
                && let Ok(ann) = validate_cached(&old, &mut self.regexes)
            {
                effective.push((old, ann));
            }
        }
        // Deleted Ingresses (and those no longer of our class) keep no last good version.
        self.validated.forget_unseen(&mut self.last_good_ingress);
        self.validated.sort_by_age(effective)
    }
}

type Time = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// Oldest first, then by namespace and name.
fn order_key(ing: &Ingress) -> (Option<&Time>, Option<&str>, Option<&str>) {
    let meta = &ing.metadata;
    (
        meta.creation_timestamp.as_ref(),
        meta.namespace.as_deref(),
        meta.name.as_deref(),
    )
}

/// Each Ingress object's validation, kept while the store hands out the same object: the
/// reflector replaces an object's `Arc` on every change, so an unchanged Ingress is found by
/// its address and neither parsed nor keyed again (with 10,000 Ingresses, validating and
/// keying all of them was a third of a build triggered by one edit).
#[derive(Default)]
pub(super) struct Validated {
    /// By the object's address; the entry holds the `Arc`, so the address stays its own.
    entries: HashMap<usize, Checked>,
    round: u64,
    /// Keys of the objects this build saw first.
    fresh: Vec<ObjectKey>,
}

struct Checked {
    /// Where this object was in the previous build's order, and that build.
    position: Option<(u64, usize)>,
    /// Held so that the address is not reused while the entry lives.
    _object: Arc<Ingress>,
    key: ObjectKey,
    outcome: Outcome,
    /// The last build that saw this object.
    seen: u64,
}

type Outcome = Result<Arc<Annotations>, Vec<String>>;
type Effective = (Arc<Ingress>, Arc<Annotations>);

impl Validated {
    fn start_round(&mut self) {
        self.round += 1;
        self.fresh.clear();
    }

    /// `ing`'s key and validation, computed the first time this object is seen; a valid new
    /// object becomes its key's last good version.
    fn check(
        &mut self,
        ing: &Arc<Ingress>,
        regexes: &mut RegexCache,
        last_good: &mut HashMap<ObjectKey, Arc<Ingress>>,
    ) -> (&ObjectKey, &Outcome) {
        let round = self.round;
        let fresh = &mut self.fresh;
        let entry = self
            .entries
            .entry(Arc::as_ptr(ing) as usize)
            .or_insert_with(|| {
                let key = key_of(ing.as_ref());
                let outcome = validate_cached(ing, regexes);
                if outcome.is_ok() {
                    last_good.insert(key.clone(), ing.clone());
                }
                fresh.push(key.clone());
                Checked {
                    position: None,
                    _object: ing.clone(),
                    key,
                    outcome,
                    seen: round,
                }
            });
        entry.seen = round;
        (&entry.key, &entry.outcome)
    }

    /// `effective` oldest first (then by namespace and name), as upstream settles conflicts.
    /// The objects of the previous build keep their relative order, so only new ones are
    /// compared: sorting all 10,000 each build touched every object's metadata about 14
    /// times and took most of this phase.
    fn sort_by_age(&mut self, effective: Vec<Effective>) -> Vec<Effective> {
        let previous = self.round - 1;
        let mut known = Vec::with_capacity(effective.len());
        let mut new = Vec::new();
        for item in effective {
            let position = self
                .entries
                .get(&(Arc::as_ptr(&item.0) as usize))
                .and_then(|c| c.position)
                .filter(|(round, _)| *round == previous);
            match position {
                Some((_, p)) => known.push((p, item)),
                None => new.push(item),
            }
        }
        known.sort_unstable_by_key(|(p, _)| *p);
        let known: Vec<Effective> = known.into_iter().map(|(_, item)| item).collect();
        new.sort_by(|(a, _), (b, _)| order_key(a).cmp(&order_key(b)));
        // Where each new one goes among the known (ascending, as `new` is sorted), then one
        // merge: a binary search each, no comparisons of the known among themselves.
        let at: Vec<usize> = new
            .iter()
            .map(|(ing, _)| {
                let key = order_key(ing);
                known.partition_point(|(x, _)| order_key(x) <= key)
            })
            .collect();
        let mut sorted = Vec::with_capacity(known.len() + new.len());
        let mut new = at.into_iter().zip(new).peekable();
        for (j, item) in known.into_iter().enumerate() {
            while let Some((_, n)) = new.next_if(|(p, _)| *p == j) {
                sorted.push(n);
            }
            sorted.push(item);
        }
        sorted.extend(new.map(|(_, n)| n));
        for (i, (ing, _)) in sorted.iter().enumerate() {
            if let Some(c) = self.entries.get_mut(&(Arc::as_ptr(ing) as usize)) {
                c.position = Some((self.round, i));
            }
        }
        sorted
    }

    /// Drops the objects this build did not see, and the last good version of every key no
    /// object of this build has (deleted, or no longer of our class).
    fn forget_unseen(&mut self, last_good: &mut HashMap<ObjectKey, Arc<Ingress>>) {
        let round = self.round;
        let mut gone = Vec::new();
        self.entries.retain(|_, c| {
            let keep = c.seen == round;
            if !keep {
                gone.push(c.key.clone());
            }
            keep
        });
        // A key is still present only through a new object (one object per key at a time).
        let fresh: HashSet<ObjectKey> = std::mem::take(&mut self.fresh).into_iter().collect();
        for key in gone {
            if !fresh.contains(&key) {
                last_good.remove(&key);
            }
        }
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
