//! gRPC through the sidecar's proxy (the real `proxy::serve_all`, in process)
//! to tonic test servers: unary and server-streaming calls by `:authority` and
//! by a dedicated upstream port across three instances, `kill -9` of an
//! instance under unary calls, `REFUSED_STREAM` retried elsewhere, and
//! `grpc-timeout` bounding the call. The test servers are `grpc_support`'s.

mod grpc_support;
mod proxy_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use trellis_sidecar::metrics::Metrics;
use trellis_sidecar::proxy::{self, Listener};
use trellis_tests::{start_ready, wait_for, Launch};

use grpc_support::{call_path, grpc_server, serve_grpc, stream, unary};
use proxy_support::{service, FixedResolver};

/// Where a child server writes the address it bound.
const CHILD_READY_FILE: &str = "GRPC_CHILD_READY_FILE";

/// Not a test of its own: the body of the child processes that
/// `kill_9_of_an_instance_fails_only_calls_in_flight_on_it` kills.
#[test]
#[ignore = "run as a child process by kill_9_of_an_instance_fails_only_calls_in_flight_on_it"]
fn grpc_child_server() {
    let (Ok(ready), Ok(name)) = (std::env::var(CHILD_READY_FILE), std::env::var("GRPC_CHILD_NAME")) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let bound =
            std::collections::BTreeMap::from([("listen", listener.local_addr().unwrap().to_string())]);
        trellis_shared::ready_file::write(std::path::Path::new(&ready), &bound).unwrap();
        serve_grpc(name, listener, Arc::new(AtomicUsize::new(0))).await;
    });
}

// ---- The proxy and the client.

struct Sidecar {
    outbound: SocketAddr,
    dedicated: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The proxy with service `users` at `addrs`, on an outbound port and on a
/// dedicated port for `users`.
async fn sidecar(addrs: &[SocketAddr]) -> Sidecar {
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dedicated = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (o, d) = (outbound.local_addr().unwrap(), dedicated.local_addr().unwrap());
    let metrics = Arc::new(Metrics::new());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let listeners = vec![
        Listener { listener: outbound, service: None },
        Listener { listener: dedicated, service: Some("users".parse().unwrap()) },
    ];
    tokio::spawn(proxy::serve_all(
        listeners,
        Arc::new(FixedResolver::default().with(service("users", addrs))),
        proxy_support::config(),
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    Sidecar { outbound: o, dedicated: d, metrics, shutdown }
}

/// A tonic channel to `addr`; with `authority`, the calls carry that
/// `:authority` (the service name) while connecting to `addr`.
async fn channel(addr: SocketAddr, authority: Option<&str>) -> Channel {
    let mut ep = Endpoint::from_shared(format!("http://{addr}")).unwrap();
    if let Some(a) = authority {
        ep = ep.origin(format!("http://{a}").parse().unwrap());
    }
    ep.connect().await.expect("connect to the sidecar")
}

fn metric(metrics: &Metrics, line_prefix: &str) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_and_streaming_by_authority_and_by_dedicated_port_across_three_instances() {
    let servers = [grpc_server("u0").await, grpc_server("u1").await, grpc_server("u2").await];
    let addrs: Vec<SocketAddr> = servers.iter().map(|s| s.addr).collect();
    let sc = sidecar(&addrs).await;
    let by_authority = channel(sc.outbound, Some("users")).await;
    let by_port = channel(sc.dedicated, None).await;

    for (how, ch) in [("authority", &by_authority), ("dedicated port", &by_port)] {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        // Concurrent calls on one multiplexed connection, so least-connections spreads them.
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..60 {
            let ch = ch.clone();
            set.spawn(async move { unary(&ch, "5", None).await });
        }
        while let Some(r) = set.join_next().await {
            let name = r.unwrap().unwrap_or_else(|s| panic!("unary by {how} failed: {s:?}"));
            *seen.entry(name).or_default() += 1;
        }
        println!("unary by {how}: {seen:?}");
        assert_eq!(seen.len(), 3, "by {how}, every instance answers: {seen:?}");
        assert!(seen.values().all(|&n| n >= 5), "by {how}, spread: {seen:?}");

        let got = stream(ch, 5).await.unwrap_or_else(|s| panic!("stream by {how} failed: {s:?}"));
        assert_eq!(got.len(), 5, "{got:?}");
        let instance = got[0].split(':').next().unwrap().to_string();
        for (i, m) in got.iter().enumerate() {
            assert_eq!(m, &format!("{instance}:{i}"), "one instance streams every message in order");
        }
    }
    // A trailers-only error answer passes through with its status.
    let e = call_path(&by_authority, "/test.Echo/Nope").await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "{e:?}");

    let ok = metric(&sc.metrics, r#"trellis_sidecar_grpc_responses_total{service="users",code="0"}"#);
    let unimplemented =
        metric(&sc.metrics, r#"trellis_sidecar_grpc_responses_total{service="users",code="12"}"#);
    println!("grpc_responses: code 0 = {ok}, code 12 = {unimplemented}");
    assert_eq!(ok, 122, "120 unary calls and 2 streams counted from their trailers");
    assert_eq!(unimplemented, 1);
    let served: usize = servers.iter().map(|s| s.calls.load(Ordering::SeqCst)).sum();
    assert_eq!(served, 123, "no call was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_an_instance_fails_only_calls_in_flight_on_it() {
    if std::env::var("GRPC_TEST_TRACE").is_ok() {
        let _ = tracing_subscriber::fmt().with_env_filter("trellis_sidecar=debug").try_init();
    }
    let exe = std::env::current_exe().unwrap();
    let mut children = Vec::new();
    let mut addrs = Vec::new();
    for i in 0..3 {
        let args: Vec<String> =
            ["grpc_child_server", "--exact", "--ignored", "--nocapture", "--test-threads=1"]
                .map(String::from)
                .into();
        let launch = Launch::new(&format!("grpc-k{i}"), &exe)
            .args(&args)
            .env("GRPC_CHILD_NAME", format!("k{i}"))
            .ready_file_env(CHILD_READY_FILE);
        let (child, ready) = start_ready(launch).await;
        children.push(child);
        addrs.push(ready.addr("listen"));
    }
    let sc = sidecar(&addrs).await;
    let ch = channel(sc.outbound, Some("users")).await;

    // (started, ended, answer) of every call.
    type Record = (Instant, Instant, Result<String, Status>);
    let records: Arc<Mutex<Vec<Record>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = tokio::task::JoinSet::new();
    const WORKERS: usize = 6;
    for _ in 0..WORKERS {
        let (ch, records, stop) = (ch.clone(), Arc::clone(&records), Arc::clone(&stop));
        workers.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let r = unary(&ch, "20", None).await;
                records.lock().unwrap().push((started, Instant::now(), r));
            }
        });
    }
    wait_for("calls flow", Duration::from_secs(20), || {
        let n = records.lock().unwrap().len();
        async move { (n >= 150).then_some(()) }
    })
    .await;
    let kill_started = Instant::now();
    children[1].kill9();
    let killed = Instant::now();
    let before = records.lock().unwrap().len();
    wait_for("calls after the kill", Duration::from_secs(30), || {
        let n = records.lock().unwrap().len();
        async move { (n >= before + 300).then_some(()) }
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    while workers.join_next().await.is_some() {}

    let records = records.lock().unwrap();
    let failed: Vec<&Record> = records.iter().filter(|r| r.2.is_err()).collect();
    let after: Vec<&Record> = records.iter().filter(|r| r.0 > killed).collect();
    println!(
        "{} calls, {} failed ({:?}), {} started after the kill (kill took {:?})",
        records.len(),
        failed.len(),
        failed.iter().map(|r| r.2.as_ref().unwrap_err().code()).collect::<Vec<_>>(),
        after.len(),
        killed - kill_started
    );
    for r in &failed {
        println!(
            "failed: started {:?} after the kill, ended {:?} after",
            r.0.checked_duration_since(killed),
            r.1.checked_duration_since(killed)
        );
    }
    for r in &failed {
        assert!(r.0 <= killed && r.1 >= kill_started, "a failed call was in flight at the kill: {:?}", r.2);
    }
    assert!(failed.len() <= WORKERS, "at most the calls in flight failed");
    assert!(after.len() >= 300);
    for r in &after {
        let name = r.2.as_ref().unwrap_or_else(|s| panic!("a call started after the kill failed: {s:?}"));
        assert_ne!(name, "k1", "the killed instance answered after its death");
    }
}

/// An HTTP/2 server that refuses every stream (`REFUSED_STREAM`), as an
/// overloaded server past its concurrent-stream limit does.
async fn refusing_server() -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused = Arc::new(AtomicUsize::new(0));
    let r = Arc::clone(&refused);
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let r = Arc::clone(&r);
            tokio::spawn(async move {
                let Ok(mut conn) =
                    h2::server::Builder::new().max_concurrent_streams(1).handshake::<_, Bytes>(stream).await
                else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    r.fetch_add(1, Ordering::SeqCst);
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                }
            });
        }
    });
    (addr, refused, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_is_retried_on_another_endpoint() {
    let good = grpc_server("good").await;
    let (bad, refused, task) = refusing_server().await;
    let sc = sidecar(&[bad, good.addr]).await;
    let ch = channel(sc.outbound, Some("users")).await;
    for i in 0..20 {
        let name = unary(&ch, "0", None).await.unwrap_or_else(|s| panic!("call {i} failed: {s:?}"));
        assert_eq!(name, "good");
    }
    let refused = refused.load(Ordering::SeqCst);
    let retries = metric(&sc.metrics, r#"trellis_sidecar_retries_total{service="users"}"#);
    println!(
        "refused streams: {refused}, retries: {retries}, good served {}",
        good.calls.load(Ordering::SeqCst)
    );
    assert!(refused >= 1, "the overloaded server was tried");
    assert_eq!(retries as usize, refused, "every refused stream was retried");
    assert_eq!(good.calls.load(Ordering::SeqCst), 20, "each call reached the good server exactly once");
    task.abort();
}

/// tonic's client gives up at its own deadline too, so the call is sent by
/// hand to see the sidecar's answer: a trailers-only `DEADLINE_EXCEEDED`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_bounds_the_call() {
    let slow = grpc_server("slow").await;
    let sc = sidecar(&[slow.addr]).await;
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<http_body_util::Full<Bytes>>();
    // One gRPC message: uncompressed, 4 bytes, "5000" (ms the server sleeps).
    let mut frame = vec![0u8, 0, 0, 0, 4];
    frame.extend_from_slice(b"5000");
    let req = http::Request::post(format!("http://{}/test.Echo/Unary", sc.dedicated))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", "300m")
        .body(http_body_util::Full::new(Bytes::from(frame)))
        .unwrap();
    let started = Instant::now();
    let resp = client.request(req).await.expect("the sidecar answers");
    let took = started.elapsed();
    println!("grpc-timeout 300ms against a 5s call: {:?} after {took:?}", resp.headers());
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["grpc-status"], "4", "DEADLINE_EXCEEDED");
    assert_eq!(resp.headers()["x-trellis-error"], "timeout");
    assert!(took < Duration::from_secs(3), "answered long before the 5s call ended: {took:?}");
    assert!(took >= Duration::from_millis(250), "not before the deadline: {took:?}");
    assert_eq!(metric(&sc.metrics, r#"trellis_sidecar_proxy_errors_total{code="timeout"}"#), 1);
}
