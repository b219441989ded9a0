//! TLS configuration scan with Debian's `testssl.sh` (`testssl`): every finding of severity
//! MEDIUM or worse, ours next to nginx's with ingress-nginx's default protocols and ciphers.

use std::net::SocketAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct Finding {
    pub id: String,
    pub severity: String,
    pub finding: String,
}

impl Finding {
    /// MEDIUM, HIGH or CRITICAL.
    pub fn serious(&self) -> bool {
        matches!(self.severity.as_str(), "MEDIUM" | "HIGH" | "CRITICAL")
    }
}

/// The scan's scope: the full run checks everything testssl does by default; the quick one only
/// protocols, cipher categories and server preferences.
#[derive(Clone, Copy, Debug)]
pub enum Scope {
    Full,
    Quick,
}

pub async fn scan(
    program: &Path,
    addr: SocketAddr,
    scope: Scope,
    dir: &Path,
) -> Result<Vec<Finding>, Error> {
    let json = dir.join(format!("testssl-{}.json", addr.port()));
    let _ = std::fs::remove_file(&json);
    let mut args: Vec<String> = [
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "--ip",
        "one",
        "--sneaky",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if matches!(scope, Scope::Quick) {
        args.extend(["--protocols", "--std", "--server-preference"].map(String::from));
    }
    args.push("--jsonfile".into());
    args.push(json.display().to_string());
    args.push(addr.to_string());
    let text = super::tool_output("testssl", program, args, &json).await?;
    let findings: Vec<Finding> = serde_json::from_str(&text)?;
    Ok(findings)
}

/// The serious findings of `ours` whose id nginx's scan does not also report as serious.
pub fn ours_only<'a>(ours: &'a [Finding], nginx: &[Finding]) -> Vec<&'a Finding> {
    ours.iter()
        .filter(|f| f.serious())
        .filter(|f| !nginx.iter().any(|n| n.serious() && n.id == f.id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(id: &str, severity: &str) -> Finding {
        Finding {
            id: id.into(),
            severity: severity.into(),
            finding: String::new(),
        }
    }

    #[test]
    fn only_serious_findings_nginx_lacks_count() {
        let ours = [
            f("BREACH", "MEDIUM"),
            f("LUCKY13", "LOW"),
            f("HSTS", "MEDIUM"),
        ];
        let nginx = [f("BREACH", "MEDIUM")];
        let only: Vec<&str> = ours_only(&ours, &nginx)
            .iter()
            .map(|f| f.id.as_str())
            .collect();
        assert_eq!(only, ["HSTS"]);
    }
}
