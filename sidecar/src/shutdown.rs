//! Ordered, bounded shutdown.
//!
//! On SIGTERM or SIGINT the sidecar (1) deregisters its app, so peers stop
//! choosing it; (2) keeps proxying for `drain`, because peers learn of the
//! deregistration through their watches a moment later and the app may still
//! be making calls; (3) stops accepting and lets in-flight requests finish for
//! at most `grace`; then exits 0. A second signal skips the waiting.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Shutdown timing.
#[derive(Debug, Clone)]
pub struct ShutdownConfig {
    /// Time between deregistering and closing the outbound listener. Default 2s.
    pub drain: Duration,
    /// Longest wait for in-flight requests after the drain. Default 5s.
    pub grace: Duration,
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        ShutdownConfig { drain: Duration::from_secs(2), grace: Duration::from_secs(5) }
    }
}

/// How long deregistration may take before the sidecar moves on (the lease
/// then expires on its own).
pub const DEREGISTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Resolves on the first SIGTERM or SIGINT; returns its name.
pub async fn signal() -> &'static str {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            },
            _ => {
                warn!("cannot install signal handlers; only Ctrl-C stops the sidecar");
                let _ = tokio::signal::ctrl_c().await;
                "SIGINT"
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        "SIGINT"
    }
}

/// Runs `step` for at most `limit`, or until `force` is cancelled (a second
/// signal); true when the step finished.
pub async fn bounded<F: Future<Output = ()>>(
    what: &str,
    limit: Duration,
    step: F,
    force: &CancellationToken,
) -> bool {
    let started = Instant::now();
    tokio::select! {
        _ = step => {
            info!(step = what, took_ms = started.elapsed().as_millis() as u64, "shutdown step done");
            true
        }
        _ = tokio::time::sleep(limit) => {
            warn!(step = what, limit_ms = limit.as_millis() as u64, "shutdown step took too long; moving on");
            false
        }
        _ = force.cancelled() => {
            warn!(step = what, "second signal; skipping the rest of the shutdown wait");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bounded_steps_end_at_their_limit() {
        let never = CancellationToken::new();
        let start = Instant::now();
        assert!(!bounded("slow", Duration::from_secs(5), std::future::pending(), &never).await);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert!(
            bounded("quick", Duration::from_secs(5), tokio::time::sleep(Duration::from_secs(1)), &never)
                .await
        );
        assert_eq!(start.elapsed(), Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_cuts_the_wait() {
        let force = CancellationToken::new();
        let f = force.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            f.cancel();
        });
        let start = Instant::now();
        assert!(!bounded("drain", Duration::from_secs(30), std::future::pending(), &force).await);
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }
}
