//! `cargo run -p xtask -- code-order --kubeconfig <up's kubeconfig>`: finds which functions our
//! components run in the seed cluster and writes them to `images/code-order/<arch>.txt.gz`, the
//! order the images' binaries are linked in (`images::link`).
//!
//! It runs against the cluster `xtask up` started, whose images were built from this checkout:
//! each of our Deployments and DaemonSets is switched for a while to the same binary (the
//! build's unstripped copy, whose symbols the list names) under `valgrind --tool=callgrind`,
//! which records every function executed (`callgrind`). While they run, the household
//! certificate is issued again and the app is requested through the ingress; then the objects
//! are put back as they were, and each process writes its record as it exits. The objects as
//! they were are also kept in `target/code-order-saved.json` until they are back, so that an
//! interrupted run can be undone (`--restore`). The list is this machine's architecture's; the
//! other architecture's binaries are then built and the list carried over to their symbols
//! (`carry`).

mod callgrind;
mod carry;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::images::{self, Arch, link};
use crate::{paths, setup, step};
use callgrind::Program;

/// `(namespace, kind, name, binary, how the container starts it)` of every workload running
/// one of our binaries.
const WORKLOADS: &[(&str, &str, &str, &str, Program)] = &[
    (
        "cert-manager",
        "deployment",
        "cert-manager",
        "cert-manager-controller",
        Program::Command,
    ),
    (
        "cert-manager",
        "deployment",
        "cert-manager-cainjector",
        "cert-manager-cainjector",
        Program::Command,
    ),
    (
        "cert-manager",
        "deployment",
        "cert-manager-webhook",
        "cert-manager-webhook",
        Program::Command,
    ),
    (
        "ingress-nginx",
        "deployment",
        "ingress-nginx-controller",
        "ingress-controller",
        Program::FirstArg,
    ),
    (
        "kube-flannel",
        "daemonset",
        "kube-flannel-ds",
        "flanneld",
        Program::Command,
    ),
    (
        "local-path-storage",
        "deployment",
        "local-path-provisioner",
        "local-path-provisioner",
        Program::Command,
    ),
    (
        "local-path-storage",
        "daemonset",
        "local-path-agent",
        "local-path-provisioner",
        Program::Command,
    ),
];

/// The household app's certificate and where the ingress serves it (deploy/, the seed's
/// NodePort).
const TLS_NAMESPACE: &str = "household-task-manager";
const TLS_SECRET: &str = "household-task-manager-tls";
const APP_HOST: &str = "household-task-mgr.duckdns.org";
const HTTPS_NODE_PORT: u16 = 30894;

/// What `code-order` does.
pub enum Mode<'a> {
    /// Profile the cluster `up` runs (its kubeconfig, for how long) and carry the list over.
    Profile(&'a Path, u64),
    /// Put back the workloads an interrupted run left under valgrind.
    Restore(&'a Path),
    /// Only carry this machine's list over to the other architecture.
    Carry,
}

pub fn run(mode: Mode) -> Result<()> {
    let native = Arch::native()?;
    let names = match mode {
        Mode::Profile(kubeconfig, seconds) => {
            setup::ensure_packages(&["valgrind", "curl", "binutils"])?;
            let names = profile(&Kubectl::new(kubeconfig), kubeconfig, seconds)?;
            write(&native, &names)?;
            names
        }
        Mode::Restore(kubeconfig) => return restore_saved(&Kubectl::new(kubeconfig)),
        Mode::Carry => {
            setup::ensure_packages(&["binutils"])?;
            link::read_order(&native)?
        }
    };
    for arch in [images::AMD64, images::ARM64] {
        if arch == native {
            continue;
        }
        let mut dirs = Vec::new();
        step(
            &format!("{} binaries, to carry the list over", arch.name),
            || {
                dirs = images::build_static(&[arch], images::BINARIES, images::SHIP_PROFILE)?;
                Ok(())
            },
        )?;
        let dir = dirs
            .first()
            .context("build_static returns one directory per arch")?;
        write(&arch, &carry::carry_over(&names, dir)?)?;
    }
    eprintln!("    `cargo run -p xtask -- images` links with the new lists");
    Ok(())
}

fn write(arch: &Arch, names: &BTreeSet<String>) -> Result<()> {
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    link::write_order(arch, &list)?;
    eprintln!(
        "    {}: {} functions ({} KiB unpacked) written to {}",
        arch.name,
        names.len(),
        list.len() / 1024,
        link::order_source(arch).display()
    );
    Ok(())
}

/// Runs every workload under callgrind while the cluster works; returns the functions seen.
fn profile(kubectl: &Kubectl, kubeconfig: &Path, seconds: u64) -> Result<BTreeSet<String>> {
    let work = tempfile::Builder::new().prefix("code-order-").tempdir()?;
    let (bin, out) = (work.path().join("bin"), work.path().join("out"));
    copy_binaries(&bin)?;
    std::fs::create_dir_all(&out)?;
    set_mode(work.path(), 0o755)?;
    // The pods' users (cert-manager runs as 1000) write their records here.
    set_mode(&out, 0o1777)?;

    let saved = profile_workloads(kubectl, &bin, &out)?;
    let exercised = exercise(kubectl, kubeconfig, seconds);
    let restored = restore(kubectl, &saved);
    let records = exercised
        .and(restored)
        .and_then(|()| wait_for_records(&out, &saved));
    let records = match records {
        Ok(records) => records,
        Err(e) => {
            // Pods may still write there, and the records tell what went wrong.
            let kept = work.keep();
            return Err(e.context(format!("records kept in {}", kept.display())));
        }
    };
    let mut names = BTreeSet::new();
    for record in &records {
        let these = callgrind::executed(record)?;
        eprintln!("    {}: {} functions", record.display(), these.len());
        names.extend(these);
    }
    Ok(names)
}

struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
    fn new(kubeconfig: &Path) -> Kubectl {
        Kubectl {
            program: paths::k8s_bin_dir().join("kubectl"),
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    fn output(&self, args: &[&str]) -> Result<String> {
        let out = self
            .command()
            .args(args)
            .output()
            .context("running kubectl")?;
        if !out.status.success() {
            bail!(
                "kubectl {}: {}",
                args.join(" "),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
                .trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn get(&self, namespace: &str, kind: &str, name: &str) -> Result<Value> {
        let json = self.output(&["-n", namespace, "get", kind, name, "-o", "json"])?;
        Ok(serde_json::from_str(&json)?)
    }

    /// `kubectl replace` with `object` as read, less what the server owns.
    fn replace(&self, object: &Value) -> Result<()> {
        let mut object = object.clone();
        if let Some(meta) = object["metadata"].as_object_mut() {
            for field in [
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "generation",
                "managedFields",
                "selfLink",
            ] {
                meta.remove(field);
            }
        }
        if let Some(object) = object.as_object_mut() {
            object.remove("status");
        }
        let mut child = self
            .command()
            .args(["replace", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running kubectl replace")?;
        serde_json::to_writer(child.stdin.take().context("kubectl's stdin")?, &object)?;
        let status = child.wait()?;
        if !status.success() {
            bail!("kubectl replace failed ({status})");
        }
        Ok(())
    }
}

/// The unstripped binaries the running images were made from (the shipped profiles' output).
fn copy_binaries(to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    let arch = images::Arch::native()?;
    for (_, bin) in images::BINARIES {
        let built = images::target_dir()
            .join(arch.triple)
            .join(images::binary_profile(bin, images::SHIP_PROFILE))
            .join(bin);
        if !built.is_file() {
            bail!(
                "{} is missing: start the cluster with `cargo run -p xtask -- up` first",
                built.display()
            );
        }
        std::fs::copy(&built, to.join(bin))
            .with_context(|| format!("copying {}", built.display()))?;
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

/// Where the objects as they were are kept while they are rewritten.
fn saved_path() -> PathBuf {
    images::target_dir().join("code-order-saved.json")
}

/// Switches every workload to its binary under callgrind; returns the objects as they were.
/// On any failure the workloads already switched are put back.
fn profile_workloads(kubectl: &Kubectl, bin: &Path, out: &Path) -> Result<Vec<Value>> {
    if saved_path().exists() {
        bail!(
            "{} exists: an earlier run did not finish; put the workloads back with \
             `cargo run -p xtask -- code-order --kubeconfig <kubeconfig> --restore`",
            saved_path().display()
        );
    }
    let mut saved = Vec::new();
    for (namespace, kind, name, _, _) in WORKLOADS {
        let object = kubectl.get(namespace, kind, name)?;
        if callgrind::is_rewritten(&object) {
            bail!("{kind} {namespace}/{name} is still under valgrind from an earlier run");
        }
        saved.push(object);
    }
    std::fs::write(saved_path(), serde_json::to_vec(&saved)?)
        .with_context(|| format!("writing {}", saved_path().display()))?;
    let switched = (|| -> Result<()> {
        for (object, (_, _, _, binary, program)) in saved.iter().zip(WORKLOADS) {
            let mut profiled = object.clone();
            callgrind::rewrite(&mut profiled, binary, *program, bin, out)?;
            kubectl.replace(&profiled)?;
        }
        Ok(())
    })();
    if let Err(e) = switched {
        if let Err(restoring) = restore(kubectl, &saved) {
            eprintln!("    could not put the workloads back: {restoring:#}");
        }
        return Err(e);
    }
    Ok(saved)
}

/// What the footprint covers besides idling: the certificate issued again (the ACME client,
/// the solver's Ingress and pod, the secret written) and the app requested over HTTPS.
fn exercise(kubectl: &Kubectl, kubeconfig: &Path, seconds: u64) -> Result<()> {
    let started = Instant::now();
    for (namespace, kind, name, _, _) in WORKLOADS {
        kubectl
            .output(&[
                "-n",
                namespace,
                "rollout",
                "status",
                kind,
                name,
                "--timeout=180s",
            ])
            .with_context(|| format!("waiting for {kind} {namespace}/{name} under valgrind"))?;
    }
    std::thread::sleep(Duration::from_secs(20));
    kubectl.output(&["-n", TLS_NAMESPACE, "delete", "secret", TLS_SECRET])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while kubectl
        .output(&["-n", TLS_NAMESPACE, "get", "secret", TLS_SECRET])
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the certificate was not issued again within 300 s under valgrind");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    request_app(kubectl, kubeconfig)?;
    let left = Duration::from_secs(seconds).saturating_sub(started.elapsed());
    eprintln!("    idling {} s more", left.as_secs());
    std::thread::sleep(left);
    Ok(())
}

/// Twenty requests for the app over HTTPS through a node's NodePort, with the pebble-issued
/// certificate; an error when none is answered.
fn request_app(kubectl: &Kubectl, kubeconfig: &Path) -> Result<()> {
    let node = kubectl.output(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    ])?;
    let pebble_root = kubeconfig.with_file_name("pebble-root.pem");
    let mut answered = 0;
    for _ in 0..20 {
        let status = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--max-time", "30", "--cacert"])
            .arg(&pebble_root)
            .arg("--resolve")
            .arg(format!("{APP_HOST}:{HTTPS_NODE_PORT}:{}", node.trim()))
            .arg(format!("https://{APP_HOST}:{HTTPS_NODE_PORT}/"))
            .status()?;
        answered += usize::from(status.success());
    }
    if answered == 0 {
        bail!(
            "no request through the ingress was answered (CA {})",
            pebble_root.display()
        );
    }
    Ok(())
}

/// Puts `saved` back; the saved file is removed once all of them are.
fn restore(kubectl: &Kubectl, saved: &[Value]) -> Result<()> {
    let mut result = Ok(());
    for object in saved {
        if let Err(e) = kubectl.replace(object) {
            eprintln!(
                "    could not put back {}: {e:#}",
                object["metadata"]["name"]
            );
            result = Err(e);
        }
    }
    if result.is_ok() {
        std::fs::remove_file(saved_path())?;
    }
    result
}

/// `--restore`: puts back what an interrupted run saved.
fn restore_saved(kubectl: &Kubectl) -> Result<()> {
    let saved: Vec<Value> = serde_json::from_slice(
        &std::fs::read(saved_path())
            .with_context(|| format!("reading {}", saved_path().display()))?,
    )?;
    restore(kubectl, &saved)
}

/// The records the profiled processes write as they exit (one per pod), once every workload
/// has one and all are complete.
fn wait_for_records(out: &Path, saved: &[Value]) -> Result<Vec<PathBuf>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let records: Vec<PathBuf> = std::fs::read_dir(out)?
            .filter_map(|e| Some(e.ok()?.path()))
            .collect();
        let every_workload = saved.iter().all(|o| {
            let prefix = format!("{}.", o["metadata"]["name"].as_str().unwrap_or_default());
            records.iter().any(|p| {
                p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with(&prefix))
            })
        });
        let incomplete: Vec<&PathBuf> = records
            .iter()
            .filter(|r| !callgrind::is_complete(r))
            .collect();
        if every_workload && incomplete.is_empty() {
            return Ok(records);
        }
        if Instant::now() > deadline {
            bail!("records still missing or incomplete after 300 s: {incomplete:?}");
        }
        std::thread::sleep(Duration::from_secs(5));
    }
}
