//! A workload's pod template rewritten to run its binary under `valgrind --tool=callgrind`, and
//! the records callgrind writes read back as function names.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

/// Where the pods find the binaries, write their records, and valgrind its temporary files.
const BIN_MOUNT: &str = "/code-order/bin";
const OUT_MOUNT: &str = "/code-order/out";
const TMP_MOUNT: &str = "/code-order/tmp";

/// Marks an object rewritten here, so that an interrupted run is noticed.
pub const MARKER: &str = "homecluster.dev/code-order";

/// How a workload's first container starts its program.
#[derive(Clone, Copy)]
pub enum Program {
    /// `command` starts with the program (or the image's entrypoint is the program, and
    /// `command` is unset): its arguments follow it, or are `args`.
    Command,
    /// The image has no entrypoint and `args` starts with the program's path (ingress-nginx's
    /// manifests: `args: [/nginx-ingress-controller, ...]`).
    FirstArg,
}

/// Rewrites `object`'s pod template so that its first container runs `binary` (from `bin` on
/// the node) under callgrind, writing its record to `out`. The probes and resources are
/// dropped (valgrind is slow and larger); the security contexts are kept (flanneld needs its
/// capabilities, cert-manager runs as a user).
pub fn rewrite(
    object: &mut Value,
    binary: &str,
    program: Program,
    bin: &Path,
    out: &Path,
) -> Result<()> {
    let name = object["metadata"]["name"]
        .as_str()
        .context("object without a name")?
        .to_owned();
    if let Some(meta) = object["metadata"].as_object_mut() {
        let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
        if let Some(annotations) = annotations.as_object_mut() {
            annotations.insert(MARKER.into(), json!("profiling"));
        }
    }
    let pod = object
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
        .context("no pod template")?;
    pod.insert("terminationGracePeriodSeconds".into(), json!(120));
    let volumes = vec![
        json!({"name": "code-order-usr", "hostPath": {"path": "/usr"}}),
        json!({"name": "code-order-lib", "hostPath": {"path": "/lib"}}),
        json!({"name": "code-order-lib64", "hostPath": {"path": "/lib64"}}),
        json!({"name": "code-order-bin", "hostPath": {"path": bin.display().to_string()}}),
        json!({"name": "code-order-out", "hostPath": {"path": out.display().to_string()}}),
        json!({"name": "code-order-tmp", "emptyDir": {}}),
    ];
    append(pod, "volumes", volumes);
    let container = pod
        .get_mut("containers")
        .and_then(Value::as_array_mut)
        .and_then(|c| c.first_mut())
        .and_then(Value::as_object_mut)
        .context("no container")?;
    run_under_callgrind(container, &name, binary, program);
    mount_and_name(container);
    Ok(())
}

/// The container's command becomes callgrind running `binary` with the program's own
/// arguments; the probes and resources go.
fn run_under_callgrind(
    container: &mut serde_json::Map<String, Value>,
    name: &str,
    binary: &str,
    program: Program,
) {
    let mut arguments: Vec<Value> = match container.get("command").and_then(Value::as_array) {
        Some(command) => command.iter().skip(1).cloned().collect(),
        None => Vec::new(),
    };
    if let (Program::FirstArg, Some(args)) = (
        program,
        container.get_mut("args").and_then(Value::as_array_mut),
    ) && !args.is_empty()
    {
        args.remove(0);
    }
    let mut command = vec![
        // Debian's `valgrind` is a shell script; the images have no shell.
        json!("/usr/bin/valgrind.bin"),
        json!("--tool=callgrind"),
        json!("--vgdb=no"),
        json!("--demangle=no"),
        json!("--dump-instr=no"),
        json!("--compress-strings=no"),
        json!(format!(
            "--callgrind-out-file={OUT_MOUNT}/{name}.%q{{CODE_ORDER_POD}}"
        )),
        json!(format!("{BIN_MOUNT}/{binary}")),
    ];
    command.append(&mut arguments);
    container.insert("command".into(), Value::Array(command));
    for field in [
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "resources",
    ] {
        container.remove(field);
    }
}

/// The mounts callgrind needs, and the variables naming its record and its temporary files.
fn mount_and_name(container: &mut serde_json::Map<String, Value>) {
    append(
        container,
        "env",
        vec![
            json!({"name": "CODE_ORDER_POD",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
            // valgrind writes a file at start, and the root filesystem may be read-only.
            json!({"name": "TMPDIR", "value": TMP_MOUNT}),
        ],
    );
    append(
        container,
        "volumeMounts",
        vec![
            json!({"name": "code-order-usr", "mountPath": "/usr", "readOnly": true}),
            json!({"name": "code-order-lib", "mountPath": "/lib", "readOnly": true}),
            json!({"name": "code-order-lib64", "mountPath": "/lib64", "readOnly": true}),
            json!({"name": "code-order-bin", "mountPath": BIN_MOUNT, "readOnly": true}),
            json!({"name": "code-order-out", "mountPath": OUT_MOUNT}),
            json!({"name": "code-order-tmp", "mountPath": TMP_MOUNT}),
        ],
    );
}

/// Appends `items` to the list `field` of `object`, creating it.
fn append(object: &mut serde_json::Map<String, Value>, field: &str, mut items: Vec<Value>) {
    match object.get_mut(field).and_then(Value::as_array_mut) {
        Some(list) => list.append(&mut items),
        None => {
            object.insert(field.into(), Value::Array(items));
        }
    }
}

/// Whether `object` is still rewritten by an earlier run.
pub fn is_rewritten(object: &Value) -> bool {
    object["metadata"]["annotations"].get(MARKER).is_some()
}

/// Whether a record is complete: callgrind writes `totals:` last, as the process exits.
pub fn is_complete(record: &Path) -> bool {
    let Ok(file) = std::fs::File::open(record) else {
        return false;
    };
    std::io::BufReader::new(file)
        .lines()
        .map_while(|l| l.ok())
        .any(|l| l.starts_with("totals:"))
}

/// The symbols of every function a callgrind record saw run (`fn=` and `cfn=` lines).
pub fn executed(record: &Path) -> Result<BTreeSet<String>> {
    let file =
        std::fs::File::open(record).with_context(|| format!("opening {}", record.display()))?;
    let mut names = BTreeSet::new();
    for line in std::io::BufReader::new(file).split(b'\n') {
        let line = line.with_context(|| format!("reading {}", record.display()))?;
        let line = String::from_utf8_lossy(&line);
        let Some(name) = line
            .strip_prefix("fn=")
            .or_else(|| line.strip_prefix("cfn="))
        else {
            continue;
        };
        if let Some(name) = symbol(name.trim()) {
            names.insert(name.to_owned());
        }
    }
    if names.is_empty() {
        bail!("{} names no function", record.display());
    }
    Ok(names)
}

/// A record's function name as the symbol table spells it: not an address, not valgrind's
/// `(below main)`, and without the `'2` callgrind appends to a recursion's inner level.
fn symbol(name: &str) -> Option<&str> {
    let name = match name.rsplit_once('\'') {
        Some((base, level)) if level.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    };
    let plain = !name.is_empty()
        && !name.starts_with("0x")
        && !name.contains(|c: char| c.is_whitespace() || c == '(' || c == ')');
    plain.then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command_of(object: &Value) -> Vec<&str> {
        object["spec"]["template"]["spec"]["containers"][0]["command"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect()
    }

    #[test]
    fn a_pod_runs_its_binary_under_callgrind_with_its_own_arguments() {
        let mut object = json!({
            "metadata": {"name": "ingress-nginx-controller"},
            "spec": {"template": {"spec": {
                "securityContext": {"runAsNonRoot": true},
                "containers": [{
                    "name": "controller",
                    "args": ["/nginx-ingress-controller", "--configmap=x/y"],
                    "env": [{"name": "POD_NAME", "value": "x"}],
                    "livenessProbe": {}, "readinessProbe": {}, "resources": {},
                    "securityContext": {"readOnlyRootFilesystem": true},
                }],
            }}},
        });
        let (bin, out) = (Path::new("/tmp/b"), Path::new("/tmp/o"));
        rewrite(
            &mut object,
            "ingress-controller",
            Program::FirstArg,
            bin,
            out,
        )
        .unwrap();
        let command = command_of(&object);
        assert_eq!(command[0], "/usr/bin/valgrind.bin");
        assert_eq!(command.last(), Some(&"/code-order/bin/ingress-controller"));
        let pod = &object["spec"]["template"]["spec"];
        let container = &pod["containers"][0];
        assert_eq!(container["args"], json!(["--configmap=x/y"]));
        for gone in ["livenessProbe", "readinessProbe", "resources"] {
            assert!(container.get(gone).is_none(), "{gone} kept");
        }
        // Its rights are its own: flanneld needs NET_ADMIN, cert-manager runs as a user.
        assert!(container.get("securityContext").is_some());
        assert!(pod.get("securityContext").is_some());
        assert_eq!(container["env"].as_array().unwrap().len(), 3);
        assert_eq!(pod["volumes"].as_array().unwrap().len(), 6);
        assert!(is_rewritten(&object));

        let mut object = json!({
            "metadata": {"name": "local-path-agent"},
            "spec": {"template": {"spec": {
                "containers": [{"command": ["local-path-provisioner", "agent"]}],
            }}},
        });
        rewrite(
            &mut object,
            "local-path-provisioner",
            Program::Command,
            bin,
            out,
        )
        .unwrap();
        let command = command_of(&object);
        assert_eq!(
            command[command.len() - 2..],
            ["/code-order/bin/local-path-provisioner", "agent"]
        );

        let mut empty = json!({"metadata": {"name": "x"}, "spec": {"template": {"spec": {}}}});
        assert!(rewrite(&mut empty, "x", Program::Command, bin, out).is_err());
    }

    #[test]
    fn executed_functions_are_read_from_fn_and_cfn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let record = dir.path().join("r");
        std::fs::write(
            &record,
            "events: Ir\nfn=_ZN4main3runE\n1 5\ncfn=memcpy\ncalls=1 0\n1 3\n\
             cfn=_ZN4main3runE'2\nfn=0x0000000000401000\n1 1\nfn=(below main)\ntotals: 10\n",
        )
        .unwrap();
        let names: Vec<String> = executed(&record).unwrap().into_iter().collect();
        assert_eq!(names, ["_ZN4main3runE", "memcpy"]);
        assert!(is_complete(&record));
        std::fs::write(&record, "events: Ir\nfn=_ZN4main3runE\n").unwrap();
        assert!(!is_complete(&record));
    }
}
