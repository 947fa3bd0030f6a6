//! Slow start end to end, with the real binaries on loopback: a registry, two
//! `demo-app` instances each behind its own sidecar, and a client sidecar
//! under steady load ([`CONCURRENCY`] requests at once, each a new one as soon
//! as the last is answered). A third instance then joins, and its share of the
//! requests is measured second by second from the moment the client sidecar
//! lists it.
//!
//! - With `--slow-start 6s` its share starts far below a third and approaches
//!   a third once the window is over.
//! - With `--slow-start 0` it takes close to its full share in the first second.
//!
//! The apps answer after a fixed delay, so every request costs about the same
//! and the split follows the balancer's least-loaded choice over in-flight
//! counts and weights. The bounds are generous and the shares are printed.
//!
//! Build first: `cargo build --release --workspace --bins`. The tests run one
//! at a time: each starts eight processes, and the machine may have two cores.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::task::JoinSet;
use trellis_tests::{strings, wait_for, AppInstance, RegistryProc, SidecarProc};

/// Held for a whole test; tokio's mutex works across the tests' runtimes and
/// is not poisoned by a failing test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVICE: &str = "ramp";
/// Requests the load keeps in flight through the client sidecar.
const CONCURRENCY: usize = 16;
/// Every answer waits this long, so in-flight counts, not CPU, decide the split.
const APP_DELAY: &str = "40ms";
/// The client sidecar's `--slow-start` in the ramping test.
const SLOW_START: Duration = Duration::from_secs(6);
/// The instance that joins under load.
const NEWCOMER: &str = "b3";
/// Bound on a start-up or a discovery on a loaded machine, not a guess at its length.
const WITHIN: Duration = Duration::from_secs(30);

/// A `demo-app` NAME (answers after [`APP_DELAY`]) and its sidecar
/// registering it as instance NAME of [`SERVICE`].
async fn start_instance(registry: &str, name: &str) -> AppInstance {
    AppInstance::start(registry, SERVICE, name, &["--delay", APP_DELAY], &[], WITHIN).await
}

/// The ids of the client sidecar's active endpoints of [`SERVICE`].
async fn active_endpoints(admin: SocketAddr) -> Vec<String> {
    trellis_tests::admin::endpoint_list(admin, SERVICE)
        .await
        .into_iter()
        .filter(|e| e["state"] == "active")
        .filter_map(|e| e["id"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the client sidecar lists every one of `ids` as active; returns when it saw them.
async fn wait_listed(admin: SocketAddr, ids: &[&str]) -> Instant {
    wait_for(&format!("the client sidecar to list {ids:?} as active"), WITHIN, || async move {
        let listed = active_endpoints(admin).await;
        ids.iter().all(|id| listed.iter().any(|l| l == id)).then(Instant::now)
    })
    .await
}

/// One request of the load: when it was sent and the instance that answered
/// (`None`: an error or a non-2xx answer).
struct Sample {
    sent: Instant,
    instance: Option<String>,
}

/// [`CONCURRENCY`] loops sending `GET /work` with `Host: SERVICE` to the
/// client sidecar's outbound port, each over its own kept-alive connection.
struct Load {
    stop: Arc<AtomicBool>,
    loops: JoinSet<Vec<Sample>>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Load {
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("client");
        let url = format!("http://{outbound}/work");
        let stop = Arc::new(AtomicBool::new(false));
        let mut loops = JoinSet::new();
        for _ in 0..CONCURRENCY {
            let (client, url, stop) = (client.clone(), url.clone(), Arc::clone(&stop));
            loops.spawn(async move {
                let mut samples = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let sent = Instant::now();
                    let instance = answered_by(&client, &url).await;
                    samples.push(Sample { sent, instance });
                }
                samples
            });
        }
        Load { stop, loops }
    }

    /// Stops the loops and returns every sample, in the order they were sent.
    async fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        while let Some(samples) = self.loops.join_next().await {
            all.extend(samples.expect("a load loop panicked"));
        }
        all.sort_by_key(|s| s.sent);
        all
    }
}

async fn answered_by(client: &reqwest::Client, url: &str) -> Option<String> {
    let resp = client.get(url).header("host", SERVICE).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body: Value = resp.json().await.ok()?;
    body["instance"].as_str().map(str::to_string)
}

/// Share of the requests sent in `[from, to)` that `instance` answered, and how many were sent.
fn share(samples: &[Sample], from: Instant, to: Instant, instance: &str) -> (f64, usize) {
    let window: Vec<&Sample> = samples.iter().filter(|s| s.sent >= from && s.sent < to).collect();
    let hits = window.iter().filter(|s| s.instance.as_deref() == Some(instance)).count();
    (hits as f64 / window.len().max(1) as f64, window.len())
}

/// What one run measured.
struct Run {
    /// The newcomer's share in each whole second after the client listed it.
    per_second: Vec<f64>,
    /// Requests that failed (error or non-2xx), over the whole load.
    failed: usize,
}

/// The scenario: two instances under load, then a third joins; its share is
/// measured for `seconds` whole seconds from when the client sidecar lists it.
async fn newcomer_share(slow_start: Duration, seconds: u32) -> Run {
    let registry = RegistryProc::start("registry", &[]).await;
    let url = registry.url();
    let _b1 = start_instance(&url, "b1").await;
    let _b2 = start_instance(&url, "b2").await;
    let slow_start_flag = humantime::format_duration(slow_start).to_string();
    let client_flags = strings(&["--upstream-service", SERVICE, "--slow-start", &slow_start_flag]);
    let client = SidecarProc::start("client-sidecar", &url, &client_flags, WITHIN).await;
    let listed_two = wait_listed(client.admin, &["b1", "b2"]).await;
    let load = Load::start(client.outbound);

    // The first two must be past their own slow start, or the newcomer would
    // be weighed against endpoints still warming up. Warmth is not visible
    // from outside the sidecar, so this waits out the window itself, under load.
    tokio::time::sleep_until((listed_two + slow_start).into()).await;
    let _b3 = start_instance(&url, NEWCOMER).await;
    let joined = wait_listed(client.admin, &[NEWCOMER]).await;
    let end = joined + Duration::from_secs(u64::from(seconds));
    // Paces the measuring window; the load runs meanwhile.
    tokio::time::sleep_until(end.into()).await;
    let samples = load.finish().await;

    let (b1_before, sent_before) = share(&samples, listed_two, joined, "b1");
    println!(
        "--slow-start {slow_start_flag}: before {NEWCOMER} joined, b1 answered {:.1} % of \
         {sent_before} requests (b2 the rest)",
        b1_before * 100.0
    );
    let mut per_second = Vec::new();
    for k in 0..seconds {
        let from = joined + Duration::from_secs(u64::from(k));
        let (s, n) = share(&samples, from, from + Duration::from_secs(1), NEWCOMER);
        println!(
            "--slow-start {slow_start_flag}: second {k}-{} after {NEWCOMER} was listed: {:.1} % of {n} \
             requests",
            k + 1,
            s * 100.0
        );
        per_second.push(s);
    }
    let first_hit = samples.iter().find(|s| s.sent >= joined && s.instance.as_deref() == Some(NEWCOMER));
    let first_hit = first_hit.map_or("never".to_string(), |s| format!("{:?}", s.sent - joined));
    println!(
        "--slow-start {slow_start_flag}: the first request {NEWCOMER} answered was sent {first_hit} after it \
         was listed"
    );
    let failed = samples.iter().filter(|s| s.instance.is_none()).count();
    println!("--slow-start {slow_start_flag}: {} requests in all, {failed} failed", samples.len());
    Run { per_second, failed }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_instance_gets_its_share_gradually_over_the_slow_start() {
    let _serial = SERIAL.lock().await;
    // Two seconds past the window, so the last ones show the full share.
    let run = newcomer_share(SLOW_START, 8).await;
    let first = run.per_second[0];
    let last: Vec<f64> = run.per_second[6..].to_vec();
    let last_mean = last.iter().sum::<f64>() / last.len() as f64;
    println!(
        "slow start {SLOW_START:?}: first second {:.1} %, last two seconds {:.1} %",
        first * 100.0,
        last_mean * 100.0
    );
    assert_eq!(run.failed, 0, "requests failed while an instance joined");
    assert!(first < 0.15, "the newcomer took {:.1} % in its first second (bound 15 %)", first * 100.0);
    assert!(
        last_mean > 0.22,
        "the newcomer took {:.1} % in the last two seconds, after its slow start (bound 22 %)",
        last_mean * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_slow_start_a_new_instance_gets_its_share_at_once() {
    let _serial = SERIAL.lock().await;
    let run = newcomer_share(Duration::ZERO, 3).await;
    let first = run.per_second[0];
    println!("slow start off: first second {:.1} %", first * 100.0);
    assert_eq!(run.failed, 0, "requests failed while an instance joined");
    assert!(first > 0.22, "the newcomer took {:.1} % in its first second (bound 22 %)", first * 100.0);
}
