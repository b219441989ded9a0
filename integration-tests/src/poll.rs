//! Waiting for a condition in tests: poll until it holds, fail the test after a limit. No test
//! asserts on how long something took; the limit only bounds a hang.

use std::future::Future;
use std::time::Duration;

const INTERVAL: Duration = Duration::from_millis(50);

/// Polls `f` until it returns true; panics with `what` after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, f: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(what, limit, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Polls `f` until it returns `Some`; panics with `what` after `limit`.
pub async fn wait_for<T, F, Fut>(what: &str, limit: Duration, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(INTERVAL).await;
    }
}
