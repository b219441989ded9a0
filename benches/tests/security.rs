//! The security benchmark's quick variant (`Options::quick`): every case against our
//! ingress-controller and nginx for a few seconds. It asserts what must hold for ours whatever
//! the machine's speed (no request smuggled, attacks closed or bounded, the normal client
//! served, descriptors recovered, no TLS finding nginx lacks); the figures themselves are the
//! benchmark's (`cargo run -p xtask -- bench security`).

mod common;

use benches::security::h2flood::Attack;
use benches::security::{Options, Programs, tls};
use common::ingress_controller;
use integration_tests::process::which;

const OURS: &str = "ingress-controller";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ours_holds_where_it_must() {
    let tool = |name: &str| {
        which(name)
            .unwrap_or_else(|e| panic!("{e}: run `{}` once", integration_tests::SETUP_COMMAND))
    };
    let programs = Programs {
        ingress_controller: ingress_controller(),
        nginx: tool("nginx"),
        testssl: tool("testssl"),
        slowhttptest: tool("slowhttptest"),
    };
    let r = benches::security::run(&Options::quick(programs))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let md = r.markdown(&[]);
    assert!(
        r.errors.is_empty(),
        "cases failed to run: {:?}\n{md}",
        r.errors
    );

    let ours: Vec<_> = r.smuggling.iter().filter(|o| o.peer == OURS).collect();
    assert_eq!(ours.len(), benches::security::smuggling::VECTORS.len());
    for o in ours {
        assert!(
            o.safe,
            "smuggling vector {} not handled safely: {o:?}\n{md}",
            o.id
        );
    }

    for (peer, attack, seen, cost) in r.h2.iter().filter(|(p, ..)| p == OURS) {
        // Every attack ends the offending connection (the control-frame floods by our budget,
        // with GOAWAY); a slow reader's connection stays, bounded in memory (below).
        assert!(
            seen.closed || *attack == Attack::SlowReadStreams,
            "{peer} {}: connection not closed: {seen:?}\n{md}",
            attack.id()
        );
        if matches!(attack, Attack::SettingsFlood | Attack::PingFlood) {
            assert!(
                seen.goaway.is_some(),
                "{}: no GOAWAY: {seen:?}\n{md}",
                attack.id()
            );
        }
        // A reader that never reads: what each of its 128 streams holds is bounded, about
        // 64 KiB (hyper's default send buffer grew this case by 56 MiB; 16 KiB, by 8).
        let bound = if *attack == Attack::SlowReadStreams {
            assert!(
                seen.responses >= 128,
                "slow-read-streams: answers not started: {seen:?}\n{md}"
            );
            24.0
        } else {
            64.0
        };
        assert!(
            cost.rss_peak_mib - cost.rss_before_mib < bound,
            "{} grew memory: {cost:?}\n{md}",
            attack.id()
        );
        assert!(
            cost.client.success_pct() >= 99.0,
            "{}: normal client failed: {cost:?}\n{md}",
            attack.id()
        );
    }
    for (_, mode, tool, cost) in r.slow.iter().filter(|(p, ..)| p == OURS) {
        assert!(
            tool.max_connected > 0,
            "{}: slowhttptest held nothing\n{md}",
            mode.id()
        );
        assert!(
            cost.client.success_pct() >= 99.0,
            "{}: normal client failed: {cost:?}\n{md}",
            mode.id()
        );
    }
    for (_, idle) in r.idle.iter().filter(|(p, _)| p == OURS) {
        assert_eq!(idle.held, idle.opened, "idle connections dropped\n{md}");
        assert!(idle.served_meanwhile, "{md}");
    }
    let (_, ex) = r
        .exhaustion
        .iter()
        .find(|(p, _)| p == OURS)
        .expect("descriptor case ran");
    assert!(ex.survived && ex.served_after == 20, "{ex:?}\n{md}");
    // A loop without back-off on EMFILE burns a whole core.
    assert!(
        ex.cpu_percent < 20.0,
        "spinning while out of descriptors: {ex:?}\n{md}"
    );

    let findings = |peer: &str| {
        r.tls
            .iter()
            .find(|(p, _)| p == peer)
            .map(|(_, f)| f.clone())
            .unwrap_or_else(|| panic!("no testssl scan of {peer}\n{md}"))
    };
    let (ours, nginx) = (findings(OURS), findings("nginx"));
    let only = tls::ours_only(&ours, &nginx);
    assert!(
        only.is_empty(),
        "TLS findings nginx does not have: {only:?}\n{md}"
    );
}
