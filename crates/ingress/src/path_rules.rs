//! Host and path matching exactly as ingress-nginx does it.
//!
//! - Exact: the whole path, case-sensitive; wins over any prefix of the same path.
//! - Prefix: element-wise (`/foo` matches `/foo` and `/foo/bar`, not `/foobar`); a trailing slash
//!   on the rule is ignored.
//! - ImplementationSpecific: nginx character prefix (`/foo` matches `/foobar`).
//! - Longest matching prefix wins.
//! - If any Ingress sets `use-regex` or `rewrite-target` for a host, *every* path of that host
//!   becomes a case-insensitive regex anchored at the start, tried longest path first, first
//!   match wins (ingress-nginx's `enforceRegexModifier`).
//! - Hosts: exact name, then a one-label `*.` wildcard, then the catch-all server `_` (rules
//!   without a host). A host that matches but has no matching path goes to its default backend.

use std::collections::HashMap;
use std::sync::Arc;

use regex::Regex;

use crate::FastMap;

/// Ingress `pathType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PathKind {
    Exact,
    Prefix,
    ImplementationSpecific,
}

impl PathKind {
    pub fn parse(s: Option<&str>) -> Option<PathKind> {
        match s {
            Some("Exact") => Some(PathKind::Exact),
            Some("Prefix") => Some(PathKind::Prefix),
            // ingress-nginx treats a missing pathType like ImplementationSpecific.
            Some("ImplementationSpecific") | None => Some(PathKind::ImplementationSpecific),
            Some(_) => None,
        }
    }
}

/// One path of one host, pointing at a route payload `T` (kept generic so the matcher is
/// testable and fuzzable on its own).
#[derive(Clone, Debug)]
pub struct PathRule<T> {
    pub path: String,
    pub kind: PathKind,
    pub target: T,
}

/// The paths of one host (one nginx `server`).
#[derive(Clone, Debug)]
pub struct HostRules<T> {
    exact: FastMap<String, usize>,
    /// (match prefix, element-wise?, rule index), longest first.
    prefixes: Vec<(String, bool, usize)>,
    /// Regex mode: (regex, rule index), longest path first.
    regexes: Option<Vec<(Regex, usize)>>,
    rules: Vec<PathRule<T>>,
    /// Where unmatched paths of this host go.
    pub default: Option<T>,
}

/// A path that could not be compiled in regex mode.
#[derive(Debug, thiserror::Error)]
#[error("path {path:?} is not a valid regular expression: {message}")]
pub struct BadRegex {
    pub path: String,
    pub message: String,
}

/// The regex a path becomes in regex mode: case-insensitive, anchored at the start.
pub fn path_pattern(path: &str) -> String {
    format!("(?i)^{path}")
}

/// Compiled regexes by pattern string, kept across snapshot builds: compiling is by far the
/// costliest part of matching setup, and most builds (endpoint changes) reuse every pattern.
/// Entries not asked for since the last [`RegexCache::prune`] are dropped by it, so the cache
/// holds only the patterns of the latest build.
#[derive(Debug, Default)]
pub struct RegexCache {
    /// Pattern → compile result (errors too: a bad path stays bad) and the round it was last
    /// asked for.
    entries: HashMap<String, (Result<Regex, regex::Error>, u64)>,
    round: u64,
    compilations: u64,
}

impl RegexCache {
    /// The compiled `pattern`, compiling it only if no earlier call did. Cloning a `Regex`
    /// shares its compiled program.
    pub fn compile(&mut self, pattern: &str) -> Result<Regex, regex::Error> {
        let round = self.round;
        if let Some((compiled, used)) = self.entries.get_mut(pattern) {
            *used = round;
            return compiled.clone();
        }
        self.compilations += 1;
        let compiled = Regex::new(pattern);
        self.entries
            .insert(pattern.to_owned(), (compiled.clone(), round));
        compiled
    }

    /// Drops the patterns not asked for since the previous call.
    pub fn prune(&mut self) {
        let round = self.round;
        self.entries.retain(|_, (_, used)| *used == round);
        self.round += 1;
    }

    /// How many patterns are cached.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many times a pattern was actually compiled (cache misses).
    pub fn compilations(&self) -> u64 {
        self.compilations
    }
}

impl<T> HostRules<T> {
    /// Builds the matcher. Rules earlier in `rules` win conflicts (callers order them by
    /// Ingress creationTimestamp, so the oldest Ingress wins as upstream). Rules that fail to
    /// compile in regex mode are returned as errors and left out.
    pub fn new(
        rules: Vec<PathRule<T>>,
        regex_mode: bool,
        default: Option<T>,
    ) -> (Self, Vec<BadRegex>) {
        Self::with_cache(rules, regex_mode, default, &mut RegexCache::default())
    }

    /// [`HostRules::new`], taking compiled regexes from (and adding them to) `cache`.
    pub fn with_cache(
        rules: Vec<PathRule<T>>,
        regex_mode: bool,
        default: Option<T>,
        cache: &mut RegexCache,
    ) -> (Self, Vec<BadRegex>) {
        let mut host = HostRules {
            exact: FastMap::default(),
            prefixes: Vec::new(),
            regexes: None,
            rules: Vec::new(),
            default,
        };
        // Dedupe: the same (path, kind) defined twice keeps the first (oldest).
        let mut seen = std::collections::HashSet::new();
        for rule in rules {
            if seen.insert((rule.path.clone(), rule.kind)) {
                host.rules.push(rule);
            }
        }
        if !regex_mode {
            host.index_paths();
            return (host, Vec::new());
        }
        let errors = host.compile_regexes(cache);
        (host, errors)
    }

    /// Marks this host's patterns as used in `cache` (a host kept from an earlier build
    /// compiles nothing, but its patterns must outlive the cache's pruning).
    pub fn touch(&self, cache: &mut RegexCache) {
        if self.regexes.is_some() {
            for rule in &self.rules {
                let _ = cache.compile(&path_pattern(&rule.path));
            }
        }
    }

    /// Regex mode: every path as a regex, longest path first; returns the paths that do not
    /// compile (left out).
    fn compile_regexes(&mut self, cache: &mut RegexCache) -> Vec<BadRegex> {
        let mut order: Vec<usize> = (0..self.rules.len()).collect();
        // Stable sort keeps creation order among equal lengths.
        order.sort_by_key(|&i| std::cmp::Reverse(self.rules[i].path.len()));
        let mut regexes = Vec::new();
        let mut errors = Vec::new();
        for i in order {
            let path = &self.rules[i].path;
            match cache.compile(&path_pattern(path)) {
                Ok(re) => regexes.push((re, i)),
                Err(e) => errors.push(BadRegex {
                    path: path.clone(),
                    message: e.to_string(),
                }),
            }
        }
        self.regexes = Some(regexes);
        errors
    }

    /// Plain mode: exact paths by name, prefixes longest first.
    fn index_paths(&mut self) {
        for (i, rule) in self.rules.iter().enumerate() {
            match rule.kind {
                PathKind::Exact => {
                    self.exact.entry(rule.path.clone()).or_insert(i);
                }
                PathKind::Prefix => {
                    let trimmed = rule.path.trim_end_matches('/');
                    self.prefixes.push((trimmed.to_string(), true, i));
                }
                PathKind::ImplementationSpecific => {
                    self.prefixes.push((rule.path.clone(), false, i));
                }
            }
        }
        self.prefixes
            .sort_by_key(|(p, _, _)| std::cmp::Reverse(p.len()));
    }

    /// The rule for `path` (without query), if any path matches.
    pub fn lookup(&self, path: &str) -> Option<&PathRule<T>> {
        if let Some(regexes) = &self.regexes {
            return regexes
                .iter()
                .find(|(re, _)| re.is_match(path))
                .map(|(_, i)| &self.rules[*i]);
        }
        if let Some(&i) = self.exact.get(path) {
            return Some(&self.rules[i]);
        }
        self.prefixes
            .iter()
            .find(|(prefix, element_wise, _)| {
                if *element_wise {
                    prefix_matches(prefix, path)
                } else {
                    path.starts_with(prefix.as_str())
                }
            })
            .map(|(_, _, i)| &self.rules[*i])
    }

    /// Whether this host matches paths by regex (use-regex / rewrite-target on some Ingress).
    pub fn regex_mode(&self) -> bool {
        self.regexes.is_some()
    }

    /// The compiled regex of a rule, for `rewrite-target` capture groups.
    pub fn regex_for(&self, path: &str) -> Option<&Regex> {
        self.regexes
            .as_ref()?
            .iter()
            .find(|(_, i)| self.rules[*i].path == path)
            .map(|(re, _)| re)
    }

    pub fn rules(&self) -> &[PathRule<T>] {
        &self.rules
    }
}

/// Element-wise prefix: `prefix` (no trailing slash) matches `path` if equal or followed by `/`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix.is_empty() {
        return true; // "/"
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// All servers: exact hosts, one-label wildcards, and the catch-all.
#[derive(Clone, Debug)]
pub struct Router<T> {
    hosts: FastMap<Arc<str>, Arc<HostRules<T>>>,
    /// Keyed by the suffix after `*.`.
    wildcards: FastMap<Arc<str>, Arc<HostRules<T>>>,
    catch_all: Arc<HostRules<T>>,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Match<'a, T> {
    /// A path rule matched.
    Rule(&'a PathRule<T>, &'a HostRules<T>),
    /// A server matched but no path did: its default (Ingress `spec.defaultBackend`), if any.
    HostDefault(Option<&'a T>),
}

impl<T> Router<T> {
    /// The servers are shared (host names too): a snapshot builder hands the next router
    /// the hosts that did not change.
    pub fn new(
        hosts: impl ExactSizeIterator<Item = (Arc<str>, Arc<HostRules<T>>)>,
        catch_all: Arc<HostRules<T>>,
    ) -> Self {
        let mut exact = FastMap::with_capacity_and_hasher(hosts.len(), Default::default());
        let mut wildcards = FastMap::default();
        for (host, rules) in hosts {
            match host.strip_prefix("*.") {
                Some(suffix) => {
                    wildcards.insert(suffix.into(), rules);
                }
                None => {
                    exact.insert(host, rules);
                }
            }
        }
        Router {
            hosts: exact,
            wildcards,
            catch_all,
        }
    }

    /// The server for `host` (lowercase, without port).
    pub fn server(&self, host: &str) -> &HostRules<T> {
        if let Some(rules) = self.hosts.get(host) {
            return rules;
        }
        if let Some((_, suffix)) = host.split_once('.')
            && let Some(rules) = self.wildcards.get(suffix)
        {
            return rules;
        }
        &self.catch_all
    }

    pub fn lookup(&self, host: &str, path: &str) -> Match<'_, T> {
        let server = self.server(host);
        match server.lookup(path) {
            Some(rule) => Match::Rule(rule, server),
            None => Match::HostDefault(server.default.as_ref()),
        }
    }

    /// Whether `host` has its own server (exact or wildcard).
    pub fn has_server(&self, host: &str) -> bool {
        !std::ptr::eq(self.server(host), &*self.catch_all)
    }

    pub fn hosts(&self) -> impl Iterator<Item = (&str, &HostRules<T>)> {
        self.hosts.iter().map(|(h, r)| (&**h, &**r))
    }
}

/// Normalizes a Host header / :authority: lowercase, port and trailing dot removed.
pub fn normalize_host(raw: &str) -> String {
    let host = if raw.starts_with('[') {
        // IPv6 literal: keep the brackets' content.
        raw.split(']').next().unwrap_or(raw).trim_start_matches('[')
    } else {
        raw.rsplit_once(':').map(|(h, _)| h).unwrap_or(raw)
    };
    host.trim_end_matches('.').to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(rules: &[(&str, PathKind, &'static str)], regex: bool) -> HostRules<&'static str> {
        let rules = rules
            .iter()
            .map(|(p, k, t)| PathRule {
                path: p.to_string(),
                kind: *k,
                target: *t,
            })
            .collect();
        HostRules::new(rules, regex, Some("default")).0
    }

    fn hit(h: &HostRules<&'static str>, path: &str) -> &'static str {
        h.lookup(path).map(|r| r.target).unwrap_or("default")
    }

    use PathKind::{Exact, ImplementationSpecific as Impl, Prefix};

    /// kubernetes-sigs/ingress-controller-conformance features/path_rules.feature, as a table:
    /// (rules, request path, expected backend).
    #[test]
    fn conformance_path_rules() {
        type Case<'a> = (&'a [(&'a str, PathKind, &'a str)], &'a str, &'a str);
        let cases: &[Case] = &[
            // Exact matches only the exact path, case-sensitively.
            (&[("/foo", Exact, "foo-exact")], "/foo", "foo-exact"),
            (&[("/foo", Exact, "foo-exact")], "/foo/", "default"),
            (&[("/foo", Exact, "foo-exact")], "/FOO", "default"),
            (&[("/foo/", Exact, "foo-slash")], "/foo", "default"),
            (&[("/foo/", Exact, "foo-slash")], "/foo/", "foo-slash"),
            // Prefix is element-wise; a trailing slash on either side is ignored.
            (&[("/foo", Prefix, "foo")], "/foo", "foo"),
            (&[("/foo", Prefix, "foo")], "/foo/", "foo"),
            (&[("/foo", Prefix, "foo")], "/foo/bar", "foo"),
            (&[("/foo", Prefix, "foo")], "/foobar", "default"),
            (&[("/foo", Prefix, "foo")], "/FOO", "default"),
            (&[("/foo/", Prefix, "foo")], "/foo", "foo"),
            (&[("/foo/", Prefix, "foo")], "/foo/", "foo"),
            (&[("/aaa/bb", Prefix, "bb")], "/aaa/bbb", "default"),
            (&[("/aaa/bbb", Prefix, "bbb")], "/aaa/bbb/ccc", "bbb"),
            (&[("/aaa/bbb", Prefix, "bbb")], "/aaa/bbbxyz", "default"),
            (&[("/aaa/bbb", Prefix, "bbb")], "/aaaccc", "default"),
            // Longest prefix wins.
            (
                &[
                    ("/", Prefix, "root"),
                    ("/aaa", Prefix, "aaa"),
                    ("/aaa/bbb", Prefix, "bbb"),
                ],
                "/aaa/bbb",
                "bbb",
            ),
            (
                &[
                    ("/", Prefix, "root"),
                    ("/aaa", Prefix, "aaa"),
                    ("/aaa/bbb", Prefix, "bbb"),
                ],
                "/aaa/ccc",
                "aaa",
            ),
            (
                &[
                    ("/", Prefix, "root"),
                    ("/aaa", Prefix, "aaa"),
                    ("/aaa/bbb", Prefix, "bbb"),
                ],
                "/ccc",
                "root",
            ),
            // Exact is preferred over Prefix for the same path.
            (
                &[("/foo", Prefix, "prefix"), ("/foo", Exact, "exact")],
                "/foo",
                "exact",
            ),
            (
                &[("/foo", Prefix, "prefix"), ("/foo", Exact, "exact")],
                "/foo/x",
                "prefix",
            ),
            // ImplementationSpecific is nginx character-prefix.
            (&[("/foo", Impl, "impl")], "/foobar", "impl"),
            (&[("/foo", Impl, "impl")], "/fo", "default"),
            // No match: default backend.
            (&[("/foo", Prefix, "foo")], "/bar", "default"),
        ];
        for (rules, path, want) in cases {
            assert_eq!(
                hit(&host(rules, false), path),
                *want,
                "rules {rules:?} path {path}"
            );
        }
    }

    #[test]
    fn regex_mode_is_case_insensitive_anchored_longest_first() {
        let h = host(
            &[
                ("/foo/bar/bar", Prefix, "literal"),
                ("/foo/bar/[A-Z0-9]{3}", Impl, "regex"),
            ],
            true,
        );
        // The ingress-nginx documentation example: the longer regex path wins.
        assert_eq!(hit(&h, "/foo/bar/bar"), "regex");
        assert_eq!(hit(&h, "/FOO/BAR/BAR"), "regex");
        assert_eq!(hit(&h, "/x/foo/bar/bar"), "default");
        // Exact paths become prefixes too in regex mode, as upstream.
        let h = host(&[("/exact", Exact, "e")], true);
        assert_eq!(hit(&h, "/exact/more"), "e");
        let (_, errs) = HostRules::new(
            vec![PathRule {
                path: "/(".into(),
                kind: Impl,
                target: "x",
            }],
            true,
            None,
        );
        assert_eq!(errs.len(), 1);
    }

    /// Building a regex host again compiles nothing (bad patterns included); a pattern that no
    /// build since the previous prune asked for is dropped.
    #[test]
    fn regex_cache_compiles_once_and_keeps_only_used_patterns() {
        let rules = |paths: &[&str]| -> Vec<PathRule<&'static str>> {
            paths
                .iter()
                .map(|p| PathRule {
                    path: p.to_string(),
                    kind: Impl,
                    target: "x",
                })
                .collect()
        };
        let mut cache = RegexCache::default();
        let (_, errs) = HostRules::with_cache(rules(&["/a", "/b("]), true, None, &mut cache);
        assert_eq!((cache.compilations(), errs.len()), (2, 1));
        cache.prune();
        let (h, errs) = HostRules::with_cache(rules(&["/a", "/b("]), true, None, &mut cache);
        assert_eq!((cache.compilations(), errs.len()), (2, 1), "all cached");
        assert!(h.lookup("/A/x").is_some(), "a cached regex still matches");
        cache.prune();
        HostRules::with_cache(rules(&["/a"]), true, None, &mut cache);
        cache.prune();
        assert_eq!(cache.len(), 1, "/b( was not used by the last build");
        cache.prune();
        assert!(cache.is_empty());
        HostRules::with_cache(rules(&["/a"]), true, None, &mut cache);
        assert_eq!(
            cache.compilations(),
            3,
            "a dropped pattern is compiled again"
        );
    }

    #[test]
    fn first_rule_wins_duplicates() {
        let h = host(&[("/a", Prefix, "old"), ("/a", Prefix, "new")], false);
        assert_eq!(hit(&h, "/a"), "old");
    }

    /// features/host_rules.feature.
    #[test]
    fn conformance_host_rules() {
        let hosts = vec![
            (
                Arc::from("foo.bar.com"),
                Arc::new(host(&[("/", Prefix, "foo-bar")], false)),
            ),
            (
                Arc::from("*.foo.com"),
                Arc::new(host(&[("/", Prefix, "wildcard")], false)),
            ),
        ];
        let router = Router::new(
            hosts.into_iter(),
            Arc::new(host(&[("/", Prefix, "no-host")], false)),
        );
        let target = |h: &str| match router.lookup(h, "/") {
            Match::Rule(r, _) => r.target,
            Match::HostDefault(d) => d.copied().unwrap_or("none"),
        };
        assert_eq!(target("foo.bar.com"), "foo-bar");
        assert_eq!(target("bar.foo.com"), "wildcard");
        assert_eq!(target("baz.bar.foo.com"), "no-host");
        assert_eq!(target("foo.com"), "no-host");
        assert_eq!(target("other.example"), "no-host");
        assert!(router.has_server("bar.foo.com"));
        assert!(!router.has_server("foo.com"));
    }

    #[test]
    fn host_normalization() {
        assert_eq!(normalize_host("Foo.Bar.com:8443"), "foo.bar.com");
        assert_eq!(normalize_host("foo.bar.com."), "foo.bar.com");
        assert_eq!(normalize_host("[::1]:80"), "::1");
        assert_eq!(normalize_host("example.org"), "example.org");
    }
}
