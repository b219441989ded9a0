//! End to end over the whole seed cluster (issue 11): three real nodes, our four components as
//! pods from our images via `kubectl apply -k deploy/`, pebble behind `letsencrypt-prod`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use integration_tests::seed::{Seed, SeedOptions, get_app, tls_config};

/// `psql` in the postgres pod (as the app's user, over its local socket): the output.
fn psql(seed: &Seed, statements: &[&str]) -> String {
    let mut args = vec![
        "exec",
        "-n",
        "household-task-manager",
        "deploy/postgres",
        "--",
        "psql",
        "-h",
        "/tmp",
        "-U",
        "household",
        "-d",
        "household",
        "-qtA",
    ];
    for s in statements {
        args.extend(["-c", s]);
    }
    seed.kubectl(&args)
        .unwrap_or_else(|e| format!("psql failed: {e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn the_seed_cluster_runs_end_to_end() {
    let seed = Seed::start(SeedOptions::default())
        .await
        .expect("the seed cluster");
    println!("seed cluster up in {:.1}s", seed.startup.as_secs_f64());
    seed.wait_rollouts(Duration::from_secs(240))
        .await
        .expect("every workload of deploy/ rolled out");

    // The certificate: issued by pebble through cert-manager and our ingress, served on the
    // HTTPS NodePort of every node.
    let root = seed
        .wait_https(Duration::from_secs(120))
        .await
        .expect("the pebble-issued certificate served");
    let config = tls_config(&root).unwrap();
    for i in 0..seed.lab.nodes.len() {
        get_app(&config, seed.node_ip(i))
            .await
            .unwrap_or_else(|e| panic!("HTTPS through node {i}'s NodePort: {e}"));
    }
    println!(
        "certificate issued and served after {:.1}s",
        seed.startup.as_secs_f64()
    );

    // Pods on different nodes reach each other through our VXLAN: one frontend replica to
    // the other. Anti-affinity is only preferred (a surge pod must fit on two workers), so
    // replicas scheduled while a node was still coming up can share it: then one is deleted
    // and its replacement, scheduled with every node Ready, goes elsewhere.
    let replicas = spread_frontend(&seed).await;
    let page = seed
        .kubectl(&[
            "exec",
            "-n",
            "household-task-manager",
            &replicas[0][0],
            "--",
            "sh",
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 8080",
                replicas[1][2]
            ),
        ])
        .unwrap();
    assert!(page.contains("household-task-manager frontend"), "{page}");

    println!(
        "our components' footprint, idle:\n{}",
        integration_tests::seed::footprint_table()
    );

    // postgres writes to its local-path volume; the row survives the pod's replacement.
    assert_eq!(
        psql(
            &seed,
            &[
                "CREATE TABLE tasks (title text)",
                "INSERT INTO tasks VALUES ('water the plants')",
                "SELECT count(*) FROM tasks",
            ]
        )
        .trim(),
        "1"
    );
    seed.kubectl(&[
        "delete",
        "pod",
        "-n",
        "household-task-manager",
        "-l",
        "app=postgres",
        "--wait=true",
    ])
    .unwrap();
    seed.kubectl(&[
        "rollout",
        "status",
        "-n",
        "household-task-manager",
        "deployment/postgres",
        "--timeout=120s",
    ])
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let out = psql(&seed, &["SELECT title FROM tasks"]);
        if out.trim() == "water the plants" {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the row after the restart: {out}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // A steady client through the NodePort while the ingress Deployment rolls and a node's
    // flannel pod is replaced: no request fails.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let client = {
        let (stop, ok, failed, config, ip) = (
            stop.clone(),
            ok.clone(),
            failed.clone(),
            config.clone(),
            seed.node_ip(1),
        );
        tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match get_app(&config, ip).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            errors
        })
    };
    seed.kubectl(&[
        "rollout",
        "restart",
        "-n",
        "ingress-nginx",
        "deployment/ingress-nginx-controller",
    ])
    .unwrap();
    seed.kubectl(&[
        "rollout",
        "status",
        "-n",
        "ingress-nginx",
        "deployment/ingress-nginx-controller",
        "--timeout=180s",
    ])
    .unwrap();
    let flannel_pod = seed
        .kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-flannel",
            "-o",
            "name",
            "--field-selector",
            "spec.nodeName=rpi-worker-1",
        ])
        .unwrap();
    seed.kubectl(&["delete", "-n", "kube-flannel", flannel_pod.trim()])
        .unwrap();
    seed.kubectl(&[
        "rollout",
        "status",
        "-n",
        "kube-flannel",
        "daemonset/kube-flannel-ds",
        "--timeout=120s",
    ])
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let errors = client.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("steady client: {ok} answered, {failed} failed");
    assert!(ok > 20, "the steady client got {ok} answers");
    assert_eq!(failed, 0, "requests failed during the rollout: {errors:?}");
}

/// The two frontend replicas as (name, node, pod IP), once they run on different nodes.
async fn spread_frontend(seed: &integration_tests::seed::Seed) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    for _ in 0..60 {
        let out = seed
            .kubectl(&[
                "get", "pods", "-n", "household-task-manager", "-l", "app=frontend",
                "--field-selector=status.phase=Running", "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.spec.nodeName} {.status.podIP} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ])
            .unwrap();
        seen = out
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .filter(|r: &Vec<String>| r.len() == 3)
            .collect();
        if seen.len() == 2 && seen[0][1] != seen[1][1] {
            return seen;
        }
        if seen.len() == 2 {
            seed.kubectl(&[
                "delete",
                "pod",
                "-n",
                "household-task-manager",
                "--wait=false",
                &seen[1][0],
            ])
            .unwrap();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    panic!("frontend replicas never on two nodes: {seen:?}");
}
