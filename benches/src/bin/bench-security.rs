//! `bench-security`: attacks, slow clients and limits against our ingress-controller and nginx;
//! writes `security.md`. Normally started by `cargo run -p xtask -- bench security`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use benches::security::{Options, Programs};
use clap::Parser;
use integration_tests::process::which;

#[derive(Parser)]
#[command(about = "Security benchmark: ingress-controller vs nginx under attack")]
struct Args {
    /// Where security.md goes.
    #[arg(long, default_value = "benches/results")]
    out: PathBuf,
    /// The ingress-controller binary (`xtask bench` passes the image's build, symbols kept).
    #[arg(long)]
    ingress_controller: PathBuf,
    /// The seconds-per-case settings the suite uses.
    #[arg(long)]
    quick: bool,
    /// A note recorded with the results.
    #[arg(long)]
    note: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let tool = |name: &str| {
        which(name).with_context(|| format!("{name} (run `cargo run -p xtask -- setup`)"))
    };
    let programs = Programs {
        ingress_controller: args.ingress_controller.clone(),
        nginx: tool("nginx")?,
        testssl: tool("testssl")?,
        slowhttptest: tool("slowhttptest")?,
    };
    let opts = if args.quick {
        Options::quick(programs)
    } else {
        Options::full(programs)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let results = runtime.block_on(benches::security::run(&opts))?;
    let path = results.write(&args.out, &args.note)?;
    println!("{}", std::fs::read_to_string(&path)?);
    eprintln!("wrote {}", path.display());
    Ok(())
}
