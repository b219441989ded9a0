//! flanneld's flags: upstream's names and defaults, each also settable as `FLANNELD_<FLAG>`.
//! Go's boolean flags accept `--flag` and `--flag=false`; so do these.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::{ArgAction, Parser};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "flanneld",
    version,
    about = "flannel VXLAN overlay daemon (kube subnet manager)"
)]
pub struct Args {
    /// Contact the Kubernetes API for subnet assignment instead of etcd (the only mode here).
    #[arg(long, env = "FLANNELD_KUBE_SUBNET_MGR", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub kube_subnet_mgr: bool,
    /// Set up IP masquerade for traffic leaving the flannel network.
    #[arg(long, env = "FLANNELD_IP_MASQ", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub ip_masq: bool,
    /// Interface (name or IP) for inter-host traffic; repeatable, first match wins. Values are
    /// not split on commas (upstream appends each flag value whole).
    #[arg(long, env = "FLANNELD_IFACE")]
    pub iface: Vec<String>,
    /// Regex matched against interface IPs, then names; repeatable.
    #[arg(long, env = "FLANNELD_IFACE_REGEX")]
    pub iface_regex: Vec<String>,
    /// Use the interface that routes to this address.
    #[arg(long, env = "FLANNELD_IFACE_CAN_REACH")]
    pub iface_can_reach: Option<Ipv4Addr>,
    /// IP accessible by other nodes for inter-host communication.
    #[arg(long, env = "FLANNELD_PUBLIC_IP")]
    pub public_ip: Option<Ipv4Addr>,
    /// Where to write the subnet file read by the CNI plugin.
    #[arg(
        long,
        env = "FLANNELD_SUBNET_FILE",
        default_value = "/run/flannel/subnet.env"
    )]
    pub subnet_file: PathBuf,
    /// Path to net-conf.json.
    #[arg(
        long,
        env = "FLANNELD_NET_CONFIG_PATH",
        default_value = "/etc/kube-flannel/net-conf.json"
    )]
    pub net_config_path: PathBuf,
    /// Prefix of the node annotations.
    #[arg(long, env = "FLANNELD_KUBE_ANNOTATION_PREFIX", default_value = crate::annotations::DEFAULT_PREFIX)]
    pub kube_annotation_prefix: String,
    /// kubeconfig file (default: in-cluster).
    #[arg(long, env = "FLANNELD_KUBECONFIG_FILE")]
    pub kubeconfig_file: Option<PathBuf>,
    /// Seconds between checks of the masquerade/forward rules.
    #[arg(long, env = "FLANNELD_IPTABLES_RESYNC", default_value_t = 5)]
    pub iptables_resync: u64,
    /// Add FORWARD accept rules for the flannel network.
    #[arg(long, env = "FLANNELD_IPTABLES_FORWARD_RULES", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = true)]
    pub iptables_forward_rules: bool,
    /// Do not use --random-fully on MASQUERADE rules.
    #[arg(long, env = "FLANNELD_IP_MASQ_FULLY_RANDOM_DISABLE", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = false)]
    pub ip_masq_fully_random_disable: bool,
    /// Set the node's NetworkUnavailable condition to False once the network is up.
    #[arg(long, env = "FLANNELD_SET_NODE_NETWORK_UNAVAILABLE", action = ArgAction::Set, num_args = 0..=1, default_missing_value = "true", default_value_t = true)]
    pub set_node_network_unavailable: bool,
    /// Address of the /healthz /readyz /metrics server.
    #[arg(long, env = "FLANNELD_HEALTHZ_IP", default_value = "0.0.0.0")]
    pub healthz_ip: IpAddr,
    /// Port of the /healthz /readyz /metrics server (0: off).
    #[arg(long, env = "FLANNELD_HEALTHZ_PORT", default_value_t = 8081)]
    pub healthz_port: u16,
    /// Seconds between full reconciles of peer routes, ARP and FDB entries (not upstream: its
    /// VXLAN backend never re-checks).
    #[arg(long, env = "FLANNELD_RECONCILE_INTERVAL", default_value_t = 5)]
    pub reconcile_interval: u64,
    /// Log filter (EnvFilter syntax).
    #[arg(long, env = "FLANNELD_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

impl Args {
    /// Upstream modes this daemon does not implement, named.
    pub fn refuse_unsupported(&self) -> Result<(), String> {
        if !self.kube_subnet_mgr {
            return Err(
                "only the Kubernetes subnet manager is supported: pass --kube-subnet-mgr (the etcd subnet manager is not implemented)"
                    .into(),
            );
        }
        for re in &self.iface_regex {
            regex::Regex::new(re).map_err(|e| format!("--iface-regex {re:?}: {e}"))?;
        }
        if self.iptables_resync == 0 || self.reconcile_interval == 0 {
            return Err(
                "--iptables-resync and --reconcile-interval must be at least 1 second".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_flags_and_defaults() {
        let a = Args::try_parse_from([
            "flanneld",
            "--ip-masq",
            "--kube-subnet-mgr",
            "--healthz-port=8081",
            "--iface=eth0",
            "--iface",
            "10.0.0.1",
        ])
        .unwrap();
        assert!(
            a.ip_masq
                && a.kube_subnet_mgr
                && a.iptables_forward_rules
                && a.set_node_network_unavailable
        );
        assert_eq!(a.iface, vec!["eth0", "10.0.0.1"]);
        assert_eq!(a.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(
            a.net_config_path,
            PathBuf::from("/etc/kube-flannel/net-conf.json")
        );
        assert_eq!(a.iptables_resync, 5);
        let b = Args::try_parse_from([
            "flanneld",
            "--kube-subnet-mgr",
            "--ip-masq=false",
            "--iptables-forward-rules=false",
        ])
        .unwrap();
        assert!(!b.ip_masq && !b.iptables_forward_rules);
        assert!(b.refuse_unsupported().is_ok());
        let c = Args::try_parse_from(["flanneld"]).unwrap();
        assert!(
            c.refuse_unsupported()
                .unwrap_err()
                .contains("--kube-subnet-mgr")
        );
        assert!(Args::try_parse_from(["flanneld", "--etcd-endpoints=http://x"]).is_err());
        let d = Args::try_parse_from([
            "flanneld",
            "--kube-subnet-mgr",
            "--iface-regex=^(eth|en)[0-9]{1,2}$",
            "--iface-regex",
            "^wl.*",
        ])
        .unwrap();
        assert_eq!(d.iface_regex, ["^(eth|en)[0-9]{1,2}$", "^wl.*"]);
        assert!(d.refuse_unsupported().is_ok());
    }
}
