//! Volume names and directories as upstream makes them: PV `pvc-<claim uid>`, directory
//! `<pvName>_<namespace>_<claim>` or the StorageClass `pathPattern` (a Go template; the subset
//! upstream documents is rendered here, anything else is refused with a clear error).

use std::collections::BTreeMap;

use thiserror::Error;

use crate::config::clean;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("pathPattern {0:?}: unterminated {{{{")]
    Unterminated(String),
    #[error(
        "pathPattern: unsupported template action {0:?} (supported: .PVName, .PVC.Namespace, .PVC.Name, .PVC.Labels.<key>, .PVC.Annotations.<key>, index .PVC.Labels|.PVC.Annotations \"<key>\")"
    )]
    Unsupported(String),
    #[error("pathPattern: the claim has no {kind} {key:?}")]
    MissingKey { kind: &'static str, key: String },
    #[error(
        "pathPattern renders {0:?}, which must start with \"<namespace>/<claim name>/\" (set allowUnsafePathPattern to lift this)"
    )]
    NotUnderClaim(String),
    #[error("folder path contains invalid references: {0}")]
    NotLocal(String),
}

/// `pvc-<uid>`: the external-provisioner library's name for a claim's volume.
pub fn pv_name(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

/// What a pattern may refer to.
pub struct ClaimMeta<'a> {
    pub pv_name: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub annotations: &'a BTreeMap<String, String>,
}

/// The volume's directory relative to its base path.
pub fn folder(
    meta: &ClaimMeta<'_>,
    pattern: Option<&str>,
    allow_unsafe: bool,
) -> Result<String, PatternError> {
    let Some(pattern) = pattern else {
        return Ok(format!("{}_{}_{}", meta.pv_name, meta.namespace, meta.name));
    };
    let rendered = render(pattern, meta)?;
    // Checked on the cleaned path: `ns/name/..` must not pass as "below the claim" and then
    // clean to `ns`, the parent of every sibling claim's directory.
    if !is_local(&rendered) {
        return Err(PatternError::NotLocal(rendered));
    }
    let cleaned = clean(&rendered);
    if cleaned.split('/').any(|c| c == "..") {
        return Err(PatternError::NotLocal(rendered));
    }
    if !allow_unsafe {
        let prefix = format!("{}/{}/", meta.namespace, meta.name);
        if !cleaned.starts_with(&prefix) || cleaned.len() == prefix.len() {
            return Err(PatternError::NotUnderClaim(rendered));
        }
    }
    Ok(cleaned)
}

/// Go's `filepath.IsLocal` on Unix: non-empty, relative, and never leaving its directory.
pub fn is_local(path: &str) -> bool {
    if path.is_empty() || path.starts_with('/') {
        return false;
    }
    let c = clean(path);
    c != ".." && !c.starts_with("../")
}

fn render(pattern: &str, meta: &ClaimMeta<'_>) -> Result<String, PatternError> {
    let mut out = String::new();
    let mut rest = pattern;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find("}}")
            .ok_or_else(|| PatternError::Unterminated(pattern.to_string()))?;
        out.push_str(&action(after[..end].trim(), meta)?);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

fn action(act: &str, meta: &ClaimMeta<'_>) -> Result<String, PatternError> {
    let unsupported = || PatternError::Unsupported(act.to_string());
    let lookup = |kind: &'static str, key: &str| {
        let map = if kind == "label" {
            meta.labels
        } else {
            meta.annotations
        };
        map.get(key).cloned().ok_or(PatternError::MissingKey {
            kind,
            key: key.to_string(),
        })
    };
    match act {
        ".PVName" => return Ok(meta.pv_name.to_string()),
        ".PVC.Namespace" => return Ok(meta.namespace.to_string()),
        ".PVC.Name" => return Ok(meta.name.to_string()),
        _ => {}
    }
    if let Some(key) = act.strip_prefix(".PVC.Labels.") {
        return lookup("label", key);
    }
    if let Some(key) = act.strip_prefix(".PVC.Annotations.") {
        return lookup("annotation", key);
    }
    if let Some(args) = act.strip_prefix("index ") {
        let mut it = args.split_whitespace();
        let (map, key) = (it.next(), it.next());
        let key = key
            .and_then(|k| k.strip_prefix('"')?.strip_suffix('"'))
            .ok_or_else(unsupported)?;
        if it.next().is_some() {
            return Err(unsupported());
        }
        return match map {
            Some(".PVC.Labels") => lookup("label", key),
            Some(".PVC.Annotations") => lookup("annotation", key),
            _ => Err(unsupported()),
        };
    }
    Err(unsupported())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta<'a>(labels: &'a BTreeMap<String, String>) -> ClaimMeta<'a> {
        ClaimMeta {
            pv_name: "pvc-123",
            namespace: "db",
            name: "data",
            labels,
            annotations: labels,
        }
    }

    #[test]
    fn default_folder() {
        let l = BTreeMap::new();
        assert_eq!(folder(&meta(&l), None, false).unwrap(), "pvc-123_db_data");
    }

    #[test]
    fn pattern_subset() {
        let mut l = BTreeMap::new();
        l.insert("app".to_string(), "pg".to_string());
        l.insert("a/b".to_string(), "x".to_string());
        let m = meta(&l);
        assert_eq!(
            folder(
                &m,
                Some("{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{.PVName}}-{{ .PVC.Labels.app }}"),
                false
            )
            .unwrap(),
            "db/data/pvc-123-pg"
        );
        assert_eq!(
            folder(
                &m,
                Some("{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ index .PVC.Annotations \"a/b\" }}"),
                false
            )
            .unwrap(),
            "db/data/x"
        );
        assert!(matches!(
            folder(
                &m,
                Some("{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ printf \"x\" }}"),
                false
            ),
            Err(PatternError::Unsupported(_))
        ));
        assert!(matches!(
            folder(
                &m,
                Some("{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ .PVC.Labels.none }}"),
                false
            ),
            Err(PatternError::MissingKey { .. })
        ));
        assert!(matches!(
            folder(&m, Some("{{ .PVC.Namespace "), false),
            Err(PatternError::Unterminated(_))
        ));
    }

    #[test]
    fn traversal_refused() {
        let l = BTreeMap::new();
        let m = meta(&l);
        assert!(matches!(
            folder(&m, Some("../../etc"), false),
            Err(PatternError::NotLocal(_))
        ));
        assert!(matches!(
            folder(
                &m,
                Some("{{ .PVC.Namespace }}/{{ .PVC.Name }}/../../../etc"),
                false
            ),
            Err(PatternError::NotLocal(_))
        ));
        assert!(matches!(
            folder(&m, Some("{{ .PVName }}"), false),
            Err(PatternError::NotUnderClaim(_))
        ));
        assert_eq!(folder(&m, Some("{{ .PVName }}"), true).unwrap(), "pvc-123");
        assert!(matches!(
            folder(&m, Some("../x"), true),
            Err(PatternError::NotLocal(_))
        ));
    }

    #[test]
    fn pattern_cannot_reach_a_sibling_claim() {
        let mut l = BTreeMap::new();
        let pat = "{{ .PVC.Namespace }}/{{ .PVC.Name }}/{{ .PVC.Labels.x }}";
        for bad in ["..", ".", "../other", "a/../..", ""] {
            l.insert("x".to_string(), bad.to_string());
            assert!(
                matches!(
                    folder(&meta(&l), Some(pat), false),
                    Err(PatternError::NotUnderClaim(_))
                ),
                "label x={bad:?} must be refused"
            );
        }
        l.insert("x".to_string(), "a/../b/".to_string());
        assert_eq!(folder(&meta(&l), Some(pat), false).unwrap(), "db/data/b");
    }

    #[test]
    fn is_local_like_go() {
        assert!(is_local("a/b"));
        assert!(is_local("a/../b"));
        assert!(!is_local("a/../../b"));
        assert!(!is_local("/a"));
        assert!(!is_local(""));
        assert!(!is_local(".."));
    }
}
