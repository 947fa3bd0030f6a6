//! End-to-end tests of the sidecar with the real binaries on loopback: a
//! registry, backend `demo-app`s each with its own sidecar, and a client
//! sidecar the load goes through.
//!
//! Build first: `cargo build -p trellis-registry -p trellis-sidecar -p trellis-tests --bins`.
//!
//! The load client counts every non-2xx answer and every error or timeout as a
//! failure and never retries. Tests run one at a time (each starts up to eight
//! processes, and the machine may have two cores).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper::{HeaderMap, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use trellis_shared::{RegistryClient, ServiceName};
use trellis_tests::{bin, strings, wait_for, wait_http_ok, AppProc, Proc, RegistryProc, SidecarProc};

/// Held for a whole test; tokio's mutex works across the tests' runtimes and
/// is not poisoned by a failing test.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVICE: &str = "api";
/// The sidecar's default TTL and heartbeat interval.
const TTL: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(1);

async fn start_registry() -> RegistryProc {
    RegistryProc::start("registry", &[]).await
}

async fn endpoints_json(admin: SocketAddr) -> Value {
    match reqwest::get(format!("http://{admin}/endpoints")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    }
}

/// A sidecar's endpoints of `service` as (id, state, ejections).
async fn endpoints_at(admin: SocketAddr, service: &str) -> Vec<(String, String, u64)> {
    trellis_tests::admin::endpoint_list(admin, service)
        .await
        .into_iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_string(),
                e["state"].as_str().unwrap_or_default().to_string(),
                e["ejections"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

struct Sidecar {
    proc: Proc,
    admin: SocketAddr,
    outbound: SocketAddr,
}

impl Sidecar {
    async fn start(name: &str, registry: &str, extra: &[String]) -> Sidecar {
        let SidecarProc { proc, admin, outbound, .. } =
            SidecarProc::start(name, registry, extra, Duration::from_secs(30)).await;
        Sidecar { proc, admin, outbound }
    }

    async fn endpoints(&self) -> Value {
        endpoints_json(self.admin).await
    }

    /// The endpoints of `service` as (id, state, ejections).
    async fn endpoints_of(&self, service: &str) -> Vec<(String, String, u64)> {
        endpoints_at(self.admin, service).await
    }

    async fn wait_endpoints(&self, service: &str, n: usize, timeout: Duration) {
        wait_for(&format!("{} to see {n} endpoints of {service}", self.proc.name), timeout, || async {
            (self.endpoints_of(service).await.len() == n).then_some(())
        })
        .await
    }

    /// The value of the metric sample `name_and_labels` (`None`: absent or no answer).
    async fn metric(&self, name_and_labels: &str) -> Option<i64> {
        let text = reqwest::get(format!("http://{}/metrics", self.admin)).await.ok()?.text().await.ok()?;
        let prefix = format!("{name_and_labels} ");
        text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).and_then(|v| v.trim().parse().ok())
    }

    /// The `trellis_sidecar_registry_up` gauge.
    async fn registry_up(&self) -> Option<i64> {
        self.metric("trellis_sidecar_registry_up").await
    }

    /// `trellis_sidecar_health_panic` of [`SERVICE`].
    async fn health_panic(&self) -> Option<i64> {
        self.metric(&format!(r#"trellis_sidecar_health_panic{{service="{SERVICE}"}}"#)).await
    }

    /// `trellis_sidecar_requests_total` of [`SERVICE`] for one status class.
    async fn requests_of_class(&self, class: &str) -> Option<i64> {
        self.metric(&format!(r#"trellis_sidecar_requests_total{{service="{SERVICE}",class="{class}"}}"#))
            .await
    }

    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

struct Backend {
    name: String,
    app: Proc,
    app_addr: SocketAddr,
    sidecar: Sidecar,
}

/// A backend sidecar's flags: register the app at `app` as instance `id` of [`SERVICE`].
fn registering(app: SocketAddr, id: &str) -> Vec<String> {
    let app = app.to_string();
    strings(&["--service", SERVICE, "--app", &app, "--advertise", &app, "--instance-id", id])
}

impl Backend {
    async fn start(name: &str, registry: &str, app_extra: &[&str], sidecar_extra: &[&str]) -> Backend {
        let AppProc { proc: app, addr: app_addr } =
            AppProc::start(&format!("{name}-app"), name, &strings(app_extra)).await;
        let mut extra = registering(app_addr, name);
        extra.extend(strings(sidecar_extra));
        let sidecar = Sidecar::start(&format!("{name}-sidecar"), registry, &extra).await;
        Backend { name: name.to_string(), app, app_addr, sidecar }
    }

    async fn control(&self, path_and_query: &str) {
        let url = format!("http://{}{path_and_query}", self.app_addr);
        let r = reqwest::Client::new().put(&url).send().await.expect("control request");
        assert!(r.status().is_success(), "PUT {url}: {}", r.status());
    }
}

/// Instance ids the registry lists for the service (`all` includes critical ones).
async fn registry_ids(client: &RegistryClient, all: bool) -> Option<Vec<String>> {
    let view = client.get(&ServiceName::new(SERVICE).unwrap(), all).await.ok()?;
    let mut ids: Vec<String> = view.instances.iter().map(|i| i.id.to_string()).collect();
    ids.sort();
    Some(ids)
}

async fn wait_registry_ids(client: &RegistryClient, all: bool, want: &[&str], timeout: Duration) -> Duration {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
    want.sort();
    wait_for(&format!("registry to list {want:?}"), timeout, || async {
        (registry_ids(client, all).await.as_ref() == Some(&want)).then_some(())
    })
    .await;
    start.elapsed()
}

/// How requests reach the client sidecar.
#[derive(Clone, Copy, Debug)]
enum Mode {
    /// `GET http://<outbound>/path` with `Host: api`.
    HostHeader,
    /// `GET http://api/path` through the outbound port as an HTTP proxy.
    AbsoluteForm,
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    by_instance: Mutex<HashMap<String, u64>>,
    failures: Mutex<Vec<String>>,
}

impl Tally {
    fn total(&self) -> u64 {
        self.ok.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
    fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    fn by_instance(&self) -> HashMap<String, u64> {
        self.by_instance.lock().unwrap().clone()
    }
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut f = self.failures.lock().unwrap();
        if f.len() < 20 {
            f.push(why);
        }
    }
}

/// A load client on one keep-alive connection to the client sidecar, with raw
/// hyper so that nothing retries behind the test's back (pooled clients
/// transparently resend requests on connections closed under them). Any error
/// drops the connection; the next request opens a new one.
struct Caller {
    outbound: SocketAddr,
    mode: Mode,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

/// Per-request bound; a request taking longer counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Caller {
    fn new(outbound: SocketAddr, mode: Mode) -> Caller {
        Caller { outbound, mode, conn: None }
    }

    async fn sender(&mut self) -> Result<&mut SendRequest<Empty<Bytes>>, String> {
        let usable = match self.conn.as_mut() {
            // Waiting for readiness sends nothing: it only learns whether the
            // connection is still open before the request is written.
            Some(c) => c.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            let stream =
                tokio::net::TcpStream::connect(self.outbound).await.map_err(|e| format!("connect: {e}"))?;
            let _ = stream.set_nodelay(true);
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            self.conn = Some(sender);
        }
        self.conn.as_mut().ok_or_else(|| "no connection".to_string())
    }

    /// `GET path` for `host`: status, headers and the whole body.
    async fn call(&mut self, host: &str, path: &str) -> Result<(StatusCode, HeaderMap, Bytes), String> {
        let uri = match self.mode {
            Mode::HostHeader => path.to_string(),
            Mode::AbsoluteForm => format!("http://{host}{path}"),
        };
        let req = Request::get(uri).header("host", host).body(Empty::new()).map_err(|e| e.to_string())?;
        let result = tokio::time::timeout(REQUEST_TIMEOUT, async {
            let resp = self.sender().await?.send_request(req).await.map_err(|e| format!("request: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
            Ok::<_, String>((parts.status, parts.headers, body))
        })
        .await
        .unwrap_or_else(|_| Err(format!("timed out after {REQUEST_TIMEOUT:?}")));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// One request to the test service, tallied; never retried.
    async fn one(&mut self, host: &str, tally: &Tally) {
        match self.call(host, "/work").await {
            Ok((status, _, body)) if status.is_success() => match serde_json::from_slice::<Value>(&body) {
                Ok(v) => {
                    tally.ok.fetch_add(1, Ordering::Relaxed);
                    let inst = v["instance"].as_str().unwrap_or("?").to_string();
                    *tally.by_instance.lock().unwrap().entry(inst).or_insert(0) += 1;
                }
                Err(e) => tally.fail(format!("body: {e}")),
            },
            Ok((status, headers, body)) => {
                let code =
                    headers.get("x-trellis-error").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                tally.fail(format!("status {status} {code} {}", String::from_utf8_lossy(&body)));
            }
            Err(e) => tally.fail(e),
        }
    }
}

/// Steady load from `workers` concurrent loops until stopped.
struct Load {
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(outbound: SocketAddr, mode: Mode, workers: usize, pause: Duration) -> Load {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|_| {
                let (tally, stop) = (Arc::clone(&tally), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut caller = Caller::new(outbound, mode);
                    while !stop.load(Ordering::Relaxed) {
                        caller.one(SERVICE, &tally).await;
                        if !pause.is_zero() {
                            tokio::time::sleep(pause).await;
                        }
                    }
                })
            })
            .collect();
        Load { tally, stop, tasks }
    }

    async fn wait_total(&self, n: u64, timeout: Duration) {
        wait_for(&format!("{n} requests"), timeout, || async { (self.tally.total() >= n).then_some(()) })
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

fn assert_no_failures(what: &str, tally: &Tally) {
    let failures = tally.failures.lock().unwrap().clone();
    assert_eq!(
        tally.failed(),
        0,
        "{what}: {} of {} requests failed; first failures: {failures:#?}",
        tally.failed(),
        tally.total()
    );
}

struct Cluster {
    registry: RegistryProc,
    backends: Vec<Backend>,
    client: Sidecar,
    api: RegistryClient,
}

impl Cluster {
    /// A registry, `n` backends and a client sidecar (`--workers 1`) watching `api` from the start.
    async fn start(n: usize) -> Cluster {
        let registry = start_registry().await;
        let registry_url = registry.url();
        let mut backends = Vec::new();
        for i in 0..n {
            backends.push(Backend::start(&format!("api-{i}"), &registry_url, &[], &[]).await);
        }
        let api = RegistryClient::from_list(&registry_url).unwrap();
        let names: Vec<String> = backends.iter().map(|b| b.name.clone()).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        wait_registry_ids(&api, false, &names, Duration::from_secs(20)).await;
        // One worker: the current-thread runtime the benchmarks measure. The
        // spread test's client keeps the default (multi-thread) runtime.
        let client = Sidecar::start(
            "client-sidecar",
            &registry_url,
            &strings(&["--upstream-service", SERVICE, "--workers", "1"]),
        )
        .await;
        client.wait_endpoints(SERVICE, n, Duration::from_secs(20)).await;
        Cluster { registry, backends, client, api }
    }
}

// ---------------------------------------------------------------------------
// A client sidecar spreads requests across three instances,
// by Host header and by absolute-form URI; the watch starts on first use.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spreads_requests_across_three_instances_by_host_and_absolute_uri() {
    let _serial = SERIAL.lock().await;
    let registry = start_registry().await;
    let registry_url = registry.url();
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(Backend::start(&format!("api-{i}"), &registry_url, &[], &[]).await);
    }
    let api = RegistryClient::from_list(&registry_url).unwrap();
    wait_registry_ids(&api, false, &["api-0", "api-1", "api-2"], Duration::from_secs(20)).await;
    // No --upstream-service: the first request starts the watch.
    let client = Sidecar::start("client-sidecar", &registry_url, &[]).await;

    for mode in [Mode::HostHeader, Mode::AbsoluteForm] {
        let mut caller = Caller::new(client.outbound, mode);
        let tally = Tally::default();
        for _ in 0..300 {
            caller.one(SERVICE, &tally).await;
        }
        assert_no_failures(&format!("{mode:?}"), &tally);
        let spread = tally.by_instance();
        println!("{mode:?}: 300 sequential requests spread as {spread:?}");
        for b in &backends {
            let n = spread.get(&b.name).copied().unwrap_or(0);
            // Sequential requests tie at zero in flight; random tie-breaking gives ~100 each.
            assert!(n >= 40, "{mode:?}: {} got only {n} of 300 requests: {spread:?}", b.name);
        }
    }
    // Each backend app saw requests (the sidecar proxied to the apps, not elsewhere).
    for b in &backends {
        let stats: Value =
            reqwest::get(format!("http://{}/control/stats", b.app_addr)).await.unwrap().json().await.unwrap();
        assert!(stats["requests"].as_u64().unwrap_or(0) >= 80, "{}: {stats}", b.name);
    }
}

// ---------------------------------------------------------------------------
// Least-connections sends markedly fewer requests to a slow instance.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_connections_sends_fewer_requests_to_a_slow_instance() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(3).await;
    c.backends[0].control("/control/delay?d=200ms").await;

    let load = Load::start(c.client.outbound, Mode::HostHeader, 8, Duration::ZERO);
    load.wait_total(3000, Duration::from_secs(120)).await;
    let tally = load.stop().await;
    assert_no_failures("least-connections load", &tally);
    let spread = tally.by_instance();
    let slow = spread.get("api-0").copied().unwrap_or(0);
    let fast = spread.get("api-1").copied().unwrap_or(0).min(spread.get("api-2").copied().unwrap_or(0));
    println!("8 concurrent loops, api-0 answering in 200ms: spread {spread:?}");
    assert!(slow * 5 < fast, "slow instance got {slow}, the slower fast one {fast}: {spread:?}");
}

// ---------------------------------------------------------------------------
// kill -9 of one backend (app and sidecar) during a steady stream.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_backend_fails_no_request_ejects_it_and_it_expires() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.client.outbound, Mode::HostHeader, 4, Duration::ZERO);
    load.wait_total(500, Duration::from_secs(60)).await;

    let victim = c.backends.remove(1);
    let (mut app, mut sidecar) = (victim.app, victim.sidecar.proc);
    let killed = Instant::now();
    app.kill9();
    sidecar.kill9();

    // Ejected at once: the first refused connect ejects it.
    let ejected_after = {
        wait_for("api-1 to be ejected", Duration::from_secs(10), || async {
            let eps = c.client.endpoints_of(SERVICE).await;
            eps.iter().any(|(id, state, ej)| id == "api-1" && (state != "active" || *ej >= 1)).then_some(())
        })
        .await;
        killed.elapsed()
    };

    // Gone from the registry within its TTL.
    let gone_after = {
        wait_registry_ids(&c.api, true, &["api-0", "api-2"], TTL * 4).await;
        killed.elapsed()
    };
    load.wait_total(2500, Duration::from_secs(120)).await;
    let tally = load.stop().await;
    println!(
        "kill -9: {} requests, {} failed; ejected after {ejected_after:?}; gone from the registry after {gone_after:?} (TTL {TTL:?})",
        tally.total(),
        tally.failed()
    );
    assert_no_failures("kill -9", &tally);
    assert!(tally.total() >= 2000);
    assert!(ejected_after < Duration::from_secs(5), "ejection took {ejected_after:?}");
    assert!(gone_after <= TTL * 3, "expiry took {gone_after:?}");
}

// ---------------------------------------------------------------------------
// The registry stops during traffic, then comes back empty.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_restart_drops_no_request_and_instances_come_back() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.client.outbound, Mode::HostHeader, 4, Duration::from_millis(2));
    load.wait_total(300, Duration::from_secs(60)).await;

    c.registry.proc.kill9();
    // While it is down (longer than a TTL), the client keeps every endpoint and keeps serving.
    let down_since = Instant::now();
    while down_since.elapsed() < TTL + HEARTBEAT {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert_eq!(c.client.endpoints_of(SERVICE).await.len(), 3, "the registry being down emptied the set");
    }
    let during_outage = load.tally.total();
    assert_eq!(c.client.registry_up().await, Some(0), "registry_up while the registry is down");
    assert_no_failures("registry down", &load.tally);

    // From the restart on, watch the client's endpoint count: instances that have
    // not re-registered yet are kept, so it never drops.
    let watching = Arc::new(AtomicBool::new(true));
    let min_seen = {
        let (watching, admin) = (Arc::clone(&watching), c.client.admin);
        tokio::spawn(async move {
            let mut min = usize::MAX;
            while watching.load(Ordering::Relaxed) {
                min = min.min(endpoints_at(admin, SERVICE).await.len());
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            min
        })
    };
    // The same port again: the sidecars were started with its address.
    c.registry = RegistryProc::start_on("registry", c.registry.addr, &[]).await;
    let restarted = Instant::now();
    let back_after =
        wait_registry_ids(&c.api, false, &["api-0", "api-1", "api-2"], (HEARTBEAT + TTL) * 3).await;
    // Watches recover too: the client's endpoints follow the new registry.
    c.client.wait_endpoints(SERVICE, 3, Duration::from_secs(20)).await;
    // One TTL past the restart, every kept instance has re-registered or been dropped.
    tokio::time::sleep(TTL.saturating_sub(restarted.elapsed()) + HEARTBEAT).await;
    watching.store(false, Ordering::Relaxed);
    let min_seen = min_seen.await.unwrap();
    assert_eq!(min_seen, 3, "the client's endpoints dropped to {min_seen} across the registry restart");
    wait_for("registry_up to be 1 again", Duration::from_secs(20), || async {
        (c.client.registry_up().await == Some(1)).then_some(())
    })
    .await;
    let before_end = load.tally.total();
    load.wait_total(before_end + 300, Duration::from_secs(60)).await;
    let tally = load.stop().await;
    println!(
        "registry restart: {} requests ({during_outage} by the end of the outage), {} failed; all 3 instances back {back_after:?} after the restart (bound: heartbeat {HEARTBEAT:?} + TTL {TTL:?}); total {:?}",
        tally.total(),
        tally.failed(),
        restarted.elapsed()
    );
    assert_no_failures("registry restart", &tally);
    assert!(back_after <= (HEARTBEAT + TTL) * 3, "{back_after:?}");
}

// ---------------------------------------------------------------------------
// SIGTERM of a backend's sidecar under traffic.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_a_backend_sidecar_deregisters_drains_and_exits_0() {
    let _serial = SERIAL.lock().await;
    let mut c = Cluster::start(3).await;
    let load = Load::start(c.client.outbound, Mode::HostHeader, 4, Duration::from_millis(1));
    load.wait_total(300, Duration::from_secs(60)).await;

    let signalled = Instant::now();
    c.backends[2].sidecar.proc.sigterm();
    // The app behind the terminating sidecar makes a slow call through it during
    // the drain; it must complete although the listener closes meanwhile.
    let outbound = c.backends[2].sidecar.outbound;
    let in_flight = tokio::spawn(async move {
        let r = Caller::new(outbound, Mode::HostHeader).call(SERVICE, "/slow?delay=2500ms").await;
        (r.map(|(status, _, _)| status.as_u16()), signalled.elapsed())
    });
    let gone_after = wait_registry_ids(&c.api, true, &["api-0", "api-1"], TTL * 3).await;
    // Not ready any more while draining.
    let ready = reqwest::get(format!("http://{}/ready", c.backends[2].sidecar.admin)).await;
    if let Ok(r) = ready {
        assert_ne!(r.status(), reqwest::StatusCode::OK, "still ready while shutting down");
    }
    let status = c.backends[2].sidecar.proc.wait_exit(Duration::from_secs(30)).expect("sidecar did not exit");
    let exited_after = signalled.elapsed();
    let (slow_call, slow_took) = in_flight.await.unwrap();
    assert_eq!(slow_call, Ok(200), "a call in flight during the drain failed");
    assert!(slow_took >= Duration::from_millis(2500) && slow_took <= exited_after, "{slow_took:?}");
    c.client.wait_endpoints(SERVICE, 2, Duration::from_secs(10)).await;
    let before_end = load.tally.total();
    load.wait_total(before_end + 300, Duration::from_secs(60)).await;
    let tally = load.stop().await;
    println!(
        "SIGTERM: deregistered after {gone_after:?}, exited {status} after {exited_after:?} (a 2.5s call made during the drain took {slow_took:?}); {} requests, {} failed",
        tally.total(),
        tally.failed()
    );
    assert!(status.success(), "exit status {status}");
    // Deregistered explicitly, not by lease expiry.
    assert!(gone_after < TTL - Duration::from_secs(1), "deregistration took {gone_after:?}");
    // Default drain 2s + grace 5s + deregistration, generously.
    assert!(exited_after < Duration::from_secs(20), "{exited_after:?}");
    let log = c.backends[2].sidecar.proc.log_text();
    assert!(log.contains("deregistered"), "no deregistration in the log");
    assert_no_failures("SIGTERM", &tally);
}

// ---------------------------------------------------------------------------
// An app that turns unhealthy is hidden, then returns.

/// A registry and `n` backends `api-0`... checked over HTTP (`/health`, which
/// a test turns off and on), once the registry lists them all healthy.
async fn start_http_checked(n: usize) -> (RegistryProc, Vec<Backend>, RegistryClient) {
    let registry = start_registry().await;
    let mut backends = Vec::new();
    for i in 0..n {
        backends.push(
            Backend::start(&format!("api-{i}"), &registry.url(), &[], &["--health", "http:/health"]).await,
        );
    }
    let api = RegistryClient::from_list(&registry.url()).unwrap();
    let ids: Vec<String> = (0..n).map(|i| format!("api-{i}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    wait_registry_ids(&api, false, &ids, Duration::from_secs(20)).await;
    (registry, backends, api)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unhealthy_app_is_hidden_then_returns() {
    let _serial = SERIAL.lock().await;
    let (registry, backends, api) = start_http_checked(2).await;
    let registry_url = registry.url();
    let client =
        Sidecar::start("client-sidecar", &registry_url, &strings(&["--upstream-service", SERVICE])).await;
    client.wait_endpoints(SERVICE, 2, Duration::from_secs(20)).await;
    let load = Load::start(client.outbound, Mode::HostHeader, 2, Duration::from_millis(5));

    // Default checks: every 1s, unhealthy after 2 failures, healthy after 2 passes.
    let flipped = Instant::now();
    backends[0].control("/control/health?ok=false").await;
    client.wait_endpoints(SERVICE, 1, Duration::from_secs(20)).await;
    let hidden_after = flipped.elapsed();
    assert_eq!(registry_ids(&api, false).await, Some(vec!["api-1".to_string()]));
    assert_eq!(registry_ids(&api, true).await.map(|v| v.len()), Some(2), "hidden, not removed");

    let flipped = Instant::now();
    backends[0].control("/control/health?ok=true").await;
    client.wait_endpoints(SERVICE, 2, Duration::from_secs(20)).await;
    let back_after = flipped.elapsed();
    let tally = load.stop().await;
    println!(
        "unhealthy app hidden after {hidden_after:?}, back after {back_after:?} (thresholds 2 x 1s plus watch delay); {} requests, {} failed",
        tally.total(),
        tally.failed()
    );
    assert_no_failures("health flip", &tally);
    assert!(hidden_after >= Duration::from_millis(900), "hidden before two failed checks: {hidden_after:?}");
    assert!(hidden_after < Duration::from_secs(10), "{hidden_after:?}");
    assert!(back_after < Duration::from_secs(10), "{back_after:?}");
}

// ---------------------------------------------------------------------------
// Most instances failing their checks while still serving: a health panic.

/// The client's view of the service: whether it is in a health panic, and its
/// endpoints as (id, health).
async fn panic_view(client: &Sidecar) -> (Option<bool>, Vec<(String, String)>) {
    let svc = trellis_tests::admin::service_endpoints(client.admin, SERVICE).await;
    let list = svc["endpoints"].as_array().cloned().unwrap_or_default();
    let seen = list
        .iter()
        .map(|e| {
            let field = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (field("id"), field("health"))
        })
        .collect();
    (svc["health_panic"].as_bool(), seen)
}

/// Waits until the client's view of the service is (or is not) in a health
/// panic, and returns its endpoints as (id, health).
async fn wait_panic(client: &Sidecar, on: bool) -> Vec<(String, String)> {
    wait_for(&format!("health panic {}", if on { "on" } else { "off" }), Duration::from_secs(20), || async {
        let (panic, seen) = panic_view(client).await;
        (panic == Some(on)).then_some(seen)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_most_instances_fail_their_checks_all_serve_and_a_dead_one_costs_nothing() {
    let _serial = SERIAL.lock().await;
    let (registry, mut backends, api) = start_http_checked(3).await;
    let registry_url = registry.url();
    let timeout = Duration::from_secs(20);
    let client =
        Sidecar::start("client-sidecar", &registry_url, &strings(&["--upstream-service", SERVICE])).await;
    client.wait_endpoints(SERVICE, 3, timeout).await;
    assert_eq!(client.health_panic().await, Some(0));
    // A sidecar with the health panic off, for comparison.
    let strict = Sidecar::start(
        "strict-sidecar",
        &registry_url,
        &strings(&["--upstream-service", SERVICE, "--panic-threshold", "0"]),
    )
    .await;
    strict.wait_endpoints(SERVICE, 3, timeout).await;
    let mut strict_caller = Caller::new(strict.outbound, Mode::HostHeader);
    let (status, _, _) = strict_caller.call(SERVICE, "/work").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    let load = Load::start(client.outbound, Mode::HostHeader, 4, Duration::from_millis(2));

    // Two of three fail their checks (as overloaded apps do) but still serve:
    // 33 % healthy, below the default threshold of 50 %.
    backends[0].control("/control/health?ok=false").await;
    backends[1].control("/control/health?ok=false").await;
    wait_registry_ids(&api, false, &["api-2"], timeout).await;
    let seen = wait_panic(&client, true).await;
    let critical: Vec<&str> =
        seen.iter().filter(|(_, h)| h == "critical").map(|(id, _)| id.as_str()).collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(critical, ["api-0", "api-1"], "{seen:?}");
    assert_eq!(client.health_panic().await, Some(1));

    // The last one fails its checks too: the registry lists no healthy instance.
    backends[2].control("/control/health?ok=false").await;
    wait_registry_ids(&api, false, &[], timeout).await;
    wait_for("the client to see three critical endpoints in a health panic", timeout, || async {
        let (panic, seen) = panic_view(&client).await;
        (panic == Some(true) && seen.len() == 3 && seen.iter().all(|(_, h)| h == "critical")).then_some(())
    })
    .await;
    let served_before = load.tally.by_instance();
    // A second failure on top: one of the critical instances dies.
    backends[0].app.kill9();
    let total = load.tally.total();
    load.wait_total(total + 300, timeout).await;
    let served_after = load.tally.by_instance();
    let gained =
        |id: &str| served_after.get(id).copied().unwrap_or(0) - served_before.get(id).copied().unwrap_or(0);

    // The sidecar with the health panic off has nobody to call meanwhile, and
    // its request metrics count the outage.
    strict.wait_endpoints(SERVICE, 0, timeout).await;
    let (status, headers, _) = strict_caller.call(SERVICE, "/work").await.unwrap();
    let code = headers.get("x-trellis-error").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert_eq!((status.as_u16(), code.as_str()), (503, "no_endpoints"));
    let strict_5xx = strict.requests_of_class("5xx").await;
    assert_eq!((strict.requests_of_class("2xx").await, strict_5xx), (Some(1), Some(1)));

    // Two pass again (the dead one stays critical): 67 % healthy, panic ends.
    backends[1].control("/control/health?ok=true").await;
    backends[2].control("/control/health?ok=true").await;
    let seen = wait_panic(&client, false).await;
    assert_eq!(
        seen,
        [("api-1".to_string(), "passing".to_string()), ("api-2".to_string(), "passing".to_string())]
    );
    let tally = load.stop().await;
    let endpoints = client.endpoints_of(SERVICE).await;
    println!(
        "health panic: {} requests, {} failed; served while every instance was critical and api-0 dead: \
         api-1 {}, api-2 {}; by instance {:?}; client endpoints after {endpoints:?}",
        tally.total(),
        tally.failed(),
        gained("api-1"),
        gained("api-2"),
        tally.by_instance()
    );
    assert_no_failures("health panic", &tally);
    assert!(
        gained("api-1") > 0 && gained("api-2") > 0,
        "critical instances served nothing: {served_after:?}"
    );
}

// ---------------------------------------------------------------------------
// Thousands of distinct Host names: errors, and memory stays bounded.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_distinct_host_names_get_errors_with_bounded_memory() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(1).await;
    // The flood expects error answers only, so a plain client is fine here.
    let http = reqwest::Client::builder().timeout(REQUEST_TIMEOUT).no_proxy().build().unwrap();
    let mut caller = Caller::new(c.client.outbound, Mode::HostHeader);
    let tally = Tally::default();
    caller.one(SERVICE, &tally).await;
    assert_no_failures("warm-up", &tally);
    let rss_before = c.client.rss_kib();

    let codes: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let started = Instant::now();
    let n = 3000;
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let (http, codes, outbound) = (http.clone(), Arc::clone(&codes), c.client.outbound);
            tokio::spawn(async move {
                for i in (w..n).step_by(8) {
                    let host = format!("no-such-service-{i}");
                    let key = match http.get(format!("http://{outbound}/x")).header("host", host).send().await
                    {
                        Ok(r) => format!(
                            "{} {}",
                            r.status().as_u16(),
                            r.headers().get("x-trellis-error").and_then(|v| v.to_str().ok()).unwrap_or("-")
                        ),
                        Err(e) => format!("error {e}"),
                    };
                    *codes.lock().unwrap().entry(key).or_insert(0) += 1;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let took = started.elapsed();
    let codes = codes.lock().unwrap().clone();
    let rss_after = c.client.rss_kib();
    let watched = c.client.endpoints().await["services"].as_array().map(|a| a.len()).unwrap_or(0);
    println!(
        "{n} distinct Host names in {took:?}: answers {codes:?}; services watched after: {watched}; RSS {rss_before} KiB -> {rss_after} KiB"
    );
    for (k, v) in &codes {
        assert!(k == "503 no_endpoints" || k == "503 overloaded", "{v} answers were {k:?}");
    }
    assert!(watched <= 256, "{watched} services watched, the cap is 256");
    assert!(rss_after < rss_before + 64 * 1024, "RSS grew from {rss_before} KiB to {rss_after} KiB");

    // The real service still works, and the sidecar is still healthy.
    let tally = Tally::default();
    for _ in 0..50 {
        caller.one(SERVICE, &tally).await;
    }
    assert_no_failures("after the flood", &tally);
    wait_http_ok(&format!("http://{}/ready", c.client.admin), Duration::from_secs(5)).await;
}

// ---------------------------------------------------------------------------
// The probe subcommand and bad configuration.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_subcommand_and_bad_config_exit_codes() {
    let _serial = SERIAL.lock().await;
    let registry = start_registry().await;
    let client = Sidecar::start("probe-sidecar", &registry.url(), &[]).await;

    let probe = |admin: SocketAddr| {
        std::process::Command::new(bin("sidecar"))
            .args(["probe", "--admin", &admin.to_string()])
            .output()
            .expect("run sidecar probe")
    };
    let ok = probe(client.admin);
    assert!(ok.status.success(), "probe of a ready sidecar: {ok:?}");
    // Port 1 on loopback: nothing unprivileged listens there, so connecting is refused.
    let dead = probe(SocketAddr::from(([127, 0, 0, 1], 1)));
    assert_eq!(dead.status.code(), Some(1), "probe of nothing: {dead:?}");

    let bad = std::process::Command::new(bin("sidecar"))
        .args(["--registry", "http://127.0.0.1:1", "--service", "Bad_Name", "--app", "127.0.0.1:1"])
        .output()
        .expect("run sidecar");
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("service name"), "{bad:?}");
    let missing =
        std::process::Command::new(bin("sidecar")).env_remove("TRELLIS_REGISTRY").output().expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--registry"), "{missing:?}");
}

// ---------------------------------------------------------------------------
// The registry unreachable at start: the sidecar keeps trying and registers
// within about a heartbeat interval of the registry appearing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_started_before_its_registry_registers_once_it_appears() {
    let _serial = SERIAL.lock().await;
    // The sidecar must know its registry's address before any registry runs:
    // one started and killed at once gives a port, and the registry started
    // later takes the same one again.
    let registry_addr = {
        let mut first = start_registry().await;
        first.proc.kill9();
        first.addr
    };
    let registry_url = format!("http://{registry_addr}");
    let AppProc { proc: _app, addr: app_addr } = AppProc::start("early-app", "api-0", &[]).await;
    let extra = registering(app_addr, "api-0");
    let SidecarProc { proc: mut sidecar, admin, .. } =
        SidecarProc::spawn("early-sidecar", &registry_url, &extra).await;
    // Up, but not ready: nothing to register with.
    let ready_url = format!("http://{admin}/ready");
    let status = wait_for("the admin port", Duration::from_secs(20), || async {
        reqwest::get(&ready_url).await.ok().map(|r| r.status())
    })
    .await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
    // Several retries' worth of an outage.
    tokio::time::sleep(3 * HEARTBEAT).await;
    assert!(sidecar.wait_exit(Duration::ZERO).is_none(), "the sidecar exited while the registry was down");

    let _registry = RegistryProc::start_on("registry", registry_addr, &[]).await;
    let started = Instant::now();
    let api = RegistryClient::from_list(&registry_url).unwrap();
    let registered_after = wait_registry_ids(&api, false, &["api-0"], Duration::from_secs(20)).await;
    wait_http_ok(&ready_url, Duration::from_secs(10)).await;
    println!(
        "registry appeared after the sidecar: registered {registered_after:?} later, ready {:?} later (retry cap: heartbeat {HEARTBEAT:?})",
        started.elapsed()
    );
    assert!(registered_after <= HEARTBEAT * 4, "{registered_after:?}");
}
