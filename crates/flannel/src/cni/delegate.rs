//! Running the delegate plugin found in `CNI_PATH` (as libcni's `invoke.DelegateAdd/Del`), and
//! the saved delegate config under `<dataDir>/<containerID>` that DEL replays.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::error::{CniError, code};

/// Finds `plugin` in the `:`-separated `cni_path`.
pub fn find(plugin: &str, cni_path: &str) -> Result<PathBuf, CniError> {
    cni_path
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                code::IO,
                format!("failed to find plugin {plugin:?} in path [{cni_path}]"),
            )
        })
}

/// Runs the delegate `verb` with `conf` on stdin; its stdout on success, its own error otherwise.
pub fn exec(
    plugin: &str,
    verb: &str,
    conf: &[u8],
    cni_path: &str,
    env: &[(&str, &str)],
) -> Result<Vec<u8>, CniError> {
    let bin = find(plugin, cni_path)?;
    let mut child = Command::new(&bin)
        .env("CNI_COMMAND", verb)
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            CniError::new(code::IO, format!("running {}", bin.display()))
                .with_details(e.to_string())
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        // A delegate that exits without reading gives EPIPE; its exit status tells the story.
        let _ = stdin.write_all(conf);
    }
    let out = child.wait_with_output().map_err(|e| {
        CniError::new(code::IO, format!("waiting for {}", bin.display()))
            .with_details(e.to_string())
    })?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    Err(delegate_error(plugin, &out.stdout, &out.stderr))
}

fn delegate_error(plugin: &str, stdout: &[u8], stderr: &[u8]) -> CniError {
    let parsed: Option<Value> = serde_json::from_slice(stdout).ok();
    match parsed
        .as_ref()
        .and_then(|v| Some((v.get("code")?.as_u64()?, v)))
    {
        Some((c, v)) => CniError {
            code: u32::try_from(c).unwrap_or(code::INTERNAL),
            msg: format!(
                "{plugin}: {}",
                v.get("msg").and_then(Value::as_str).unwrap_or("failed")
            ),
            details: v
                .get("details")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        },
        None => CniError::new(code::INTERNAL, format!("{plugin} failed")).with_details(
            String::from_utf8_lossy(if stdout.is_empty() { stderr } else { stdout })
                .trim()
                .to_string(),
        ),
    }
}

/// Container IDs become file names: refuse anything that could leave the data directory.
pub fn check_container_id(id: &str) -> Result<(), CniError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(CniError::new(
            code::INVALID_ENV,
            format!("CNI_CONTAINERID {id:?} is not a valid container ID"),
        ))
    }
}

/// Saves the delegate config (mode 0600) as upstream's `saveScratchNetConf`: renamed into place,
/// not fsynced (upstream's is a plain write; an fsync is a third of the plugin's own cost on
/// every pod start). What a power loss may leave, an empty file, DEL handles (see `cmd_del`).
pub fn save(data_dir: &str, id: &str, conf: &[u8]) -> Result<(), CniError> {
    use crate::subnet_env::{Durability, write_atomic};
    write_atomic(
        &Path::new(data_dir).join(id),
        conf,
        0o600,
        Durability::Rename,
    )
    .map_err(|e| {
        CniError::new(
            code::IO,
            format!("saving the delegate config in {data_dir}"),
        )
        .with_details(e.to_string())
    })
}

/// The saved config, or `None` if there is none (DEL then succeeds, as upstream).
pub fn load(data_dir: &str, id: &str) -> Result<Option<Vec<u8>>, CniError> {
    match std::fs::read(Path::new(data_dir).join(id)) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(
            CniError::new(code::IO, format!("reading the saved config of {id}"))
                .with_details(e.to_string()),
        ),
    }
}

pub fn remove(data_dir: &str, id: &str) -> Result<(), CniError> {
    match std::fs::remove_file(Path::new(data_dir).join(id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(CniError::new(
            code::IO,
            format!("removing the saved config of {id}"),
        )
        .with_details(e.to_string())),
        _ => Ok(()),
    }
}

/// Container IDs with a saved config.
pub fn saved_ids(data_dir: &str) -> Vec<String> {
    std::fs::read_dir(data_dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| check_container_id(n).is_ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The delegate's plugin type from a saved config.
pub fn saved_type(conf: &[u8]) -> Result<String, CniError> {
    let v: Value = serde_json::from_slice(conf).map_err(|e| {
        CniError::new(code::DECODE, "the saved delegate config is not JSON")
            .with_details(e.to_string())
    })?;
    let t = v.get("type").and_then(Value::as_str).unwrap_or("bridge");
    if t.contains('/') || t.is_empty() {
        return Err(CniError::new(
            code::INVALID_CONFIG,
            format!("saved delegate type {t:?} is not a plugin name"),
        ));
    }
    Ok(t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn container_ids_cannot_escape() {
        for bad in ["", "../x", "a/b", ".hidden", "a b"] {
            assert_eq!(
                check_container_id(bad).unwrap_err().code,
                code::INVALID_ENV,
                "{bad:?}"
            );
        }
        assert!(check_container_id("3f2a9c_pod-1.x").is_ok());
    }

    #[test]
    fn delegate_errors_pass_through() {
        let e = delegate_error(
            "bridge",
            br#"{"cniVersion":"0.3.1","code":11,"msg":"busy","details":"d"}"#,
            b"",
        );
        assert_eq!(
            (e.code, e.msg.as_str(), e.details.as_str()),
            (11, "bridge: busy", "d")
        );
        let e = delegate_error("bridge", b"", b"boom");
        assert_eq!((e.code, e.details.as_str()), (code::INTERNAL, "boom"));
    }

    #[test]
    fn save_load_remove() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_str().unwrap();
        assert_eq!(load(dir, "c1").unwrap(), None);
        save(dir, "c1", b"{}").unwrap();
        assert_eq!(load(dir, "c1").unwrap().unwrap(), b"{}");
        assert_eq!(saved_ids(dir), vec!["c1".to_string()]);
        remove(dir, "c1").unwrap();
        remove(dir, "c1").unwrap();
    }
}
