//! `demo-client`: calls a service through its local sidecar at a fixed rate and
//! reports what it saw, once a second.
//!
//! It never retries by itself: every answer that is not 2xx, every transport
//! error and every request that exceeds `--timeout` counts as a failure, so its
//! counts measure exactly what the sidecar delivered. Requests are sent open-loop
//! (one every `1/rate` seconds, whatever the latency of the previous ones), each
//! in its own task, up to `--max-in-flight`.
//!
//! Output (stdout, one record per line, space-separated `key=value` fields; the
//! first word names the record; the format is stable, see docs/compose.md):
//!
//! ```text
//! stats t=3.0s sent=150 ok=150 failed=0 last_sent=50 last_failed=0 share=app1:34%,app2:32%,app3:34% served=app1:51,app2:48,app3:51 errors=-
//! seen instance=app4 at_ms=1764090000123 gap_ms=first
//! summary duration=30.0s sent=1500 ok=1500 failed=0 served=app1:500,app2:501,app3:499 errors=- p50_ms=2 p99_ms=9 max_ms=31
//! ```
//!
//! - `stats`, once a second: cumulative `sent` / `ok` / `failed`; `last_sent` / `last_failed` over the
//!   last second; `share`: each instance's share of the successful answers of the last second (`-` when
//!   none); `served`: cumulative successful answers per instance (the answer's `instance` field);
//!   `errors`: cumulative failures by kind (`status_503`, `timeout`, `transport`, ...), `-` when none.
//! - `seen`, when an instance answers for the first time (`gap_ms=first`) or again after at least one
//!   second of silence (`gap_ms` = time since its previous answer); `at_ms` is Unix time in milliseconds.
//! - `summary`, once at the end (after `--duration`, or on SIGTERM/SIGINT), with latency percentiles of
//!   the successful requests.
//!
//! Requests are counted as `sent` when they complete (answer, failure or timeout), so `sent = ok + failed`
//! on every line.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use tokio::sync::Semaphore;

#[derive(Parser, Debug, Clone)]
#[command(name = "demo-client", about = "Steady-rate client that calls a service through its sidecar")]
struct Args {
    /// Base URL the requests go to: the local sidecar's outbound listener.
    #[arg(long, env = "DEMO_CLIENT_TARGET", default_value = "http://127.0.0.1:15001")]
    target: String,
    /// Host header sent: the service name the sidecar routes by.
    #[arg(long, env = "DEMO_CLIENT_HOST", default_value = "demo")]
    host: String,
    /// Path (and query) requested.
    #[arg(long, env = "DEMO_CLIENT_PATH", default_value = "/hello")]
    path: String,
    /// Requests per second.
    #[arg(long, env = "DEMO_CLIENT_RATE", default_value_t = 50.0)]
    rate: f64,
    /// Per-request timeout; a request still unanswered then counts as a failure.
    #[arg(long, env = "DEMO_CLIENT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// How long to run; 0 runs until SIGTERM/SIGINT.
    #[arg(long, env = "DEMO_CLIENT_DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Before sending anything, wait until a GET of this URL answers 2xx (e.g. the sidecar's
    /// admin `/ready`). Default: start at once.
    #[arg(long, env = "DEMO_CLIENT_WAIT_FOR")]
    wait_for: Option<String>,
    /// Requests in flight at most; a tick that finds them all busy counts a failure (`overrun`).
    #[arg(long, env = "DEMO_CLIENT_MAX_IN_FLIGHT", default_value_t = 1000)]
    max_in_flight: usize,
}

/// What one request ended as.
enum Outcome {
    Ok { instance: String, latency: Duration },
    Failed(String),
}

#[derive(Default)]
struct Counts {
    sent: u64,
    ok: u64,
    failed: u64,
    served: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
    /// Successful answers per instance since the last `stats` line.
    window: BTreeMap<String, u64>,
    window_sent: u64,
    window_failed: u64,
    /// When each instance last answered.
    last_seen: BTreeMap<String, Instant>,
    latencies_us: Vec<u64>,
}

impl Counts {
    fn record(&mut self, outcome: Outcome) {
        self.sent += 1;
        self.window_sent += 1;
        match outcome {
            Outcome::Ok { instance, latency } => {
                self.ok += 1;
                let now = Instant::now();
                match self.last_seen.get(&instance) {
                    None => println!("seen instance={instance} at_ms={} gap_ms=first", unix_ms()),
                    Some(prev) if now.duration_since(*prev) >= Duration::from_secs(1) => println!(
                        "seen instance={instance} at_ms={} gap_ms={}",
                        unix_ms(),
                        now.duration_since(*prev).as_millis()
                    ),
                    Some(_) => {}
                }
                self.last_seen.insert(instance.clone(), now);
                *self.served.entry(instance.clone()).or_insert(0) += 1;
                *self.window.entry(instance).or_insert(0) += 1;
                self.latencies_us.push(latency.as_micros().min(u64::MAX as u128) as u64);
            }
            Outcome::Failed(kind) => {
                self.failed += 1;
                self.window_failed += 1;
                *self.errors.entry(kind).or_insert(0) += 1;
            }
        }
    }

    fn stats_line(&mut self, elapsed: Duration) -> String {
        let window_ok: u64 = self.window.values().sum();
        let share = if window_ok == 0 {
            "-".to_string()
        } else {
            self.window
                .iter()
                .map(|(k, v)| format!("{k}:{}%", (v * 100 + window_ok / 2) / window_ok))
                .collect::<Vec<_>>()
                .join(",")
        };
        let line = format!(
            "stats t={:.1}s sent={} ok={} failed={} last_sent={} last_failed={} share={} served={} errors={}",
            elapsed.as_secs_f64(),
            self.sent,
            self.ok,
            self.failed,
            self.window_sent,
            self.window_failed,
            share,
            join_counts(&self.served),
            join_counts(&self.errors),
        );
        self.window.clear();
        self.window_sent = 0;
        self.window_failed = 0;
        line
    }

    fn summary_line(&mut self, elapsed: Duration) -> String {
        self.latencies_us.sort_unstable();
        let pct = |p: f64| -> u64 {
            if self.latencies_us.is_empty() {
                return 0;
            }
            let i = ((self.latencies_us.len() - 1) as f64 * p).round() as usize;
            self.latencies_us[i.min(self.latencies_us.len() - 1)] / 1000
        };
        format!(
            "summary duration={:.1}s sent={} ok={} failed={} served={} errors={} p50_ms={} p99_ms={} max_ms={}",
            elapsed.as_secs_f64(),
            self.sent,
            self.ok,
            self.failed,
            join_counts(&self.served),
            join_counts(&self.errors),
            pct(0.5),
            pct(0.99),
            pct(1.0),
        )
    }
}

fn join_counts(m: &BTreeMap<String, u64>) -> String {
    if m.is_empty() {
        return "-".into();
    }
    m.iter().map(|(k, v)| format!("{k}:{v}")).collect::<Vec<_>>().join(",")
}

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

/// Keeps the instance name safe to print inside a `key=value` record.
fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .take(64)
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .collect();
    if s.is_empty() {
        "unnamed".into()
    } else {
        s
    }
}

async fn one_request(client: reqwest::Client, url: String, host: String, timeout: Duration) -> Outcome {
    let start = Instant::now();
    let call = async {
        let resp = client.get(&url).header(reqwest::header::HOST, host).send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        Ok::<_, reqwest::Error>((status, body))
    };
    match tokio::time::timeout(timeout, call).await {
        Err(_) => Outcome::Failed("timeout".into()),
        Ok(Err(e)) if e.is_timeout() => Outcome::Failed("timeout".into()),
        Ok(Err(_)) => Outcome::Failed("transport".into()),
        Ok(Ok((status, _))) if !status.is_success() => Outcome::Failed(format!("status_{}", status.as_u16())),
        Ok(Ok((_, body))) => {
            let instance = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("instance").and_then(|i| i.as_str()).map(sanitize))
                .unwrap_or_else(|| "unknown".into());
            Outcome::Ok { instance, latency: start.elapsed() }
        }
    }
}

/// Polls `url` until it answers 2xx; says so on stderr every few seconds.
async fn wait_ready(client: &reqwest::Client, url: &str) {
    let started = Instant::now();
    let mut last_note = started;
    loop {
        let probe = client.get(url).timeout(Duration::from_secs(1)).send().await;
        if matches!(&probe, Ok(r) if r.status().is_success()) {
            eprintln!("demo-client: {url} is ready after {:?}", started.elapsed());
            return;
        }
        if last_note.elapsed() >= Duration::from_secs(5) {
            eprintln!("demo-client: still waiting for {url}");
            last_note = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(args: Args) -> Result<(), String> {
    if !(args.rate > 0.0 && args.rate.is_finite()) {
        return Err(format!("--rate must be a positive number, got {}", args.rate));
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    let url = format!("{}{}", args.target.trim_end_matches('/'), args.path);
    // Installed first: as PID 1 in a container, an unhandled SIGTERM would be ignored.
    let signal = trellis_tests::shutdown_signal();
    tokio::pin!(signal);
    if let Some(ready) = &args.wait_for {
        tokio::select! {
            _ = wait_ready(&client, ready) => {}
            _ = &mut signal => return Ok(()),
        }
    }
    let counts = Arc::new(Mutex::new(Counts::default()));
    let in_flight = Arc::new(Semaphore::new(args.max_in_flight.max(1)));
    let start = Instant::now();
    let deadline = (!args.duration.is_zero()).then(|| tokio::time::Instant::now() + args.duration);

    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
    // Behind schedule (a stalled machine): keep the rate, do not burst to catch up.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    let stop = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    if let Ok(mut c) = counts.lock() {
                        c.record(Outcome::Failed("overrun".into()));
                    }
                    continue;
                };
                let (client, url, host, counts) = (client.clone(), url.clone(), args.host.clone(), counts.clone());
                let timeout = args.timeout;
                tokio::spawn(async move {
                    let outcome = one_request(client, url, host, timeout).await;
                    if let Ok(mut c) = counts.lock() {
                        c.record(outcome);
                    }
                    drop(permit);
                });
            }
            _ = report.tick() => {
                if let Ok(mut c) = counts.lock() {
                    println!("{}", c.stats_line(start.elapsed()));
                }
            }
            _ = &mut stop => break,
            _ = &mut signal => break,
        }
    }
    // Let the requests already sent finish (each is bounded by --timeout) so the summary counts them.
    let all = u32::try_from(args.max_in_flight.max(1)).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(args.timeout + Duration::from_secs(1), in_flight.acquire_many(all)).await;
    if let Ok(mut c) = counts.lock() {
        println!("{}", c.summary_line(start.elapsed()));
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo-client: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(instance: &str) -> Outcome {
        Outcome::Ok { instance: instance.into(), latency: Duration::from_millis(3) }
    }

    #[test]
    fn stats_and_summary_lines_keep_their_documented_format() {
        let mut c = Counts::default();
        for _ in 0..3 {
            c.record(ok("app1"));
        }
        c.record(ok("app2"));
        c.record(Outcome::Failed("status_503".into()));
        let line = c.stats_line(Duration::from_millis(1000));
        assert_eq!(
            line,
            "stats t=1.0s sent=5 ok=4 failed=1 last_sent=5 last_failed=1 share=app1:75%,app2:25% \
             served=app1:3,app2:1 errors=status_503:1"
        );
        // The window restarts after each line; cumulative counts do not.
        c.record(ok("app2"));
        let line = c.stats_line(Duration::from_millis(2000));
        assert_eq!(
            line,
            "stats t=2.0s sent=6 ok=5 failed=1 last_sent=1 last_failed=0 share=app2:100% \
             served=app1:3,app2:2 errors=status_503:1"
        );
        let line = c.stats_line(Duration::from_millis(3000));
        assert!(line.contains(" last_sent=0 last_failed=0 share=- "), "{line}");
        let summary = c.summary_line(Duration::from_millis(3000));
        assert!(
            summary.starts_with("summary duration=3.0s sent=6 ok=5 failed=1 served=app1:3,app2:2 "),
            "{summary}"
        );
        assert!(summary.ends_with("p50_ms=3 p99_ms=3 max_ms=3"), "{summary}");
    }

    #[test]
    fn instance_names_cannot_break_the_format() {
        assert_eq!(sanitize("app 1=x,y:z"), "app_1_x_y_z");
        assert_eq!(sanitize(""), "unnamed");
        assert_eq!(sanitize(&"a".repeat(200)).len(), 64);
    }
}
