//! Benchmark peer: the smallest pingora 0.9 reverse proxy that does what the other peers do:
//! plain HTTP/1.1 and TLS (HTTP/1.1 + h2 by ALPN) in front of one plain-HTTP upstream, with
//! pingora's upstream connection pool. Configured from the environment by `xtask bench`:
//! PEER_HTTP, PEER_HTTPS (listen addresses), PEER_CERT, PEER_KEY (PEM paths), PEER_UPSTREAM
//! (host:port) and PEER_THREADS (worker threads).

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

struct Forward {
    upstream: String,
}

#[async_trait]
impl ProxyHttp for Forward {
    type CTX = ();
    fn new_ctx(&self) -> Self::CTX {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        // Plain HTTP upstream, no SNI: the same as every other peer's backend hop.
        Ok(Box::new(HttpPeer::new(
            self.upstream.as_str(),
            false,
            String::new(),
        )))
    }
}

fn env(name: &str) -> String {
    match std::env::var(name) {
        Ok(v) => v,
        Err(_) => {
            eprintln!("pingora-peer: {name} is not set");
            std::process::exit(2);
        }
    }
}

fn main() {
    let threads: usize = env("PEER_THREADS").parse().unwrap_or(1);
    let dir = std::env::temp_dir();
    let conf = ServerConf {
        threads,
        pid_file: dir.join("pingora-peer.pid").display().to_string(),
        upgrade_sock: dir.join("pingora-peer.upgrade.sock").display().to_string(),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = http_proxy_service(
        &server.configuration,
        Forward {
            upstream: env("PEER_UPSTREAM"),
        },
    );
    proxy.add_tcp(&env("PEER_HTTP"));
    let mut tls = match TlsSettings::intermediate(&env("PEER_CERT"), &env("PEER_KEY")) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("pingora-peer: TLS settings: {e}");
            std::process::exit(2);
        }
    };
    tls.enable_h2();
    proxy.add_tls_with_settings(&env("PEER_HTTPS"), None, tls);
    server.add_service(proxy);
    server.run_forever();
}
