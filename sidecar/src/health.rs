//! Active health checks of the local app: an HTTP GET expecting 2xx, or a TCP
//! connect, on an interval, turned into a healthy/unhealthy verdict by
//! consecutive-success and consecutive-failure thresholds.
//!
//! The verdict is published on a `watch` channel that registration follows.
//! Only flips are logged, so a steady app produces no log lines.

use std::future::Future;
use std::str::FromStr;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// What a check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// `GET http://<app><path>`; any 2xx passes.
    Http { path: String },
    /// A TCP connect to the app's port passes.
    Tcp,
}

impl FromStr for HealthCheck {
    type Err = String;

    /// `tcp` or `http:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "tcp" {
            return Ok(HealthCheck::Tcp);
        }
        match s.strip_prefix("http:") {
            Some(path) if path.starts_with('/') && !path.contains(char::is_whitespace) => {
                Ok(HealthCheck::Http { path: path.to_string() })
            }
            _ => Err(format!(
                "health check {s:?} is invalid: expected `tcp` or `http:/path` (e.g. http:/health)"
            )),
        }
    }
}

/// Health check settings.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    pub check: HealthCheck,
    /// The app, `host:port`.
    pub target: String,
    /// Time between checks. Default 1s.
    pub interval: Duration,
    /// Timeout of one check; shorter than the interval. Default 500ms.
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy app healthy. Default 2.
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy app unhealthy. Default 2.
    pub unhealthy_threshold: u32,
}

/// The app's health as the thresholds decide it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppHealth {
    /// No verdict yet (just started).
    Unknown,
    Healthy,
    Unhealthy,
}

/// The latest verdict with the last check's outcome text (sent as heartbeat output).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthReport {
    pub health: AppHealth,
    pub output: String,
}

impl Default for HealthReport {
    fn default() -> Self {
        HealthReport { health: AppHealth::Unknown, output: String::new() }
    }
}

/// The consecutive-threshold state machine.
///
/// From `Unknown`, the first pass is enough: a healthy app registers at once
/// when its sidecar starts, instead of waiting `healthy_threshold` intervals.
/// `unhealthy_threshold` failures are needed from `Unknown` too, so a slow
/// starting app is not reported as failing on its first refused connect.
#[derive(Debug, Clone)]
pub struct Thresholds {
    state: AppHealth,
    successes: u32,
    failures: u32,
    rise: u32,
    fall: u32,
}

impl Thresholds {
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        Thresholds {
            state: AppHealth::Unknown,
            successes: 0,
            failures: 0,
            rise: healthy_threshold.max(1),
            fall: unhealthy_threshold.max(1),
        }
    }

    pub fn state(&self) -> AppHealth {
        self.state
    }

    /// Records one check; returns the new state when it flipped.
    pub fn observe(&mut self, pass: bool) -> Option<AppHealth> {
        let next = if pass {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            let needed = if self.state == AppHealth::Unknown { 1 } else { self.rise };
            (self.state != AppHealth::Healthy && self.successes >= needed).then_some(AppHealth::Healthy)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            (self.state != AppHealth::Unhealthy && self.failures >= self.fall).then_some(AppHealth::Unhealthy)
        };
        if let Some(s) = next {
            self.state = s;
        }
        next
    }
}

/// One check of the app; `Err` carries why it failed.
pub async fn check_once(
    check: &HealthCheck,
    target: &str,
    timeout: Duration,
    http: &reqwest::Client,
) -> Result<(), String> {
    match check {
        HealthCheck::Tcp => match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(target)).await
        {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("tcp connect to {target}: {e}")),
            Err(_) => Err(format!("tcp connect to {target}: timed out after {timeout:?}")),
        },
        HealthCheck::Http { path } => {
            let url = format!("http://{target}{path}");
            match http.get(&url).timeout(timeout).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("GET {url}: status {}", r.status().as_u16())),
                Err(e) if e.is_timeout() => Err(format!("GET {url}: timed out after {timeout:?}")),
                Err(e) => Err(format!("GET {url}: {e}")),
            }
        }
    }
}

/// Checks the app every `config.interval` until `shutdown`, publishing verdicts.
pub async fn run(config: HealthConfig, tx: watch::Sender<HealthReport>, shutdown: CancellationToken) {
    // No pooling: a pooled connection the app closed would fail a check for no
    // reason. No proxy from the environment: HTTP_PROXY may point at this very sidecar.
    let http = match reqwest::Client::builder().pool_max_idle_per_host(0).no_proxy().build() {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "cannot build the health check HTTP client; using a default one");
            reqwest::Client::new()
        }
    };
    let check = config.check.clone();
    let target = config.target.clone();
    let timeout = config.timeout;
    let probe = move || {
        let (check, target, http) = (check.clone(), target.clone(), http.clone());
        async move { check_once(&check, &target, timeout, &http).await }
    };
    run_with(
        config.interval,
        Thresholds::new(config.healthy_threshold, config.unhealthy_threshold),
        probe,
        tx,
        shutdown,
    )
    .await
}

/// The check loop with the probe injected, so tests can script outcomes.
pub async fn run_with<P, F>(
    interval: Duration,
    mut thresholds: Thresholds,
    mut probe: P,
    tx: watch::Sender<HealthReport>,
    shutdown: CancellationToken,
) where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let mut ticker = tokio::time::interval_at(Instant::now(), interval);
    // A check that overran must not be followed by a burst of catch-up checks.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = probe() => r,
        };
        let output = match &result {
            Ok(()) => "ok".to_string(),
            Err(e) => e.clone(),
        };
        debug!(ok = result.is_ok(), output = %output, "app health check");
        match thresholds.observe(result.is_ok()) {
            Some(AppHealth::Healthy) => info!("app is healthy"),
            Some(AppHealth::Unhealthy) => warn!(reason = %output, "app is unhealthy"),
            _ => {}
        }
        let health = thresholds.state();
        tx.send_if_modified(|r| {
            // Output text alone does not wake registration; it rides on the next heartbeat.
            let flipped = r.health != health;
            r.health = health;
            r.output = output;
            flipped
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    #[test]
    fn parses_check_specs() {
        assert_eq!("tcp".parse::<HealthCheck>().unwrap(), HealthCheck::Tcp);
        assert_eq!(
            "http:/health".parse::<HealthCheck>().unwrap(),
            HealthCheck::Http { path: "/health".into() }
        );
        for bad in ["", "http", "http:health", "udp", "http:/a b"] {
            assert!(bad.parse::<HealthCheck>().is_err(), "{bad}");
        }
    }

    #[test]
    fn thresholds_flip_only_after_consecutive_results() {
        let mut t = Thresholds::new(2, 3);
        // First pass from Unknown is enough.
        assert_eq!(t.observe(true), Some(AppHealth::Healthy));
        assert_eq!(t.observe(true), None);
        // Two failures are not enough, and a pass in between resets the count.
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(false), Some(AppHealth::Unhealthy));
        assert_eq!(t.observe(false), None);
        // Recovery needs two consecutive passes.
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.observe(true), None);
        assert_eq!(t.observe(true), Some(AppHealth::Healthy));
    }

    #[test]
    fn unknown_becomes_unhealthy_after_the_failure_threshold() {
        let mut t = Thresholds::new(2, 2);
        assert_eq!(t.observe(false), None);
        assert_eq!(t.state(), AppHealth::Unknown);
        assert_eq!(t.observe(false), Some(AppHealth::Unhealthy));
    }

    #[tokio::test(start_paused = true)]
    async fn loop_reports_flips_at_the_expected_times() {
        // pass, fail, fail, pass, pass: healthy at 0s, unhealthy at 2s, healthy at 4s.
        let script = Arc::new(Mutex::new(VecDeque::from([true, false, false, true, true])));
        let probe = {
            let script = Arc::clone(&script);
            move || {
                let next = script.lock().unwrap().pop_front().unwrap_or(true);
                async move {
                    if next {
                        Ok(())
                    } else {
                        Err("refused".to_string())
                    }
                }
            }
        };
        let (tx, mut rx) = watch::channel(HealthReport::default());
        let shutdown = CancellationToken::new();
        let start = Instant::now();
        let task = tokio::spawn(run_with(
            Duration::from_secs(1),
            Thresholds::new(2, 2),
            probe,
            tx,
            shutdown.clone(),
        ));
        let mut flips = vec![];
        for _ in 0..3 {
            rx.changed().await.unwrap();
            let r = rx.borrow_and_update().clone();
            flips.push((r.health, start.elapsed().as_secs()));
        }
        assert_eq!(flips, vec![(AppHealth::Healthy, 0), (AppHealth::Unhealthy, 2), (AppHealth::Healthy, 4)]);
        shutdown.cancel();
        task.await.unwrap();
    }
}
