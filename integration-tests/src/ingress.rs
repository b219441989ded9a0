//! Our ingress controller inside a test process. The harness does not depend on the ingress
//! crate, so it hands out the command line and the test parses it into `ingress::cli::Args`.

/// The command line (program name first, as clap expects) of an ingress controller started in
/// the test's own process: loopback only, ports chosen by the OS (read them back from what
/// `ingress::app::start` returns), leader election off. A flag in `extra` replaces the default
/// of the same name (clap refuses one given twice); `extra` comes last.
pub fn controller_args(extra: &[&str]) -> Vec<String> {
    let name = |a: &str| a.split('=').next().unwrap_or(a).to_string();
    let given: Vec<String> = extra.iter().map(|a| name(a)).collect();
    let mut args = vec!["ingress-controller".to_string()];
    args.extend(
        [
            "--http-port=0",
            "--https-port=0",
            "--healthz-port=0",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ]
        .into_iter()
        .filter(|d| !given.contains(&name(d)))
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}

#[cfg(test)]
mod tests {
    #[test]
    fn extra_flags_replace_defaults() {
        let args = super::controller_args(&["--http-port=8080", "--leader-elect=true"]);
        assert_eq!(
            args.iter().filter(|a| a.starts_with("--http-port")).count(),
            1
        );
        assert!(args.contains(&"--http-port=8080".to_string()));
        assert!(!args.contains(&"--leader-elect=false".to_string()));
        assert!(args.contains(&"--https-port=0".to_string()));
    }
}
