//! `cargo run -p xtask -- images [--arch amd64,arm64]`: the components' container images as
//! OCI archives in `target/images/`, one per image, each holding every platform under one
//! multi-arch index.
//!
//! The binaries are built with `--profile small` (the proxy with `--profile proxy`, the same
//! at opt-level 2) and linked statically against musl, natively and cross (arm64 with Debian's
//! aarch64 gcc as C compiler and linker driver), by the toolchain's lld with the functions the
//! cluster runs placed first (`link`), and stripped as they go into the image; the test suite
//! builds the same images from `--profile suite-images` (unoptimised, a third of the build
//! time). An image holds its binary and
//! nothing else, except flannel's: upstream's DaemonSet runs `cp` in its init
//! containers and flanneld runs `iptables`/`nft`, so that image also carries a static busybox
//! and those two programs with their libraries, from Debian's packages of the same
//! architecture. Foreign-architecture binaries are then run under qemu-user-static: `--version`
//! and one real operation each.

mod debs;
pub mod link;
pub mod oci;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{cargo_with_env, setup, step};
use oci::{File, FileContents, Platform, RunConfig};

/// The images' tag (the workspace version).
pub const TAG: &str = env!("CARGO_PKG_VERSION");
/// Repository prefix of our images, as the manifests in deploy/ name them.
pub const REPOSITORY: &str = "docker.io/homecluster";

/// A target platform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arch {
    /// The OCI/Debian name.
    pub name: &'static str,
    /// Rust's musl target.
    pub triple: &'static str,
    /// Debian's multiarch triple (for libraries from its packages).
    pub debian_triple: &'static str,
    /// C compiler (and, cross, linker) for the musl target.
    cc: &'static str,
    /// What runs this architecture's binaries here: nothing (native) or qemu-user-static.
    runner: Option<&'static str>,
}

pub const AMD64: Arch = Arch {
    name: "amd64",
    triple: "x86_64-unknown-linux-musl",
    debian_triple: "x86_64-linux-gnu",
    cc: "musl-gcc",
    runner: None,
};
pub const ARM64: Arch = Arch {
    name: "arm64",
    triple: "aarch64-unknown-linux-musl",
    debian_triple: "aarch64-linux-gnu",
    cc: "aarch64-linux-gnu-gcc",
    runner: Some("qemu-aarch64-static"),
};

impl Arch {
    pub fn parse(name: &str) -> Result<Arch> {
        match name {
            "amd64" | "x86_64" => Ok(AMD64),
            "arm64" | "aarch64" => Ok(ARM64),
            other => bail!("unknown architecture {other:?} (known: amd64, arm64)"),
        }
    }

    /// This machine's architecture.
    pub fn native() -> Result<Arch> {
        Arch::parse(std::env::consts::ARCH)
    }

    fn is_native(&self) -> bool {
        std::env::consts::ARCH == self.triple.split('-').next().unwrap_or_default()
    }

    /// A command running `program` (built for this architecture) on this machine.
    fn command(&self, program: &Path) -> Command {
        match self.runner.filter(|_| !self.is_native()) {
            Some(runner) => {
                let mut cmd = Command::new(runner);
                cmd.arg(program);
                cmd
            }
            None => Command::new(program),
        }
    }
}

/// The binaries the images carry: `(package, binary)`.
pub const BINARIES: &[(&str, &str)] = &[
    ("ingress", "ingress-controller"),
    ("cert-manager", "cert-manager-controller"),
    ("cert-manager", "cert-manager-cainjector"),
    ("cert-manager", "cert-manager-webhook"),
    ("flannel", "flanneld"),
    ("flannel", "flannel"),
    ("local-path", "local-path-provisioner"),
];

/// Debian's PostgreSQL 15 and the libraries its server, initdb and psql need (the
/// household app's database; the seed runs postgres:16-alpine, which no registry here serves).
const POSTGRES_DEBS: &[&str] = &[
    "postgresql-15",
    "postgresql-client-15",
    "libpq5",
    "libicu72",
    "libgssapi-krb5-2",
    "libldap-2.5-0",
    "liblz4-1",
    "libpam0g",
    "libssl3",
    "libsystemd0",
    "libxml2",
    "zlib1g",
    "libzstd1",
    "libkrb5-3",
    "libk5crypto3",
    "libcom-err2",
    "libkrb5support0",
    "libkeyutils1",
    "liblzma5",
    "libsasl2-2",
    "libgnutls30",
    "libcap2",
    "libgcrypt20",
    "libgpg-error0",
    "libaudit1",
    "libcap-ng0",
    "libstdc++6",
    "libgcc-s1",
    "libp11-kit0",
    "libidn2-0",
    "libunistring2",
    "libtasn1-6",
    "libnettle8",
    "libhogweed6",
    "libgmp10",
    "libffi8",
    "libedit2",
    "libbsd0",
    "libmd0",
    "libtinfo6",
    "libreadline8",
    "libc6",
    "busybox-static",
];

/// Debian packages whose programs the flannel image carries (and those programs' libraries).
const FLANNEL_DEBS: &[&str] = &[
    "busybox-static",
    "iptables",
    "libxtables12",
    "libip4tc2",
    "libip6tc2",
    "libnftnl11",
    "libmnl0",
    "libnetfilter-conntrack3",
    "libnfnetlink0",
    "nftables",
    "libnftables1",
    "libedit2",
    "libjansson4",
    "libgmp10",
    "libbsd0",
    "libmd0",
    "libtinfo6",
    "libc6",
];

/// The cargo profile the shipped binaries are built with (opt-level z, fat LTO).
pub const SHIP_PROFILE: &str = "small";
/// The shipped proxy's profile: `small` at opt-level 2. The proxy is the data plane; at
/// opt-level z it spent 18-32 % more CPU per request for 2.5 MiB less RSS (benches/README.md).
pub const PROXY_PROFILE: &str = "proxy";
/// The binary built with [`PROXY_PROFILE`].
pub const PROXY_BINARY: &str = "ingress-controller";
/// The test suite's profile: the same programs built for build time (dev: unoptimised but for
/// the RSA crates, with overflow checks and debug assertions, so stricter than `small`), since
/// CI builds them from clean and the suite checks behaviour, not size or speed. Its images go
/// to `target/images/suite-images/`, never over the shipped ones.
pub const SUITE_PROFILE: &str = "suite-images";

/// `images`: builds every image for `arches` into `target/images/` from binaries built with
/// `profile`, prints their sizes, and runs each foreign binary under qemu.
pub fn run(arches: &[Arch], profile: &str) -> Result<Vec<PathBuf>> {
    let mut packages = vec!["musl-tools", "binutils", "dpkg-dev"];
    if arches.iter().any(|a| !a.is_native()) {
        // The C headers the cross compiler builds ring (and any C) against: only recommended
        // by gcc-aarch64-linux-gnu, so not pulled in with --no-install-recommends.
        packages.extend([
            "gcc-aarch64-linux-gnu",
            "libc6-dev-arm64-cross",
            "qemu-user-static",
        ]);
    }
    step("Debian packages for static and cross builds", || {
        setup::ensure_packages(&packages)
    })?;
    let dirs = build_static(arches, BINARIES, profile)?;
    let bins: Vec<(Arch, PathBuf)> = arches.iter().copied().zip(dirs).collect();
    for (arch, dir) in &bins {
        if !arch.is_native() {
            step(
                &format!("{} binaries under {:?}", arch.name, arch.runner),
                || smoke(arch, dir),
            )?;
        }
    }
    let out = images_dir(profile);
    std::fs::create_dir_all(&out)?;
    let mut written = Vec::new();
    let mut table = Vec::new();
    for image in IMAGES {
        let mut platforms = Vec::new();
        for (arch, dir) in &bins {
            platforms.push(Platform {
                architecture: arch.name,
                files: (image.files)(arch, dir)?,
            });
        }
        let path = out.join(format!("{}.oci.tar", image.name));
        let name = format!("{REPOSITORY}/{}", image.name);
        let result = oci::write_archive(&path, &name, TAG, &(image.run)(), &platforms)?;
        eprintln!("    {name}:{TAG} index {}", result.index_digest);
        table.push((image.name, result.layer_bytes));
        written.push(path);
    }
    eprintln!("    image (compressed layer)        {}", {
        let names: Vec<&str> = arches.iter().map(|a| a.name).collect();
        names.join("        ")
    });
    for (name, sizes) in table {
        let cells: Vec<String> = sizes
            .iter()
            .map(|(_, b)| format!("{:>8.2} MiB", *b as f64 / (1024.0 * 1024.0)))
            .collect();
        eprintln!("    {name:<30} {}", cells.join("  "));
    }
    eprintln!("    written to {}", out.display());
    Ok(written)
}

/// One image: its name under [`REPOSITORY`], what runs, and its files for a platform.
struct Image {
    name: &'static str,
    run: fn() -> RunConfig,
    files: fn(&Arch, &Path) -> Result<Vec<File>>,
}

const PATH_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A cert-manager role's image: its own binary at upstream's path, the CA bundle, `/tmp`.
macro_rules! cert_manager_image {
    ($name:literal, $path:literal) => {
        Image {
            name: $name,
            run: || RunConfig {
                entrypoint: vec![$path.into()],
                env: vec![PATH_ENV.into()],
                // Upstream's images run as 1000; the manifests ask for runAsNonRoot.
                user: Some("1000".into()),
                ..Default::default()
            },
            files: |_, dir| Ok(vec![binary(dir, $name, $path)?, ca_bundle()?, tmp()]),
        }
    };
}

const IMAGES: &[Image] = &[
    Image {
        // Every pod's sandbox (containerd's `sandbox_image`): holds the pod's namespaces.
        name: "pause",
        run: || RunConfig {
            entrypoint: vec!["/pause".into()],
            ..Default::default()
        },
        files: |arch, dir| Ok(vec![pause(arch, dir)?]),
    },
    Image {
        name: "ingress-controller",
        // Upstream's manifests start the controller with `args: [/nginx-ingress-controller,
        // ...]`: the same path here, so either image runs either manifest.
        run: || RunConfig {
            cmd: vec!["/nginx-ingress-controller".into()],
            env: vec![PATH_ENV.into()],
            ..Default::default()
        },
        files: |_, dir| {
            Ok(vec![
                binary(dir, "ingress-controller", "/nginx-ingress-controller")?,
                tmp(),
            ])
        },
    },
    // Upstream's three cert-manager images, each with its binary where upstream's is.
    cert_manager_image!("cert-manager-controller", "/app/cmd/controller/controller"),
    cert_manager_image!("cert-manager-cainjector", "/app/cmd/cainjector/cainjector"),
    cert_manager_image!("cert-manager-webhook", "/app/cmd/webhook/webhook"),
    Image {
        name: "flannel",
        run: || RunConfig {
            entrypoint: vec!["/opt/bin/flanneld".into()],
            env: vec![PATH_ENV.into()],
            ..Default::default()
        },
        files: flannel_files,
    },
    Image {
        // The household app's frontend (busybox's httpd serving a page), also the tests'
        // toolbox (sh, wget, nc, ping).
        name: "household-frontend",
        run: || RunConfig {
            cmd: ["httpd", "-f", "-v", "-p", "8080", "-h", "/www"]
                .map(String::from)
                .to_vec(),
            env: vec![PATH_ENV.into()],
            ..Default::default()
        },
        files: frontend_files,
    },
    Image {
        // The household app's database: Debian's PostgreSQL 15 with a small entrypoint that
        // initialises an empty data directory from the official image's variables
        // (POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB, PGDATA).
        name: "household-postgres",
        run: || RunConfig {
            entrypoint: vec!["/usr/local/bin/docker-entrypoint.sh".into()],
            env: vec![
                format!("{PATH_ENV}:{PG_BIN}"),
                "PGDATA=/var/lib/postgresql/data".into(),
            ],
            user: Some("999".into()),
            ..Default::default()
        },
        files: postgres_files,
    },
    Image {
        name: "local-path-provisioner",
        // Upstream's manifest runs `command: [local-path-provisioner, ...]` through PATH.
        run: || RunConfig {
            cmd: vec!["local-path-provisioner".into()],
            env: vec![PATH_ENV.into()],
            ..Default::default()
        },
        // The node agent runs config.json's setup and teardown scripts with /bin/sh (upstream's
        // helper pods run them in busybox): busybox gives the shell and the usual tools.
        files: |arch, dir| {
            let mut files = vec![
                binary(
                    dir,
                    "local-path-provisioner",
                    "/usr/bin/local-path-provisioner",
                )?,
                tmp(),
            ];
            files.extend(busybox(
                arch,
                &[
                    "sh", "mkdir", "rm", "rmdir", "chmod", "chown", "ls", "cat", "echo", "test",
                    "[", "mv", "cp", "du", "stat", "touch",
                ],
            )?);
            Ok(files)
        },
    },
];

fn binary(dir: &Path, name: &str, at: &str) -> Result<File> {
    let path = dir.join(name);
    Ok(File {
        path: at.into(),
        mode: 0o755,
        contents: FileContents::Bytes(link::stripped(&path)?),
    })
}

/// `pause.c` compiled statically for `arch` (musl natively, the cross gcc's libc for arm64).
fn pause(arch: &Arch, dir: &Path) -> Result<File> {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/images/pause.c");
    let out = dir.join("pause");
    let status = Command::new(arch.cc)
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&out)
        .arg(&source)
        .status()
        .with_context(|| format!("running {}", arch.cc))?;
    if !status.success() {
        bail!("{} failed to build pause.c", arch.cc);
    }
    binary(dir, "pause", "/pause")
}

fn tmp() -> File {
    File {
        path: "/tmp".into(),
        mode: 0o1777,
        contents: FileContents::Dir,
    }
}

/// The CA bundle cert-manager's ACME client trusts (Debian's ca-certificates).
fn ca_bundle() -> Result<File> {
    let path = "/etc/ssl/certs/ca-certificates.crt";
    Ok(File {
        path: path.into(),
        mode: 0o644,
        contents: FileContents::Bytes(
            std::fs::read(path).with_context(|| format!("reading {path} (ca-certificates)"))?,
        ),
    })
}

/// flanneld at upstream's `/opt/bin/flanneld`, the CNI plugin at `/flannel` (what upstream's
/// flannel-cni-plugin image holds), busybox for `sh`, `cp` and `mv`, iptables and nft.
fn flannel_files(arch: &Arch, dir: &Path) -> Result<Vec<File>> {
    let root = debs::unpack("flannel", arch.name, arch.debian_triple, FLANNEL_DEBS)?;
    let mut files = vec![
        binary(dir, "flanneld", "/opt/bin/flanneld")?,
        binary(dir, "flannel", "/flannel")?,
        tmp(),
        File {
            path: "/run".into(),
            mode: 0o755,
            contents: FileContents::Dir,
        },
    ];
    files.extend(busybox(
        arch,
        &["sh", "cp", "mv", "cat", "ls", "rm", "mkdir"],
    )?);
    let programs = vec![
        root.file("/usr/sbin/xtables-nft-multi")?,
        root.file("/usr/sbin/xtables-legacy-multi")?,
        root.file("/usr/sbin/nft")?,
    ];
    let mut libs = root.libraries_for(&programs.iter().collect::<Vec<_>>())?;
    let plugins = root.tree(&format!("/usr/lib/{}/xtables", arch.debian_triple))?;
    libs.extend(root.libraries_for(&plugins.iter().collect::<Vec<_>>())?);
    files.extend(programs);
    files.extend(plugins);
    files.extend(libs);
    for (tool, multi) in [
        ("nft", "xtables-nft-multi"),
        ("legacy", "xtables-legacy-multi"),
    ] {
        for suffix in ["", "-save", "-restore"] {
            for family in ["iptables", "ip6tables"] {
                files.push(symlink(
                    &format!("/usr/sbin/{family}-{tool}{suffix}"),
                    multi,
                ));
            }
        }
    }
    // The unqualified names pick nft, as Debian's alternatives and upstream's image do.
    for suffix in ["", "-save", "-restore"] {
        for family in ["iptables", "ip6tables"] {
            files.push(symlink(
                &format!("/usr/sbin/{family}{suffix}"),
                "xtables-nft-multi",
            ));
        }
    }
    dedup(&mut files);
    Ok(files)
}

/// Static busybox at /bin/busybox with `applets` linked to it.
fn busybox(arch: &Arch, applets: &[&str]) -> Result<Vec<File>> {
    let root = debs::unpack("flannel", arch.name, arch.debian_triple, FLANNEL_DEBS)?;
    let mut files = vec![root.file("/bin/busybox")?];
    files.extend(
        applets
            .iter()
            .map(|a| symlink(&format!("/bin/{a}"), "busybox")),
    );
    Ok(files)
}

fn frontend_files(arch: &Arch, _: &Path) -> Result<Vec<File>> {
    let mut files = busybox(
        arch,
        &[
            "sh", "httpd", "wget", "nc", "ping", "sleep", "cat", "ls", "echo", "hostname", "env",
        ],
    )?;
    files.push(File {
        path: "/www/index.html".into(),
        mode: 0o644,
        contents: FileContents::Bytes(b"household-task-manager frontend\n".to_vec()),
    });
    files.push(tmp());
    Ok(files)
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

fn postgres_files(arch: &Arch, _: &Path) -> Result<Vec<File>> {
    let root = debs::unpack("postgres", arch.name, arch.debian_triple, POSTGRES_DEBS)?;
    let programs = ["postgres", "initdb", "psql", "pg_ctl"]
        .iter()
        .map(|p| root.file(&format!("{PG_BIN}/{p}")))
        .collect::<Result<Vec<_>>>()?;
    let plugins = ["plpgsql.so", "dict_snowball.so"]
        .iter()
        .map(|p| root.file(&format!("/usr/lib/postgresql/15/lib/{p}")))
        .collect::<Result<Vec<_>>>()?;
    let mut files = root.libraries_for(&programs.iter().chain(&plugins).collect::<Vec<_>>())?;
    files.extend(programs);
    files.extend(plugins);
    files.extend(root.tree("/usr/share/postgresql/15")?);
    files.extend(
        root.tree("/usr/share/postgresql-common")
            .unwrap_or_default(),
    );
    let mut bb = vec![root.file("/bin/busybox")?];
    bb.extend(
        [
            "sh", "cat", "echo", "mkdir", "rm", "ls", "sleep", "chmod", "id",
        ]
        .iter()
        .map(|a| symlink(&format!("/bin/{a}"), "busybox")),
    );
    files.extend(bb);
    for (path, text) in [
        (
            "/etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\npostgres:x:999:999:PostgreSQL:/var/lib/postgresql:/bin/sh\n",
        ),
        ("/etc/group", "root:x:0:\npostgres:x:999:\n"),
        (
            "/etc/nsswitch.conf",
            "passwd: files\ngroup: files\nhosts: files dns\n",
        ),
    ] {
        files.push(File {
            path: path.into(),
            mode: 0o644,
            contents: FileContents::Bytes(text.as_bytes().to_vec()),
        });
    }
    files.push(File {
        path: "/usr/local/bin/docker-entrypoint.sh".into(),
        mode: 0o755,
        contents: FileContents::Bytes(POSTGRES_ENTRYPOINT.as_bytes().to_vec()),
    });
    for dir in ["/var/lib/postgresql", "/var/run/postgresql"] {
        files.push(File {
            path: dir.into(),
            // Writable by the postgres user (999) as /tmp is: sticky, so no one removes
            // another's files.
            mode: 0o1777,
            contents: FileContents::Dir,
        });
    }
    files.push(tmp());
    dedup(&mut files);
    Ok(files)
}

/// Initialises `$PGDATA` on first start (as the official image's entrypoint does for these
/// variables), then runs the server listening on every address.
const POSTGRES_ENTRYPOINT: &str = r#"#!/bin/sh
set -eu
umask 077
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
: "${POSTGRES_PASSWORD:=}"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  if [ -z "$POSTGRES_PASSWORD" ]; then
    echo "POSTGRES_PASSWORD is empty: refusing to initialise a database without one" >&2
    exit 1
  fi
  if [ -d "$PGDATA" ] && [ -n "$(ls -A "$PGDATA")" ]; then
    echo "$PGDATA is not empty and holds no database: refusing to touch it" >&2
    exit 1
  fi
  # Initialised beside PGDATA and moved in place when complete, so a failed first start is
  # simply retried; in place when PGDATA is itself a mount point.
  target="$PGDATA.init"
  if [ -d "$PGDATA" ] && ! rmdir "$PGDATA" 2>/dev/null; then target="$PGDATA"; fi
  rm -rf "$PGDATA.init"
  pwfile="/tmp/pwfile.$$"
  trap 'rm -f "$pwfile"' EXIT
  printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
  initdb -D "$target" -U "$POSTGRES_USER" --pwfile="$pwfile" -E UTF8 --no-locale \
    --auth-local=trust --auth-host=scram-sha-256
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$target/pg_hba.conf"
  if [ "$POSTGRES_DB" != "postgres" ]; then
    db=$(printf '%s' "$POSTGRES_DB" | sed 's/"/""/g')
    printf 'CREATE DATABASE "%s";\n' "$db" | postgres --single -D "$target" postgres >/dev/null
  fi
  if [ "$target" != "$PGDATA" ]; then mv "$target" "$PGDATA"; fi
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
"#;

fn symlink(path: &str, target: &str) -> File {
    File {
        path: path.into(),
        mode: 0o777,
        contents: FileContents::Symlink(target.into()),
    }
}

/// Keeps the first file of each path (a library needed twice is listed twice).
fn dedup(files: &mut Vec<File>) {
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.path.clone()));
}

/// Code generation flags of the static binaries. Not position-independent (Rust builds
/// x86_64 musl programs as static PIEs; aarch64 ones already are not): a static PIE
/// relocates itself at start, reading all of `.rela.dyn` and dirtying every page of
/// `.data.rel.ro` (0.5 + 0.4 MiB in cert-manager, in every process). No unwind tables:
/// `panic = "abort"` never unwinds (1.2 MiB of cert-manager's file). Then the linker and the
/// code order ([`link::rustflags`]).
const RUSTFLAGS: &str = "-C relocation-model=static -C force-unwind-tables=no";

/// Builds `binaries` for each of `arches`' musl targets with `profile` (the proxy with
/// [`PROXY_PROFILE`] when `profile` is the shipped one), one cargo call per profile (the
/// host's build scripts and proc macros are built once per profile), and gathers them into one
/// directory per arch; returns those directories, in `arches`' order.
pub fn build_static(
    arches: &[Arch],
    binaries: &[(&str, &str)],
    profile: &str,
) -> Result<Vec<PathBuf>> {
    if binaries.is_empty() {
        bail!("no binaries to build");
    }
    for arch in arches {
        step(&format!("{} standard library", arch.triple), || {
            musl_target(arch.triple)
        })?;
    }
    let mut profiles: Vec<&str> = binaries
        .iter()
        .map(|(_, bin)| binary_profile(bin, profile))
        .collect();
    profiles.sort_unstable();
    profiles.dedup();
    for build_profile in &profiles {
        let these: Vec<&str> = binaries
            .iter()
            .filter(|(_, bin)| binary_profile(bin, profile) == *build_profile)
            .map(|(_, bin)| *bin)
            .collect();
        cargo_build_static(arches, &these, build_profile)?;
    }
    arches
        .iter()
        .map(|arch| gather(arch, binaries, profile))
        .collect()
}

/// The profile `bin` is built with when the images are built with `profile`.
pub(crate) fn binary_profile<'a>(bin: &str, profile: &'a str) -> &'a str {
    if profile == SHIP_PROFILE && bin == PROXY_BINARY {
        PROXY_PROFILE
    } else {
        profile
    }
}

/// Copies `arch`'s `binaries`, each from its profile's output, into one directory (through a
/// temporary file and a rename: a running copy of the old binary is left alone, and a failed
/// copy never leaves a partial binary under the real name).
fn gather(arch: &Arch, binaries: &[(&str, &str)], profile: &str) -> Result<PathBuf> {
    let dir = target_dir()
        .join(arch.triple)
        .join(format!("{profile}-images"));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for (_, bin) in binaries {
        let built = target_dir()
            .join(arch.triple)
            .join(binary_profile(bin, profile))
            .join(bin);
        let partial = dir.join(format!(".{bin}.partial"));
        std::fs::copy(&built, &partial).with_context(|| format!("copying {}", built.display()))?;
        std::fs::rename(&partial, dir.join(bin))
            .with_context(|| format!("renaming {}", partial.display()))?;
    }
    Ok(dir)
}

/// One `cargo build --profile <profile>` of `bins` for every arch's musl target. Every image
/// package is named (`-p`), whichever binaries are built, so that cargo resolves the same
/// dependency features for each call and for the benchmarks' builds as for the images'.
fn cargo_build_static(arches: &[Arch], bins: &[&str], profile: &str) -> Result<()> {
    let mut args = vec!["build", "--profile", profile];
    for arch in arches {
        args.extend(["--target", arch.triple]);
    }
    let mut packages: Vec<&str> = BINARIES.iter().map(|(p, _)| *p).collect();
    packages.dedup();
    for package in &packages {
        args.extend(["-p", package]);
    }
    for bin in bins {
        args.extend(["--bin", bin]);
    }
    let rustflags = arches
        .iter()
        .map(|arch| Ok(format!("{RUSTFLAGS} {}", link::rustflags(arch)?)))
        .collect::<Result<Vec<String>>>()?;
    let env: Vec<(String, &std::ffi::OsStr)> = arches
        .iter()
        .zip(&rustflags)
        .flat_map(|(arch, flags)| target_env(arch, flags))
        .collect();
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    if ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        eprintln!(
            "    warning: RUSTFLAGS is set, so cargo ignores the images' own flags ({RUSTFLAGS}, \
             the lld link and the code order): these binaries differ from the shipped build"
        );
    }
    step(&format!("cargo {}", args.join(" ")), || {
        cargo_with_env(&args, &env)
    })
}

/// C flags of the static binaries. mimalloc (the proxy's allocator) turns transparent huge
/// pages off for its process at start: its `no_thp` feature only stops it asking for them, and
/// where THP is `always` (Debian's kernels) the kernel backs its aligned arenas with huge pages
/// anyway: 32 MiB each on a 16 KiB page kernel, where the idle proxy held 38 MiB.
const C_FLAGS: &str = "-DMI_DEFAULT_ALLOW_THP=0";

/// The compiler, linker and flags cargo uses for `arch`'s musl target.
fn target_env<'a>(arch: &Arch, rustflags: &'a str) -> Vec<(String, &'a std::ffi::OsStr)> {
    // cc-rs would look for `<arch>-linux-musl-gcc`; Debian ships `musl-gcc` (native) and the
    // aarch64 glibc cross compiler, which links a static musl program with Rust's own crt and
    // libc (self-contained linking).
    let upper = arch.triple.replace('-', "_").to_uppercase();
    let mut env = vec![
        (
            format!("CC_{}", arch.triple.replace('-', "_")),
            std::ffi::OsStr::new(arch.cc),
        ),
        (
            format!("CFLAGS_{}", arch.triple.replace('-', "_")),
            std::ffi::OsStr::new(C_FLAGS),
        ),
        (
            format!("CARGO_TARGET_{upper}_RUSTFLAGS"),
            std::ffi::OsStr::new(rustflags),
        ),
    ];
    if !arch.is_native() {
        env.push((
            format!("CARGO_TARGET_{upper}_LINKER"),
            std::ffi::OsStr::new(arch.cc),
        ));
    }
    env
}

/// Where `run` writes the images of `profile`: `target/images` for the shipped build, a
/// directory of its own for any other (the tests find it through `HOMECLUSTER_IMAGES`).
pub fn images_dir(profile: &str) -> PathBuf {
    let dir = target_dir().join("images");
    if profile == SHIP_PROFILE {
        dir
    } else {
        dir.join(profile)
    }
}

pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// What `rustc <args>` prints.
fn rustc(args: &[&str]) -> Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .output()
        .context("running rustc")?;
    if !out.status.success() {
        bail!("rustc {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The toolchain's sysroot.
fn sysroot() -> Result<PathBuf> {
    Ok(PathBuf::from(rustc(&["--print", "sysroot"])?.trim()))
}

/// The target's standard library: already in the toolchain's sysroot, or added with rustup.
fn musl_target(triple: &str) -> Result<()> {
    let sysroot = sysroot()?;
    if sysroot.join("lib/rustlib").join(triple).is_dir() {
        eprintln!("    present in {}", sysroot.display());
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", triple])
        .status()
        .context("running rustup (the musl target links the shipped binaries statically)")?;
    if !status.success() {
        bail!("rustup target add {triple} failed ({status})");
    }
    Ok(())
}

/// Runs each of `arch`'s binaries in `dir`: `--version`, then one real operation.
fn smoke(arch: &Arch, dir: &Path) -> Result<()> {
    for (_, bin) in BINARIES.iter().filter(|(_, b)| *b != "flannel") {
        let out = arch.command(&dir.join(bin)).arg("--version").output()?;
        let version = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() || !version.contains(TAG) {
            bail!("{bin} --version under {:?}: {version:?}", arch.runner);
        }
        eprintln!("    {bin} --version: {}", version.trim());
    }
    for (bin, args, env, expect) in smoke_operations() {
        let out = arch
            .command(&dir.join(bin))
            .args(args)
            .envs(env.iter().copied())
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stdout.contains(expect) && !stderr.contains(expect) {
            bail!(
                "{bin} {} under {:?} did not print {expect:?}:\n{stdout}\n{stderr}",
                args.join(" "),
                arch.runner
            );
        }
        eprintln!("    {bin} {}: ok", args.join(" "));
    }
    Ok(())
}

/// One real operation per binary that needs no cluster: `(binary, args, env, expected output)`.
type Operation = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
    &'static str,
);

fn smoke_operations() -> Vec<Operation> {
    vec![
        // The CNI VERSION call a runtime makes first.
        (
            "flannel",
            &[],
            &[("CNI_COMMAND", "VERSION")],
            "supportedVersions",
        ),
        // Upstream's flags, bad values refused before any API call.
        (
            "cert-manager-controller",
            &["--acme-http01-solver-nameservers", "not-an-address"],
            &[],
            "invalid value",
        ),
        (
            "cert-manager-cainjector",
            &["--leader-elect-lease-duration", "soon"],
            &[],
            "invalid value",
        ),
        (
            "cert-manager-webhook",
            &["--secure-port", "notaport"],
            &[],
            "invalid value",
        ),
        // A bad config file is refused with a clear error before any API call.
        (
            "local-path-provisioner",
            &["start", "--config", "/nonexistent/config.json"],
            &[],
            "config",
        ),
        (
            "ingress-controller",
            &["--http-port", "notaport"],
            &[],
            "invalid value",
        ),
        ("flanneld", &["--help"], &[], "kube-subnet-mgr"),
    ]
}
