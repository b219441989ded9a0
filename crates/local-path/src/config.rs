//! `config.json` and the other keys of ConfigMap `local-path-config`, parsed and canonicalised
//! with upstream's rules (`provisioner.go` `canonicalizeConfig`), so a config upstream accepts is
//! accepted here and one it refuses is refused with a message naming the problem.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;

/// The fallback entry of `nodePathMap`.
pub const DEFAULT_NODE: &str = "DEFAULT_PATH_FOR_NON_LISTED_NODES";
/// upstream's `cmdTimeoutSeconds` default.
pub const DEFAULT_CMD_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("config.json is not valid JSON for this schema: {0}")]
    Json(String),
    #[error("ConfigMap has no key {0:?}")]
    MissingKey(&'static str),
    #[error("path {path:?} of node {node:?} must be absolute")]
    RelativePath { node: String, path: String },
    #[error("path {path:?} of node {node:?}: the root directory cannot be used")]
    RootPath { node: String, path: String },
    #[error("duplicate path {path:?} on node {node:?}")]
    DuplicatePath { node: String, path: String },
    #[error("duplicate node {0:?} in nodePathMap")]
    DuplicateNode(String),
    #[error("sharedFileSystemPath {0:?} must be an absolute path other than /")]
    BadSharedPath(String),
    #[error(
        "{0}: nodePathMap must be empty when sharedFileSystemPath or storageClassConfigs is set"
    )]
    Exclusive(String),
    #[error("storage class {0:?}: nodePathMap and sharedFileSystemPath are mutually exclusive")]
    ClassExclusive(String),
    #[error("cmdTimeoutSeconds must be positive")]
    BadTimeout,
}

/// Where volumes of one class (or of the top level) go.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathConfig {
    /// node name → base paths (BTreeSet: canonical, ordered, no duplicates).
    pub node_paths: BTreeMap<String, BTreeSet<String>>,
    pub shared_fs_path: Option<String>,
}

/// Everything the provisioner needs from `local-path-config`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub cmd_timeout: Duration,
    pub setup_command: Option<String>,
    pub teardown_command: Option<String>,
    pub top: PathConfig,
    pub classes: BTreeMap<String, PathConfig>,
    pub setup_script: String,
    pub teardown_script: String,
    pub helper_pod_yaml: Option<String>,
}

/// The part of the config that applies to one StorageClass.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement<'a> {
    /// `sharedFileSystemPath`: any node, no affinity.
    Shared(&'a str),
    /// Candidate base paths on the node (at least one).
    Local(Vec<&'a str>),
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("BUG: Got request for unexpected storage class {0}")]
    UnknownClass(String),
    #[error("config doesn't contain node {0}, and no {DEFAULT_NODE} available")]
    NoNode(String),
    #[error("no local path available on node {0}")]
    NoPaths(String),
    #[error("config doesn't contain path {path} on node {node}")]
    PathNotOnNode { node: String, path: String },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawConfig {
    #[serde(default)]
    node_path_map: Vec<RawNodePaths>,
    #[serde(default)]
    shared_file_system_path: String,
    #[serde(default)]
    storage_class_configs: BTreeMap<String, RawClass>,
    #[serde(default)]
    cmd_timeout_seconds: Option<i64>,
    #[serde(default)]
    setup_command: String,
    #[serde(default)]
    teardown_command: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawClass {
    #[serde(default)]
    node_path_map: Vec<RawNodePaths>,
    #[serde(default)]
    shared_file_system_path: String,
}

#[derive(Deserialize)]
struct RawNodePaths {
    #[serde(default)]
    node: String,
    #[serde(default)]
    paths: Vec<String>,
}

impl Config {
    /// Parses the ConfigMap's data (`config.json`, `setup`, `teardown`, `helperPod.yaml`).
    pub fn from_configmap_data(data: &BTreeMap<String, String>) -> Result<Config, ConfigError> {
        let json = data
            .get("config.json")
            .ok_or(ConfigError::MissingKey("config.json"))?;
        let mut cfg = Config::parse_json(json)?;
        cfg.setup_script = data.get("setup").cloned().unwrap_or_default();
        cfg.teardown_script = data.get("teardown").cloned().unwrap_or_default();
        cfg.helper_pod_yaml = data.get("helperPod.yaml").cloned();
        if cfg.setup_command.is_none() && cfg.setup_script.trim().is_empty() {
            return Err(ConfigError::MissingKey("setup"));
        }
        if cfg.teardown_command.is_none() && cfg.teardown_script.trim().is_empty() {
            return Err(ConfigError::MissingKey("teardown"));
        }
        Ok(cfg)
    }

    /// Parses and canonicalises `config.json` alone (scripts left empty).
    pub fn parse_json(json: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig =
            serde_json::from_str(json).map_err(|e| ConfigError::Json(e.to_string()))?;
        let top = canonical_paths(&raw.node_path_map, &raw.shared_file_system_path)?;
        if (top.shared_fs_path.is_some() || !raw.storage_class_configs.is_empty())
            && !top.node_paths.is_empty()
        {
            return Err(ConfigError::Exclusive("top level".into()));
        }
        let mut classes = BTreeMap::new();
        for (name, class) in &raw.storage_class_configs {
            let pc = canonical_paths(&class.node_path_map, &class.shared_file_system_path)?;
            if pc.shared_fs_path.is_some() && !pc.node_paths.is_empty() {
                return Err(ConfigError::ClassExclusive(name.clone()));
            }
            classes.insert(name.clone(), pc);
        }
        let cmd_timeout = match raw.cmd_timeout_seconds {
            None | Some(0) => DEFAULT_CMD_TIMEOUT,
            Some(s) if s < 0 => return Err(ConfigError::BadTimeout),
            Some(s) => Duration::from_secs(s.unsigned_abs()),
        };
        let non_empty = |s: String| (!s.trim().is_empty()).then_some(s);
        Ok(Config {
            cmd_timeout,
            setup_command: non_empty(raw.setup_command),
            teardown_command: non_empty(raw.teardown_command),
            top,
            classes,
            setup_script: String::new(),
            teardown_script: String::new(),
            helper_pod_yaml: None,
        })
    }

    /// The path configuration for `class` (per-class when `storageClassConfigs` is used).
    pub fn for_class(&self, class: &str) -> Result<&PathConfig, PlacementError> {
        if self.classes.is_empty() {
            return Ok(&self.top);
        }
        self.classes
            .get(class)
            .ok_or_else(|| PlacementError::UnknownClass(class.to_string()))
    }
}

impl PathConfig {
    /// Where a volume of this class may go on `node`, honouring a `nodePath` pin.
    pub fn placement(
        &self,
        node: &str,
        node_path: Option<&str>,
    ) -> Result<Placement<'_>, PlacementError> {
        if let Some(shared) = &self.shared_fs_path {
            return Ok(Placement::Shared(shared));
        }
        let paths = self
            .node_paths
            .get(node)
            .or_else(|| self.node_paths.get(DEFAULT_NODE))
            .ok_or_else(|| PlacementError::NoNode(node.to_string()))?;
        if paths.is_empty() {
            return Err(PlacementError::NoPaths(node.to_string()));
        }
        match node_path {
            Some(pin) if !pin.is_empty() => {
                let pin = clean(pin);
                paths
                    .get(&pin)
                    .map(|p| Placement::Local(vec![p.as_str()]))
                    .ok_or(PlacementError::PathNotOnNode {
                        node: node.to_string(),
                        path: pin,
                    })
            }
            _ => Ok(Placement::Local(paths.iter().map(String::as_str).collect())),
        }
    }

    /// Every base path configured for `node` (for the agent's usage and orphan scans).
    pub fn paths_on(&self, node: &str) -> Vec<String> {
        if let Some(shared) = &self.shared_fs_path {
            return vec![shared.clone()];
        }
        self.node_paths
            .get(node)
            .or_else(|| self.node_paths.get(DEFAULT_NODE))
            .map(|p| p.iter().cloned().collect())
            .unwrap_or_default()
    }
}

impl Config {
    /// Base paths on `node` across every class (deduplicated).
    pub fn all_paths_on(&self, node: &str) -> Vec<String> {
        let mut all: BTreeSet<String> = self.top.paths_on(node).into_iter().collect();
        for class in self.classes.values() {
            all.extend(class.paths_on(node));
        }
        all.into_iter().collect()
    }
}

fn canonical_paths(entries: &[RawNodePaths], shared: &str) -> Result<PathConfig, ConfigError> {
    let mut node_paths = BTreeMap::new();
    for entry in entries {
        let mut set = BTreeSet::new();
        for p in &entry.paths {
            let path = canonical(&entry.node, p)?;
            if !set.insert(path.clone()) {
                return Err(ConfigError::DuplicatePath {
                    node: entry.node.clone(),
                    path,
                });
            }
        }
        if node_paths.insert(entry.node.clone(), set).is_some() {
            return Err(ConfigError::DuplicateNode(entry.node.clone()));
        }
    }
    let shared_fs_path = if shared.is_empty() {
        None
    } else {
        let c = clean(shared);
        if !shared.starts_with('/') || c == "/" {
            return Err(ConfigError::BadSharedPath(shared.to_string()));
        }
        Some(c)
    };
    Ok(PathConfig {
        node_paths,
        shared_fs_path,
    })
}

fn canonical(node: &str, path: &str) -> Result<String, ConfigError> {
    if !path.starts_with('/') {
        return Err(ConfigError::RelativePath {
            node: node.into(),
            path: path.into(),
        });
    }
    let c = clean(path);
    if c == "/" {
        return Err(ConfigError::RootPath {
            node: node.into(),
            path: path.into(),
        });
    }
    Ok(c)
}

/// Go's `filepath.Clean` for absolute and relative paths (lexical: `.`, `..`, duplicate `/`).
pub fn clean(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => parts.push(s.to_str().unwrap_or_default()),
            Component::ParentDir => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// `dir`, cleaned, is strictly below `base`: `base/../etc` and `base` itself are not.
pub fn strictly_below(dir: &str, base: &str) -> bool {
    let (dir, base) = (clean(dir), clean(base));
    let base = base.trim_end_matches('/');
    dir.strip_prefix(base)
        .is_some_and(|r| r.starts_with('/') && r.len() > 1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn below_is_strict() {
        use super::strictly_below as below;
        assert!(below("/a/b", "/a"));
        assert!(below("/a/b/../c", "/a/"));
        assert!(!below("/a", "/a"));
        assert!(!below("/a/..", "/a"));
        assert!(!below("/a/../../etc", "/a"));
        assert!(!below("/ab", "/a"));
        assert!(below("/x", "/"));
        assert!(!below("/", "/"));
    }

    use super::*;

    #[test]
    fn upstream_default_parses() {
        let c = Config::parse_json(
            r#"{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["/opt/local-path-provisioner"]}]}"#,
        )
        .unwrap();
        assert_eq!(c.cmd_timeout, DEFAULT_CMD_TIMEOUT);
        assert_eq!(
            c.for_class("local-path")
                .unwrap()
                .placement("any", None)
                .unwrap(),
            Placement::Local(vec!["/opt/local-path-provisioner"])
        );
    }

    #[test]
    fn canonicalisation_rules() {
        let bad = |j: &str| Config::parse_json(j).unwrap_err();
        assert!(matches!(
            bad(r#"{"nodePathMap":[{"node":"a","paths":["rel"]}]}"#),
            ConfigError::RelativePath { .. }
        ));
        assert!(matches!(
            bad(r#"{"nodePathMap":[{"node":"a","paths":["/x/.."]}]}"#),
            ConfigError::RootPath { .. }
        ));
        assert!(matches!(
            bad(r#"{"nodePathMap":[{"node":"a","paths":["/x","/x/"]}]}"#),
            ConfigError::DuplicatePath { .. }
        ));
        assert!(matches!(
            bad(r#"{"nodePathMap":[{"node":"a","paths":["/x"]},{"node":"a","paths":["/y"]}]}"#),
            ConfigError::DuplicateNode(_)
        ));
        assert!(matches!(
            bad(r#"{"nodePathMap":[{"node":"a","paths":["/x"]}],"sharedFileSystemPath":"/s"}"#),
            ConfigError::Exclusive(_)
        ));
        assert!(matches!(bad("{"), ConfigError::Json(_)));
        assert!(matches!(
            bad(r#"{"nodePathMap":[],"sharedFileSystemPath":"/"}"#),
            ConfigError::BadSharedPath(_)
        ));
    }

    #[test]
    fn placement_and_pinning() {
        let c = Config::parse_json(
            r#"{"nodePathMap":[{"node":"DEFAULT_PATH_FOR_NON_LISTED_NODES","paths":["/a"]},
                {"node":"n1","paths":["/b","/c"]},{"node":"n2","paths":[]}]}"#,
        )
        .unwrap();
        let top = c.for_class("x").unwrap();
        assert_eq!(
            top.placement("n1", None).unwrap(),
            Placement::Local(vec!["/b", "/c"])
        );
        assert_eq!(
            top.placement("n1", Some("/c/")).unwrap(),
            Placement::Local(vec!["/c"])
        );
        assert!(matches!(
            top.placement("n1", Some("/a")),
            Err(PlacementError::PathNotOnNode { .. })
        ));
        assert_eq!(
            top.placement("n3", None).unwrap(),
            Placement::Local(vec!["/a"])
        );
        assert_eq!(
            top.placement("n2", None),
            Err(PlacementError::NoPaths("n2".into()))
        );
    }

    #[test]
    fn class_configs_and_shared() {
        let c = Config::parse_json(
            r#"{"storageClassConfigs":{"shared":{"sharedFileSystemPath":"/nfs"},
                "local":{"nodePathMap":[{"node":"n1","paths":["/l"]}]}}}"#,
        )
        .unwrap();
        assert_eq!(
            c.for_class("shared")
                .unwrap()
                .placement("n1", None)
                .unwrap(),
            Placement::Shared("/nfs")
        );
        assert!(matches!(
            c.for_class("other"),
            Err(PlacementError::UnknownClass(_))
        ));
        assert_eq!(
            c.all_paths_on("n1"),
            vec!["/l".to_string(), "/nfs".to_string()]
        );
    }

    #[test]
    fn clean_matches_go() {
        assert_eq!(clean("/a/b/../c/"), "/a/c");
        assert_eq!(clean("/.."), "/");
        assert_eq!(clean("a/../../b"), "../b");
        assert_eq!(clean("./"), ".");
    }

    #[test]
    fn scripts_are_required_unless_commands() {
        let mut data = BTreeMap::new();
        data.insert(
            "config.json".to_string(),
            r#"{"nodePathMap":[]}"#.to_string(),
        );
        assert_eq!(
            Config::from_configmap_data(&data),
            Err(ConfigError::MissingKey("setup"))
        );
        data.insert("setup".into(), "mkdir -m 0777 -p \"$VOL_DIR\"".into());
        data.insert("teardown".into(), "rm -rf \"$VOL_DIR\"".into());
        assert!(Config::from_configmap_data(&data).is_ok());
    }
}
