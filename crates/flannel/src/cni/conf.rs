//! The plugin's network config (stdin) and the delegate config built from it and subnet.env,
//! as upstream's `flannel.go`/`flannel_linux.go` build it.

use serde_json::{Map, Value, json};

use super::error::{CniError, code};
use super::version;
use crate::subnet_env::SubnetEnv;

pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";

/// What the runtime sent.
#[derive(Clone, Debug)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    pub subnet_file: String,
    pub data_dir: String,
    pub delegate: Map<String, Value>,
    pub ipam: Map<String, Value>,
    pub runtime_config: Option<Value>,
    /// The whole object, for verbs that need other keys (GC's valid attachments).
    pub raw: Map<String, Value>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(code::INVALID_CONFIG, msg)
}

fn opt_str(m: &Map<String, Value>, key: &str) -> Result<Option<String>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(format!("{key:?} must be a string"))),
    }
}

fn opt_obj(m: &Map<String, Value>, key: &str) -> Result<Map<String, Value>, CniError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(o)) => Ok(o.clone()),
        Some(_) => Err(invalid(format!("{key:?} must be an object"))),
    }
}

/// The `cniVersion` of raw stdin, if it is readable at all (for error replies).
pub fn sniff_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(String::from)
}

/// Parses and validates the plugin config.
pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(code::DECODE, "failed to decode the network configuration")
            .with_details(e.to_string())
    })?;
    let Value::Object(raw) = v else {
        return Err(CniError::new(
            code::DECODE,
            "the network configuration must be a JSON object",
        ));
    };
    // libcni treats a missing version as 0.1.0.
    let cni_version = opt_str(&raw, "cniVersion")?.unwrap_or_else(|| "0.1.0".into());
    version::check_supported(&cni_version)?;
    let name = opt_str(&raw, "name")?
        .filter(|n| !n.is_empty())
        .ok_or_else(|| invalid("\"name\" is missing"))?;
    let delegate = opt_obj(&raw, "delegate")?;
    if delegate.contains_key("name") {
        return Err(invalid(
            "\"delegate\" must not set \"name\" (it is the network's name)",
        ));
    }
    if delegate.contains_key("ipam") {
        return Err(invalid(
            "\"delegate\" must not set \"ipam\" (flannel builds it from subnet.env)",
        ));
    }
    let dtype = opt_str(&delegate, "type")?;
    if let Some(t) = &dtype
        && (t.is_empty() || t.contains('/') || t.starts_with('.'))
    {
        return Err(invalid(format!("delegate type {t:?} is not a plugin name")));
    }
    Ok(NetConf {
        cni_version,
        name,
        subnet_file: opt_str(&raw, "subnetFile")?.unwrap_or_else(|| DEFAULT_SUBNET_FILE.into()),
        data_dir: opt_str(&raw, "dataDir")?.unwrap_or_else(|| DEFAULT_DATA_DIR.into()),
        delegate,
        ipam: opt_obj(&raw, "ipam")?,
        runtime_config: raw.get("runtimeConfig").cloned(),
        raw,
    })
}

/// The version the delegate is asked to speak: Debian's plugins stop at 1.0.0, whose result
/// layout 1.1.0 keeps, so a 1.1.0 config delegates as 1.0.0 and the result is relabelled.
pub fn delegate_version(v: &str) -> &str {
    if v == "1.1.0" { "1.0.0" } else { v }
}

/// Upstream's delegate config: bridge (type default), `ipMasq = !FLANNEL_IPMASQ`, `mtu`,
/// `isGateway` for bridge, host-local IPAM with the node's range and a route to the network.
pub fn delegate_config(n: &NetConf, env: &SubnetEnv) -> Value {
    let mut d = n.delegate.clone();
    d.insert("name".into(), n.name.clone().into());
    d.entry("type").or_insert_with(|| "bridge".into());
    d.entry("ipMasq").or_insert_with(|| (!env.ipmasq).into());
    d.entry("mtu").or_insert_with(|| env.mtu.into());
    if d.get("type").and_then(Value::as_str) == Some("bridge") {
        d.entry("isGateway").or_insert(true.into());
    }
    d.insert("cniVersion".into(), delegate_version(&n.cni_version).into());
    let mut ipam = n.ipam.clone();
    ipam.entry("type").or_insert_with(|| "host-local".into());
    ipam.insert(
        "ranges".into(),
        json!([[{ "subnet": env.pod_cidr().to_string() }]]),
    );
    let mut routes = match ipam.get("routes") {
        Some(Value::Array(r)) => r.clone(),
        _ => Vec::new(),
    };
    routes.push(json!({ "dst": env.network.to_string() }));
    ipam.insert("routes".into(), Value::Array(routes));
    d.insert("ipam".into(), Value::Object(ipam));
    if let Some(rc) = &n.runtime_config {
        d.insert("runtimeConfig".into(), rc.clone());
    }
    Value::Object(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;

    fn env() -> SubnetEnv {
        SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", "x").unwrap()
    }

    #[test]
    fn seed_delegate_is_upstreams() {
        let n = parse(SEED.as_bytes()).unwrap();
        assert_eq!(n.subnet_file, DEFAULT_SUBNET_FILE);
        assert_eq!(n.data_dir, DEFAULT_DATA_DIR);
        let d = delegate_config(&n, &env());
        assert_eq!(
            d,
            json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "hairpinMode": true,
                "isDefaultGateway": true, "ipMasq": false, "mtu": 1450, "isGateway": true,
                "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.1.0/24"}]],
                         "routes": [{"dst": "10.244.0.0/16"}]}
            })
        );
    }

    #[test]
    fn explicit_values_win_and_input_routes_are_kept() {
        let n = parse(br#"{"cniVersion":"1.1.0","name":"n","ipam":{"dataDir":"/d","routes":[{"dst":"1.2.3.0/24"}]},"delegate":{"type":"ptp","mtu":1400,"ipMasq":true}}"#).unwrap();
        let d = delegate_config(&n, &env());
        assert_eq!(d["type"], "ptp");
        assert_eq!(d["mtu"], 1400);
        assert_eq!(d["ipMasq"], true);
        assert!(d.get("isGateway").is_none());
        assert_eq!(d["cniVersion"], "1.0.0");
        assert_eq!(d["ipam"]["dataDir"], "/d");
        assert_eq!(
            d["ipam"]["routes"],
            json!([{"dst":"1.2.3.0/24"},{"dst":"10.244.0.0/16"}])
        );
    }

    #[test]
    fn bad_configs_have_spec_codes() {
        for (input, want) in [
            (&b"garbage"[..], code::DECODE),
            (&br#"{"cniVersion":"0.3.1","name":"cb"#[..], code::DECODE),
            (&b"[1]"[..], code::DECODE),
            (
                &br#"{"cniVersion":"7.0.0","name":"x"}"#[..],
                code::INCOMPATIBLE_VERSION,
            ),
            (&br#"{"cniVersion":"0.3.1"}"#[..], code::INVALID_CONFIG),
            (
                &br#"{"cniVersion":"0.3.1","name":"x","delegate":{"name":"y"}}"#[..],
                code::INVALID_CONFIG,
            ),
            (
                &br#"{"cniVersion":"0.3.1","name":"x","delegate":{"type":"../../bin/sh"}}"#[..],
                code::INVALID_CONFIG,
            ),
            (
                &br#"{"cniVersion":"0.3.1","name":"x","delegate":{"type":3}}"#[..],
                code::INVALID_CONFIG,
            ),
        ] {
            assert_eq!(
                parse(input).unwrap_err().code,
                want,
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }
}
