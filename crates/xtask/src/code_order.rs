//! `cargo run -p xtask -- code-order --kubeconfig <up's kubeconfig>`: finds which functions our
//! components run in the seed cluster and writes them to `images/code-order.txt.gz`, the order
//! the images' binaries are linked in (`images::link`).
//!
//! It runs against the cluster `xtask up` started, whose images were built from this checkout:
//! each of our Deployments and DaemonSets is switched for a while to the same binary (the
//! build's unstripped copy, whose symbols the list names) under `valgrind --tool=callgrind`,
//! which records every function executed. Valgrind and the binary come from this machine
//! through hostPath volumes (the images have neither a shell nor a libc; `valgrind.bin`, as
//! Debian's `valgrind` is a shell script), and the probes and resources are dropped (valgrind
//! is slow and larger). While they run, the household certificate is issued again and the app is
//! requested through the ingress; then the objects are put back as they were, and each process
//! writes its record as it exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::images::{self, link};
use crate::{paths, setup};

/// `(namespace, kind, name, binary)` of every workload running one of our binaries.
const WORKLOADS: &[(&str, &str, &str, &str)] = &[
    (
        "cert-manager",
        "deployment",
        "cert-manager",
        "cert-manager-controller",
    ),
    (
        "cert-manager",
        "deployment",
        "cert-manager-cainjector",
        "cert-manager-cainjector",
    ),
    (
        "cert-manager",
        "deployment",
        "cert-manager-webhook",
        "cert-manager-webhook",
    ),
    (
        "ingress-nginx",
        "deployment",
        "ingress-nginx-controller",
        "ingress-controller",
    ),
    ("kube-flannel", "daemonset", "kube-flannel-ds", "flanneld"),
    (
        "local-path-storage",
        "deployment",
        "local-path-provisioner",
        "local-path-provisioner",
    ),
    (
        "local-path-storage",
        "daemonset",
        "local-path-agent",
        "local-path-provisioner",
    ),
];

/// Where the pods find the binaries and write their records.
const BIN_MOUNT: &str = "/code-order/bin";
const OUT_MOUNT: &str = "/code-order/out";
const TMP_MOUNT: &str = "/code-order/tmp";

pub fn run(kubeconfig: &Path, seconds: u64) -> Result<()> {
    setup::ensure_packages(&["valgrind", "curl"])?;
    let kubectl = Kubectl {
        program: paths::k8s_bin_dir().join("kubectl"),
        kubeconfig: kubeconfig.to_path_buf(),
    };
    let work = tempfile::Builder::new().prefix("code-order-").tempdir()?;
    let (bin, out) = (work.path().join("bin"), work.path().join("out"));
    copy_binaries(&bin)?;
    std::fs::create_dir_all(&out)?;
    // The pods' users (cert-manager runs as 1000) write their records here.
    set_mode(work.path(), 0o755)?;
    set_mode(&out, 0o777)?;

    let saved = profile_workloads(&kubectl, &bin, &out)?;
    let exercised = exercise(&kubectl, kubeconfig, seconds);
    let restored = restore(&kubectl, &saved);
    exercised?;
    restored?;
    let records = wait_for_records(&out, &saved)?;

    let mut names = std::collections::BTreeSet::new();
    for record in &records {
        let these = executed(record)?;
        eprintln!("    {}: {} functions", record.display(), these.len());
        names.extend(these);
    }
    let list: String = names.iter().map(|n| format!("{n}\n")).collect();
    write_order(&list)?;
    eprintln!(
        "    {} functions written to {} ({} KiB unpacked); `cargo run -p xtask -- images` links with them",
        names.len(),
        link::order_source().display(),
        list.len() / 1024
    );
    Ok(())
}

struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
}

impl Kubectl {
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

/// Switches every workload to its binary under callgrind; returns the objects as they were.
fn profile_workloads(kubectl: &Kubectl, bin: &Path, out: &Path) -> Result<Vec<Value>> {
    let mut saved = Vec::new();
    for (namespace, kind, name, binary) in WORKLOADS {
        let object = kubectl.get(namespace, kind, name)?;
        let mut profiled = object.clone();
        under_callgrind(
            &mut profiled["spec"]["template"]["spec"],
            name,
            binary,
            bin,
            out,
        )
        .with_context(|| format!("{kind} {namespace}/{name}"))?;
        saved.push(object);
        if let Err(e) = kubectl.replace(&profiled) {
            restore(kubectl, &saved)?;
            return Err(e);
        }
    }
    Ok(saved)
}

/// Rewrites a pod template so that its first container runs `binary` under callgrind.
fn under_callgrind(
    pod: &mut Value,
    name: &str,
    binary: &str,
    bin: &Path,
    out: &Path,
) -> Result<()> {
    let container = &mut pod["containers"][0];
    let Some(fields) = container.as_object_mut() else {
        bail!("no container");
    };
    // The program's own arguments: after the program in `command`, or all of `args` but a
    // leading program path (an image without an entrypoint, such as the ingress's).
    let mut rest: Vec<Value> = match fields.get("command").and_then(Value::as_array) {
        Some(command) => command.iter().skip(1).cloned().collect(),
        None => Vec::new(),
    };
    if fields.get("command").is_none()
        && let Some(Value::Array(args)) = fields.get_mut("args")
        && args
            .first()
            .and_then(Value::as_str)
            .is_some_and(|a| a.starts_with('/'))
    {
        args.remove(0);
    }
    let mut command = vec![
        json!("/usr/bin/valgrind.bin"),
        json!("--tool=callgrind"),
        json!("--vgdb=no"),
        json!("--demangle=no"),
        json!("--dump-instr=no"),
        json!("--compress-strings=no"),
        json!(format!(
            "--callgrind-out-file={OUT_MOUNT}/{name}.%q{{CODE_ORDER_NODE}}"
        )),
        json!(format!("{BIN_MOUNT}/{binary}")),
    ];
    command.append(&mut rest);
    fields.insert("command".into(), Value::Array(command));
    for field in [
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "resources",
    ] {
        fields.remove(field);
    }
    let env = fields.entry("env").or_insert_with(|| json!([]));
    if let Some(env) = env.as_array_mut() {
        env.push(json!({"name": "CODE_ORDER_NODE",
            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}));
        // valgrind writes a file at start, and the root filesystem may be read-only.
        env.push(json!({"name": "TMPDIR", "value": TMP_MOUNT}));
    }
    // (volume, hostPath or an emptyDir, mount path, read-only)
    let mounts: [(&str, Option<String>, &str, bool); 6] = [
        ("code-order-usr", Some("/usr".into()), "/usr", true),
        ("code-order-lib", Some("/lib".into()), "/lib", true),
        ("code-order-lib64", Some("/lib64".into()), "/lib64", true),
        (
            "code-order-bin",
            Some(bin.display().to_string()),
            BIN_MOUNT,
            true,
        ),
        (
            "code-order-out",
            Some(out.display().to_string()),
            OUT_MOUNT,
            false,
        ),
        ("code-order-tmp", None, TMP_MOUNT, false),
    ];
    let volume_mounts = fields.entry("volumeMounts").or_insert_with(|| json!([]));
    for (volume, _, at, read_only) in &mounts {
        if let Some(list) = volume_mounts.as_array_mut() {
            list.push(json!({"name": volume, "mountPath": at, "readOnly": read_only}));
        }
    }
    let Some(pod) = pod.as_object_mut() else {
        bail!("no pod spec");
    };
    pod.insert("terminationGracePeriodSeconds".into(), json!(120));
    let volumes = pod.entry("volumes").or_insert_with(|| json!([]));
    for (volume, host, _, _) in &mounts {
        let source = match host {
            Some(path) => json!({"name": volume, "hostPath": {"path": path}}),
            None => json!({"name": volume, "emptyDir": {}}),
        };
        if let Some(list) = volumes.as_array_mut() {
            list.push(source);
        }
    }
    Ok(())
}

/// What the footprint covers besides idling: the certificate issued again (the ACME client,
/// the solver's Ingress and pod, the secret written) and the app requested over HTTPS.
fn exercise(kubectl: &Kubectl, kubeconfig: &Path, seconds: u64) -> Result<()> {
    let started = Instant::now();
    for (namespace, kind, name, _) in WORKLOADS {
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
    kubectl.output(&[
        "-n",
        "household-task-manager",
        "delete",
        "secret",
        "household-task-manager-tls",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while kubectl
        .output(&[
            "-n",
            "household-task-manager",
            "get",
            "secret",
            "household-task-manager-tls",
        ])
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("the certificate was not issued again within 300 s under valgrind");
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    let node = kubectl.output(&[
        "get",
        "nodes",
        "-o",
        "jsonpath={.items[0].status.addresses[?(@.type==\"InternalIP\")].address}",
    ])?;
    let pebble_root = kubeconfig.with_file_name("pebble-root.pem");
    for _ in 0..20 {
        let status = Command::new("curl")
            .args(["-sS", "-o", "/dev/null", "--max-time", "30", "--cacert"])
            .arg(&pebble_root)
            .arg("--resolve")
            .arg(format!(
                "household-task-mgr.duckdns.org:30894:{}",
                node.trim()
            ))
            .arg("https://household-task-mgr.duckdns.org:30894/")
            .status()?;
        if !status.success() {
            eprintln!("    warning: a request through the ingress failed ({status})");
        }
    }
    let left = Duration::from_secs(seconds).saturating_sub(started.elapsed());
    eprintln!("    idling {} s more", left.as_secs());
    std::thread::sleep(left);
    Ok(())
}

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
    result
}

/// The records the profiled processes write as they exit (one per pod), once all are complete.
fn wait_for_records(out: &Path, saved: &[Value]) -> Result<Vec<PathBuf>> {
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut last = Vec::new();
    loop {
        let mut records: Vec<(PathBuf, u64)> = std::fs::read_dir(out)?
            .filter_map(|e| e.ok())
            .filter_map(|e| Some((e.path(), e.metadata().ok()?.len())))
            .collect();
        records.sort();
        let complete = records.iter().all(|(_, len)| *len > 0)
            && saved.iter().all(|o| {
                let name = o["metadata"]["name"].as_str().unwrap_or_default();
                records.iter().any(|(p, _)| {
                    p.file_name()
                        .and_then(|f| f.to_str())
                        .is_some_and(|f| f.starts_with(&format!("{name}.")))
                })
            });
        if complete && records == last {
            return Ok(records.into_iter().map(|(p, _)| p).collect());
        }
        if Instant::now() > deadline {
            bail!(
                "the profiled pods did not all write their records in {}",
                out.display()
            );
        }
        last = records;
        std::thread::sleep(Duration::from_secs(5));
    }
}

/// The symbols of every function a callgrind record saw run (`fn=` and `cfn=` lines).
fn executed(record: &Path) -> Result<std::collections::BTreeSet<String>> {
    let text = std::fs::read(record).with_context(|| format!("reading {}", record.display()))?;
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("fn=").or_else(|| l.strip_prefix("cfn=")))
        .map(|n| n.trim())
        .filter(|n| !n.is_empty() && !n.starts_with("0x"))
        .map(str::to_owned)
        .collect())
}

fn write_order(list: &str) -> Result<()> {
    use std::io::Write;
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(list.as_bytes())?;
    let path = link::order_source();
    std::fs::write(&path, gz.finish()?).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_runs_its_binary_under_callgrind_with_its_own_arguments() {
        let mut pod = json!({
            "securityContext": {"runAsNonRoot": true},
            "containers": [{
                "name": "controller",
                "args": ["/nginx-ingress-controller", "--configmap=x/y"],
                "livenessProbe": {}, "readinessProbe": {}, "resources": {},
                "securityContext": {"readOnlyRootFilesystem": true},
            }],
        });
        let (bin, out) = (Path::new("/tmp/b"), Path::new("/tmp/o"));
        under_callgrind(
            &mut pod,
            "ingress-nginx-controller",
            "ingress-controller",
            bin,
            out,
        )
        .unwrap();
        let container = &pod["containers"][0];
        let command: Vec<&str> = container["command"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(command[0], "/usr/bin/valgrind.bin");
        assert_eq!(command.last(), Some(&"/code-order/bin/ingress-controller"));
        assert_eq!(container["args"], json!(["--configmap=x/y"]));
        for gone in ["livenessProbe", "readinessProbe", "resources"] {
            assert!(container.get(gone).is_none(), "{gone} kept");
        }
        // Its rights are its own: flanneld needs NET_ADMIN, cert-manager runs as a user.
        assert!(container.get("securityContext").is_some());
        assert_eq!(pod["volumes"].as_array().unwrap().len(), 6);

        let mut pod = json!({"containers": [{"command": ["local-path-provisioner", "agent"]}]});
        under_callgrind(
            &mut pod,
            "local-path-agent",
            "local-path-provisioner",
            bin,
            out,
        )
        .unwrap();
        let command = pod["containers"][0]["command"].as_array().unwrap();
        assert_eq!(
            command[command.len() - 2],
            "/code-order/bin/local-path-provisioner"
        );
        assert_eq!(command[command.len() - 1], "agent");
    }

    #[test]
    fn executed_functions_are_read_from_fn_and_cfn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("r");
        std::fs::write(
            &record,
            "events: Ir\nfn=_ZN4main3runE\n1 5\ncfn=memcpy\ncalls=1 0\n1 3\ncfn=_ZN4main3runE\nfn=0x0000000000401000\n1 1\n",
        )
        .unwrap();
        let names: Vec<String> = executed(&record).unwrap().into_iter().collect();
        assert_eq!(names, ["_ZN4main3runE", "memcpy"]);
    }
}
