//! net-conf.json (`/etc/kube-flannel/net-conf.json`), read as upstream's Go `encoding/json` reads
//! it: keys match case-insensitively, `EnableIPv4` defaults to true, VNI 1, port 0 (kernel default
//! 8472), MTU 0 (underlay MTU).

use ipnet::Ipv4Net;
use serde::Deserialize;
use serde_json::Value;

/// The backend port the kernel picks when none is given (upstream relies on that default).
pub const DEFAULT_VXLAN_PORT: u16 = 8472;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("net-conf.json is not valid JSON: {0}")]
    Json(serde_json::Error),
    #[error("net-conf.json: {0}")]
    Invalid(String),
    #[error("net-conf.json: {0} is not supported by this flanneld (only the vxlan backend, IPv4)")]
    Unsupported(String),
}

/// The parts of upstream's `subnet.Config` that matter in kube-subnet-mgr mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConf {
    pub network: Ipv4Net,
    pub enable_nftables: bool,
    pub backend: VxlanConf,
}

/// `Backend` for `"Type": "vxlan"` (upstream `VXLANConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct VxlanConf {
    #[serde(rename = "vni")]
    pub vni: u32,
    /// 0 means the kernel default (8472).
    #[serde(rename = "port")]
    pub port: u16,
    /// Underlay MTU; 0 means the external interface's MTU.
    #[serde(rename = "mtu")]
    pub mtu: u32,
    #[serde(rename = "gbp")]
    pub gbp: bool,
    #[serde(rename = "learning")]
    pub learning: bool,
    #[serde(rename = "directrouting")]
    pub direct_routing: bool,
}

impl Default for VxlanConf {
    fn default() -> Self {
        VxlanConf {
            vni: 1,
            port: 0,
            mtu: 0,
            gbp: false,
            learning: false,
            direct_routing: false,
        }
    }
}

impl VxlanConf {
    /// The UDP port the device really uses.
    pub fn effective_port(&self) -> u16 {
        if self.port == 0 {
            DEFAULT_VXLAN_PORT
        } else {
            self.port
        }
    }

    /// `flannel.<VNI>`.
    pub fn device_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct Raw {
    enableipv4: bool,
    enableipv6: bool,
    enablenftables: bool,
    network: Option<String>,
    ipv6network: Option<String>,
    backend: Option<Value>,
}

impl Default for Raw {
    fn default() -> Self {
        Raw {
            enableipv4: true,
            enableipv6: false,
            enablenftables: false,
            network: None,
            ipv6network: None,
            backend: None,
        }
    }
}

/// Reads and parses the file at `path`.
pub fn load(path: &std::path::Path) -> Result<NetConf, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text)
}

/// Parses net-conf.json text.
pub fn parse(text: &str) -> Result<NetConf, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(ConfigError::Json)?;
    if !value.is_object() {
        return Err(ConfigError::Invalid(
            "top level must be a JSON object".into(),
        ));
    }
    let raw: Raw = serde_json::from_value(lowercase_keys(value)).map_err(ConfigError::Json)?;
    if raw.enableipv6 || raw.ipv6network.is_some() {
        return Err(ConfigError::Unsupported("EnableIPv6/IPv6Network".into()));
    }
    if !raw.enableipv4 {
        return Err(ConfigError::Unsupported("EnableIPv4=false".into()));
    }
    let network = raw
        .network
        .ok_or_else(|| ConfigError::Invalid("\"Network\" is missing".into()))?;
    let network: Ipv4Net = network.parse().map_err(|_| {
        ConfigError::Invalid(format!("\"Network\" {network:?} is not an IPv4 CIDR"))
    })?;
    let backend = parse_backend(raw.backend)?;
    Ok(NetConf {
        network: network.trunc(),
        enable_nftables: raw.enablenftables,
        backend,
    })
}

fn parse_backend(backend: Option<Value>) -> Result<VxlanConf, ConfigError> {
    // Upstream quirk: no Backend at all means "udp".
    let Some(backend) = backend else {
        return Err(ConfigError::Unsupported(
            "a missing \"Backend\" (upstream then selects the udp backend; set \"Backend\": {\"Type\": \"vxlan\"})"
                .into(),
        ));
    };
    let kind = backend
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("udp")
        .to_ascii_lowercase();
    if kind != "vxlan" {
        return Err(ConfigError::Unsupported(format!("Backend.Type {kind:?}")));
    }
    let conf: VxlanConf = serde_json::from_value(backend)
        .map_err(|e| ConfigError::Invalid(format!("Backend: {e}")))?;
    if conf.gbp {
        return Err(ConfigError::Unsupported("Backend.GBP".into()));
    }
    if conf.vni == 0 || conf.vni > 0x00ff_ffff {
        return Err(ConfigError::Invalid(format!(
            "Backend.VNI {} out of range",
            conf.vni
        )));
    }
    if conf.mtu != 0 && conf.mtu < 100 {
        return Err(ConfigError::Invalid(format!(
            "Backend.MTU {} too small",
            conf.mtu
        )));
    }
    Ok(conf)
}

/// Go's encoding/json matches struct keys case-insensitively; lower-casing every key before
/// deserializing into lower-case field names gives the same result.
fn lowercase_keys(v: Value) -> Value {
    match v {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), lowercase_keys(v)))
                .collect(),
        ),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_config_has_upstream_defaults() {
        let c = parse(r#"{"Network": "10.244.0.0/16", "EnableNFTables": false, "Backend": {"Type": "vxlan"}}"#)
            .unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert!(!c.enable_nftables);
        assert_eq!(c.backend, VxlanConf::default());
        assert_eq!(c.backend.effective_port(), 8472);
        assert_eq!(c.backend.device_name(), "flannel.1");
    }

    #[test]
    fn keys_are_case_insensitive_and_host_bits_masked() {
        let c = parse(r#"{"network":"10.244.3.7/16","backend":{"type":"VXLAN","vni":4,"Port":4789,"DirectRouting":true,"MTU":1400}}"#)
            .unwrap();
        assert_eq!(c.network.to_string(), "10.244.0.0/16");
        assert_eq!(c.backend.vni, 4);
        assert_eq!(c.backend.effective_port(), 4789);
        assert!(c.backend.direct_routing);
        assert_eq!(c.backend.mtu, 1400);
    }

    #[test]
    fn bad_files_get_one_clear_message() {
        for (text, needle) in [
            ("{\"Network\": ", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"Backend":{"Type":"vxlan"}}"#, "\"Network\" is missing"),
            (
                r#"{"Network":"10.244.0.0/33","Backend":{"Type":"vxlan"}}"#,
                "not an IPv4 CIDR",
            ),
            (r#"{"Network":"10.244.0.0/16"}"#, "udp"),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#,
                "host-gw",
            ),
            (
                r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","VNI":"x"}}"#,
                "Backend",
            ),
            (
                r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"Backend":{"Type":"vxlan"}}"#,
                "EnableIPv6",
            ),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
