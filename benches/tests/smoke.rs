//! The benchmark's smoke variant: every scenario against every peer for about a second, one
//! round (the idle and scale scenarios with small sizes), so the harness never rots. It
//! asserts only that figures came out, that ours answered with 2xx, and that the result files
//! can be written; it judges no figure.

use std::path::PathBuf;

mod common;

use benches::peers::PeerKind;
use benches::{Options, Programs};
use common::{ingress_controller, workspace_root};
use integration_tests::process::which;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_produces_figures() {
    let oha = benches::oha_path();
    assert!(
        oha.is_file(),
        "oha not found at {}: run `{}` once",
        oha.display(),
        integration_tests::SETUP_COMMAND
    );
    let tool = |name: &str| which(name).unwrap_or_else(|e| panic!("{e}"));
    let programs = Programs {
        ingress_controller: ingress_controller(),
        backend: PathBuf::from(env!("CARGO_BIN_EXE_bench-backend")),
        bare: PathBuf::from(env!("CARGO_BIN_EXE_bare-proxy")),
        // Cached outside the repository: after the first build this is a freshness check.
        pingora: Ok(benches::build_pingora(&workspace_root()).unwrap_or_else(|e| panic!("{e}"))),
        nginx: tool("nginx"),
        haproxy: tool("haproxy"),
        wrk: tool("wrk"),
        h2load: tool("h2load"),
        oha,
    };
    let opts = Options::smoke(programs);
    let results = benches::run(&opts).await.unwrap_or_else(|e| panic!("{e}"));

    let peers = [
        PeerKind::IngressController,
        PeerKind::Nginx,
        PeerKind::Haproxy,
        PeerKind::Pingora,
        PeerKind::Direct,
    ];
    assert!(results.skipped.is_empty(), "skipped: {:?}", results.skipped);
    assert!(results.failed.is_empty(), "failed: {:?}", results.failed);
    for s in results.throughput.iter().chain(&results.latency) {
        for kind in peers {
            let p = s
                .get(kind)
                .unwrap_or_else(|| panic!("{} has no {} figures", s.id, kind.name()));
            assert!(
                p.value.median > 0.0,
                "{} {}: no figure ({p:?})",
                s.id,
                kind.name()
            );
        }
    }
    // Ours answers every request it answers with a 2xx. (Socket errors are not judged: wrk
    // counts a debug build's slow answers on a loaded machine as timeouts. The smoke's debug
    // build is also too slow to reach 1000 streams per h2load connection in a second, so
    // `keep-alive-requests` ending them shows only in full runs: benches/README.md, change 16.)
    for s in &results.throughput {
        if let Some(p) = s.get(PeerKind::IngressController) {
            assert_eq!(p.non_2xx, 0, "{} ours: {p:?}", s.id);
        }
    }
    // The bare proxies serve plain HTTP/1 on kept-alive connections, and nothing else.
    for s in &results.throughput {
        for kind in [PeerKind::BareEpoll, PeerKind::BareIoUring] {
            match (benches::bare_scenario(&s.id), s.get(kind)) {
                (true, Some(p)) => assert!(
                    p.value.median > 0.0 && p.errors == 0 && p.non_2xx == 0,
                    "{} {p:?}",
                    s.id
                ),
                (true, None) => panic!("{} has no {} figures", s.id, kind.name()),
                (false, Some(_)) => panic!("{} measured {}", s.id, kind.name()),
                (false, None) => {}
            }
            for l in &results.latency {
                assert!(l.get(kind).is_none(), "{} measured {}", l.id, kind.name());
            }
        }
    }
    for r in &results.resources {
        assert!(r.peak_rss_mib > 0.0 && r.cpu_seconds > 0.0, "{r:?}");
    }
    assert_eq!(results.propagation.len(), 3);
    for p in &results.propagation {
        assert!(p.edits > 0 && p.from_request_ms.median > 0.0, "{p:?}");
    }
    let under_load = results.edits_under_load.as_ref().expect("edits under load");
    assert!(under_load.requests > 0);
    for s in &results.throughput {
        assert!(s.floor_us_per_request.is_some(), "{} has no floor", s.id);
    }
    // Every proxy (direct is no proxy) held the smoke size of idle connections.
    let idle_peers: Vec<&str> = results.idle.iter().map(|p| p.peer.as_str()).collect();
    assert_eq!(idle_peers.len(), peers.len() - 1, "{idle_peers:?}");
    for p in &results.idle {
        assert_eq!(p.idle.held, opts.idle_connections, "{p:?}");
        assert!(
            p.idle.rss_before_mib > 0.0 && p.idle.served_meanwhile,
            "{p:?}"
        );
    }
    let scale = results
        .scale
        .as_ref()
        .unwrap_or_else(|| panic!("no scale figures: {:?}", results.failed));
    assert!(
        scale.raw.ingresses >= opts.scale_ingresses
            && scale.raw.tls_secrets == opts.scale_certificates,
        "{scale:?}"
    );
    assert!(
        scale.edits.edits == opts.edits && scale.raw.rss_loaded_mib > 0.0,
        "{scale:?}"
    );
    assert!(!results.targets.is_empty());

    let dir = tempfile::tempdir().expect("temp dir");
    let (md, json) = results.write(dir.path()).expect("writing results");
    let md = std::fs::read_to_string(md).expect("markdown");
    assert!(md.contains("| h2-64k | pingora |"), "{md}");
    assert!(md.contains("## Idle keep-alive connections"), "{md}");
    assert!(md.contains("## Scale:"), "{md}");
    assert!(md.contains("floor µs/req"), "{md}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(json).expect("json")).expect("valid JSON");
    assert!(json["machine"]["cores"].as_u64().unwrap_or(0) > 0);
    assert!(json["idle"].as_array().is_some_and(|a| !a.is_empty()));
    assert!(json["scale"]["raw"]["tls_secrets"].as_u64().unwrap_or(0) > 0);
}
