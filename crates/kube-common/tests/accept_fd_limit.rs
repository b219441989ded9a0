//! The accept loop out of file descriptors (EMFILE): it neither crashes nor spins, and takes the
//! waiting connections once descriptors free up. Alone in its binary: it lowers the process's
//! descriptor limit.
#![allow(clippy::unwrap_used)] // test code

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use kube_common::serve::{Accepted, Limits, accept_loop};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const CLIENTS: usize = 30;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// user + system CPU time of this process, in clock ticks, from `/proc/self/stat` opened
/// beforehand (no descriptor is left to open it when it is needed).
fn cpu_ticks(file: &mut std::fs::File) -> u64 {
    use std::io::{Read, Seek};
    let mut stat = String::new();
    file.rewind().expect("rewind");
    file.read_to_string(&mut stat).expect("/proc/self/stat");
    let after_name = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of stat(5) (utime, stime), counted after the `comm` field.
    fields[11].parse::<u64>().unwrap_or(0) + fields[12].parse::<u64>().unwrap_or(0)
}

fn set_soft_nofile(limit: usize) {
    let status = Command::new("prlimit")
        .args([
            "--pid",
            &std::process::id().to_string(),
            &format!("--nofile={limit}:"),
        ])
        .status()
        .expect("prlimit (util-linux) runs: apt-get install util-linux");
    assert!(status.success(), "prlimit failed");
}

/// A client in its own process (so it has descriptors when this one has none): waits, connects,
/// holds the connection, exits.
fn client(port: u16, wait: f32, hold: f32) -> Child {
    Command::new("bash")
        .args([
            "-c",
            &format!("sleep {wait}; exec 3<>/dev/tcp/127.0.0.1/{port}; sleep {hold}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("bash")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_survives_running_out_of_file_descriptors() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = CancellationToken::new();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = served.clone();
    let limits = Limits {
        max_connections: 10_000,
        drain: Duration::from_secs(1),
    };
    let server = tokio::spawn(accept_loop(
        "fd-test",
        listener,
        limits,
        stop.clone(),
        move |a: Accepted| {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                let Accepted {
                    mut stream, slot, ..
                } = a;
                let mut buf = [0u8; 1];
                let _ = stream.read(&mut buf).await;
                drop(slot);
            }
        },
    ));
    // Clients start now (spawning needs descriptors) but connect a second later.
    let mut clients: Vec<Child> = (0..CLIENTS).map(|_| client(port, 1.0, 3.0)).collect();
    let mut stat = std::fs::File::open("/proc/self/stat").expect("/proc/self/stat");
    // Room for a few accepted connections, not for all of them.
    set_soft_nofile(open_fds() + 5);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let during = served.load(Ordering::SeqCst);
    assert!(during < CLIENTS, "the limit did not bite ({during} served)");
    let ticks = cpu_ticks(&mut stat);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let spent = cpu_ticks(&mut stat) - ticks;
    // Clock ticks are 10 ms: a loop spinning on EMFILE would spend about 100 a second.
    assert!(
        spent < 20,
        "{spent} ticks of CPU in a second out of descriptors"
    );
    // The clients hang up; their descriptors here close, and the waiting ones are taken.
    let deadline = Instant::now() + Duration::from_secs(15);
    while served.load(Ordering::SeqCst) < CLIENTS {
        assert!(
            Instant::now() < deadline,
            "accepting did not resume: {} of {CLIENTS} served",
            served.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for c in &mut clients {
        let _ = c.wait();
    }
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server stopped")
        .expect("server task");
}
