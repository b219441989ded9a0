//! `security.md`: one table per section, ours next to nginx row by row, with the verdict the
//! issue asks for.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::smuggling::{Rule, VECTORS};
use super::steady::Figures;
use super::{Cost, Results, tls};

/// Below this an unloaded p99 is the VM's timer and scheduler noise, not the peer: it counts as
/// this much when judging "within 2x".
pub const P99_FLOOR_MS: f64 = 2.5;

/// The normal client held up: at least 99% success and p99 within 2x of its unloaded figure
/// (at least [`P99_FLOOR_MS`]).
pub fn client_held(during: &Figures, unloaded: &Figures) -> bool {
    during.success_pct() >= 99.0 && during.p99_ms <= 2.0 * unloaded.p99_ms.max(P99_FLOOR_MS)
}

impl Results {
    pub fn unloaded(&self, peer: &str) -> Figures {
        self.baseline
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, f)| *f)
            .unwrap_or_default()
    }

    pub fn markdown(&self, notes: &[String]) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "# Security and overload: ingress-controller and nginx side by side\n\n\
             Written by `cargo run -p xtask -- bench security` (benches/src/security). Both \
             peers forward to one recording backend; nginx runs with ingress-nginx's defaults \
             (protocols, ciphers, client timeouts 60 s, header buffers 4 8k, body 1m, \
             keep-alive 75 s, 128 HTTP/2 streams). The normal client is 4 keep-alive workers, \
             one GET every 20 ms each, on the plain listener; \"held\" means >= 99% success and \
             p99 within 2x of its unloaded p99 (an unloaded p99 under {P99_FLOOR_MS} ms counts \
             as {P99_FLOOR_MS} ms: below that the figure is this VM's scheduling noise).\n"
        );
        for (peer, version) in &self.peers {
            let b = self.unloaded(peer);
            let _ = writeln!(
                md,
                "- {peer}: {version}; unloaded normal client p99 {:.2} ms ({} requests)",
                b.p99_ms, b.requests
            );
        }
        for n in notes {
            let _ = writeln!(md, "- note: {n}");
        }
        self.smuggling_md(&mut md);
        self.h2_md(&mut md);
        self.slow_md(&mut md);
        self.limits_md(&mut md);
        self.tls_md(&mut md);
        if !self.errors.is_empty() {
            let _ = writeln!(md, "\n## Cases that could not run\n");
            for e in &self.errors {
                let _ = writeln!(md, "- {e}");
            }
        }
        md
    }

    fn smuggling_md(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Request smuggling and malformed framing (raw bytes, plain listener)\n\n\
             \"forwarded\" counts the vector's own requests the backend received; \"hidden\" \
             is a second request inside the first reaching the backend (never acceptable).\n\n\
             | vector | RFC | ingress-controller | nginx | safe (ours / nginx) |\n|---|---|---|---|---|"
        );
        for v in VECTORS {
            let cell = |peer: &str| {
                self.smuggling
                    .iter()
                    .find(|o| o.id == v.id && o.peer == peer)
                    .map(|o| {
                        let mut c = format!("{}; forwarded {}", o.answer(), o.forwarded);
                        if o.smuggled {
                            c.push_str("; **hidden request reached backend**");
                        }
                        if o.raw_ctl {
                            c.push_str("; **raw control byte forwarded**");
                        }
                        if let Some(h) = o.host.as_deref().filter(|_| v.id == "absolute-form") {
                            let _ = write!(c, "; Host {h}");
                        }
                        (c, o.safe)
                    })
                    .unwrap_or_else(|| ("not run".into(), false))
            };
            let (ours, ours_safe) = cell("ingress-controller");
            let (nginx, nginx_safe) = cell("nginx");
            let rule = match v.rule {
                Rule::Reject => "must reject (400)",
                Rule::RejectOrNormalise => "reject or normalise",
                Rule::TargetAuthority => "use target's host",
            };
            let yn = |b: bool| if b { "yes" } else { "**no**" };
            let _ = writeln!(
                md,
                "| {} ({}) | {rule} | {ours} | {nginx} | {} / {} |",
                v.id,
                v.description,
                yn(ours_safe),
                yn(nginx_safe)
            );
        }
    }

    fn cost_cells(&self, peer: &str, c: &Cost) -> String {
        let held = client_held(&c.client, &self.unloaded(peer));
        format!(
            "{:.2} | {:.1} → {:.1} | {:.2}% / {:.1} ms | {}",
            c.cpu_seconds,
            c.rss_before_mib,
            c.rss_peak_mib,
            c.client.success_pct(),
            c.client.p99_ms,
            if held { "yes" } else { "**no**" }
        )
    }

    fn h2_md(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## HTTP/2 attacks (one TLS connection, frames written by hand)\n\n\
             | attack | peer | frames sent | time s | what the attacker saw | peer CPU s | RSS MiB | normal client success / p99 | held |\n\
             |---|---|---|---|---|---|---|---|---|"
        );
        for (peer, attack, seen, cost) in &self.h2 {
            let _ = writeln!(
                md,
                "| {} | {peer} | {} ({:.1} MiB) | {:.1} | {}; {} responses, {} RST | {} |",
                attack.id(),
                seen.frames_sent,
                seen.bytes_sent as f64 / (1024.0 * 1024.0),
                seen.seconds,
                seen.verdict(),
                seen.responses,
                seen.rst_received,
                self.cost_cells(peer, cost)
            );
        }
        let _ = writeln!(md);
        for a in super::h2flood::Attack::ALL {
            let _ = writeln!(md, "- {}: {}", a.id(), a.description());
        }
    }

    fn slow_md(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Slow clients (slowhttptest)\n\n\
             | mode | peer | most connections held | service available at end (its probe) | peer CPU s | RSS MiB | normal client success / p99 | held |\n\
             |---|---|---|---|---|---|---|---|"
        );
        for (peer, mode, tool, cost) in &self.slow {
            let _ = writeln!(
                md,
                "| {} | {peer} | {} | {} | {} |",
                mode.id(),
                tool.max_connected,
                if tool.available_at_end { "yes" } else { "no" },
                self.cost_cells(peer, cost)
            );
        }
    }

    fn limits_md(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\n## Idle connections\n\n\
             | peer | opened | still open | RSS before → after MiB | KiB per connection | new client served meanwhile |\n|---|---|---|---|---|---|"
        );
        for (peer, i) in &self.idle {
            let _ = writeln!(
                md,
                "| {peer} | {} | {} | {:.1} → {:.1} | {:.1} | {} |",
                i.opened,
                i.held,
                i.rss_before_mib,
                i.rss_after_mib,
                i.kib_per_connection,
                i.served_meanwhile
            );
        }
        let _ = writeln!(
            md,
            "\n## File descriptors exhausted (limit lowered with prlimit while running)\n\n\
             | peer | limit | connections held | peer CPU while exhausted (% of a core) | survived | fresh requests served after (of 20) |\n|---|---|---|---|---|---|"
        );
        for (peer, e) in &self.exhaustion {
            let _ = writeln!(
                md,
                "| {peer} | {} | {} | {:.1} | {} | {} |",
                e.limit, e.held, e.cpu_percent, e.survived, e.served_after
            );
        }
    }

    fn tls_md(&self, md: &mut String) {
        let _ = writeln!(md, "\n## TLS (testssl.sh)\n");
        let find = |p: &str| {
            self.tls
                .iter()
                .find(|(peer, _)| peer == p)
                .map(|(_, f)| f.as_slice())
        };
        let (Some(ours), Some(nginx)) = (find("ingress-controller"), find("nginx")) else {
            let _ = writeln!(md, "Not run for both peers.");
            return;
        };
        let only = tls::ours_only(ours, nginx);
        let _ = writeln!(
            md,
            "Findings of severity MEDIUM or worse: ingress-controller {}, nginx {}; ours that \
             nginx does not also have: {}.\n",
            ours.iter().filter(|f| f.serious()).count(),
            nginx.iter().filter(|f| f.serious()).count(),
            only.len()
        );
        let _ = writeln!(md, "| peer | id | severity | finding |\n|---|---|---|---|");
        for (peer, findings) in &self.tls {
            for f in findings
                .iter()
                .filter(|f| f.serious() || f.severity == "LOW")
            {
                let _ = writeln!(
                    md,
                    "| {peer} | {} | {} | {} |",
                    f.id,
                    f.severity,
                    f.finding.replace('|', "/")
                );
            }
        }
    }

    /// Writes `security.md` into `dir`.
    pub fn write(&self, dir: &Path, notes: &[String]) -> std::io::Result<PathBuf> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("security.md");
        std::fs::write(&path, self.markdown(notes))?;
        Ok(path)
    }
}
