//! Latency the in-process proxy adds to a sequential HTTP/1.1 keep-alive GET,
//! compared with calling the backend directly. A measurement, not a gate:
//! ignored by default, meaningful only in release builds:
//! `cargo test --release -p trellis-tests --test proxy_latency -- --ignored --nocapture`

mod proxy_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_support::*;
use trellis_sidecar::proxy::ProxyConfig;

async fn measure(client: &TestClient, target: SocketAddr, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let r = call(client, target, "GET", "users", Bytes::new()).await;
        out.push(started.elapsed());
        assert_eq!(r.status, 200);
    }
    out.sort();
    out
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p) as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run in release with --ignored --nocapture"]
async fn added_latency_of_a_keep_alive_get() {
    let b = backend(|_| Reply::ok("hello")).await;
    let proxy =
        start_proxy(FixedResolver::default().with(service("users", &[b.addr])), ProxyConfig::default()).await;
    let client = client();
    let n = 20_000;
    // Warm up pools and caches.
    measure(&client, b.addr, 1000).await;
    measure(&client, proxy.addr, 1000).await;
    let direct = measure(&client, b.addr, n).await;
    let proxied = measure(&client, proxy.addr, n).await;
    for (p, name) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99")] {
        let (d, x) = (pct(&direct, p), pct(&proxied, p));
        println!("{name}: direct {d:?}, through the proxy {x:?}, added {:?}", x.saturating_sub(d));
    }
}
