//! The `flannel` CNI plugin (upstream flannel-io/cni-plugin): reads subnet.env, builds the
//! delegate config (bridge + host-local), saves it under `<dataDir>/<containerID>` and runs the
//! delegate from `CNI_PATH`. A small hand-written layer rather than rscni-plugin: the plugin's
//! real work is passing bytes to and from the delegate, which no CNI crate provides, and this
//! keeps the binary free of an async runtime and quick to start.

pub mod conf;
pub mod delegate;
pub mod error;
pub mod version;

use std::collections::HashMap;

use serde_json::{Value, json};

use conf::NetConf;
use error::{CniError, code};

use crate::subnet_env::{SubnetEnv, SubnetEnvError};

/// What one invocation produced: bytes for stdout (may be empty).
pub type Output = Vec<u8>;

/// The `CNI_*` environment of one call.
pub struct Env {
    vars: HashMap<String, String>,
}

impl Env {
    pub fn from_process() -> Env {
        Env {
            vars: std::env::vars()
                .filter(|(k, _)| k.starts_with("CNI_"))
                .collect(),
        }
    }

    pub fn from_pairs(pairs: &[(&str, &str)]) -> Env {
        Env {
            vars: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.vars
            .get(k)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    fn require(&self, k: &str) -> Result<&str, CniError> {
        self.get(k).ok_or_else(|| {
            CniError::new(
                code::INVALID_ENV,
                format!("required environment variable {k} is missing"),
            )
        })
    }

    fn cni_path(&self) -> &str {
        self.get("CNI_PATH").unwrap_or("")
    }
}

/// Runs one call; `Err` carries the version the error reply is labelled with.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Output, (String, CniError)> {
    let label = conf::sniff_version(stdin)
        .filter(|v| version::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| version::LATEST.to_string());
    dispatch(env, stdin).map_err(|e| (label, e))
}

fn dispatch(env: &Env, stdin: &[u8]) -> Result<Output, CniError> {
    let command = env.require("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(version_reply(stdin));
    }
    let n = conf::parse(stdin)?;
    match command {
        "ADD" => cmd_add(env, &n),
        "DEL" => cmd_del(env, &n),
        "CHECK" => {
            version::check_floor(&n.cni_version, "CHECK", "0.4.0")?;
            env.require("CNI_CONTAINERID")?;
            env.require("CNI_IFNAME")?;
            // Upstream's CHECK is a no-op; the saved config must at least exist.
            let id = env.require("CNI_CONTAINERID")?;
            delegate::check_container_id(id)?;
            match delegate::load(&n.data_dir, id)? {
                Some(_) => Ok(Vec::new()),
                None => Err(CniError::new(
                    3,
                    format!("no network set up by flannel for container {id}"),
                )),
            }
        }
        "STATUS" => {
            version::check_floor(&n.cni_version, "STATUS", "1.1.0")?;
            read_env(&n)
                .map(|_| Vec::new())
                .map_err(|e| CniError::new(code::NOT_AVAILABLE, e.msg).with_details(e.details))
        }
        "GC" => cmd_gc(env, &n),
        other => Err(CniError::new(
            code::INVALID_ENV,
            format!("unknown CNI_COMMAND {other:?}"),
        )),
    }
}

fn version_reply(stdin: &[u8]) -> Output {
    let v = conf::sniff_version(stdin).unwrap_or_else(|| version::LATEST.to_string());
    json!({ "cniVersion": v, "supportedVersions": version::SUPPORTED })
        .to_string()
        .into_bytes()
}

/// subnet.env missing means flanneld is not up yet: "try again later" (11).
fn read_env(n: &NetConf) -> Result<SubnetEnv, CniError> {
    SubnetEnv::read(std::path::Path::new(&n.subnet_file)).map_err(|e| match e {
        SubnetEnvError::Io { ref source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            CniError::new(
                code::TRY_AGAIN_LATER,
                format!(
                    "{} not found: flanneld is not running on this node yet",
                    n.subnet_file
                ),
            )
        }
        other => CniError::new(code::IO, "reading subnet.env").with_details(other.to_string()),
    })
}

fn cmd_add(env: &Env, n: &NetConf) -> Result<Output, CniError> {
    let id = env.require("CNI_CONTAINERID")?;
    delegate::check_container_id(id)?;
    env.require("CNI_NETNS")?;
    env.require("CNI_IFNAME")?;
    let (dtype, bytes) = delegate_for(n)?;
    delegate::find(&dtype, env.cni_path())?;
    delegate::save(&n.data_dir, id, &bytes)?;
    match delegate::exec(&dtype, "ADD", &bytes, env.cni_path(), &[]) {
        Ok(out) => Ok(relabel(out, &n.cni_version)),
        Err(e) => {
            // Leave nothing half set up: undo what the delegate may have done, forget the config.
            if delegate::exec(&dtype, "DEL", &bytes, env.cni_path(), &[]).is_ok() {
                let _ = delegate::remove(&n.data_dir, id);
            }
            Err(e)
        }
    }
}

/// The delegate's type and config, as ADD saves it, from the conf and the current subnet.env.
fn delegate_for(n: &NetConf) -> Result<(String, Vec<u8>), CniError> {
    let senv = read_env(n)?;
    let dconf = conf::delegate_config(n, &senv);
    let dtype = dconf
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("bridge")
        .to_string();
    Ok((dtype, dconf.to_string().into_bytes()))
}

/// A delegate result labelled with the version the runtime asked for (1.1.0 runs as 1.0.0).
fn relabel(out: Vec<u8>, wanted: &str) -> Output {
    if conf::delegate_version(wanted) == wanted {
        return out;
    }
    match serde_json::from_slice::<Value>(&out) {
        Ok(mut v) if v.is_object() => {
            v["cniVersion"] = wanted.into();
            v.to_string().into_bytes()
        }
        _ => out,
    }
}

fn cmd_del(env: &Env, n: &NetConf) -> Result<Output, CniError> {
    let id = env.require("CNI_CONTAINERID")?;
    delegate::check_container_id(id)?;
    env.require("CNI_IFNAME")?;
    del_saved(env, n, id, &[])
}

/// Replays a saved config's DEL; a missing one is success. The file goes only on success.
fn del_saved(env: &Env, n: &NetConf, id: &str, extra: &[(&str, &str)]) -> Result<Output, CniError> {
    let Some(saved) = delegate::load(&n.data_dir, id)? else {
        return Ok(Vec::new());
    };
    let (dtype, conf) = match delegate::saved_type(&saved) {
        Ok(t) => (t, saved),
        // Empty or cut (a power loss soon after ADD: the save is not fsynced): the config ADD
        // would save now, so the delegate still releases the address and the interface.
        Err(e) if e.code == code::DECODE => delegate_for(n).map_err(|env_err| {
            let details = format!("{}; {}: {}", env_err.details, e.msg, e.details);
            env_err.with_details(details)
        })?,
        Err(e) => return Err(e),
    };
    delegate::exec(&dtype, "DEL", &conf, env.cni_path(), extra)?;
    delegate::remove(&n.data_dir, id)?;
    Ok(Vec::new())
}

/// GC (1.1.0): every saved config whose container is not among `cni.dev/valid-attachments` is
/// released through the delegate's DEL.
fn cmd_gc(env: &Env, n: &NetConf) -> Result<Output, CniError> {
    version::check_floor(&n.cni_version, "GC", "1.1.0")?;
    let valid: Vec<(String, String)> = match n.raw.get("cni.dev/valid-attachments") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| {
                Some((
                    x.get("containerID")?.as_str()?.to_string(),
                    x.get("ifname")?.as_str()?.to_string(),
                ))
            })
            .collect(),
        Some(_) => {
            return Err(CniError::new(
                code::INVALID_CONFIG,
                "cni.dev/valid-attachments must be a list",
            ));
        }
    };
    let mut first_err = None;
    for id in delegate::saved_ids(&n.data_dir) {
        if valid.iter().any(|(c, _)| *c == id) {
            continue;
        }
        let extra = [("CNI_CONTAINERID", id.as_str()), ("CNI_IFNAME", "eth0")];
        if let Err(e) = del_saved(env, n, &id, &extra) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(Vec::new()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_needs_no_config() {
        let out = run(&Env::from_pairs(&[("CNI_COMMAND", "VERSION")]), b"").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 7);
    }

    #[test]
    fn missing_subnet_env_is_try_again_later() {
        let d = tempfile::tempdir().unwrap();
        let conf = json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
            "subnetFile": d.path().join("none.env"), "dataDir": d.path()});
        let env = Env::from_pairs(&[
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let (label, e) = run(&env, conf.to_string().as_bytes()).unwrap_err();
        assert_eq!((label.as_str(), e.code), ("0.3.1", code::TRY_AGAIN_LATER));
        // Nothing saved for a call that did nothing.
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    #[test]
    fn del_without_saved_config_succeeds_and_env_is_checked() {
        let d = tempfile::tempdir().unwrap();
        let conf = json!({"cniVersion":"1.0.0","name":"cbr0","dataDir": d.path()}).to_string();
        let ok = Env::from_pairs(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        assert_eq!(run(&ok, conf.as_bytes()).unwrap(), b"");
        let no_id = Env::from_pairs(&[("CNI_COMMAND", "DEL"), ("CNI_IFNAME", "eth0")]);
        assert_eq!(
            run(&no_id, conf.as_bytes()).unwrap_err().1.code,
            code::INVALID_ENV
        );
        let check = Env::from_pairs(&[
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
        ]);
        let old = json!({"cniVersion":"0.3.1","name":"cbr0"}).to_string();
        assert_eq!(
            run(&check, old.as_bytes()).unwrap_err().1.code,
            code::INCOMPATIBLE_VERSION
        );
        let gc = Env::from_pairs(&[("CNI_COMMAND", "GC")]);
        assert_eq!(
            run(&gc, conf.as_bytes()).unwrap_err().1.code,
            code::INCOMPATIBLE_VERSION
        );
    }

    #[test]
    fn del_of_an_empty_saved_config_runs_the_current_one() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("bin");
        let data = d.path().join("data");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        let bridge = bin.join("bridge");
        std::fs::write(&bridge, "#!/bin/sh\ncat > \"$(dirname \"$0\")/stdin\"\n").unwrap();
        std::fs::set_permissions(&bridge, std::fs::Permissions::from_mode(0o755)).unwrap();
        let senv = d.path().join("subnet.env");
        std::fs::write(
            &senv,
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
        )
        .unwrap();
        std::fs::write(data.join("c1"), b"").unwrap();
        let conf = json!({"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
            "subnetFile": senv, "dataDir": data});
        let env = Env::from_pairs(&[
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", bin.to_str().unwrap()),
        ]);
        assert_eq!(run(&env, conf.to_string().as_bytes()).unwrap(), b"");
        let sent: Value =
            serde_json::from_slice(&std::fs::read(bin.join("stdin")).unwrap()).unwrap();
        assert_eq!(sent["type"], "bridge");
        assert_eq!(sent["ipam"]["type"], "host-local");
        assert!(!data.join("c1").exists());
    }
}
