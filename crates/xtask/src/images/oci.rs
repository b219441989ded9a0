//! OCI image layout archives (image-spec v1.1): one gzip layer per image and platform, a config
//! and a manifest per platform, and an index over the platforms, all in one tar that
//! `ctr images import` (and `skopeo copy oci-archive:`) reads.
//!
//! Everything is reproducible: entries sorted, owner root, mtime 0, gzip without a timestamp,
//! so the same binaries give the same digests (and identical layers are stored once).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// One file of an image's filesystem.
#[derive(Clone, Debug)]
pub struct File {
    /// Absolute path inside the image, e.g. `/usr/bin/local-path-provisioner`.
    pub path: String,
    pub mode: u32,
    pub contents: FileContents,
}

#[derive(Clone, Debug)]
pub enum FileContents {
    Bytes(Vec<u8>),
    Symlink(String),
    /// An empty directory (e.g. `/tmp`).
    Dir,
}

/// What the runtime starts (the image config's `config` object).
#[derive(Clone, Debug, Default)]
pub struct RunConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub user: Option<String>,
}

/// One platform's variant of an image.
pub struct Platform {
    /// GOARCH-style name: `amd64`, `arm64`.
    pub architecture: &'static str,
    pub files: Vec<File>,
}

/// A content-addressed blob.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Blob {
        Blob {
            digest: sha256(&bytes),
            bytes,
        }
    }

    fn descriptor(&self, media_type: &str) -> Value {
        json!({"mediaType": media_type, "digest": self.digest, "size": self.bytes.len()})
    }
}

/// What was written: per platform, the compressed layer's size.
#[derive(Debug)]
pub struct Written {
    pub layer_bytes: Vec<(&'static str, usize)>,
    pub index_digest: String,
}

/// Writes `name:tag` (e.g. `docker.io/homecluster/flannel:0.1.0`) for every platform into an
/// OCI layout tar at `out`.
pub fn write_archive(
    out: &Path,
    name: &str,
    tag: &str,
    run: &RunConfig,
    platforms: &[Platform],
) -> Result<Written> {
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut manifests = Vec::new();
    let mut layer_bytes = Vec::new();
    for platform in platforms {
        let tar = layer_tar(&platform.files)?;
        let diff_id = sha256(&tar);
        let layer = Blob::new(gzip(&tar)?);
        let config = Blob::new(serde_json::to_vec(&config_json(
            platform.architecture,
            run,
            &diff_id,
        ))?);
        let manifest = Blob::new(serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": config.descriptor(MEDIA_CONFIG),
            "layers": [layer.descriptor(MEDIA_LAYER)],
        }))?);
        let mut descriptor = manifest.descriptor(MEDIA_MANIFEST);
        descriptor["platform"] = json!({"architecture": platform.architecture, "os": "linux"});
        manifests.push(descriptor);
        layer_bytes.push((platform.architecture, layer.bytes.len()));
        for blob in [layer, config, manifest] {
            blobs.insert(blob.digest, blob.bytes);
        }
    }
    let image_index = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": manifests,
    }))?);
    let full_name = format!("{name}:{tag}");
    let mut top = image_index.descriptor(MEDIA_INDEX);
    // containerd names the imported image after `io.containerd.image.name`; other tools read
    // the OCI ref name.
    top["annotations"] = json!({
        "io.containerd.image.name": full_name,
        "org.opencontainers.image.ref.name": tag,
    });
    let layout_index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [top],
    }))?;
    let index_digest = image_index.digest.clone();
    blobs.insert(image_index.digest, image_index.bytes);

    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    append(
        &mut archive,
        "oci-layout",
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )?;
    append(&mut archive, "index.json", 0o644, &layout_index)?;
    for (digest, bytes) in &blobs {
        let hex = digest.trim_start_matches("sha256:");
        append(&mut archive, &format!("blobs/sha256/{hex}"), 0o644, bytes)?;
    }
    archive.into_inner()?.flush()?;
    Ok(Written {
        layer_bytes,
        index_digest,
    })
}

fn config_json(architecture: &str, run: &RunConfig, diff_id: &str) -> Value {
    let mut config = json!({"Env": run.env});
    if !run.entrypoint.is_empty() {
        config["Entrypoint"] = json!(run.entrypoint);
    }
    if !run.cmd.is_empty() {
        config["Cmd"] = json!(run.cmd);
    }
    if let Some(user) = &run.user {
        config["User"] = json!(user);
    }
    json!({
        "architecture": architecture,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created_by": "cargo run -p xtask -- images"}],
    })
}

/// The layer: every file with its parent directories, sorted, owned by root, mtime 0.
pub fn layer_tar(files: &[File]) -> Result<Vec<u8>> {
    let mut dirs = std::collections::BTreeSet::new();
    for file in files {
        let mut parent = Path::new(file.path.trim_start_matches('/')).parent();
        while let Some(dir) = parent.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            parent = dir.parent();
        }
    }
    let mut sorted: Vec<&File> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut archive = tar::Builder::new(Vec::new());
    for dir in &dirs {
        let mut header = header(tar::EntryType::Directory, 0o755, 0);
        archive.append_data(&mut header, dir, std::io::empty())?;
    }
    for file in sorted {
        let path = file.path.trim_start_matches('/');
        match &file.contents {
            FileContents::Bytes(bytes) => {
                let mut header = header(tar::EntryType::Regular, file.mode, bytes.len());
                archive.append_data(&mut header, path, bytes.as_slice())?;
            }
            FileContents::Symlink(target) => {
                let mut header = header(tar::EntryType::Symlink, 0o777, 0);
                archive.append_link(&mut header, path, target)?;
            }
            FileContents::Dir if dirs.contains(Path::new(path)) => {}
            FileContents::Dir => {
                let mut header = header(tar::EntryType::Directory, file.mode, 0);
                archive.append_data(&mut header, path, std::io::empty())?;
            }
        }
    }
    Ok(archive.into_inner()?)
}

fn header(kind: tar::EntryType, mode: u32, size: usize) -> tar::Header {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size as u64);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header
}

fn append<W: Write>(
    archive: &mut tar::Builder<W>,
    path: &str,
    mode: u32,
    bytes: &[u8],
) -> Result<()> {
    let mut header = header(tar::EntryType::Regular, mode, bytes.len());
    archive.append_data(&mut header, path, bytes)?;
    Ok(())
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut encoder = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

fn sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256:");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(architecture: &'static str, contents: &[u8]) -> Platform {
        Platform {
            architecture,
            files: vec![
                File {
                    path: "/usr/bin/tool".into(),
                    mode: 0o755,
                    contents: FileContents::Bytes(contents.to_vec()),
                },
                File {
                    path: "/bin/tool".into(),
                    mode: 0o777,
                    contents: FileContents::Symlink("/usr/bin/tool".into()),
                },
            ],
        }
    }

    fn entries(archive: &[u8]) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        let mut reader = tar::Archive::new(archive);
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let path = entry.path().unwrap().display().to_string();
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut entry, &mut bytes).unwrap();
            out.insert(path, bytes);
        }
        out
    }

    #[test]
    fn layout_has_an_index_over_both_platforms_and_every_blob() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("image.tar");
        let run = RunConfig {
            entrypoint: vec!["/usr/bin/tool".into()],
            ..Default::default()
        };
        let platforms = [platform("amd64", b"x86"), platform("arm64", b"arm")];
        let written = write_archive(
            &out,
            "docker.io/homecluster/tool",
            "0.1.0",
            &run,
            &platforms,
        )
        .unwrap();
        let files = entries(&std::fs::read(&out).unwrap());
        let layout: Value = serde_json::from_slice(&files["index.json"]).unwrap();
        let top = &layout["manifests"][0];
        assert_eq!(
            top["annotations"]["io.containerd.image.name"],
            "docker.io/homecluster/tool:0.1.0"
        );
        assert_eq!(top["digest"], written.index_digest.as_str());
        let blob = |digest: &Value| -> &Vec<u8> {
            let hex = digest.as_str().unwrap().trim_start_matches("sha256:");
            let bytes = &files[&format!("blobs/sha256/{hex}")];
            assert_eq!(
                sha256(bytes),
                digest.as_str().unwrap(),
                "blob content matches its name"
            );
            bytes
        };
        let index: Value = serde_json::from_slice(blob(&top["digest"])).unwrap();
        let arches: Vec<&str> = index["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["platform"]["architecture"].as_str().unwrap())
            .collect();
        assert_eq!(arches, ["amd64", "arm64"]);
        let manifest: Value =
            serde_json::from_slice(blob(&index["manifests"][1]["digest"])).unwrap();
        let config: Value = serde_json::from_slice(blob(&manifest["config"]["digest"])).unwrap();
        assert_eq!(config["architecture"], "arm64");
        assert_eq!(config["config"]["Entrypoint"][0], "/usr/bin/tool");
        let gz = blob(&manifest["layers"][0]["digest"]);
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(gz.as_slice()), &mut tar)
            .unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], sha256(&tar).as_str());
        let layer = entries(&tar);
        assert_eq!(layer["usr/bin/tool"], b"arm");
        assert!(layer.contains_key("usr/") || layer.contains_key("usr"));
    }

    #[test]
    fn same_input_same_digests() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunConfig::default();
        let a = write_archive(
            &dir.path().join("a.tar"),
            "x",
            "1",
            &run,
            &[platform("amd64", b"same")],
        )
        .unwrap();
        let b = write_archive(
            &dir.path().join("b.tar"),
            "x",
            "1",
            &run,
            &[platform("amd64", b"same")],
        )
        .unwrap();
        assert_eq!(a.index_digest, b.index_digest);
        assert_eq!(
            std::fs::read(dir.path().join("a.tar")).unwrap(),
            std::fs::read(dir.path().join("b.tar")).unwrap()
        );
    }
}
