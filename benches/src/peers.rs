//! The proxies under test, each started from a config written here (every setting is
//! explained in benches/README.md), and the backend they all forward to.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use integration_tests::process::{ManagedProcess, free_port};
use serde::Serialize;

use crate::Error;

/// The virtual host every peer serves (and the certificate's name).
pub const HOST: &str = "bench.test";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerKind {
    IngressController,
    Nginx,
    Haproxy,
    Pingora,
    /// `bare-proxy` on epoll: forwarding bytes and nothing else (plain HTTP/1 only).
    BareEpoll,
    /// `bare-proxy` on io_uring (COOP_TASKRUN), the same code.
    BareIoUring,
    Direct,
}

impl PeerKind {
    pub const ALL: [PeerKind; 7] = [
        PeerKind::IngressController,
        PeerKind::Nginx,
        PeerKind::Haproxy,
        PeerKind::Pingora,
        PeerKind::BareEpoll,
        PeerKind::BareIoUring,
        PeerKind::Direct,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PeerKind::IngressController => "ingress-controller",
            PeerKind::Nginx => "nginx",
            PeerKind::Haproxy => "haproxy",
            PeerKind::Pingora => "pingora",
            PeerKind::BareEpoll => "bare-epoll",
            PeerKind::BareIoUring => "bare-io-uring",
            PeerKind::Direct => "direct",
        }
    }

    /// The bare proxies: measured only where they can serve (plain HTTP/1 with keep-alive),
    /// as the least any proxy spends there, not as proxies to compare features with.
    pub fn is_bare(self) -> bool {
        matches!(self, PeerKind::BareEpoll | PeerKind::BareIoUring)
    }
}

/// A running peer: where it listens and which process tree is its cost.
pub struct Peer {
    pub kind: PeerKind,
    pub http: SocketAddr,
    pub https: SocketAddr,
    /// Root of the process tree whose CPU and memory are this peer's.
    pub pid: u32,
    pub version: String,
    process: Option<ManagedProcess>,
}

impl Peer {
    pub fn new(
        kind: PeerKind,
        http: SocketAddr,
        https: SocketAddr,
        process: ManagedProcess,
        version: String,
    ) -> Result<Self, Error> {
        let pid = process.pid().ok_or_else(|| Error::Peer {
            peer: kind.name().into(),
            message: "no pid".into(),
        })?;
        Ok(Peer {
            kind,
            http,
            https,
            pid,
            version,
            process: Some(process),
        })
    }

    /// The backend seen as a peer (the ceiling): its process belongs to the [`Backend`].
    pub fn direct(backend: &Backend) -> Self {
        Peer {
            kind: PeerKind::Direct,
            http: backend.plain,
            https: backend.tls,
            pid: backend.pid,
            version: "bench-backend (hyper 1, rustls)".into(),
            process: None,
        }
    }

    /// Fails with the peer's log if it has exited.
    pub fn check_running(&mut self) -> Result<(), Error> {
        match self.process.as_mut() {
            Some(p) => p.check_running().map_err(Error::from),
            None => Ok(()),
        }
    }

    pub fn log_tail(&self) -> String {
        self.process
            .as_ref()
            .map(|p| p.log_tail(3000))
            .unwrap_or_default()
    }

    /// Stops the peer's process (SIGTERM, then SIGKILL after 3 s); the backend seen as a peer
    /// is left running.
    pub fn stop(&mut self) {
        // SIGTERM first: nginx's workers are not tied to the harness, only its master is, and
        // the master takes them down on TERM.
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(3));
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What every peer shares: the work dir, the certificate, the CPU placement.
pub struct Shared {
    pub dir: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Certificate then key in one file (haproxy's `crt`).
    pub combined: PathBuf,
    pub cert_pem: String,
    pub key_pem: String,
    /// The CA that signed `cert` (clients that verify it trust this).
    pub ca_pem: String,
    /// `taskset -c` list for the proxies, when pinning.
    pub proxy_cpus: Option<String>,
    /// Worker processes/threads each proxy gets (= the CPUs it may use).
    pub workers: usize,
}

impl Shared {
    /// Writes the certificate files into `dir`.
    pub fn new(dir: &Path, proxy_cpus: Option<String>, workers: usize) -> Result<Self, Error> {
        let ca = integration_tests::pki::TestCa::new("homecluster-bench-ca")?;
        let leaf = ca.leaf(HOST, &[HOST, "localhost", "127.0.0.1"])?;
        let cert = dir.join("bench.crt");
        let key = dir.join("bench.key");
        let combined = dir.join("bench.pem");
        std::fs::write(&cert, &leaf.cert_pem)?;
        std::fs::write(&key, &leaf.key_pem)?;
        std::fs::write(&combined, format!("{}{}", leaf.cert_pem, leaf.key_pem))?;
        Ok(Shared {
            dir: dir.to_path_buf(),
            cert,
            key,
            combined,
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
            ca_pem: ca.cert_pem,
            proxy_cpus,
            workers,
        })
    }

    /// Spawns `program args`, under `taskset` when pinning (taskset execs, so the pid is the
    /// program's).
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[String],
        envs: &[(String, String)],
    ) -> Result<ManagedProcess, Error> {
        let log = self.dir.join(format!("{name}.log"));
        let p = match &self.proxy_cpus {
            Some(cpus) => {
                let mut a = vec![
                    "-c".to_string(),
                    cpus.clone(),
                    program.display().to_string(),
                ];
                a.extend_from_slice(args);
                ManagedProcess::spawn(name, Path::new("/usr/bin/taskset"), &a, envs, &log)?
            }
            None => ManagedProcess::spawn(name, program, args, envs, &log)?,
        };
        Ok(p)
    }
}

pub(crate) fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The backend process (plain and TLS listeners).
pub struct Backend {
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    pub pid: u32,
    process: ManagedProcess,
}

impl Backend {
    /// Starts `bench-backend` on `cpus` (the load generator's when pinning) with `threads`.
    pub fn start(
        shared: &Shared,
        program: &Path,
        cpus: Option<&str>,
        threads: usize,
    ) -> Result<Self, Error> {
        let plain = loopback(free_port()?);
        let tls = loopback(free_port()?);
        let mut args = vec![
            format!("--plain={plain}"),
            format!("--tls={tls}"),
            format!("--cert={}", shared.cert.display()),
            format!("--key={}", shared.key.display()),
            format!("--threads={threads}"),
        ];
        let log = shared.dir.join("backend.log");
        let process = match cpus {
            Some(cpus) => {
                let mut a = vec![
                    "-c".to_string(),
                    cpus.to_string(),
                    program.display().to_string(),
                ];
                a.append(&mut args);
                ManagedProcess::spawn(
                    "bench-backend",
                    Path::new("/usr/bin/taskset"),
                    &a,
                    &[],
                    &log,
                )?
            }
            None => ManagedProcess::spawn("bench-backend", program, &args, &[], &log)?,
        };
        let pid = process.pid().ok_or_else(|| Error::Peer {
            peer: "bench-backend".into(),
            message: "no pid".into(),
        })?;
        Ok(Backend {
            plain,
            tls,
            pid,
            process,
        })
    }

    pub fn check_running(&mut self) -> Result<(), Error> {
        self.process.check_running().map_err(Error::from)
    }

    /// Moves every thread of the backend to `cpus` (for the direct rounds it is the system under
    /// test and gets the proxies' CPUs).
    pub fn pin(&self, cpus: &str) -> Result<(), Error> {
        let pid = self.pid.to_string();
        integration_tests::process::run("taskset", &["-a", "-p", "-c", cpus, &pid])?;
        Ok(())
    }
}

pub(crate) fn version_of(program: &Path, arg: &str) -> String {
    Command::new(program)
        .arg(arg)
        .output()
        .map(|o| {
            let mut s = String::from_utf8_lossy(&o.stderr).into_owned();
            s.push_str(&String::from_utf8_lossy(&o.stdout));
            s.lines().next().unwrap_or("").trim().to_string()
        })
        .unwrap_or_default()
}

/// nginx as ingress-nginx configures it where it matters for this path (see README).
pub fn nginx(shared: &Shared, program: &Path, backend: &Backend) -> Result<Peer, Error> {
    let dir = shared.dir.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let (http, https) = (loopback(free_port()?), loopback(free_port()?));
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 19000;
events {{
    worker_connections 16384;
    multi_accept on;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_timeout 75s;
    keepalive_requests 1000000;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache shared:SSL:10m;
    ssl_session_tickets off;
    upstream backend {{
        server {backend};
        keepalive 320;
        keepalive_requests 10000;
        keepalive_timeout 60s;
    }}
    server {{
        listen {http} reuseport;
        listen {https} ssl http2 reuseport;
        server_name {host};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Forwarded-Port $server_port;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_buffering off;
            proxy_request_buffering on;
        }}
    }}
}}
"#,
        workers = shared.workers,
        backend = backend.plain,
        host = HOST,
        cert = shared.cert.display(),
        key = shared.key.display(),
    );
    let conf_path = dir.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let args = vec![
        "-c".to_string(),
        conf_path.display().to_string(),
        "-p".to_string(),
        dir.display().to_string(),
    ];
    let process = shared.spawn("nginx", program, &args, &[])?;
    Peer::new(
        PeerKind::Nginx,
        http,
        https,
        process,
        version_of(program, "-v"),
    )
}

/// haproxy in one process with `nbthread` threads and connection reuse to the backend.
pub fn haproxy(shared: &Shared, program: &Path, backend: &Backend) -> Result<Peer, Error> {
    let dir = shared.dir.join("haproxy");
    std::fs::create_dir_all(&dir)?;
    let (http, https) = (loopback(free_port()?), loopback(free_port()?));
    let conf = format!(
        r#"global
    nbthread {workers}
    maxconn 10100
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2
    tune.ssl.cachesize 20000

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 75s

frontend bench
    bind {http}
    bind {https} ssl crt {combined} alpn h2,http/1.1
    default_backend backend

backend backend
    server s1 {backend}
"#,
        workers = shared.workers,
        combined = shared.combined.display(),
        backend = backend.plain,
    );
    let conf_path = dir.join("haproxy.cfg");
    std::fs::write(&conf_path, conf)?;
    // -db: foreground, no daemon; one process whose threads do all the work.
    let args = vec![
        "-db".to_string(),
        "-f".to_string(),
        conf_path.display().to_string(),
    ];
    let process = shared.spawn("haproxy", program, &args, &[])?;
    Peer::new(
        PeerKind::Haproxy,
        http,
        https,
        process,
        version_of(program, "-v"),
    )
}

/// The pingora peer (benches/pingora-peer), configured through its environment.
pub fn pingora(shared: &Shared, program: &Path, backend: &Backend) -> Result<Peer, Error> {
    let (http, https) = (loopback(free_port()?), loopback(free_port()?));
    let envs = vec![
        ("PEER_HTTP".to_string(), http.to_string()),
        ("PEER_HTTPS".to_string(), https.to_string()),
        ("PEER_CERT".to_string(), shared.cert.display().to_string()),
        ("PEER_KEY".to_string(), shared.key.display().to_string()),
        ("PEER_UPSTREAM".to_string(), backend.plain.to_string()),
        ("PEER_THREADS".to_string(), shared.workers.to_string()),
        ("TMPDIR".to_string(), shared.dir.display().to_string()),
    ];
    let process = shared.spawn("pingora", program, &[], &envs)?;
    Peer::new(
        PeerKind::Pingora,
        http,
        https,
        process,
        "pingora 0.9.1 (rustls)".into(),
    )
}

/// `bare-proxy` (src/bin/bare-proxy.rs) with the driver of `kind`, a thread per worker: the
/// cost of moving a request and its response through a proxy with nothing else done, on epoll
/// or on io_uring.
pub fn bare(
    shared: &Shared,
    program: &Path,
    backend: &Backend,
    kind: PeerKind,
) -> Result<Peer, Error> {
    let http = loopback(free_port()?);
    let (driver, version) = match kind {
        PeerKind::BareEpoll => (vec!["--driver=epoll"], "bare-proxy (monoio 0.2, epoll)"),
        PeerKind::BareIoUring => (
            vec!["--driver=uring", "--uring-setup=coop"],
            "bare-proxy (monoio 0.2, io_uring with COOP_TASKRUN)",
        ),
        other => {
            return Err(Error::Peer {
                peer: other.name().into(),
                message: "not a bare proxy".into(),
            });
        }
    };
    let mut args = vec![
        format!("--listen={http}"),
        format!("--backend={}", backend.plain),
        format!("--threads={}", shared.workers),
    ];
    args.extend(driver.into_iter().map(String::from));
    let process = shared.spawn(kind.name(), program, &args, &[])?;
    // No TLS listener: the harness measures it only on plain HTTP/1.
    Peer::new(kind, http, http, process, version.into())
}
