//! The whole suite in two lanes at once. Most of its time is waiting (control planes starting,
//! ACME and apiserver outages ridden out, drain periods), not computing, so on CI's two cores
//! two test binaries can run side by side. One lane has the tests that build real nodes and
//! network namespaces (bridges, host routes to pod networks, kubelets), one after another as
//! before, and the benchmark smoke tests; the other lane has everything else, then the doc
//! tests. A new test file joins the second lane unless its package is in [`NODE_PACKAGES`].

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::process::Stdio;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo_command, cargo_with_env, step};

/// Packages of the first lane: those whose tests make real nodes, namespaces and routes on
/// this machine (never two at once), and the benchmark smoke tests, which balance the lanes
/// (about 7 and 5 minutes of tests here, 12 in one lane).
const NODE_PACKAGES: &[&str] = &["integration-tests", "flannel", "local-path", "benches"];

/// Builds every test, then runs the two lanes concurrently; fails if either fails.
pub fn run(env: &[(&str, &OsStr)]) -> Result<()> {
    step("cargo test --workspace --no-run", || {
        cargo_with_env(&["test", "--workspace", "--no-run"], env)
    })?;
    let (nodes, rest) = test_targets()?;
    let shared: Vec<&String> = nodes.intersection(&rest).collect();
    if !shared.is_empty() {
        // `--test NAME` selects that name in every package: the lanes would both run it.
        eprintln!("    test targets {shared:?} are in both lanes: running the suite in one");
        return step("cargo test", || {
            cargo_with_env(&["test", "--workspace"], env)
        });
    }
    // Every selection names the whole workspace, so features unify as in the build above
    // and nothing is rebuilt.
    let mut first = vec!["test".to_string(), "--workspace".into()];
    for t in &nodes {
        first.extend(["--test".into(), t.clone()]);
    }
    let mut second = vec![
        "test".to_string(),
        "--workspace".into(),
        "--lib".into(),
        "--bins".into(),
    ];
    for t in &rest {
        second.extend(["--test".into(), t.clone()]);
    }
    let doc = ["test", "--workspace", "--doc"].map(String::from).to_vec();
    step("cargo test, two lanes", || {
        let mut lanes = Vec::new();
        // An empty `--test` list would select every target: a lane without tests is skipped.
        if !nodes.is_empty() {
            lanes.push(Lane::spawn("nodes", vec![first], env));
        }
        lanes.push(Lane::spawn("rest", vec![second, doc], env));
        // Both are waited for, so no lane is left running when the other fails.
        let results: Vec<(&str, Result<bool>)> =
            lanes.into_iter().map(|l| (l.name, l.wait())).collect();
        let mut failed = Vec::new();
        for (name, result) in results {
            match result {
                Ok(true) => {}
                Ok(false) => failed.push(format!("{name} (a test failed)")),
                Err(e) => failed.push(format!("{name} ({e:#})")),
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("test lane(s) failed: {}", failed.join(", "))
        }
    })
}

/// Integration test targets of the workspace: (those of [`NODE_PACKAGES`], the others).
fn test_targets() -> Result<(BTreeSet<String>, BTreeSet<String>)> {
    let out = cargo_command()
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let (mut nodes, mut rest) = (BTreeSet::new(), BTreeSet::new());
    let packages = meta["packages"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for wanted in NODE_PACKAGES {
        if !packages.iter().any(|p| p["name"] == *wanted) {
            bail!("lanes.rs names package {wanted:?}, which the workspace does not have");
        }
    }
    for package in packages {
        let lane = if NODE_PACKAGES.contains(&package["name"].as_str().unwrap_or_default()) {
            &mut nodes
        } else {
            &mut rest
        };
        for target in package["targets"].as_array().into_iter().flatten() {
            // `test = false` targets are left out, as a plain `cargo test` leaves them.
            let is_test = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "test"))
                && target["test"] != false;
            if is_test && let Some(name) = target["name"].as_str() {
                lane.insert(name.to_string());
            }
        }
    }
    Ok((nodes, rest))
}

/// `cargo` commands run one after another in a thread, their output lines printed with the
/// lane's name in front; the lane stops at the first that fails.
struct Lane {
    name: &'static str,
    runner: JoinHandle<Result<bool>>,
}

impl Lane {
    fn spawn(name: &'static str, commands: Vec<Vec<String>>, env: &[(&str, &OsStr)]) -> Lane {
        let env: Vec<(String, std::ffi::OsString)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_os_string()))
            .collect();
        let runner = std::thread::spawn(move || {
            let started = Instant::now();
            let mut passed = true;
            for args in commands {
                if !run_prefixed(name, &args, &env)? {
                    passed = false;
                    break;
                }
            }
            eprintln!(
                "    [{name}] {} in {:.1}s",
                if passed { "passed" } else { "FAILED" },
                started.elapsed().as_secs_f64()
            );
            Ok(passed)
        });
        Lane { name, runner }
    }

    /// Waits for the lane; true if every test in it passed.
    fn wait(self) -> Result<bool> {
        self.runner
            .join()
            .map_err(|_| anyhow::anyhow!("lane {} panicked", self.name))?
    }
}

/// Runs `cargo args`, printing its output lines behind `[name]`; true if it succeeded.
fn run_prefixed(
    name: &'static str,
    args: &[String],
    env: &[(String, std::ffi::OsString)],
) -> Result<bool> {
    eprintln!("    [{name}] cargo {}", args.join(" "));
    let mut child = cargo_command()
        .args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    let (done, drained) = mpsc::channel();
    let mut printers = 0;
    if let Some(out) = child.stdout.take() {
        print_lines(name, out, done.clone());
        printers += 1;
    }
    if let Some(err) = child.stderr.take() {
        print_lines(name, err, done);
        printers += 1;
    }
    let status = child.wait()?;
    // The pipes end when every holder closes them; a leftover grandchild may hold one for
    // longer, so the rest of its output is not waited for beyond a few seconds.
    for _ in 0..printers {
        if drained.recv_timeout(Duration::from_secs(5)).is_err() {
            break;
        }
    }
    Ok(status.success())
}

/// Prints `from`'s lines behind `[name]` until it ends (invalid UTF-8 shown lossily, so the
/// pipe is always drained), then reports on `done`.
fn print_lines(name: &'static str, from: impl Read + Send + 'static, done: mpsc::Sender<()>) {
    std::thread::spawn(move || {
        let mut from = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match from.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => eprintln!("[{name}] {}", String::from_utf8_lossy(&line).trim_end()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}
