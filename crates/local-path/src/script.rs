//! Running the user's `setup`/`teardown` exactly as upstream's helper pod does: `/bin/sh <script>
//! -p <VOL_DIR> -s <bytes> -m <mode> -a <create|delete>` with `VOL_DIR`, `VOL_MODE` and
//! `VOL_SIZE_BYTES` in the environment. Values travel as arguments and environment only, never
//! spliced into a shell string, so a claim name cannot inject commands.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::io::AsyncReadExt;

use crate::task::{Op, Script};

/// Output kept per run (the rest is cut: a chatty script cannot grow the task object).
const OUTPUT_LIMIT: usize = 4096;

#[derive(Debug, Error)]
pub enum ScriptError {
    #[error("cannot write the script to a temporary file: {0}")]
    TempFile(#[source] std::io::Error),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op} process timeout after {secs} seconds; output: {output}")]
    Timeout {
        op: &'static str,
        secs: u64,
        output: String,
    },
    #[error("{op} script failed ({status}); output: {output}")]
    Failed {
        op: &'static str,
        status: String,
        output: String,
    },
}

/// One run of a script.
pub struct Run<'a> {
    pub op: Op,
    pub script: &'a Script,
    pub vol_dir: &'a str,
    pub size_bytes: u64,
    pub vol_mode: &'a str,
    pub extra_env: &'a BTreeMap<String, String>,
    pub timeout: Duration,
}

/// Runs the script to completion; returns its combined output (cut to a few KiB).
pub async fn run(r: &Run<'_>) -> Result<String, ScriptError> {
    // The script file must outlive the child; dropped (deleted) when this function returns.
    let mut file = None;
    let (program, mut args) = match r.script {
        Script::Shell(text) => {
            let text = text.clone();
            // File I/O blocks: off the async threads.
            let f = tokio::task::spawn_blocking(move || {
                let mut f = tempfile::NamedTempFile::new()?;
                f.write_all(text.as_bytes())?;
                Ok(f)
            })
            .await
            .map_err(|e| ScriptError::TempFile(std::io::Error::other(e)))?
            .map_err(ScriptError::TempFile)?;
            let path = f.path().display().to_string();
            file = Some(f);
            ("/bin/sh".to_string(), vec![path])
        }
        Script::Command(cmd) => (cmd.clone(), Vec::new()),
    };
    args.extend([
        "-p".into(),
        r.vol_dir.into(),
        "-s".into(),
        r.size_bytes.to_string(),
        "-m".into(),
        r.vol_mode.into(),
        "-a".into(),
        r.op.as_str().into(),
    ]);
    let mut cmd = tokio::process::Command::new(&program);
    cmd.args(&args)
        .envs(
            r.extra_env
                .iter()
                .filter(|(k, _)| crate::task::EXTRA_ENV_KEYS.contains(&k.as_str())),
        )
        .env("VOL_DIR", r.vol_dir)
        .env("VOL_MODE", r.vol_mode)
        .env("VOL_SIZE_BYTES", r.size_bytes.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| ScriptError::Spawn {
        program: program.clone(),
        source,
    })?;
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let collect = async {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let read_out = async {
            if let Some(s) = stdout.as_mut() {
                let _ = s.read_to_end(&mut out).await;
            }
        };
        let read_err = async {
            if let Some(s) = stderr.as_mut() {
                let _ = s.read_to_end(&mut err).await;
            }
        };
        tokio::join!(read_out, read_err);
        let status = child.wait().await;
        out.extend_from_slice(&err);
        (status, out)
    };
    let op = r.op.as_str();
    let result = tokio::time::timeout(r.timeout, collect).await;
    drop(file);
    match result {
        Err(_) => Err(ScriptError::Timeout {
            op,
            secs: r.timeout.as_secs(),
            output: String::new(),
        }),
        Ok((status, out)) => {
            let output = cut(&out);
            match status {
                Ok(s) if s.success() => Ok(output),
                Ok(s) => Err(ScriptError::Failed {
                    op,
                    status: s.to_string(),
                    output,
                }),
                Err(e) => Err(ScriptError::Failed {
                    op,
                    status: e.to_string(),
                    output,
                }),
            }
        }
    }
}

fn cut(out: &[u8]) -> String {
    let start = out.len().saturating_sub(OUTPUT_LIMIT);
    String::from_utf8_lossy(&out[start..]).trim().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_with(script: &Script, dir: &str, timeout: Duration) -> Result<String, ScriptError> {
        let env = BTreeMap::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run(&Run {
            op: Op::Create,
            script,
            vol_dir: dir,
            size_bytes: 42,
            vol_mode: "Filesystem",
            extra_env: &env,
            timeout,
        }))
    }

    #[test]
    fn upstream_env_and_args() {
        let s = Script::Shell(r#"echo "$VOL_DIR|$VOL_MODE|$VOL_SIZE_BYTES|$*""#.into());
        let out = run_with(&s, "/x/y", Duration::from_secs(10)).unwrap();
        assert_eq!(
            out,
            "/x/y|Filesystem|42|-p /x/y -s 42 -m Filesystem -a create"
        );
    }

    #[test]
    fn no_injection_through_values() {
        let tmp = tempfile::tempdir().unwrap();
        let marker = tmp.path().join("pwned");
        let dir = format!("/x/$(touch {})", marker.display());
        let s = Script::Shell(
            r#"mkdir -p "$(dirname "$VOL_DIR")" 2>/dev/null; echo "$VOL_DIR""#.into(),
        );
        let out = run_with(&s, &dir, Duration::from_secs(10)).unwrap();
        assert!(out.ends_with(&dir));
        assert!(!marker.exists());
    }

    #[test]
    fn failure_and_timeout() {
        let s = Script::Shell("echo boom >&2; exit 3".into());
        let e = run_with(&s, "/x", Duration::from_secs(10)).unwrap_err();
        assert!(e.to_string().contains("boom"), "{e}");
        let s = Script::Shell("sleep 5".into());
        let e = run_with(&s, "/x", Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, ScriptError::Timeout { .. }));
    }
}
