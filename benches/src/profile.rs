//! Where a peer's CPU time goes during one load run: `perf record` on its process tree
//! (software `cpu-clock`: this VM exposes no hardware counters; no call graphs), summarised per
//! binary (kernel, the proxy's own code, libc) and as the top symbols. The report quotes these
//! lines next to each goal a run misses.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde::Serialize;

use crate::Error;

/// One profiled run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Profile {
    /// What ran (a scenario id) and against whom.
    pub scenario: String,
    pub peer: String,
    pub samples: u64,
    /// Share of samples per binary (`[kernel.kallsyms]`, `libc.so.6`, the program), largest
    /// first.
    pub binaries: Vec<Share>,
    /// The largest symbols over all binaries.
    pub top: Vec<Share>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Share {
    pub percent: f64,
    pub samples: u64,
    pub binary: String,
    /// Empty in the per-binary list.
    pub symbol: String,
}

/// Symbols kept per profile.
const TOP: usize = 12;

/// A `perf record` attached to running processes until [`Recording::finish`].
pub struct Recording {
    child: Child,
    file: PathBuf,
}

/// Starts sampling `pids` (all their threads) into `file`. Fails with the set-up command when
/// perf is not installed.
pub fn start(pids: &[u32], file: &Path) -> Result<Recording, Error> {
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    let child = Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "999", "--quiet", "-p"])
        .arg(list.join(","))
        .arg("-o")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Error::Tool {
            tool: "perf".into(),
            message: format!(
                "{e} (Debian's linux-perf; `cargo run -p xtask -- bench proxy` installs it)"
            ),
        })?;
    Ok(Recording {
        child,
        file: file.to_owned(),
    })
}

impl Recording {
    /// Stops sampling (SIGINT, as Ctrl-C: perf then writes its file) and summarises.
    pub fn finish(self, scenario: &str, peer: &str) -> Result<Profile, Error> {
        let pid = i32::try_from(self.child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::INT);
        }
        let mut child = self.child;
        let stopped = wait_until(&mut child, STOP_TIMEOUT)?;
        if !stopped {
            let _ = child.kill();
        }
        let out = child.wait_with_output()?;
        if !stopped {
            return Err(Error::Tool {
                tool: "perf record".into(),
                message: format!("still running {STOP_TIMEOUT:?} after SIGINT; killed"),
            });
        }
        // perf exits with 130 after SIGINT; a missing file is the real failure.
        if !self.file.exists() {
            return Err(Error::Tool {
                tool: "perf record".into(),
                message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        let binaries = parse(&report(&self.file, "dso")?);
        let mut top = parse(&report(&self.file, "dso,sym")?);
        top.truncate(TOP);
        let _ = std::fs::remove_file(&self.file);
        Ok(Profile {
            scenario: scenario.into(),
            peer: peer.into(),
            samples: binaries.iter().map(|s| s.samples).sum(),
            binaries,
            top,
        })
    }
}

/// How long perf may take to write its file after SIGINT (a few seconds for a run's samples).
const STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether `child` exits within `timeout`.
fn wait_until(child: &mut Child, timeout: std::time::Duration) -> Result<bool, Error> {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(true)
}

/// `perf report` of `file` sorted by `keys`, one line per entry with its sample count.
fn report(file: &Path, keys: &str) -> Result<String, Error> {
    let out = Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "-q",
            "-n",
            "--sort",
            keys,
            "-i",
        ])
        .arg(file)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() && !String::from_utf8_lossy(&out.stderr).contains("no samples") {
        return Err(Error::Tool {
            tool: "perf report".into(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(text)
}

/// Lines like `  28.92%  334  [kernel.kallsyms]  [k] do_syscall_64` (the symbol part only with
/// `--sort dso,sym`).
fn parse(text: &str) -> Vec<Share> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let percent = words.next()?.strip_suffix('%')?.parse().ok()?;
            let samples = words.next()?.parse().ok()?;
            let binary = words.next()?.to_string();
            // The rest: `[k] name` or `[.] name` (names may contain spaces).
            let rest: Vec<&str> = words.collect();
            let symbol = match rest.split_first() {
                Some((kind, name)) if kind.starts_with('[') => name.join(" "),
                _ => rest.join(" "),
            };
            Some(Share {
                percent,
                samples,
                binary,
                symbol,
            })
        })
        .collect()
}

impl Profile {
    /// The share of samples in the kernel.
    pub fn kernel_percent(&self) -> f64 {
        self.binaries
            .iter()
            .filter(|s| s.binary.starts_with("[kernel"))
            .map(|s| s.percent)
            .sum()
    }

    /// One line for a report: the split by binary and the largest user-space symbols.
    pub fn line(&self, symbols: usize) -> String {
        let split: Vec<String> = self
            .binaries
            .iter()
            .take(4)
            .map(|s| format!("{} {:.0} %", short_binary(&s.binary), s.percent))
            .collect();
        let user: Vec<String> = self
            .top
            .iter()
            .filter(|s| !s.binary.starts_with("[kernel"))
            .take(symbols)
            .map(|s| format!("`{}` {:.1} %", short_symbol(&s.symbol), s.percent))
            .collect();
        if user.is_empty() {
            return split.join(", ");
        }
        format!(
            "{}; user space led by {}",
            split.join(", "),
            user.join(", ")
        )
    }
}

fn short_binary(b: &str) -> &str {
    match b {
        "[kernel.kallsyms]" => "kernel",
        other => other,
    }
}

/// A symbol without its generic arguments' paths, at most 60 characters.
fn short_symbol(s: &str) -> String {
    let s: String = s.chars().filter(|c| *c != '|').collect();
    if s.chars().count() <= 60 {
        return s;
    }
    let cut: String = s.chars().take(59).collect();
    format!("{cut}…")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_that_does_not_stop_is_not_waited_for() {
        let mut slow = Command::new("sleep").arg("30").spawn().unwrap();
        let started = std::time::Instant::now();
        assert!(!wait_until(&mut slow, std::time::Duration::from_millis(200)).unwrap());
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        slow.kill().unwrap();
        slow.wait().unwrap();
        let mut quick = Command::new("true").spawn().unwrap();
        assert!(wait_until(&mut quick, std::time::Duration::from_secs(10)).unwrap());
    }

    #[test]
    fn reads_perf_report_lines() {
        let text = "    28.92%           334  [kernel.kallsyms]  [k] do_syscall_64\n\
                    \n\
                    17.75%           205  libc.so.6          [.] __GI___libc_write\n\
                     9.61%           111  ingress-controller  [.] <hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::parse\n";
        let shares = parse(text);
        assert_eq!(shares.len(), 3);
        assert_eq!(shares[0].binary, "[kernel.kallsyms]");
        assert_eq!(shares[0].samples, 334);
        assert_eq!(shares[1].symbol, "__GI___libc_write");
        assert!(shares[2].symbol.contains("Http1Transaction"));
        let by_binary =
            parse("    72.64%           839  [kernel.kallsyms]\n    17.75%  205  libc.so.6\n");
        assert_eq!(by_binary[1].binary, "libc.so.6");
        assert_eq!(by_binary[1].symbol, "");
        let p = Profile {
            binaries: by_binary,
            top: shares,
            ..Default::default()
        };
        assert!((p.kernel_percent() - 72.64).abs() < 1e-9);
        let line = p.line(2);
        assert!(line.starts_with("kernel 73 %, libc.so.6 18 %"), "{line}");
        assert!(line.contains("`__GI___libc_write` 17.8 %"), "{line}");
    }
}
