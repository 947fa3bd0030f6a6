//! `demo-app`: the small HTTP service the demo, the end-to-end tests and the
//! benchmarks run behind sidecars. It answers with its instance name, has a
//! health endpoint, and can be told to slow down, fail, or drop connections, so
//! balancing, retries and ejection can be seen from outside.
//!
//! ```text
//! demo-app [--listen ADDR] [--name NAME] [--delay DUR] [--fail-rate F] [--unhealthy] [--ready-file PATH]
//! demo-app probe [--listen ADDR]      # exit 0 when the local /health answers 200
//! demo-app control health|delay|fail-rate VALUE [--listen ADDR]
//!                                     # PUT /control/... on the local app (images have no curl:
//!                                     # `docker exec <app> demo-app control delay 300ms`)
//! ```
//!
//! Routes:
//! - `GET /health`: 200 `{"status":"ok"}`, or 503 `{"status":"unhealthy"}` when unhealthy.
//! - `PUT /control/health?ok=false|true`, `PUT /control/delay?d=200ms`, `PUT /control/fail-rate?r=0.5`.
//! - `GET /control/stats`: `{"requests":N,"by_method":{"GET":n,...}}`, counting ordinary requests only
//!   (everything but `/health` and `/control/*`, and not those rejected with 400 for a bad knob).
//! - `GET /sse?n=5&interval=100ms`: `text/event-stream`, one event per interval, each flushed as produced.
//! - `GET /download?bytes=N`: N bytes streamed in 16 KiB chunks, never held whole.
//! - anything else: the whole request body is read, then 200
//!   `{"instance":NAME,"method":..,"path":..,"body_bytes":N}`. Query knobs: `?delay=100ms` (instead of the
//!   configured delay), `?status=503` (answer with that status, same body), `?reset=1` (read the body, count
//!   the request, then drop the connection without answering: on HTTP/2 the stream is reset).
//!
//! The configured delay and fail rate apply to ordinary requests only, so the health endpoint stays an
//! honest signal of liveness. Serves HTTP/1.1 and h2c (prior knowledge) on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::stream;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// Connections served at once; past it, accepting waits.
const MAX_CONNECTIONS: usize = 10_000;
/// How long in-flight requests may finish after SIGTERM before the process exits.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Chunk size of `/download`.
const CHUNK: usize = 16 * 1024;
/// Upper bound of `/sse?n=`, so one request cannot hold a task forever.
const MAX_EVENTS: u64 = 100_000;

static ZEROES: [u8; CHUNK] = [b'x'; CHUNK];

#[derive(Parser, Debug)]
#[command(name = "demo-app", about = "Trellis demo HTTP service", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// Address to listen on (HTTP/1.1 and h2c).
    #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
    listen: SocketAddr,
    /// Instance name put in every answer. Default: the host name.
    #[arg(long, env = "DEMO_NAME")]
    name: Option<String>,
    /// Delay before answering each ordinary request, e.g. `200ms`. Default 0.
    #[arg(long, env = "DEMO_DELAY", value_parser = humantime::parse_duration)]
    delay: Option<Duration>,
    /// Share of ordinary requests (0..1) answered 503. Default 0.
    #[arg(long, env = "DEMO_FAIL_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    fail_rate: f64,
    /// Start with `/health` answering 503.
    #[arg(long, env = "DEMO_UNHEALTHY")]
    unhealthy: bool,
    /// Once listening, write `{"listen":"IP:PORT"}` here: the bound address,
    /// which is how a caller learns the port when `--listen` has port 0.
    #[arg(long, env = "DEMO_READY_FILE", value_name = "PATH")]
    ready_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Exit 0 when the local app's `/health` answers 200 (for container healthchecks).
    Probe {
        /// The app's listen address; an unspecified IP is probed on 127.0.0.1.
        #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Change the local app's behaviour: `health true|false`, `delay 300ms`, `fail-rate 0.5`.
    Control {
        /// What to change.
        #[arg(value_enum)]
        what: Knob,
        /// The new value.
        value: String,
        /// The app's listen address; an unspecified IP is reached on 127.0.0.1.
        #[arg(long, env = "DEMO_LISTEN", default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Knob {
    Health,
    Delay,
    FailRate,
}

impl Knob {
    /// The control path and its query parameter.
    fn route(self) -> (&'static str, &'static str) {
        match self {
            Knob::Health => ("/control/health", "ok"),
            Knob::Delay => ("/control/delay", "d"),
            Knob::FailRate => ("/control/fail-rate", "r"),
        }
    }
}

fn parse_rate(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{s:?} is not a number between 0 and 1")),
    }
}

/// Runtime-adjustable behaviour and counters, shared by every connection.
struct State {
    name: String,
    healthy: AtomicBool,
    delay_ms: AtomicU64,
    /// f64 bits of the fail rate.
    fail_rate: AtomicU64,
    requests: AtomicU64,
    // A std Mutex: held for one map update, never across an await.
    by_method: Mutex<BTreeMap<String, u64>>,
}

impl State {
    fn new(name: String, healthy: bool, delay: Duration, fail_rate: f64) -> State {
        State {
            name,
            healthy: AtomicBool::new(healthy),
            delay_ms: AtomicU64::new(delay.as_millis().min(u64::MAX as u128) as u64),
            fail_rate: AtomicU64::new(fail_rate.to_bits()),
            requests: AtomicU64::new(0),
            by_method: Mutex::new(BTreeMap::new()),
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_millis(self.delay_ms.load(Ordering::Relaxed))
    }

    fn fail_rate(&self) -> f64 {
        f64::from_bits(self.fail_rate.load(Ordering::Relaxed))
    }

    fn count(&self, method: &Method) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.by_method.lock() {
            *m.entry(method.as_str().to_string()).or_insert(0) += 1;
        }
    }
}

type Body = BoxBody<Bytes, std::io::Error>;

/// Returned by the service to make hyper drop the connection (or reset the stream)
/// without answering.
#[derive(Debug)]
struct ResetRequested;

impl std::fmt::Display for ResetRequested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset requested by ?reset=1")
    }
}

impl std::error::Error for ResetRequested {}

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never: Infallible| match never {}).boxed()
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn bad_request(message: String) -> Response<Body> {
    json(StatusCode::BAD_REQUEST, serde_json::json!({"error": "bad_request", "message": message}))
}

/// Query pairs; no percent-decoding is needed for the knobs this app reads.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect()
}

fn parse_duration_knob(name: &str, v: &str) -> Result<Duration, String> {
    humantime::parse_duration(v).map_err(|e| format!("{name}={v:?}: {e}"))
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, ResetRequested> {
    debug!(method = %req.method(), path = %req.uri().path(), "request");
    let path = req.uri().path().to_string();
    let q = query(&req);
    let resp = match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => health(&state),
        (&Method::PUT, "/control/health") => match q.get("ok").map(String::as_str) {
            Some("true") => set_health(&state, true),
            Some("false") => set_health(&state, false),
            _ => bad_request("expected ?ok=true or ?ok=false".into()),
        },
        (&Method::PUT, "/control/delay") => match q.get("d").map(|v| parse_duration_knob("d", v)) {
            Some(Ok(d)) => {
                state.delay_ms.store(d.as_millis().min(u64::MAX as u128) as u64, Ordering::Relaxed);
                info!(delay = ?d, "delay changed");
                json(StatusCode::OK, serde_json::json!({"delay_ms": d.as_millis() as u64}))
            }
            Some(Err(e)) => bad_request(e),
            None => bad_request("expected ?d=<duration>".into()),
        },
        (&Method::PUT, "/control/fail-rate") => match q.get("r").map(|v| parse_rate(v)) {
            Some(Ok(r)) => {
                state.fail_rate.store(r.to_bits(), Ordering::Relaxed);
                info!(fail_rate = r, "fail rate changed");
                json(StatusCode::OK, serde_json::json!({"fail_rate": r}))
            }
            Some(Err(e)) => bad_request(e),
            None => bad_request("expected ?r=<0..1>".into()),
        },
        (&Method::GET, "/control/stats") => {
            let by_method = state.by_method.lock().map(|m| m.clone()).unwrap_or_default();
            json(
                StatusCode::OK,
                serde_json::json!({"requests": state.requests.load(Ordering::Relaxed), "by_method": by_method}),
            )
        }
        (_, p) if p == "/health" || p.starts_with("/control/") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "method_not_allowed", "message": format!("{} {p}", req.method())}),
        ),
        (&Method::GET, "/sse") => {
            state.count(req.method());
            sse(&state, &q)
        }
        (&Method::GET, "/download") => {
            state.count(req.method());
            download(&q)
        }
        _ => return ordinary(state, req, q).await,
    };
    Ok(resp)
}

fn health(state: &State) -> Response<Body> {
    if state.healthy.load(Ordering::Relaxed) {
        json(StatusCode::OK, serde_json::json!({"status": "ok"}))
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, serde_json::json!({"status": "unhealthy"}))
    }
}

fn set_health(state: &State, ok: bool) -> Response<Body> {
    let was = state.healthy.swap(ok, Ordering::Relaxed);
    if was != ok {
        info!(healthy = ok, "health changed");
    }
    json(StatusCode::OK, serde_json::json!({"healthy": ok}))
}

async fn ordinary(
    state: Arc<State>,
    req: Request<Incoming>,
    q: BTreeMap<String, String>,
) -> Result<Response<Body>, ResetRequested> {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    // Validate the knobs before reading, but answer only after the whole body is read.
    let delay = match q.get("delay").map(|v| parse_duration_knob("delay", v)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return Ok(bad_request(e)),
        None => state.delay(),
    };
    let status = match q.get("status") {
        Some(s) => match s.parse::<u16>().ok().and_then(|c| StatusCode::from_u16(c).ok()) {
            Some(code) => Some(code),
            None => return Ok(bad_request(format!("status={s:?} is not an HTTP status code"))),
        },
        None => None,
    };
    let reset = q.get("reset").is_some_and(|v| v == "1" || v == "true");

    let mut body = req.into_body();
    let mut body_bytes: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    body_bytes += data.len() as u64;
                }
            }
            Err(e) => {
                // The peer went away mid-body: nobody to answer.
                debug!(error = %e, "request body failed");
                return Err(ResetRequested);
            }
        }
    }
    state.count(&method);
    if reset {
        debug!(path = %path, "dropping the connection as asked");
        return Err(ResetRequested);
    }
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let status = match status {
        Some(s) => s,
        None if state.fail_rate() > 0.0 && rand::random::<f64>() < state.fail_rate() => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        None => StatusCode::OK,
    };
    Ok(json(
        status,
        serde_json::json!({
            "instance": state.name,
            "method": method.as_str(),
            "path": path,
            "body_bytes": body_bytes,
        }),
    ))
}

fn sse(state: &State, q: &BTreeMap<String, String>) -> Response<Body> {
    let n = match q.get("n").map(|v| v.parse::<u64>()) {
        Some(Ok(n)) if n <= MAX_EVENTS => n,
        Some(_) => return bad_request(format!("n must be a number up to {MAX_EVENTS}")),
        None => 5,
    };
    let interval = match q.get("interval").map(|v| parse_duration_knob("interval", v)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => return bad_request(e),
        None => Duration::from_millis(100),
    };
    let name = state.name.clone();
    // Event i is produced at i * interval; the first goes out at once.
    let events = stream::unfold(0u64, move |i| {
        let name = name.clone();
        async move {
            if i >= n {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            let data = format!("id: {i}\ndata: {}\n\n", serde_json::json!({"instance": name, "seq": i}));
            Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from(data))), i + 1))
        }
    });
    let mut resp = Response::new(StreamBody::new(events).boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

fn download(q: &BTreeMap<String, String>) -> Response<Body> {
    let total = match q.get("bytes").map(|v| v.parse::<u64>()) {
        Some(Ok(n)) => n,
        _ => return bad_request("expected ?bytes=<count>".into()),
    };
    let chunks = stream::unfold(total, |left| async move {
        if left == 0 {
            return None;
        }
        let len = left.min(CHUNK as u64) as usize;
        Some((Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(&ZEROES[..len]))), left - len as u64))
    });
    let mut resp = Response::new(StreamBody::new(chunks).boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    resp.headers_mut().insert(CONTENT_LENGTH, HeaderValue::from(total));
    resp
}

async fn serve(args: ServeArgs) -> std::io::Result<()> {
    let name = match args.name {
        Some(n) => n,
        None => gethostname::gethostname().to_string_lossy().into_owned(),
    };
    let state =
        Arc::new(State::new(name.clone(), !args.unhealthy, args.delay.unwrap_or_default(), args.fail_rate));
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    info!(%addr, instance = %name, "demo-app listening");
    if let Some(path) = &args.ready_file {
        let bound = BTreeMap::from([("listen", addr.to_string())]);
        trellis_shared::ready_file::write(path, &bound)?;
    }
    run(listener, state, trellis_tests::shutdown_signal()).await;
    Ok(())
}

/// Serves `listener` until `shutdown` resolves, then lets open connections finish for a grace period.
async fn run(listener: TcpListener, state: Arc<State>, shutdown: impl std::future::Future<Output = ()>) {
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req| handle(state.clone(), req));
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(peer = %peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    info!("shutting down");
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => warn!("grace period over, exiting with connections open"),
    }
}

fn local(listen: SocketAddr) -> SocketAddr {
    let ip = if listen.ip().is_unspecified() { [127, 0, 0, 1].into() } else { listen.ip() };
    SocketAddr::new(ip, listen.port())
}

async fn probe(listen: SocketAddr, timeout: Duration) -> bool {
    let url = format!("http://{}/health", local(listen));
    let client = match reqwest::Client::builder().timeout(timeout).no_proxy().build() {
        Ok(c) => c,
        Err(_) => return false,
    };
    matches!(client.get(&url).send().await, Ok(r) if r.status() == StatusCode::OK)
}

/// Sends one control request to the local app and prints its answer.
async fn control(what: Knob, value: &str, listen: SocketAddr) -> Result<(), String> {
    let (path, key) = what.route();
    let url = format!("http://{}{path}?{key}={value}", local(listen));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client.put(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    println!("{body}");
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{url} answered {status}"))
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo-app: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Probe { listen, timeout }) => {
            if rt.block_on(probe(listen, timeout)) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        Some(Command::Control { what, value, listen }) => match rt.block_on(control(what, &value, listen)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo-app control: {e}");
                std::process::ExitCode::FAILURE
            }
        },
        None => match rt.block_on(serve(cli.serve)) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("demo-app: {e}");
                std::process::ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Starts the app on a loopback port; it stops when the returned sender is dropped.
    async fn start() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let state = Arc::new(State::new("t1".into(), true, Duration::ZERO, 0.0));
        tokio::spawn(run(listener, state, async move {
            let _ = rx.await;
        }));
        (addr, tx)
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder().no_proxy().build().expect("client")
    }

    async fn json_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
        let status = resp.status().as_u16();
        let body = resp.bytes().await.expect("body");
        (status, serde_json::from_slice(&body).expect("json"))
    }

    #[tokio::test]
    async fn answers_with_instance_counts_and_obeys_knobs() {
        let (addr, _stop) = start().await;
        let c = client();
        let base = format!("http://{addr}");
        let (st, v) = json_of(c.post(format!("{base}/a/b")).body("hello").send().await.expect("post")).await;
        assert_eq!(st, 200);
        assert_eq!(v, serde_json::json!({"instance":"t1","method":"POST","path":"/a/b","body_bytes":5}));
        let (st, v) = json_of(c.get(format!("{base}/x?status=503")).send().await.expect("get")).await;
        assert_eq!((st, v["instance"].as_str()), (503, Some("t1")));
        let (st, _) = json_of(c.get(format!("{base}/x?delay=bogus")).send().await.expect("get")).await;
        assert_eq!(st, 400);

        assert_eq!(c.get(format!("{base}/health")).send().await.expect("health").status(), 200);
        let r = c.put(format!("{base}/control/health?ok=false")).send().await.expect("control");
        assert_eq!(r.status(), 200);
        assert_eq!(c.get(format!("{base}/health")).send().await.expect("health").status(), 503);

        c.put(format!("{base}/control/fail-rate?r=1")).send().await.expect("control");
        assert_eq!(c.get(format!("{base}/y")).send().await.expect("get").status(), 503);
        c.put(format!("{base}/control/fail-rate?r=0")).send().await.expect("control");
        assert_eq!(
            c.put(format!("{base}/control/fail-rate?r=7")).send().await.expect("control").status(),
            400
        );

        c.put(format!("{base}/control/delay?d=150ms")).send().await.expect("control");
        let t = std::time::Instant::now();
        assert_eq!(c.get(format!("{base}/slow")).send().await.expect("get").status(), 200);
        println!("delayed answer took {:?}", t.elapsed());
        assert!(t.elapsed() >= Duration::from_millis(150));

        // Health, control and rejected (400) requests are not counted: POST /a/b, /x?status, /y, /slow.
        let (_, v) = json_of(c.get(format!("{base}/control/stats")).send().await.expect("stats")).await;
        assert_eq!(v, serde_json::json!({"requests":4,"by_method":{"GET":3,"POST":1}}));
    }

    #[tokio::test]
    async fn reset_reads_the_body_counts_and_answers_nothing() {
        let (addr, _stop) = start().await;
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(b"POST /r?reset=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .await
            .expect("write");
        let mut got = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
            .await
            .expect("closed in time");
        assert!(n.is_err() || got.is_empty(), "expected no answer, got {:?}", String::from_utf8_lossy(&got));
        let (_, v) =
            json_of(client().get(format!("http://{addr}/control/stats")).send().await.expect("stats")).await;
        assert_eq!(v["requests"], 1);
    }

    #[tokio::test]
    async fn h2c_sse_and_download_stream() {
        let (addr, _stop) = start().await;
        let h2 = reqwest::Client::builder().no_proxy().http2_prior_knowledge().build().expect("client");
        let r = h2.get(format!("http://{addr}/hello")).send().await.expect("h2c");
        assert_eq!(r.version(), reqwest::Version::HTTP_2);
        assert_eq!(r.status(), 200);

        let mut r = client().get(format!("http://{addr}/sse?n=3&interval=50ms")).send().await.expect("sse");
        assert_eq!(r.headers()[CONTENT_TYPE], "text/event-stream");
        let mut events = 0;
        while let Some(chunk) = r.chunk().await.expect("chunk") {
            events += String::from_utf8_lossy(&chunk).matches("data: ").count();
        }
        assert_eq!(events, 3);

        let r = client().get(format!("http://{addr}/download?bytes=100001")).send().await.expect("download");
        assert_eq!(r.content_length(), Some(100_001));
        assert_eq!(r.bytes().await.expect("bytes").len(), 100_001);
        let r = client().get(format!("http://{addr}/download")).send().await.expect("download");
        assert_eq!(r.status(), 400);
    }
}
