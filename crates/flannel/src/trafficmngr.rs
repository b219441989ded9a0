//! Masquerade and forward rules with upstream's names (`pkg/trafficmngr`): iptables chains
//! `FLANNEL-POSTRTG` (nat) and `FLANNEL-FWD` (filter) with the comments `flanneld masq` /
//! `flanneld forward`, or the nft table `ip flannel-ipv4` when `EnableNFTables` is set. Each mode
//! removes the other's leftovers, so either daemon cleans up after the other.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use ipnet::Ipv4Net;

#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("running {cmd}: {message}")]
    Command { cmd: String, message: String },
}

/// Which rules to keep in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rules {
    pub network: Ipv4Net,
    pub subnet: Ipv4Net,
    pub masq: bool,
    pub forward: bool,
    pub fully_random: bool,
}

const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
const FWD_CHAIN: &str = "FLANNEL-FWD";
const MASQ_COMMENT: &str = "flanneld masq";
const FWD_COMMENT: &str = "flanneld forward";
const NFT_TABLE: &str = "flannel-ipv4";

/// One iptables rule: table, chain, spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub table: &'static str,
    pub chain: &'static str,
    pub spec: Vec<String>,
}

fn rule(table: &'static str, chain: &'static str, spec: &str, comment: &str) -> Rule {
    let mut v: Vec<String> = spec.split_whitespace().map(String::from).collect();
    v.extend(["-m", "comment", "--comment", comment].map(String::from));
    Rule {
        table,
        chain,
        spec: v,
    }
}

/// Upstream's masquerade rules, in order (`MasqRules`).
pub fn masq_rules(network: Ipv4Net, subnet: Ipv4Net, fully_random: bool) -> Vec<Rule> {
    let rf = if fully_random { " --random-fully" } else { "" };
    let (n, s) = (network.to_string(), subnet.to_string());
    vec![
        rule(
            "nat",
            "POSTROUTING",
            &format!("-j {MASQ_CHAIN}"),
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            "-m mark --mark 0x4000/0x4000 -j RETURN",
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            &format!("-s {s} -d {n} -j RETURN"),
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            &format!("-s {n} -d {s} -j RETURN"),
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            &format!("! -s {n} -d {s} -j RETURN"),
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            &format!("-s {n} ! -d 224.0.0.0/4 -j MASQUERADE{rf}"),
            MASQ_COMMENT,
        ),
        rule(
            "nat",
            MASQ_CHAIN,
            &format!("! -s {n} -d {n} -j MASQUERADE{rf}"),
            MASQ_COMMENT,
        ),
    ]
}

/// The masquerade rules of the other `--random-fully` setting that differ from `r`'s.
fn other_variant(r: &Rules) -> Vec<Rule> {
    let now = masq_rules(r.network, r.subnet, r.fully_random);
    masq_rules(r.network, r.subnet, !r.fully_random)
        .into_iter()
        .filter(|x| !now.contains(x))
        .collect()
}

/// Upstream's forward rules (`ForwardRules`).
pub fn forward_rules(network: Ipv4Net) -> Vec<Rule> {
    vec![
        rule("filter", "FORWARD", &format!("-j {FWD_CHAIN}"), FWD_COMMENT),
        rule(
            "filter",
            FWD_CHAIN,
            &format!("-s {network} -j ACCEPT"),
            FWD_COMMENT,
        ),
        rule(
            "filter",
            FWD_CHAIN,
            &format!("-d {network} -j ACCEPT"),
            FWD_COMMENT,
        ),
    ]
}

/// The iptables binary matching the host's backend, as kubernetes-sigs/iptables-wrappers picks
/// it: the variant holding more rules (kube-proxy's and the kubelet's) wins, nft on a tie.
pub fn detect_iptables() -> String {
    let count = |bin: &str| -> Option<usize> {
        let out = Command::new(format!("{bin}-save"))
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| l.starts_with("-A ") || l.contains("KUBE-"))
                .count()
        })
    };
    match (count("iptables-legacy"), count("iptables-nft")) {
        (Some(l), Some(n)) if l > n => "iptables-legacy".into(),
        (_, Some(_)) => "iptables-nft".into(),
        (Some(_), None) => "iptables-legacy".into(),
        _ => "iptables".into(),
    }
}

/// Whether `iptables --version` output names a version with `--random-fully` (1.6.2 and later,
/// the check upstream's go-iptables makes).
pub fn version_has_random_fully(version: &str) -> bool {
    let Some(v) = version.split_whitespace().find_map(|w| w.strip_prefix('v')) else {
        return false;
    };
    let mut parts = v.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let (a, b, c) = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    (a, b, c) >= (1, 6, 2)
}

/// Runs iptables or nft; `Ok(false)` when it ran and said no (e.g. `-C` of a missing rule).
fn run(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<bool, RulesError> {
    run_inner(bin, args, stdin).map(|(ok, _)| ok)
}

/// Like [`run`], but "no" is an error too (a script that must apply).
fn run_strict(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<(), RulesError> {
    match run_inner(bin, args, stdin)? {
        (true, _) => Ok(()),
        (false, message) => Err(RulesError::Command {
            cmd: format!("{bin} {}", args.join(" ")),
            message,
        }),
    }
}

fn run_inner(bin: &str, args: &[&str], stdin: Option<&str>) -> Result<(bool, String), RulesError> {
    let mut cmd = Command::new(bin);
    // Honour the xtables lock as upstream does (shared with kube-proxy).
    if bin.starts_with("iptables") {
        cmd.arg("-w").arg("5");
    }
    cmd.args(args).stdout(Stdio::null()).stderr(Stdio::piped());
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let cmd_str = || format!("{bin} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| RulesError::Command {
        cmd: cmd_str(),
        message: e.to_string(),
    })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        use std::io::Write;
        let _ = pipe.write_all(text.as_bytes());
    }
    let out = child.wait_with_output().map_err(|e| RulesError::Command {
        cmd: cmd_str(),
        message: e.to_string(),
    })?;
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if out.status.success() {
        return Ok((true, err));
    }
    if out.status.code() == Some(1) {
        return Ok((false, err));
    }
    Err(RulesError::Command {
        cmd: cmd_str(),
        message: err,
    })
}

/// The iptables manager (upstream's default mode).
#[derive(Clone, Debug)]
pub struct Iptables {
    pub bin: String,
}

impl Iptables {
    fn exec(
        &self,
        table: &str,
        op: &str,
        chain: &str,
        spec: &[String],
    ) -> Result<bool, RulesError> {
        let mut args = vec!["-t", table, op, chain];
        args.extend(spec.iter().map(String::as_str));
        // Only the queries (-C, -D of a missing rule) answer "no" with exit status 1; for -A
        // it is a real failure.
        if op == "-A" {
            return run_strict(&self.bin, &args, None).map(|()| true);
        }
        run(&self.bin, &args, None)
    }

    fn ensure_chain(&self, table: &str, chain: &str) -> Result<(), RulesError> {
        if !run(&self.bin, &["-t", table, "-S", chain], None)? {
            run_strict(&self.bin, &["-t", table, "-N", chain], None)?;
        }
        Ok(())
    }

    /// Upstream's resync: if any rule is missing, delete them all and append them in order.
    /// Returns whether anything was (re)written.
    pub fn ensure(&self, rules: &[Rule]) -> Result<bool, RulesError> {
        for r in rules {
            if r.chain.starts_with("FLANNEL") {
                self.ensure_chain(r.table, r.chain)?;
            }
        }
        let mut complete = true;
        for r in rules {
            complete &= self.exec(r.table, "-C", r.chain, &r.spec)?;
        }
        if complete {
            return Ok(false);
        }
        self.delete(rules)?;
        for r in rules {
            self.exec(r.table, "-A", r.chain, &r.spec)?;
        }
        Ok(true)
    }

    /// Deletes `rules` (each as often as it appears); missing ones are fine.
    pub fn delete(&self, rules: &[Rule]) -> Result<(), RulesError> {
        for r in rules {
            let mut guard = 0;
            while self.exec(r.table, "-D", r.chain, &r.spec)? && guard < 16 {
                guard += 1;
            }
        }
        Ok(())
    }

    /// Removes flannel's chains and the jumps to them (whatever their contents).
    pub fn cleanup(&self) -> Result<(), RulesError> {
        for (table, parent, chain, comment) in [
            ("nat", "POSTROUTING", MASQ_CHAIN, MASQ_COMMENT),
            ("filter", "FORWARD", FWD_CHAIN, FWD_COMMENT),
        ] {
            // Without the chain, a rule naming it cannot even be parsed: nothing to clean.
            if !run(&self.bin, &["-t", table, "-S", chain], None)? {
                continue;
            }
            let jump = rule(table, parent, &format!("-j {chain}"), comment);
            self.delete(std::slice::from_ref(&jump))?;
            run(&self.bin, &["-t", table, "-F", chain], None)?;
            run(&self.bin, &["-t", table, "-X", chain], None)?;
        }
        Ok(())
    }
}

/// Upstream's nft ruleset (`nftables.go`), one transaction per apply.
pub fn nft_script(r: &Rules) -> String {
    let (n, s) = (r.network, r.subnet);
    let rf = if r.fully_random { " fully-random" } else { "" };
    let mut out = format!(
        "add table ip {NFT_TABLE}\n\
         add chain ip {NFT_TABLE} postrtg {{ type nat hook postrouting priority srcnat ; }}\n\
         add chain ip {NFT_TABLE} forward {{ type filter hook forward priority filter ; }}\n\
         flush chain ip {NFT_TABLE} postrtg\n\
         flush chain ip {NFT_TABLE} forward\n"
    );
    if r.masq {
        out += &format!(
            "add rule ip {NFT_TABLE} postrtg meta mark 0x4000 return\n\
             add rule ip {NFT_TABLE} postrtg ip saddr {s} ip daddr {n} return\n\
             add rule ip {NFT_TABLE} postrtg ip saddr {n} ip daddr {s} return\n\
             add rule ip {NFT_TABLE} postrtg ip saddr != {s} ip daddr {n} return\n\
             add rule ip {NFT_TABLE} postrtg ip saddr {n} ip daddr != 224.0.0.0/4 masquerade{rf}\n\
             add rule ip {NFT_TABLE} postrtg ip saddr != {n} ip daddr {n} masquerade{rf}\n"
        );
    }
    if r.forward {
        out += &format!(
            "add rule ip {NFT_TABLE} forward ip saddr {n} accept\n\
             add rule ip {NFT_TABLE} forward ip daddr {n} accept\n"
        );
    }
    out
}

/// Either mode, chosen by `EnableNFTables`.
#[derive(Clone, Debug)]
pub enum TrafficManager {
    Iptables(Iptables),
    /// The table's listing right after our last apply (`None` before the first).
    Nftables(Arc<Mutex<Option<String>>>),
}

/// `nft list table ip flannel-ipv4`, `None` when the table is missing.
fn nft_list() -> Option<String> {
    let out = Command::new("nft")
        .args(["list", "table", "ip", NFT_TABLE])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

impl TrafficManager {
    pub fn new(nftables: bool) -> TrafficManager {
        if nftables {
            TrafficManager::Nftables(Arc::default())
        } else {
            TrafficManager::Iptables(Iptables {
                bin: detect_iptables(),
            })
        }
    }

    /// Whether MASQUERADE may use `--random-fully`, probed once at start as upstream does (nft
    /// always supports `fully-random`).
    pub fn supports_random_fully(&self) -> bool {
        match self {
            TrafficManager::Iptables(ipt) => Command::new(&ipt.bin)
                .arg("--version")
                .stderr(Stdio::null())
                .output()
                .map(|o| version_has_random_fully(&String::from_utf8_lossy(&o.stdout)))
                .unwrap_or(false),
            TrafficManager::Nftables(_) => true,
        }
    }

    /// Removes the other mode's rules (upstream does this once at start).
    pub fn cleanup_other(&self) -> Result<(), RulesError> {
        match self {
            TrafficManager::Iptables(_) => {
                if nft_available() {
                    run("nft", &["delete", "table", "ip", NFT_TABLE], None)?;
                }
                Ok(())
            }
            TrafficManager::Nftables(_) => {
                for bin in ["iptables-nft", "iptables-legacy"] {
                    if which(bin) {
                        Iptables { bin: bin.into() }.cleanup()?;
                    }
                }
                Ok(())
            }
        }
    }

    /// Removes rules for an older network/subnet (from the previous subnet.env).
    pub fn remove_stale(&self, old: &Rules) -> Result<(), RulesError> {
        match self {
            TrafficManager::Iptables(ipt) => {
                ipt.delete(&masq_rules(old.network, old.subnet, false))?;
                if self.supports_random_fully() {
                    ipt.delete(&masq_rules(old.network, old.subnet, true))?;
                }
                Ok(())
            }
            // The nft chains are flushed and rewritten on every apply.
            TrafficManager::Nftables(_) => Ok(()),
        }
    }

    /// Removes the masquerade rules a run with the other `--random-fully` setting left for the
    /// same subnet (iptables upgraded, or the flag changed); the rules both share stay. An
    /// iptables without `--random-fully` cannot even name those rules (nor can it have them).
    pub fn remove_other_variant(&self, r: &Rules) -> Result<(), RulesError> {
        match self {
            TrafficManager::Iptables(ipt)
                if r.masq && (r.fully_random || self.supports_random_fully()) =>
            {
                ipt.delete(&other_variant(r))
            }
            _ => Ok(()),
        }
    }

    /// Installs or repairs the rules; returns whether anything was written.
    pub fn ensure(&self, r: &Rules) -> Result<bool, RulesError> {
        match self {
            TrafficManager::Iptables(ipt) => {
                let mut changed = false;
                if r.masq {
                    changed |= ipt.ensure(&masq_rules(r.network, r.subnet, r.fully_random))?;
                }
                if r.forward {
                    changed |= ipt.ensure(&forward_rules(r.network))?;
                }
                Ok(changed)
            }
            // The first call always applies (a table left by an older run or by upstream may
            // hold other rules); later ones re-apply when the table differs from what the last
            // apply left. The script flushes and refills in one transaction: no gap.
            TrafficManager::Nftables(last) => {
                let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
                let now = nft_list();
                if now.is_some() && *last == now {
                    return Ok(false);
                }
                run_strict("nft", &["-f", "-"], Some(&nft_script(r)))?;
                *last = nft_list();
                Ok(true)
            }
        }
    }
}

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/sbin"]
            .iter()
            .any(|d| std::path::Path::new(d).join(bin).is_file())
}

fn nft_available() -> bool {
    which("nft")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masq_rules_are_upstreams() {
        let rules = masq_rules(
            "10.244.0.0/16".parse().unwrap(),
            "10.244.1.0/24".parse().unwrap(),
            true,
        );
        let lines: Vec<String> = rules
            .iter()
            .map(|r| format!("-A {} {}", r.chain, r.spec.join(" ")))
            .collect();
        assert_eq!(
            lines[0],
            "-A POSTROUTING -j FLANNEL-POSTRTG -m comment --comment flanneld masq"
        );
        assert_eq!(
            lines[5],
            "-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully -m comment --comment flanneld masq"
        );
        assert_eq!(lines.len(), 7);
        assert_eq!(forward_rules("10.244.0.0/16".parse().unwrap()).len(), 3);
    }

    #[test]
    fn nft_script_has_upstream_names() {
        let s = nft_script(&Rules {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            masq: true,
            forward: true,
            fully_random: true,
        });
        assert!(s.contains("add table ip flannel-ipv4"));
        assert!(s.contains("postrtg { type nat hook postrouting priority srcnat ; }"));
        assert!(s.contains("masquerade fully-random"));
        assert!(s.contains("forward ip daddr 10.244.0.0/16 accept"));
    }

    #[test]
    fn a_failing_append_or_new_chain_is_an_error_not_a_no() {
        // `false` exits 1 as iptables does for real failures (a missing target, a bad chain).
        let ipt = Iptables {
            bin: "false".into(),
        };
        let rules = forward_rules("10.244.0.0/16".parse().unwrap());
        let e = ipt.ensure(&rules).unwrap_err().to_string();
        assert!(e.contains("false -t filter -N FLANNEL-FWD"), "{e}");
        let e = ipt
            .exec("filter", "-A", FWD_CHAIN, &rules[1].spec)
            .unwrap_err();
        assert!(e.to_string().contains("-A FLANNEL-FWD"), "{e}");
        assert_eq!(
            ipt.exec("filter", "-C", FWD_CHAIN, &rules[1].spec).ok(),
            Some(false)
        );
    }

    #[test]
    fn other_variant_is_only_the_random_fully_rules() {
        let r = Rules {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            masq: true,
            forward: true,
            fully_random: true,
        };
        let other = other_variant(&r);
        assert!(!other.is_empty());
        for x in &other {
            assert!(x.spec.contains(&"MASQUERADE".to_string()), "{x:?}");
            assert!(!x.spec.contains(&"--random-fully".to_string()), "{x:?}");
        }
        let back = other_variant(&Rules {
            fully_random: false,
            ..r
        });
        assert_eq!(back.len(), other.len());
        assert!(
            back.iter()
                .all(|x| x.spec.contains(&"--random-fully".to_string()))
        );
    }

    #[test]
    fn random_fully_needs_iptables_1_6_2() {
        assert!(version_has_random_fully("iptables v1.8.9 (nf_tables)\n"));
        assert!(version_has_random_fully("iptables v1.6.2"));
        assert!(!version_has_random_fully("iptables v1.6.1"));
        assert!(!version_has_random_fully("iptables v1.4.21"));
        assert!(!version_has_random_fully("garbage"));
    }
}
