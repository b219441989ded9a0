//! CPU time and resident memory of a process and its descendants, from /proc (nginx is a
//! master plus workers; the others are one process).

use integration_tests::process::status_kib;

/// Totals over a process tree at one moment.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct ProcStats {
    /// User + system CPU seconds of the live processes.
    pub cpu_seconds: f64,
    /// The user-space part of `cpu_seconds`.
    pub user_seconds: f64,
    /// Sum of each process's peak resident set (VmHWM).
    pub peak_rss_bytes: u64,
    /// Sum of each process's current resident set (VmRSS).
    pub rss_bytes: u64,
}

/// `root` and every live descendant.
pub fn tree(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(ppid) = stat_fields(pid).and_then(|f| f.get(1).and_then(|s| s.parse().ok()))
            {
                parents.push((pid, ppid));
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        out.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    out
}

/// Fields of /proc/PID/stat after the command name: index 0 is the state, 1 the ppid, 11 utime,
/// 12 stime.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or parentheses.
    let rest = &text[text.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Totals over `root`'s tree now.
pub fn stats(root: u32) -> ProcStats {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    let mut s = ProcStats::default();
    for pid in tree(root) {
        if let Some(f) = stat_fields(pid) {
            let t = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            s.cpu_seconds += (t(11) + t(12)) as f64 / ticks;
            s.user_seconds += t(11) as f64 / ticks;
        }
        s.peak_rss_bytes += status_kib(pid, "VmHWM:") * 1024;
        s.rss_bytes += status_kib(pid, "VmRSS:") * 1024;
    }
    s
}

/// Resident memory of one process by kind, MiB: anonymous (heap, stacks) and file-backed (the
/// binary's and libraries' mapped pages).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MemorySplit {
    /// When it was read (e.g. "fresh process, idle").
    pub when: String,
    pub anon_mib: f64,
    pub file_mib: f64,
}

/// `pid`'s memory split now.
pub fn memory_split(pid: u32, when: &str) -> MemorySplit {
    let mib = |field: &str| status_kib(pid, field) as f64 / 1024.0;
    MemorySplit {
        when: when.into(),
        anon_mib: mib("RssAnon:"),
        file_mib: mib("RssFile:") + mib("RssShmem:"),
    }
}

/// /proc/loadavg's first three figures.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_memory() {
        let s = stats(std::process::id());
        assert!(s.peak_rss_bytes > 0);
        assert!(s.rss_bytes > 0);
        assert!(tree(std::process::id()).contains(&std::process::id()));
    }
}
