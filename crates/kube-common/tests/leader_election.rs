//! Leader election against the real kube-apiserver: one leader at a time, takeover after a crash
//! within lease duration + retry period, immediate takeover after a graceful release, and a leader
//! cut off from the apiserver stops acting before anyone else takes over.
#![allow(clippy::unwrap_used)] // test code

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use integration_tests::faults::TcpForwarder;
use integration_tests::kube::Cluster;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_common::leader::{LeaseConfig, run_leader_elected};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(4);
const RENEW: Duration = Duration::from_secs(3);
const RETRY: Duration = Duration::from_millis(500);
/// API round trips and scheduling on a loaded 2-core CI machine.
const SLACK: Duration = Duration::from_millis(1500);

fn cfg(ns: &str, identity: &str) -> LeaseConfig {
    LeaseConfig {
        namespace: ns.into(),
        name: "test-lock".into(),
        identity: identity.into(),
        lease_duration: LEASE,
        renew_deadline: RENEW,
        retry_period: RETRY,
    }
}

/// When each candidate started and stopped acting as leader.
#[derive(Default, Debug)]
struct Timeline {
    events: Vec<(String, &'static str, Instant)>,
}

type Shared = Arc<Mutex<Timeline>>;

fn record(t: &Shared, who: &str, what: &'static str) {
    t.lock()
        .expect("timeline lock")
        .events
        .push((who.into(), what, Instant::now()));
}

/// Who is acting now: started without a later stop.
fn leaders(t: &Shared) -> Vec<String> {
    let tl = t.lock().expect("timeline lock");
    let mut acting: Vec<String> = Vec::new();
    for (who, what, _) in &tl.events {
        match *what {
            "start" => acting.push(who.clone()),
            _ => acting.retain(|w| w != who),
        }
    }
    acting
}

fn first(t: &Shared, who: &str, what: &str) -> Option<Instant> {
    t.lock()
        .expect("timeline lock")
        .events
        .iter()
        .find(|(w, e, _)| w == who && *e == what)
        .map(|(_, _, at)| *at)
}

/// Spawns a candidate whose work marks the timeline while leading.
fn candidate(
    client: Client,
    cfg: LeaseConfig,
    timeline: Shared,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<Result<(), kube_common::Error>> {
    tokio::spawn(async move {
        let who = cfg.identity.clone();
        run_leader_elected(client, cfg, shutdown, |leading| async move {
            record(&timeline, &who, "start");
            leading.cancelled().await;
            record(&timeline, &who, "stop");
        })
        .await
    })
}

async fn wait_for<F: Fn() -> bool>(what: &str, limit: Duration, f: F) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn one_leader_and_takeover_after_crash() {
    let cluster = Cluster::shared().await.expect("test control plane");
    let ns = cluster.namespace("le-crash").await.expect("namespace");
    let timeline: Shared = Arc::default();
    let a = candidate(
        cluster.client().await.expect("client"),
        cfg(&ns, "a"),
        timeline.clone(),
        CancellationToken::new(),
    );
    let b = candidate(
        cluster.client().await.expect("client"),
        cfg(&ns, "b"),
        timeline.clone(),
        CancellationToken::new(),
    );
    wait_for("a leader", Duration::from_secs(20), || {
        !leaders(&timeline).is_empty()
    })
    .await;
    // Several lease periods with both competing: never two leaders.
    for _ in 0..40 {
        let now = leaders(&timeline);
        assert_eq!(now.len(), 1, "leaders: {now:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leader = leaders(&timeline)[0].clone();
    let (crashed, survivor) = if leader == "a" { (a, "b") } else { (b, "a") };
    // A crash: the task is gone without releasing the Lease.
    crashed.abort();
    let crashed_at = Instant::now();
    wait_for(
        "takeover",
        LEASE + RETRY + SLACK + Duration::from_secs(5),
        || first(&timeline, survivor, "start").is_some(),
    )
    .await;
    let took = first(&timeline, survivor, "start").expect("survivor started") - crashed_at;
    assert!(
        took <= LEASE + RETRY + SLACK,
        "takeover took {took:?}, limit {:?}",
        LEASE + RETRY + SLACK
    );
    let lease = Api::<Lease>::namespaced(cluster.client().await.expect("client"), &ns)
        .get("test-lock")
        .await
        .expect("lease")
        .spec
        .expect("lease spec");
    assert_eq!(lease.holder_identity.as_deref(), Some(survivor));
    assert_eq!(lease.lease_duration_seconds, Some(4));
    assert_eq!(lease.lease_transitions, Some(1));
    assert!(lease.acquire_time.is_some() && lease.renew_time.is_some());
    println!("takeover after crash: {took:?}");
}

#[tokio::test]
async fn graceful_release_hands_over_at_once() {
    let cluster = Cluster::shared().await.expect("test control plane");
    let ns = cluster.namespace("le-release").await.expect("namespace");
    let timeline: Shared = Arc::default();
    let stop_a = CancellationToken::new();
    let a = candidate(
        cluster.client().await.expect("client"),
        cfg(&ns, "a"),
        timeline.clone(),
        stop_a.clone(),
    );
    wait_for("a leads", Duration::from_secs(20), || {
        leaders(&timeline) == ["a"]
    })
    .await;
    let b = candidate(
        cluster.client().await.expect("client"),
        cfg(&ns, "b"),
        timeline.clone(),
        CancellationToken::new(),
    );
    tokio::time::sleep(RETRY * 2).await;
    assert_eq!(leaders(&timeline), ["a"]);
    let released_at = Instant::now();
    stop_a.cancel();
    a.await.expect("a joined").expect("a released cleanly");
    wait_for("b leads", LEASE + SLACK, || leaders(&timeline) == ["b"]).await;
    let took = first(&timeline, "b", "start").expect("b started") - released_at;
    // A released Lease is free at the next retry, well before it would have expired.
    assert!(took < RETRY + SLACK, "handover took {took:?}");
    b.abort();
    println!("handover after release: {took:?}");
}

#[tokio::test]
async fn partitioned_leader_stops_before_takeover() {
    let cluster = Cluster::shared().await.expect("test control plane");
    let ns = cluster.namespace("le-partition").await.expect("namespace");
    let timeline: Shared = Arc::default();

    // a talks to the apiserver through a forwarder we can cut.
    let target = cluster
        .server_url()
        .trim_start_matches("https://")
        .parse()
        .expect("apiserver address");
    let fwd = TcpForwarder::start(target).await.expect("forwarder");
    let mut config = cluster.config().await.expect("config");
    config.cluster_url = format!("https://{}", fwd.addr()).parse().expect("url");
    config.read_timeout = Some(Duration::from_secs(2));
    let client_a = Client::try_from(config).expect("client a");

    let a = candidate(
        client_a,
        cfg(&ns, "a"),
        timeline.clone(),
        CancellationToken::new(),
    );
    wait_for("a leads", Duration::from_secs(20), || {
        leaders(&timeline) == ["a"]
    })
    .await;
    let b = candidate(
        cluster.client().await.expect("client"),
        cfg(&ns, "b"),
        timeline.clone(),
        CancellationToken::new(),
    );
    tokio::time::sleep(RETRY * 2).await;
    assert_eq!(leaders(&timeline), ["a"]);

    let cut_at = Instant::now();
    fwd.partition();
    wait_for(
        "b leads",
        LEASE + RENEW + SLACK + Duration::from_secs(5),
        || first(&timeline, "b", "start").is_some(),
    )
    .await;
    let a_stopped = first(&timeline, "a", "stop").expect("a stopped acting");
    let b_started = first(&timeline, "b", "start").expect("b started");
    assert!(
        a_stopped < b_started,
        "a stopped {:?} after the cut, b started {:?} after it",
        a_stopped - cut_at,
        b_started - cut_at
    );
    assert!(
        a_stopped - cut_at <= RENEW + RETRY,
        "a kept acting {:?} after losing the apiserver",
        a_stopped - cut_at
    );
    let result = a.await.expect("a joined");
    assert!(
        matches!(result, Err(kube_common::Error::LeadershipLost { .. })),
        "{result:?}"
    );
    b.abort();
    println!(
        "partition: a stopped after {:?}, b took over after {:?}",
        a_stopped - cut_at,
        b_started - cut_at
    );
}
