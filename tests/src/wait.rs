//! Waiting for something to happen: a condition polled until it holds or a
//! generous deadline passes. The deadline is a bound on a broken run, not a
//! guess at how long things take.

use std::time::{Duration, Instant};

/// How often a condition is checked again.
const POLL: Duration = Duration::from_millis(20);

/// Polls `check` until it returns `Some` or `timeout` passes (then panics).
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The blocking form of [`wait_for`], for threads outside a runtime (the
/// benchmark harness, process start-up): `Err(TimedOut)` instead of a panic.
pub fn wait_until(what: &str, within: Duration, mut ready: impl FnMut() -> bool) -> std::io::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if ready() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let msg = format!("{what} did not happen within {within:?}");
            return Err(std::io::Error::new(std::io::ErrorKind::TimedOut, msg));
        }
        std::thread::sleep(POLL);
    }
}

/// Waits until `GET url` answers 2xx.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("client");
    wait_for(&format!("{url} to answer 2xx"), timeout, || {
        let client = client.clone();
        async move {
            match client.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await
}
