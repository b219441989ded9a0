//! A real ACME server: Debian's pebble, resolving names through pebble-challtestsrv's DNS.

use std::time::{Duration, Instant};

use crate::pki::TestCa;
use crate::process::{ManagedProcess, free_port, which};
use crate::{HarnessError, Result, http};

/// How pebble is run.
#[derive(Clone, Debug)]
pub struct PebbleOptions {
    /// Port pebble's validator connects to for HTTP-01 (where the proxy under test listens).
    pub http_port: u16,
    /// Port for TLS-ALPN-01.
    pub tls_port: u16,
    /// Extra environment, e.g. `PEBBLE_VA_NOSLEEP=1`, `PEBBLE_WFE_NONCEREJECT=50`.
    pub env: Vec<(String, String)>,
    /// `certificateValidityPeriod` in seconds (pebble's default is five years).
    pub validity_secs: Option<u64>,
    /// External account binding: key id → base64url HMAC key; when set, pebble requires EAB.
    pub eab_keys: Vec<(String, String)>,
    /// Where the ACME API and challtestsrv's DNS listen (default loopback): an address pods
    /// reach, for clients running in a cluster's pods.
    pub listen_address: Option<std::net::Ipv4Addr>,
}

impl Default for PebbleOptions {
    fn default() -> Self {
        Self {
            http_port: 5002,
            tls_port: 5001,
            env: vec![("PEBBLE_VA_NOSLEEP".into(), "1".into())],
            validity_secs: None,
            eab_keys: Vec::new(),
            listen_address: None,
        }
    }
}

/// pebble + pebble-challtestsrv on loopback; stopped on drop.
pub struct Pebble {
    dir: tempfile::TempDir,
    pebble: Option<ManagedProcess>,
    challtestsrv: ManagedProcess,
    opts: PebbleOptions,
    acme_port: u16,
    mgmt_port: u16,
    dns_port: u16,
    challsrv_mgmt_port: u16,
    listen: std::net::Ipv4Addr,
    starts: u32,
    /// CA of pebble's listener certificate: what an ACME client must trust.
    pub ca_pem: String,
}

impl Pebble {
    pub async fn start(opts: PebbleOptions) -> Result<Pebble> {
        let challsrv_bin = which("pebble-challtestsrv")?;
        // Named `homecluster-acme-<pid>-…`: a pebble a test binary shares is never dropped, so
        // a later run removes the dirs of processes that are gone.
        crate::kube::remove_stale_dirs("homecluster-acme-");
        let dir = tempfile::Builder::new()
            .prefix(&format!("homecluster-acme-{}-", std::process::id()))
            .tempdir()?;
        let d = dir.path();
        let ca = TestCa::new("homecluster-pebble-listener-ca")?;
        let listen = opts.listen_address.unwrap_or(std::net::Ipv4Addr::LOCALHOST);
        let listen_text = listen.to_string();
        let listener = ca.leaf(
            "pebble",
            &["localhost", "127.0.0.1", "pebble", &listen_text],
        )?;
        std::fs::write(d.join("cert.pem"), &listener.cert_pem)?;
        std::fs::write(d.join("key.pem"), &listener.key_pem)?;
        std::fs::write(d.join("ca.pem"), &ca.cert_pem)?;

        let dns_port = free_port()?;
        let challsrv_mgmt_port = free_port()?;
        // -defaultIPv6 "": otherwise every name also resolves to ::1 and pebble tries it first.
        let challtestsrv = ManagedProcess::spawn(
            "pebble-challtestsrv",
            &challsrv_bin,
            &[
                "-defaultIPv6".into(),
                String::new(),
                "-defaultIPv4".into(),
                "127.0.0.1".into(),
                "-dns01".into(),
                format!("{listen}:{dns_port}"),
                "-http01".into(),
                String::new(),
                "-https01".into(),
                String::new(),
                "-tlsalpn01".into(),
                String::new(),
                "-management".into(),
                format!("127.0.0.1:{challsrv_mgmt_port}"),
            ],
            &[],
            &d.join("challtestsrv.log"),
        )?;

        let mut pebble = Pebble {
            dir,
            pebble: None,
            challtestsrv,
            opts,
            acme_port: free_port()?,
            mgmt_port: free_port()?,
            dns_port,
            challsrv_mgmt_port,
            listen,
            starts: 0,
            ca_pem: ca.cert_pem,
        };
        pebble.wait_challtestsrv().await?;
        pebble.start_pebble().await?;
        Ok(pebble)
    }

    /// The ACME directory URL.
    pub fn directory_url(&self) -> String {
        match self.opts.listen_address {
            Some(a) => format!("https://{a}:{}/dir", self.acme_port),
            None => format!("https://localhost:{}/dir", self.acme_port),
        }
    }

    /// challtestsrv's DNS server (what pebble resolves names with; every name is 127.0.0.1
    /// unless set with [`Pebble::set_dns_a`]).
    pub fn dns_addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from((self.listen, self.dns_port))
    }

    pub fn options(&self) -> &PebbleOptions {
        &self.opts
    }

    /// Pebble's current issuing root, from its management API (it changes on every start).
    pub async fn issuing_root_pem(&self) -> Result<String> {
        let url = format!("https://localhost:{}/roots/0", self.mgmt_port);
        let reply = http::get(&url, Some(&self.ca_pem)).await?;
        if reply.status != 200 {
            return Err(HarnessError::Http(format!(
                "{url}: status {}",
                reply.status
            )));
        }
        Ok(reply.text())
    }

    /// Makes challtestsrv's DNS answer `host` with `ipv4` (A record).
    pub async fn set_dns_a(&self, host: &str, ipv4: &str) -> Result<()> {
        let url = format!("http://127.0.0.1:{}/add-a", self.challsrv_mgmt_port);
        let reply = http::post_json(
            &url,
            &serde_json::json!({"host": host, "addresses": [ipv4]}),
            None,
        )
        .await?;
        if reply.status != 200 {
            return Err(HarnessError::Http(format!(
                "{url}: status {} {}",
                reply.status,
                reply.text()
            )));
        }
        Ok(())
    }

    /// Stops pebble (challtestsrv keeps running), e.g. to test client backoff.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.pebble.take() {
            p.stop(Duration::from_secs(5));
        }
    }

    /// Starts pebble again on the same ports (it comes back with a new root).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop();
        self.start_pebble().await
    }

    async fn start_pebble(&mut self) -> Result<()> {
        let pebble_bin = which("pebble")?;
        let d = self.dir.path();
        let mut config = serde_json::json!({
            "pebble": {
                "listenAddress": format!("{}:{}", self.listen, self.acme_port),
                "managementListenAddress": format!("127.0.0.1:{}", self.mgmt_port),
                "certificate": d.join("cert.pem"),
                "privateKey": d.join("key.pem"),
                "httpPort": self.opts.http_port,
                "tlsPort": self.opts.tls_port,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": false
            }
        });
        if !self.opts.eab_keys.is_empty() {
            config["pebble"]["externalAccountBindingRequired"] = true.into();
            config["pebble"]["externalAccountMACKeys"] = self
                .opts
                .eab_keys
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone())))
                .collect::<serde_json::Map<_, _>>()
                .into();
        }
        if let Some(v) = self.opts.validity_secs {
            config["pebble"]["certificateValidityPeriod"] = v.into();
        }
        std::fs::write(d.join("pebble-config.json"), config.to_string())?;
        self.starts += 1;
        let log = d.join(format!("pebble.{}.log", self.starts));
        let mut proc = ManagedProcess::spawn(
            "pebble",
            &pebble_bin,
            &[
                "-config".into(),
                d.join("pebble-config.json").display().to_string(),
                "-dnsserver".into(),
                format!("{}:{}", self.listen, self.dns_port),
            ],
            &self.opts.env,
            &log,
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            proc.check_running()?;
            if let Ok(reply) = http::get(&self.directory_url(), Some(&self.ca_pem)).await
                && reply.status == 200
            {
                break;
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: "pebble".into(),
                    secs: 30,
                    log: proc.log_tail(3000),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.pebble = Some(proc);
        Ok(())
    }

    async fn wait_challtestsrv(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            // Any HTTP answer from the management port means it is up.
            if http::get(
                &format!("http://127.0.0.1:{}/", self.challsrv_mgmt_port),
                None,
            )
            .await
            .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(HarnessError::NotReady {
                    what: "pebble-challtestsrv".into(),
                    secs: 15,
                    log: self.challtestsrv.log_tail(2000),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
