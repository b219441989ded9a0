//! `/run/flannel/subnet.env`, byte-compatible with upstream's `WriteSubnetFile`: four lines in a
//! fixed order, written atomically (temp file + rename), mode 0644, directory created 0755. The
//! CNI plugin reads it back with upstream's line parser.

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}. Check the flannel pod log")]
    Invalid { path: String, message: String },
}

/// What flanneld tells the CNI plugin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster pod network.
    pub network: Ipv4Net,
    /// `FLANNEL_SUBNET`: the node's podCIDR with its first address (`10.244.1.1/24`).
    pub subnet: Ipv4Net,
    /// `FLANNEL_MTU`: underlay MTU − 50.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades (then the bridge must not).
    pub ipmasq: bool,
}

impl SubnetEnv {
    /// `subnet` is the node's podCIDR; the file names its first address, as upstream does.
    pub fn new(network: Ipv4Net, pod_cidr: Ipv4Net, mtu: u32, ipmasq: bool) -> Self {
        let first = Ipv4Addr::from(u32::from(pod_cidr.network()).wrapping_add(1));
        let subnet = Ipv4Net::new(first, pod_cidr.prefix_len()).unwrap_or(pod_cidr);
        SubnetEnv {
            network,
            subnet,
            mtu,
            ipmasq,
        }
    }

    /// The node's podCIDR (`FLANNEL_SUBNET` with host bits cleared).
    pub fn pod_cidr(&self) -> Ipv4Net {
        self.subnet.trunc()
    }

    /// The exact bytes upstream writes.
    pub fn render(&self) -> String {
        format!(
            "FLANNEL_NETWORK={}\nFLANNEL_SUBNET={}\nFLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n",
            self.network, self.subnet, self.mtu, self.ipmasq
        )
    }

    /// Parses the file as the CNI plugin does: `KEY=VALUE` lines, every key required.
    pub fn parse(text: &str, path: &str) -> Result<SubnetEnv, SubnetEnvError> {
        let invalid = |message: String| SubnetEnvError::Invalid {
            path: path.to_string(),
            message,
        };
        let (mut network, mut subnet, mut mtu, mut ipmasq) = (None, None, None, None);
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            match key.trim() {
                // Upstream allows a comma-separated list; the first IPv4 network is ours.
                "FLANNEL_NETWORK" => {
                    network = value
                        .split(',')
                        .find_map(|n| n.trim().parse::<Ipv4Net>().ok())
                }
                "FLANNEL_SUBNET" => subnet = value.parse::<Ipv4Net>().ok(),
                "FLANNEL_MTU" => mtu = value.parse::<u32>().ok(),
                "FLANNEL_IPMASQ" => ipmasq = value.parse::<bool>().ok(),
                _ => {}
            }
        }
        let missing = [
            ("FLANNEL_NETWORK", network.is_none()),
            ("FLANNEL_SUBNET", subnet.is_none()),
            ("FLANNEL_MTU", mtu.is_none()),
            ("FLANNEL_IPMASQ", ipmasq.is_none()),
        ]
        .iter()
        .filter(|(_, m)| *m)
        .map(|(k, _)| *k)
        .collect::<Vec<_>>();
        match (network, subnet, mtu, ipmasq) {
            (Some(network), Some(subnet), Some(mtu), Some(ipmasq)) => Ok(SubnetEnv {
                network,
                subnet,
                mtu,
                ipmasq,
            }),
            _ => Err(invalid(format!(
                "missing or invalid {}",
                missing.join(", ")
            ))),
        }
    }

    /// Reads and parses `path`.
    pub fn read(path: &Path) -> Result<SubnetEnv, SubnetEnvError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| SubnetEnvError::Io {
            path: p.clone(),
            source,
        })?;
        SubnetEnv::parse(&text, &p)
    }

    /// Writes the file atomically; a reader sees the old or the new file, never a part.
    pub fn write(&self, path: &Path) -> Result<(), SubnetEnvError> {
        write_atomic(path, self.render().as_bytes(), 0o644, Durability::Synced).map_err(|source| {
            SubnetEnvError::Io {
                path: path.display().to_string(),
                source,
            }
        })
    }
}

/// How much of an atomic write must be on disk before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Rename only: a crash of the process never leaves a partial file, but a power loss may
    /// leave an empty one (readers must cope: the CNI plugin's DEL does).
    Rename,
    /// File and directory fsynced: the new contents survive a power loss.
    Synced,
}

/// Temp file in the same directory, rename over `path`; with [`Durability::Synced`] the file is
/// fsynced before and the directory after the rename.
pub fn write_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        if durability == Durability::Synced {
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        if durability == Durability::Synced {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_upstream_bytes() {
        let env = SubnetEnv::new(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            1450,
            true,
        );
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        assert_eq!(env.pod_cidr().to_string(), "10.244.1.0/24");
        assert_eq!(SubnetEnv::parse(&env.render(), "x").unwrap(), env);
    }

    #[test]
    fn parse_names_missing_keys() {
        let e = SubnetEnv::parse("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_MTU=abc\n", "/x")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("FLANNEL_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"),
            "{e}"
        );
        assert!(e.contains("Check the flannel pod log"), "{e}");
    }

    #[test]
    fn atomic_write_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("run/flannel/subnet.env");
        write_atomic(&p, b"a", 0o644, Durability::Synced).unwrap();
        write_atomic(&p, b"b", 0o644, Durability::Rename).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"b");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }
}
