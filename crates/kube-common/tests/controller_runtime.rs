//! The controller scaffolding against the real kube-apiserver: it survives an apiserver
//! stop/start and sees objects created afterwards; `/healthz`, `/readyz` and `/metrics` answer
//! with the right codes and parseable OpenMetrics.
#![allow(clippy::unwrap_used)] // test code

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::http;
use integration_tests::kube::{Cluster, ClusterOptions};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{Controller, watcher};
use kube::{Api, Client, ResourceExt};
use kube_common::{Action, Manager};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
#[error("refusing {0}")]
struct Refused(String);

/// Remembers every ConfigMap it reconciled; fails those labelled `fail=true`.
struct Seen {
    names: Mutex<BTreeSet<String>>,
}

async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Seen>) -> Result<Action, Refused> {
    ctx.names.lock().expect("seen lock").insert(cm.name_any());
    if cm.labels().get("fail").map(String::as_str) == Some("true") {
        return Err(Refused(cm.name_any()));
    }
    Ok(Action::await_change())
}

async fn create_cm(client: &Client, ns: &str, name: &str, fail: bool) {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let mut labels = std::collections::BTreeMap::new();
    if fail {
        labels.insert("fail".to_string(), "true".to_string());
    }
    api.create(
        &PostParams::default(),
        &ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .expect("create configmap");
}

async fn wait_seen(seen: &Seen, name: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !seen.names.lock().expect("seen lock").contains(name) {
        assert!(
            Instant::now() < deadline,
            "controller never saw {name} within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_controller(mgr: &Manager, ns: &str, seen: Arc<Seen>) -> tokio::task::JoinHandle<()> {
    let api: Api<ConfigMap> = Api::namespaced(mgr.client.clone(), ns);
    let controller = Controller::new(api, watcher::Config::default());
    let mgr = mgr.clone();
    tokio::spawn(async move {
        mgr.run(
            "configmaps",
            controller,
            reconcile,
            seen,
            CancellationToken::new(),
        )
        .await
    })
}

#[tokio::test]
async fn controller_survives_apiserver_restart() {
    // A private control plane: stopping the shared one would disturb other tests.
    let cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("test control plane");
    println!("private control plane started in {:?}", cluster.startup);
    let ns = cluster.namespace("restart").await.expect("namespace");
    let client = cluster.client().await.expect("client");
    let shutdown = CancellationToken::new();
    let mgr = Manager::new("test", client.clone(), shutdown.clone());
    let seen = Arc::new(Seen {
        names: Mutex::default(),
    });
    let task = start_controller(&mgr, &ns, seen.clone());

    create_cm(&client, &ns, "before", false).await;
    wait_seen(&seen, "before", Duration::from_secs(30)).await;

    cluster.stop_apiserver().expect("stop apiserver");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let restarted = Instant::now();
    cluster.start_apiserver().await.expect("restart apiserver");
    println!("apiserver back after {:?}", restarted.elapsed());

    create_cm(&client, &ns, "after", false).await;
    wait_seen(&seen, "after", Duration::from_secs(90)).await;
    assert!(!task.is_finished(), "the controller must keep running");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("controller stops on shutdown")
        .expect("controller task");
}

#[tokio::test]
async fn health_ready_and_metrics_endpoints() {
    let cluster = Cluster::shared().await.expect("test control plane");
    let ns = cluster.namespace("health").await.expect("namespace");
    let client = cluster.client().await.expect("client");
    let shutdown = CancellationToken::new();
    let mgr = Manager::new("test", client.clone(), shutdown.clone());
    let addr = mgr
        .serve_health("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("health server");
    let url = |path: &str| format!("http://{addr}{path}");

    // A check that is not ready yet keeps /readyz at 503 and names itself.
    let gate = mgr.readiness.register("startup-gate");
    let ready = http::get(&url("/readyz"), None).await.expect("readyz");
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("startup-gate"), "{}", ready.text());
    assert_eq!(
        http::get(&url("/healthz"), None)
            .await
            .expect("healthz")
            .status,
        200
    );
    assert_eq!(
        http::get(&url("/nope"), None).await.expect("404").status,
        404
    );

    create_cm(&client, &ns, "good", false).await;
    create_cm(&client, &ns, "bad", true).await;
    let seen = Arc::new(Seen {
        names: Mutex::default(),
    });
    let task = start_controller(&mgr, &ns, seen.clone());
    gate.set(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = http::get(&url("/readyz"), None).await.expect("readyz");
        if r.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {}", r.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_seen(&seen, "good", Duration::from_secs(30)).await;
    wait_seen(&seen, "bad", Duration::from_secs(30)).await;

    let metrics = http::get(&url("/metrics"), None).await.expect("metrics");
    assert_eq!(metrics.status, 200);
    let text = metrics.text();
    let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&text)
        .unwrap_or_else(|e| panic!("not valid OpenMetrics ({e:?}):\n{text}"));
    let total = exposition
        .families
        .get("controller_reconcile")
        .unwrap_or_else(|| panic!("no controller_reconcile family in:\n{text}"));
    let samples = format!("{total:?}");
    assert!(
        samples.contains("success") && samples.contains("error"),
        "{text}"
    );
    assert!(
        exposition
            .families
            .contains_key("controller_reconcile_duration_seconds"),
        "{text}"
    );
    assert!(
        text.contains("controller_reconcile_total{controller=\"configmaps\",result=\"success\"}"),
        "{text}"
    );

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("controller stops on shutdown")
        .expect("controller task");
}

#[tokio::test]
async fn recorder_publishes_events_v1() {
    use k8s_openapi::api::events::v1::Event as K8sEvent;
    use kube::Resource;
    use kube::runtime::events::{Event, EventType};

    let cluster = Cluster::shared().await.expect("test control plane");
    let ns = cluster.namespace("events").await.expect("namespace");
    let client = cluster.client().await.expect("client");
    create_cm(&client, &ns, "subject", false).await;
    let cm = Api::<ConfigMap>::namespaced(client.clone(), &ns)
        .get("subject")
        .await
        .expect("configmap");
    let mgr = Manager::new("test", client.clone(), CancellationToken::new());
    let recorder = mgr.recorder("test-controller");
    let event = Event {
        type_: EventType::Warning,
        reason: "BadConfig".into(),
        note: Some("annotation x is invalid".into()),
        action: "Reconcile".into(),
        secondary: None,
    };
    let reference = cm.object_ref(&());
    recorder.publish(&event, &reference).await.expect("publish");
    // The same event again becomes a series on the same object, not a second object.
    recorder
        .publish(&event, &reference)
        .await
        .expect("publish again");
    let events = Api::<K8sEvent>::namespaced(client, &ns)
        .list(&Default::default())
        .await
        .expect("list events");
    let ours: Vec<_> = events
        .items
        .iter()
        .filter(|e| e.reason.as_deref() == Some("BadConfig"))
        .collect();
    assert_eq!(ours.len(), 1, "{:?}", events.items);
    let e = ours[0];
    assert_eq!(e.type_.as_deref(), Some("Warning"));
    assert_eq!(e.reporting_controller.as_deref(), Some("test-controller"));
    assert_eq!(
        e.regarding.as_ref().and_then(|r| r.name.as_deref()),
        Some("subject")
    );
    assert_eq!(e.series.as_ref().map(|s| s.count), Some(2));
}
