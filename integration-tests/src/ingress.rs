//! Our ingress controller inside a test process. The harness does not depend on the ingress
//! crate, so it hands out the command line and the test parses it into `ingress::cli::Args`.

/// The command line (program name first, as clap expects) of an ingress controller started in
/// the test's own process: loopback only, ports chosen by the OS (read them back from what
/// `ingress::app::start` returns), leader election off unless `extra` sets `--leader-elect`.
/// `extra` comes last.
pub fn controller_args(extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "ingress-controller",
        "--http-port=0",
        "--https-port=0",
        "--healthz-port=0",
        "--bind-address=127.0.0.1",
    ]
    .map(String::from)
    .into();
    // clap refuses `--leader-elect` given twice, so the default gives way to the test's own.
    if !extra.iter().any(|a| a.starts_with("--leader-elect=")) {
        args.push("--leader-elect=false".into());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    args
}
