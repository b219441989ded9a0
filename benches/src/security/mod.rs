//! `cargo run -p xtask -- bench security`: attacks, slow clients and limits against our
//! ingress-controller (fed by a real kube-apiserver) and nginx configured as ingress-nginx
//! configures it, in one run, both forwarding to one recording backend. Writes
//! `benches/results/security.md`; the quick variant runs in the suite
//! (benches/tests/security.rs).

pub mod h2flood;
pub mod limits;
pub mod recorder;
pub mod report;
pub mod slow;
pub mod smuggling;
pub mod steady;
pub mod tls;

use std::path::{Path, PathBuf};
use std::time::Duration;

use integration_tests::kube::{Cluster, ClusterOptions};
use integration_tests::process::free_port;

use crate::Error;
use crate::cluster;
use crate::peers::{HOST, Peer, PeerKind, Shared, loopback, version_of};
use crate::procfs;
use recorder::Recorder;
use steady::{Figures, Steady};

#[derive(Clone, Debug)]
pub struct Programs {
    pub ingress_controller: PathBuf,
    pub nginx: PathBuf,
    pub testssl: PathBuf,
    pub slowhttptest: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub tls: tls::Scope,
    pub h2: h2flood::Budget,
    pub slow_connections: u32,
    pub slow_time: Duration,
    pub idle_connections: usize,
    pub exhaust_attackers: usize,
    pub exhaust_hold: Duration,
    /// The normal client alone, for the unloaded figures.
    pub baseline: Duration,
    pub programs: Programs,
}

impl Options {
    pub fn full(programs: Programs) -> Self {
        Options {
            tls: tls::Scope::Full,
            h2: h2flood::Budget {
                frames: 500_000,
                time: Duration::from_secs(10),
            },
            slow_connections: 1000,
            // Longer than the 60 s header and body timeouts, so they show.
            slow_time: Duration::from_secs(90),
            idle_connections: 10_000,
            exhaust_attackers: 300,
            exhaust_hold: Duration::from_secs(5),
            baseline: Duration::from_secs(5),
            programs,
        }
    }

    /// Seconds per case: what the suite runs.
    pub fn quick(programs: Programs) -> Self {
        Options {
            tls: tls::Scope::Quick,
            h2: h2flood::Budget {
                frames: 20_000,
                time: Duration::from_secs(2),
            },
            slow_connections: 200,
            slow_time: Duration::from_secs(6),
            idle_connections: 1000,
            exhaust_attackers: 100,
            exhaust_hold: Duration::from_secs(2),
            baseline: Duration::from_secs(2),
            ..Options::full(programs)
        }
    }
}

/// ingress-nginx's default `ssl-ciphers`.
pub const INGRESS_NGINX_CIPHERS: &str = "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-AES128-GCM-SHA256";

/// nginx with ingress-nginx's defaults where they matter here: protocols and ciphers, client
/// header and body timeouts (60 s), header buffers (4 8k), body size (1m), keep-alive (75 s,
/// 1000 requests), HTTP/2 streams (128), the Host field forwarded as received, one default
/// server for any host. (`peers::nginx` is the throughput benchmark's, tuned for speed.)
pub fn nginx(
    shared: &Shared,
    program: &Path,
    backend: std::net::SocketAddr,
) -> Result<Peer, Error> {
    let dir = shared.dir.join("nginx");
    std::fs::create_dir_all(&dir)?;
    let (http, https) = (loopback(free_port()?), loopback(free_port()?));
    let d = dir.display();
    let conf = format!(
        r#"worker_processes {workers};
# Workers keep the harness's user, so the descriptor case can lower their limit (prlimit needs
# the same user without CAP_SYS_RESOURCE).
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log crit;
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
    server_tokens off;
    keepalive_timeout 75s;
    keepalive_requests 1000;
    client_header_timeout 60s;
    client_body_timeout 60s;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_body_buffer_size 8k;
    client_max_body_size 1m;
    http2_max_concurrent_streams 128;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers '{ciphers}';
    ssl_prefer_server_ciphers on;
    ssl_session_cache shared:SSL:10m;
    ssl_session_timeout 10m;
    ssl_session_tickets off;
    ssl_ecdh_curve auto;
    upstream backend {{
        server {backend};
        keepalive 320;
    }}
    server {{
        listen {http} default_server reuseport;
        listen {https} ssl http2 default_server reuseport;
        server_name _;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # ingress-nginx forwards $best_http_host: the Host field as received.
            proxy_set_header Host $http_host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_connect_timeout 5s;
            proxy_send_timeout 60s;
            proxy_read_timeout 60s;
            proxy_buffering off;
            proxy_request_buffering on;
        }}
    }}
}}
"#,
        workers = shared.workers,
        ciphers = INGRESS_NGINX_CIPHERS,
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

/// Both peers running, serving [`HOST`] and any other host, in front of one recorder.
pub struct Stand {
    pub backend: Recorder,
    pub peers: Vec<Peer>,
    pub shared: Shared,
    // Kept alive for the run: the controller watches it.
    _cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl Stand {
    pub async fn start(programs: &Programs) -> Result<Self, Error> {
        integration_tests::install_crypto_provider();
        // The limits case holds thousands of sockets.
        crate::idle::raise_nofile();
        let dir = tempfile::Builder::new()
            .prefix("homecluster-security-")
            .tempdir()?;
        // nginx's temp paths are under here (its workers keep root in this configuration).
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        let shared = Shared::new(dir.path(), None, 2)?;
        let backend = Recorder::start().await?;
        let cluster = Cluster::start(ClusterOptions::default()).await?;
        let env = cluster::start(
            &cluster,
            &shared,
            &programs.ingress_controller,
            backend.addr,
            // Upstream's defaults, as nginx's configuration here has them.
            &[],
        )
        .await?;
        env.catch_all().await?;
        let mut nginx = nginx(&shared, &programs.nginx, backend.addr)?;
        if let Err(e) = crate::probe::wait_status(
            nginx.http,
            HOST,
            "/",
            200,
            Duration::from_millis(50),
            Duration::from_secs(20),
        )
        .await
        {
            nginx.check_running()?;
            return Err(Error::Peer {
                peer: "nginx".into(),
                message: format!("{e}; log: {}", nginx.log_tail()),
            });
        }
        Ok(Stand {
            backend,
            peers: vec![env.peer, nginx],
            shared,
            _cluster: cluster,
            _dir: dir,
        })
    }
}

/// Runs a tool to completion (killed after [`TOOL_LIMIT`]: a hung scan must not hang the
/// suite), then reads the file it wrote; a missing file is an error naming the tool's last
/// lines of output.
pub(crate) async fn tool_output(
    tool: &str,
    program: &Path,
    args: Vec<String>,
    writes: &Path,
) -> Result<String, Error> {
    let err = |message: String| Error::Tool {
        tool: tool.to_string(),
        message,
    };
    let run = tokio::process::Command::new(program)
        .args(&args)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(TOOL_LIMIT, run)
        .await
        .map_err(|_| err(format!("no result within {TOOL_LIMIT:?}")))?
        .map_err(|e| err(e.to_string()))?;
    std::fs::read_to_string(writes).map_err(|e| {
        let stdout = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = stdout.lines().rev().take(10).collect();
        err(format!(
            "no {} ({e}); output: {}",
            writes.display(),
            tail.join(" | ")
        ))
    })
}

/// The longest any tool may run (testssl's full scan takes 2-4 minutes here).
const TOOL_LIMIT: Duration = Duration::from_secs(900);

/// A peer's CPU and resident memory over an attack, and the normal client meanwhile.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Cost {
    pub cpu_seconds: f64,
    pub rss_before_mib: f64,
    pub rss_peak_mib: f64,
    pub client: Figures,
}

/// Runs `attack` while measuring `peer` and the normal client against it.
pub async fn under_attack<F, T>(peer: &Peer, attack: F) -> (T, Cost)
where
    F: std::future::Future<Output = T>,
{
    let root = peer.pid;
    let before = procfs::stats(root);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let sampler = tokio::spawn(async move {
        let mut peak = 0u64;
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(procfs::stats(root).rss_bytes);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        peak
    });
    let client = Steady::start(peer.http);
    let out = attack.await;
    let client = client.stop().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.await.unwrap_or(0);
    let after = procfs::stats(root);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    (
        out,
        Cost {
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            rss_before_mib: mib(before.rss_bytes),
            rss_peak_mib: mib(peak.max(after.rss_bytes)),
            client,
        },
    )
}

/// Everything one run measured.
#[derive(Debug, Default, serde::Serialize)]
pub struct Results {
    pub peers: Vec<(String, String)>,
    pub baseline: Vec<(String, Figures)>,
    pub tls: Vec<(String, Vec<tls::Finding>)>,
    pub smuggling: Vec<smuggling::Outcome>,
    pub h2: Vec<(String, h2flood::Attack, h2flood::Seen, Cost)>,
    pub slow: Vec<(String, slow::Mode, slow::Tool, Cost)>,
    pub idle: Vec<(String, limits::Idle)>,
    pub exhaustion: Vec<(String, limits::Exhaustion)>,
    pub errors: Vec<String>,
}

/// Runs every case against both peers.
pub async fn run(opts: &Options) -> Result<Results, Error> {
    let stand = Stand::start(&opts.programs).await?;
    let mut r = Results::default();
    for peer in &stand.peers {
        r.peers
            .push((peer.kind.name().into(), peer.version.clone()));
        let base = Steady::measure(peer.http, opts.baseline).await;
        r.baseline.push((peer.kind.name().into(), base));
    }
    eprintln!("    smuggling table");
    for peer in &stand.peers {
        r.smuggling
            .extend(smuggling::run(peer.kind.name(), peer.http, &stand.backend).await);
    }
    for attack in h2flood::Attack::ALL {
        for peer in &stand.peers {
            eprintln!("    {} {}", attack.id(), peer.kind.name());
            let (seen, cost) = under_attack(
                peer,
                h2flood::run(attack, peer.https, &stand.shared.ca_pem, opts.h2),
            )
            .await;
            match seen {
                Ok(seen) => r.h2.push((peer.kind.name().into(), attack, seen, cost)),
                Err(e) => r
                    .errors
                    .push(format!("{} {}: {e}", attack.id(), peer.kind.name())),
            }
        }
    }
    for mode in slow::Mode::ALL {
        for peer in &stand.peers {
            eprintln!("    {} {}", mode.id(), peer.kind.name());
            let (tool, cost) = under_attack(
                peer,
                slow::run(
                    &opts.programs.slowhttptest,
                    mode,
                    peer.http,
                    opts.slow_connections,
                    opts.slow_time,
                    &stand.shared.dir,
                ),
            )
            .await;
            match tool {
                Ok(tool) => r.slow.push((peer.kind.name().into(), mode, tool, cost)),
                Err(e) => r
                    .errors
                    .push(format!("{} {}: {e}", mode.id(), peer.kind.name())),
            }
        }
    }
    for peer in &stand.peers {
        eprintln!("    idle connections, descriptors {}", peer.kind.name());
        let idle = limits::idle(peer.http, peer.pid, opts.idle_connections).await;
        r.idle.push((peer.kind.name().into(), idle));
        match limits::exhaust(
            peer.http,
            peer.pid,
            opts.exhaust_attackers,
            opts.exhaust_hold,
        )
        .await
        {
            Ok(e) => r.exhaustion.push((peer.kind.name().into(), e)),
            Err(e) => r
                .errors
                .push(format!("descriptors {}: {e}", peer.kind.name())),
        }
    }
    for peer in &stand.peers {
        eprintln!("    testssl {}", peer.kind.name());
        match tls::scan(
            &opts.programs.testssl,
            peer.https,
            opts.tls,
            &stand.shared.dir,
        )
        .await
        {
            Ok(f) => r.tls.push((peer.kind.name().into(), f)),
            Err(e) => r.errors.push(format!("testssl {}: {e}", peer.kind.name())),
        }
    }
    Ok(r)
}
