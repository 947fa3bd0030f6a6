//! The sidecar trusts the registry only so far: endpoints at its own
//! listeners or at link-local addresses are never connected to, an oversized
//! answer and a view of another service are refused, and in each case the
//! last good endpoints keep serving with zero failed requests.
//!
//! Real binaries (registry, sidecar, demo-app) and, where the registry has to
//! misbehave, a fake registry served in-process by hyper on port 0.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use trellis_tests::instance::AppInstance;
use trellis_tests::{strings, wait_for, RegistryProc, SidecarProc};

/// Tests start several processes each; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVICE: &str = "users";
const WITHIN: Duration = Duration::from_secs(30);

/// A counter of the sidecar's `/metrics`, summed over the label sets whose
/// text contains `labels` (empty: all).
async fn metric(admin: SocketAddr, name: &str, labels: &str) -> f64 {
    let text = match reqwest::get(format!("http://{admin}/metrics")).await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => return 0.0,
    };
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            let metric = key.split('{').next()?;
            (metric == name && key.contains(labels)).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Sends `n` requests for `service` through the sidecar's outbound port and
/// returns the answering instances' names; panics on any failure.
async fn load(outbound: SocketAddr, service: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{outbound}")).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut names = Vec::with_capacity(n);
    for i in 0..n {
        let resp = client.get(format!("http://{service}/hello")).send().await;
        let resp = resp.unwrap_or_else(|e| panic!("request {i} failed: {e}"));
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "request {i} answered {status}: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        names.push(v["instance"].as_str().unwrap_or(&body).to_string());
    }
    names
}

/// Registers an instance straight with the registry, as an attacker with
/// write access would.
async fn register_raw(registry: &str, id: &str, address: &str, port: u16) {
    let body = serde_json::json!({"address": address, "port": port, "ttl": "60s", "weight": 10000});
    let resp = reqwest::Client::new()
        .put(format!("{registry}/v1/services/{SERVICE}/instances/{id}"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "registering {id} answered {}", resp.status());
}

/// A registry, one real backend of `users`, and a client sidecar watching it.
async fn setup() -> (RegistryProc, AppInstance, SidecarProc) {
    let registry = RegistryProc::start("registry", &[]).await;
    let backend = AppInstance::start(&registry.url(), SERVICE, "real-1", &[], &[], WITHIN).await;
    let client = SidecarProc::start(
        "client-sidecar",
        &registry.url(),
        &strings(&["--upstream-service", SERVICE]),
        WITHIN,
    )
    .await;
    (registry, backend, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_refuses_its_own_admin_port_as_an_endpoint() {
    let _serial = SERIAL.lock().await;
    let (registry, _backend, client) = setup().await;
    register_raw(&registry.url(), "evil-admin", "127.0.0.1", client.admin.port()).await;
    let refused = wait_for("the admin port to be refused", WITHIN, || async {
        let n = metric(client.admin, "trellis_sidecar_endpoints_refused_total", "own_listener").await;
        (n >= 1.0).then_some(n)
    })
    .await;
    let names = load(client.outbound, SERVICE, 60).await;
    println!(
        "refused: {refused}; answers: {} from {:?}",
        names.len(),
        names.iter().collect::<std::collections::BTreeSet<_>>()
    );
    assert!(names.iter().all(|n| n == "real-1"), "a request went elsewhere than the real backend: {names:?}");
    assert_eq!(metric(client.admin, "trellis_sidecar_endpoints_refused_total", "own_listener").await, 1.0);
    let listed = trellis_tests::admin::endpoint_list(client.admin, SERVICE).await;
    assert_eq!(listed.len(), 1, "only the real backend is an endpoint: {listed:?}");
    // The admin listener answers its own routes only; a proxied request would have been a 404 there.
    let log = client.proc.log_text();
    assert_eq!(log.matches("refusing an endpoint").count(), 1, "logged once:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_never_connects_to_link_local_endpoints() {
    let _serial = SERIAL.lock().await;
    let (registry, _backend, client) = setup().await;
    register_raw(&registry.url(), "metadata", "169.254.169.254", 80).await;
    wait_for("the link-local endpoint to be refused", WITHIN, || async {
        let n = metric(client.admin, "trellis_sidecar_endpoints_refused_total", "link_local").await;
        (n >= 1.0).then_some(())
    })
    .await;
    let names = load(client.outbound, SERVICE, 60).await;
    assert!(names.iter().all(|n| n == "real-1"), "{names:?}");
    assert_eq!(metric(client.admin, "trellis_sidecar_endpoints_refused_total", "link_local").await, 1.0);
    let failed = metric(client.admin, "trellis_sidecar_proxy_errors_total", "").await;
    let retries = metric(client.admin, "trellis_sidecar_retries_total", "").await;
    println!("60 requests: {failed} proxy errors, {retries} retries");
    assert_eq!((failed, retries), (0.0, 0.0), "an attempt went to the link-local address");
}

/// A backend answering `{"instance": NAME}` and counting its requests.
async fn backend(name: &'static str) -> (SocketAddr, Arc<AtomicU64>) {
    let hits = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&hits);
    let addr = serve(move |_req| {
        counted.fetch_add(1, Ordering::Relaxed);
        full(format!(r#"{{"instance":"{name}"}}"#))
    })
    .await;
    (addr, hits)
}

type Body =
    Either<Full<Bytes>, StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>>;

fn full(s: String) -> Response<Body> {
    let mut resp = Response::new(Either::Left(Full::new(Bytes::from(s))));
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    resp
}

/// `n` bytes sent chunked (no Content-Length), so only a streaming cap stops them.
fn chunked(n: usize) -> Response<Body> {
    let chunk = Bytes::from(vec![b' '; 1 << 20]);
    let frames: Vec<_> = (0..n.div_ceil(1 << 20)).map(|_| Ok(Frame::data(chunk.clone()))).collect();
    Response::new(Either::Right(StreamBody::new(stream::iter(frames))))
}

/// Serves `answer` for every request on a loopback port of its own.
async fn serve<F>(answer: F) -> SocketAddr
where
    F: Fn(&Request<hyper::body::Incoming>) -> Response<Body> + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = Arc::clone(&answer);
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let resp = answer(&req);
                    async move {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

fn view(service: &str, index: u64, backend: SocketAddr, id: &str) -> String {
    serde_json::json!({
        "service": service, "index": index, "epoch": "fake",
        "instances": [{"id": id, "address": "127.0.0.1", "port": backend.port(), "weight": 100, "status": "passing"}],
    })
    .to_string()
}

/// Sends requests through `client` until `done` holds, asserting each succeeds
/// and was answered by `expected`.
async fn load_until(client: &SidecarProc, expected: &str, done: impl Fn() -> bool) -> usize {
    let mut sent = 0;
    let deadline = tokio::time::Instant::now() + WITHIN;
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "the fake registry was not asked again in time");
        let names = load(client.outbound, SERVICE, 10).await;
        assert!(names.iter().all(|n| n == expected), "{names:?}");
        sent += names.len();
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_keeps_the_last_good_endpoints() {
    let _serial = SERIAL.lock().await;
    let (good, _) = backend("good").await;
    let big = Arc::new(AtomicU64::new(0));
    let asked = Arc::new(AtomicU64::new(0));
    let (big_in, asked_in) = (Arc::clone(&big), Arc::clone(&asked));
    const SEVENTEEN_MIB: usize = 17 << 20;
    let registry = serve(move |req| {
        let n = asked_in.fetch_add(1, Ordering::Relaxed);
        if !req.uri().path().starts_with("/v1/services/") {
            return full(r#"{"error":"not_found","message":"fake"}"#.into());
        }
        if n == 0 {
            return full(view(SERVICE, 1, good, "good"));
        }
        // Then 17 MiB, declared (Content-Length) and undeclared (chunked) in turn.
        let k = big_in.fetch_add(1, Ordering::Relaxed);
        if k % 2 == 0 {
            full(" ".repeat(SEVENTEEN_MIB))
        } else {
            chunked(SEVENTEEN_MIB)
        }
    })
    .await;
    let client = SidecarProc::start(
        "client-sidecar",
        &format!("http://{registry}"),
        &strings(&["--upstream-service", SERVICE, "--heartbeat-interval", "200ms", "--ttl", "2s"]),
        WITHIN,
    )
    .await;
    let sent = load_until(&client, "good", || big.load(Ordering::Relaxed) >= 4).await;
    let errors = metric(client.admin, "trellis_sidecar_registry_errors_total", "").await;
    println!("{sent} requests, all answered by the last good endpoint; {} oversized answers; {errors} registry errors", big.load(Ordering::Relaxed));
    assert!(errors >= 1.0, "the oversized answers were not counted as registry errors");
    let log = client.proc.log_text();
    assert!(log.contains("larger than the 16777216-byte limit"), "no size error in the log:\n{log}");
    assert_eq!(trellis_tests::admin::endpoint_list(client.admin, SERVICE).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_of_another_service_is_rejected() {
    let _serial = SERIAL.lock().await;
    let (good, _) = backend("good").await;
    let (other, other_hits) = backend("other").await;
    let asked = Arc::new(AtomicU64::new(0));
    let asked_in = Arc::clone(&asked);
    let registry = serve(move |_req| {
        let n = asked_in.fetch_add(1, Ordering::Relaxed);
        if n == 0 {
            full(view(SERVICE, 1, good, "good"))
        } else {
            // A later answer claims to be another service's, with another endpoint.
            full(view("billing", n + 1, other, "other"))
        }
    })
    .await;
    let client = SidecarProc::start(
        "client-sidecar",
        &format!("http://{registry}"),
        &strings(&["--upstream-service", SERVICE, "--heartbeat-interval", "200ms", "--ttl", "2s"]),
        WITHIN,
    )
    .await;
    let sent = load_until(&client, "good", || asked.load(Ordering::Relaxed) >= 4).await;
    println!("{sent} requests, {} registry answers", asked.load(Ordering::Relaxed));
    assert_eq!(other_hits.load(Ordering::Relaxed), 0, "the other service's endpoint was used");
    let log = client.proc.log_text();
    assert!(log.contains("got a view of"), "no protocol error in the log:\n{log}");
}
