//! What the node's disks look like: free space per base path (statvfs), bytes used per volume
//! directory, and `pvc-*` directories no PersistentVolume points at (orphans, reported only).

use std::collections::BTreeSet;
use std::path::Path;

/// Free bytes for an unprivileged writer (`f_bavail`) on the filesystem holding `path`, or of
/// its nearest existing ancestor (the base path may not exist before the first volume).
pub fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let mut p = path;
    loop {
        match rustix::fs::statvfs(p) {
            Ok(s) => return Ok(s.f_bavail.saturating_mul(s.f_frsize)),
            Err(rustix::io::Errno::NOENT) => match p.parent() {
                Some(parent) => p = parent,
                None => return Err(std::io::Error::from(rustix::io::Errno::NOENT)),
            },
            Err(e) => return Err(e.into()),
        }
    }
}

/// Among `candidates`, the path with the most free space that still fits `size` (ties: the
/// first). `None` if none fits. Unreadable paths are skipped.
pub fn choose_path(candidates: &[String], size: u64) -> Option<(&str, u64)> {
    let mut best: Option<(&str, u64)> = None;
    for c in candidates {
        let Ok(free) = free_bytes(Path::new(c)) else {
            continue;
        };
        if free >= size && best.is_none_or(|(_, f)| free > f) {
            best = Some((c.as_str(), free));
        }
    }
    best
}

/// Bytes allocated under `dir` (like `du -s`), not following symlinks nor crossing into other
/// filesystems. Unreadable entries are skipped.
pub fn used_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::symlink_metadata(dir) else {
        return 0;
    };
    let dev = root.dev();
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = BTreeSet::new();
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev {
                continue;
            }
            // Hard links count once.
            if m.nlink() > 1 && !seen.insert(m.ino()) {
                continue;
            }
            total = total.saturating_add(m.blocks().saturating_mul(512));
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    total
}

/// `pvc-*` entries directly under `base` whose path is not in `known` (volume directories of
/// existing PersistentVolumes).
pub fn orphans(base: &Path, known: &BTreeSet<String>) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(base) else {
        return Vec::new();
    };
    let mut out: Vec<String> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("pvc-"))
        .map(|e| e.path().display().to_string())
        .filter(|p| !known.contains(p))
        .collect();
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_missing_dir_is_its_ancestors() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("a/b/c");
        assert_eq!(
            free_bytes(&missing).unwrap() / (1 << 20),
            free_bytes(tmp.path()).unwrap() / (1 << 20)
        );
    }

    #[test]
    fn choose_most_free_that_fits() {
        let tmp = tempfile::tempdir().unwrap();
        let p = vec![tmp.path().display().to_string()];
        assert!(choose_path(&p, 1).is_some());
        assert!(choose_path(&p, u64::MAX).is_none());
    }

    #[test]
    fn usage_and_orphans() {
        let tmp = tempfile::tempdir().unwrap();
        let vol = tmp.path().join("pvc-1_ns_a");
        std::fs::create_dir(&vol).unwrap();
        std::fs::write(vol.join("f"), vec![7u8; 64 * 1024]).unwrap();
        std::fs::create_dir(tmp.path().join("pvc-2_ns_b")).unwrap();
        std::fs::create_dir(tmp.path().join("other")).unwrap();
        assert!(used_bytes(&vol) >= 64 * 1024);
        let known = BTreeSet::from([vol.display().to_string()]);
        assert_eq!(
            orphans(tmp.path(), &known),
            vec![tmp.path().join("pvc-2_ns_b").display().to_string()]
        );
    }
}
