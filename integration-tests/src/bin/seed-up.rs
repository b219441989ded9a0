//! `cargo run -p xtask -- up` runs this after set-up and the images: the seed cluster on this
//! machine until Ctrl-C (see `integration_tests::seed`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use integration_tests::paths::k8s_bin_dir;

/// The seed cluster on this machine (three real nodes, deploy/ applied, pebble as the ACME
/// server) until Ctrl-C; prints the curl and kubectl lines and the time to the first HTTPS
/// answer.
fn main() -> Result<()> {
    use integration_tests::seed::{NODES, Seed, SeedOptions};
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let started = Instant::now();
        eprintln!(
            "==> starting the control plane and the nodes {} (containerd, kubelet, kube-proxy each), applying deploy/",
            NODES.join(", ")
        );
        // Ctrl-C while starting drops what has started (nodes, pods, cgroups, sysctls).
        let seed = tokio::select! {
            seed = Seed::start(SeedOptions::default()) => seed.context("starting the seed cluster")?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted while starting; cleaned up"),
        };
        eprintln!(
            "==> nodes Ready and deploy/ applied in {:.1}s; waiting for the workloads",
            seed.startup.as_secs_f64()
        );
        let ready = async {
            seed.wait_rollouts(std::time::Duration::from_secs(300)).await?;
            seed.wait_https(std::time::Duration::from_secs(180)).await
        };
        let root = tokio::select! {
            root = ready => root?,
            _ = tokio::signal::ctrl_c() => bail!("interrupted while starting; cleaned up"),
        };
        let first_https = started.elapsed();
        let dir = seed.lab.cluster.dir();
        let root_path = dir.join("pebble-root.pem");
        std::fs::write(&root_path, &root)?;
        let kubectl = k8s_bin_dir().join("kubectl");
        let kubeconfig = seed.kubeconfig().display().to_string();
        println!();
        println!(
            "The seed cluster is up: first HTTPS answer {:.1}s after start.",
            first_https.as_secs_f64()
        );
        println!("  kubeconfig: {kubeconfig}");
        println!(
            "  try:        {} --kubeconfig {kubeconfig} get nodes,pods -A -o wide",
            kubectl.display()
        );
        println!("  logs:       {} (node logs under the lab's node directories)", dir.display());
        println!();
        println!("household-task-manager over HTTPS through a node's NodePort, certificate issued by pebble:");
        println!("  {}", seed.curl_line(&root_path));
        println!();
        println!(
            "Our components' memory right now (RSS; WS: the containers' working set, as `kubectl top` shows it):"
        );
        print!("{}", integration_tests::seed::footprint_table());
        println!("Press Ctrl-C to stop and clean up.");
        tokio::signal::ctrl_c().await?;
        eprintln!("==> stopping");
        drop(seed);
        Ok(())
    })
}
