//! Zone-aware routing with the real binaries on loopback: a registry, two
//! zones with two `demo-app`s each (each behind its own sidecar registering
//! `--zone a|b`), and a client sidecar in zone a the load goes through.
//!
//! One scenario, phase after phase on the same processes, under a paced load
//! (workers pause between requests, so the load is light while the backends
//! answer promptly and piles up when they slow down):
//! 1. light load: at least 95 % of requests answered in zone a;
//! 2. both zone-a apps slowed to 300 ms: remote zones are added (awaited on
//!    the client's `/endpoints`) and most requests go to zone b;
//! 3. their delay removed: traffic comes back, at least 95 % local again;
//! 4. one zone-a backend killed (`kill -9`, app and sidecar): one usable local
//!    endpoint is fewer than the default two, so zone b takes a share;
//! 5. a replacement zone-a backend registers: traffic comes back local.
//!
//! No request may fail in any phase. Each phase prints its measured shares.
//!
//! Build first: `cargo build --release --workspace --bins`; run with
//! `cargo test --release -p trellis-tests --test zone_routing -- --nocapture`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::Request;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use trellis_tests::{strings, wait_for, AppProc, Proc, RegistryProc, SidecarProc};

const SERVICE: &str = "api";
/// Load workers and the pause each makes between requests.
const WORKERS: usize = 8;
const PAUSE: Duration = Duration::from_millis(20);
/// Per-request bound; a request taking longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Generous bound on every wait for an event.
const WAIT: Duration = Duration::from_secs(30);

struct Backend {
    app: Proc,
    app_addr: SocketAddr,
    sidecar: Proc,
}

impl Backend {
    /// A `demo-app` named `id` and its sidecar registering it in `zone`.
    async fn start(id: &str, zone: &str, registry: &str) -> Backend {
        let AppProc { proc: app, addr: app_addr } = AppProc::start(&format!("{id}-app"), id, &[]).await;
        let app_s = app_addr.to_string();
        let extra = strings(&[
            "--service",
            SERVICE,
            "--app",
            &app_s,
            "--advertise",
            &app_s,
            "--instance-id",
            id,
            "--zone",
            zone,
        ]);
        let sidecar = SidecarProc::start(&format!("{id}-sidecar"), registry, &extra, WAIT).await;
        Backend { app, app_addr, sidecar: sidecar.proc }
    }

    /// Sets the app's delay for ordinary requests (`0ms` removes it).
    async fn delay(&self, d: &str) {
        let url = format!("http://{}/control/delay?d={d}", self.app_addr);
        let r = reqwest::Client::new().put(&url).send().await.expect("control request");
        assert!(r.status().is_success(), "PUT {url}: {}", r.status());
    }
}

/// Requests answered per zone (by the answering instance's name) and failures.
#[derive(Default)]
struct Tally {
    local: AtomicU64,
    remote: AtomicU64,
    failed: AtomicU64,
    failures: Mutex<Vec<String>>,
}

#[derive(Debug, Clone, Copy)]
struct Counts {
    local: u64,
    remote: u64,
    failed: u64,
}

impl Counts {
    fn total(&self) -> u64 {
        self.local + self.remote + self.failed
    }
    fn since(self, before: Counts) -> Counts {
        Counts {
            local: self.local - before.local,
            remote: self.remote - before.remote,
            failed: self.failed - before.failed,
        }
    }
    fn local_share(&self) -> f64 {
        self.local as f64 / (self.local + self.remote).max(1) as f64
    }
}

impl Tally {
    fn counts(&self) -> Counts {
        Counts {
            local: self.local.load(Ordering::Relaxed),
            remote: self.remote.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(why);
        }
    }
}

/// One keep-alive connection to the client sidecar through raw hyper, so
/// nothing retries behind the test's back; an error drops the connection.
async fn one(outbound: SocketAddr, conn: &mut Option<SendRequest<Empty<Bytes>>>, tally: &Tally) {
    let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let usable = match conn.as_mut() {
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let stream =
                tokio::net::TcpStream::connect(outbound).await.map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (sender, c) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(c);
            *conn = Some(sender);
        }
        let sender = conn.as_mut().ok_or("no connection")?;
        let req =
            Request::get("/work").header("host", SERVICE).body(Empty::new()).map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
        if !status.is_success() {
            return Err(format!("status {status}: {}", String::from_utf8_lossy(&body)));
        }
        let v: Value = serde_json::from_slice(&body).map_err(|e| format!("body: {e}"))?;
        Ok::<_, String>(v["instance"].as_str().unwrap_or_default().to_string())
    })
    .await
    .unwrap_or_else(|_| Err(format!("timed out after {REQUEST_TIMEOUT:?}")));
    match result {
        Ok(instance) if instance.starts_with("a-") => {
            tally.local.fetch_add(1, Ordering::Relaxed);
        }
        Ok(_) => {
            tally.remote.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            *conn = None;
            tally.fail(e);
        }
    }
}

/// Paced load from [`WORKERS`] loops until stopped.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: SocketAddr) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..WORKERS)
            .map(|_| {
                let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut conn = None;
                    while !stop.load(Ordering::Relaxed) {
                        one(outbound, &mut conn, &tally).await;
                        // Pacing of the load, not synchronisation.
                        tokio::time::sleep(PAUSE).await;
                    }
                })
            })
            .collect();
        Load { tally, stop, tasks }
    }

    /// The answers to the next `n` requests from now.
    async fn measure(&self, n: u64) -> Counts {
        let before = self.tally.counts();
        wait_for(&format!("{n} more requests"), Duration::from_secs(120), || async {
            let now = self.tally.counts();
            (now.total() >= before.total() + n).then_some(now.since(before))
        })
        .await
    }

    async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        self.tally
    }
}

/// The client's `/endpoints` entry for the service.
async fn service_view(admin: SocketAddr) -> Value {
    trellis_tests::admin::service_endpoints(admin, SERVICE).await
}

/// Waits until the client says remote zones are (or are not) in use.
async fn wait_remote_zones(admin: SocketAddr, in_use: bool) -> String {
    wait_for(&format!("remote_zones_in_use to be {in_use}"), WAIT, || async {
        let v = service_view(admin).await;
        (v["remote_zones_in_use"] == in_use).then(|| v["zone_routing"].as_str().unwrap_or("?").to_string())
    })
    .await
}

/// The client's `zone_requests` counters (local, remote).
async fn zone_metrics(admin: SocketAddr) -> (u64, u64) {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.expect("metrics").text().await.unwrap();
    let get = |zone: &str| {
        let prefix = format!("trellis_sidecar_zone_requests_total{{service=\"{SERVICE}\",zone=\"{zone}\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&prefix)).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
    };
    (get("local"), get("remote"))
}

fn report(phase: &str, c: Counts) {
    println!(
        "{phase}: {} requests, {} local, {} remote ({:.1} % local), {} failed",
        c.total(),
        c.local,
        c.remote,
        c.local_share() * 100.0,
        c.failed
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_stays_in_the_callers_zone_spills_over_when_it_cannot_carry_it_and_comes_back() {
    let registry = RegistryProc::start("registry", &[]).await;
    let url = registry.url();
    let mut backends = Vec::new();
    for (id, zone) in [("a-0", "a"), ("a-1", "a"), ("b-0", "b"), ("b-1", "b")] {
        backends.push(Backend::start(id, zone, &url).await);
    }
    let client = SidecarProc::start(
        "client-sidecar",
        &url,
        &strings(&["--zone", "a", "--upstream-service", SERVICE]),
        WAIT,
    )
    .await;
    let admin = client.admin;
    wait_for("the client to see 4 endpoints", WAIT, || async {
        (service_view(admin).await["endpoints"].as_array().map_or(0, Vec::len) == 4).then_some(())
    })
    .await;
    let load = Load::start(client.outbound);

    // 1. Light load: local.
    let light = load.measure(600).await;
    report("light load", light);

    // 2. Zone a slows down: remote zones are added.
    backends[0].delay("300ms").await;
    backends[1].delay("300ms").await;
    let why = wait_remote_zones(admin, true).await;
    let slowed = load.measure(300).await;
    report(&format!("zone a slowed to 300 ms ({why})"), slowed);

    // 3. It recovers: traffic comes back.
    backends[0].delay("0ms").await;
    backends[1].delay("0ms").await;
    wait_remote_zones(admin, false).await;
    let recovered = load.measure(600).await;
    report("zone a recovered", recovered);

    // 4. A zone-a backend dies.
    let mut dead = backends.remove(0);
    dead.app.kill9();
    dead.sidecar.kill9();
    let why = wait_remote_zones(admin, true).await;
    let killed = load.measure(300).await;
    report(&format!("a-0 killed ({why})"), killed);

    // 5. A replacement registers in zone a: local again.
    backends.push(Backend::start("a-2", "a", &url).await);
    wait_remote_zones(admin, false).await;
    let replaced = load.measure(600).await;
    report("a-2 replaces a-0", replaced);

    // Stopped first: an answer that lands after the scrape would otherwise be in the tally but not the counters.
    let tally = load.stop().await;
    let (local, remote) = zone_metrics(admin).await;
    let all = tally.counts();
    report("whole run", all);
    println!("client sidecar zone_requests: local {local}, remote {remote}");

    let failures = tally.failures.lock().unwrap().clone();
    assert_eq!(all.failed, 0, "{} requests failed; first failures: {failures:#?}", all.failed);
    assert!(light.local_share() >= 0.95, "light load: {light:?}");
    assert!(slowed.local_share() <= 0.5, "zone a slowed: {slowed:?}");
    assert!(recovered.local_share() >= 0.95, "recovered: {recovered:?}");
    assert!(killed.remote >= 30, "a-0 killed: {killed:?}");
    assert!(replaced.local_share() >= 0.95, "replaced: {replaced:?}");
    assert!(local + remote >= all.total(), "attempts counted by zone: {local} + {remote} < {}", all.total());
}
