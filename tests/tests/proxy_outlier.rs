//! Passive outlier detection through the in-process proxy over loopback
//! sockets: growing ejections, the ejected-share bound, and
//! panic mode.

mod proxy_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use proxy_support::*;
use trellis_sidecar::outlier::OutlierConfig;
use trellis_sidecar::proxy::ProxyConfig;
use trellis_sidecar::retry::RetryConfig;

fn cfg(outlier: OutlierConfig) -> ProxyConfig {
    ProxyConfig {
        outlier,
        retry: RetryConfig { min_retries_per_second: 1000, ..RetryConfig::default() },
        ..ProxyConfig::default()
    }
}

#[tokio::test]
async fn ejection_grows_with_repeated_ejections() {
    let good = backend(|_| Reply::ok("ok")).await;
    let bad = backend(|_| Reply::status(503)).await;
    let svc = service("users", &[good.addr, bad.addr]);
    let base = Duration::from_millis(300);
    let outlier = OutlierConfig {
        consecutive_failures: 2,
        base_ejection: base,
        max_ejection: Duration::from_secs(30),
        max_ejected_percent: 50,
    };
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), cfg(outlier)).await;
    let client = client();
    // Steady traffic until the bad endpoint has been ejected four times.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while states(&svc)[1].1 < 4 {
        assert!(std::time::Instant::now() < deadline, "not ejected 4 times in 30s: {:?}", states(&svc));
        // GETs that hit the bad endpoint are retried on the good one.
        let r = call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // While ejected the bad endpoint sees nothing; each ejection ends with one
    // probe, which fails and ejects it for twice as long.
    let times = bad.times();
    // The first ejection starts at the second hit; every later hit is a probe.
    let gaps: Vec<Duration> = times[1..].windows(2).map(|w| w[1] - w[0]).collect();
    println!("bad endpoint hits: {}, gaps between them while ejected: {gaps:?}", times.len());
    assert_eq!(gaps.len(), 3, "three ejections ended with a probe: {gaps:?}");
    for (i, gap) in gaps.iter().enumerate() {
        let ejection = base * 2u32.pow(i as u32);
        assert!(*gap >= ejection, "ejection {} lasted {gap:?}, expected at least {ejection:?}", i + 1);
    }
    // 2 failures, then one failed probe per ejection.
    assert_eq!(times.len(), 2 + 3, "{times:?}");
    let m = proxy.metrics.encode();
    assert!(m.contains(r#"trellis_sidecar_ejections_total{service="users"} 4"#), "{m}");
}

#[tokio::test]
async fn ejected_share_is_bounded_but_one_can_always_be_ejected() {
    let outlier = OutlierConfig {
        consecutive_failures: 1,
        base_ejection: Duration::from_secs(60),
        max_ejection: Duration::from_secs(60),
        max_ejected_percent: 50,
    };
    let mut backends = Vec::new();
    for _ in 0..4 {
        backends.push(backend(|_| Reply::status(503)).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let svc = service("users", &addrs);
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), cfg(outlier.clone())).await;
    let client = client();
    for _ in 0..40 {
        assert_eq!(call(&client, proxy.addr, "GET", "users", Bytes::new()).await.status, 503);
    }
    let st = states(&svc);
    println!("4 failing endpoints, 50% bound: {st:?}");
    assert_eq!(st.iter().filter(|s| s.0 == "ejected").count(), 2, "{st:?}");
    // The two still active keep receiving traffic.
    let before: Vec<usize> = backends.iter().map(Backend::hits).collect();
    for _ in 0..10 {
        call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
    }
    for (i, b) in backends.iter().enumerate() {
        if st[i].0 == "ejected" {
            assert_eq!(b.hits(), before[i], "an ejected endpoint got traffic");
        }
    }

    // A bound below one endpoint still allows one ejection.
    let a = backend(|_| Reply::status(503)).await;
    let b = backend(|_| Reply::status(503)).await;
    let svc = service("users", &[a.addr, b.addr]);
    let outlier = OutlierConfig { max_ejected_percent: 10, ..outlier };
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), cfg(outlier)).await;
    for _ in 0..10 {
        call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
    }
    let st = states(&svc);
    println!("2 failing endpoints, 10% bound: {st:?}");
    assert_eq!(st.iter().filter(|s| s.0 == "ejected").count(), 1, "{st:?}");
}

#[tokio::test]
async fn panic_mode_serves_when_all_are_ejected() {
    let failing = Arc::new(AtomicBool::new(true));
    let mut backends = Vec::new();
    for _ in 0..3 {
        let f = Arc::clone(&failing);
        backends.push(
            backend(move |_| if f.load(Ordering::SeqCst) { Reply::status(503) } else { Reply::ok("ok") })
                .await,
        );
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let svc = service("users", &addrs);
    let outlier = OutlierConfig {
        consecutive_failures: 1,
        base_ejection: Duration::from_secs(60),
        max_ejection: Duration::from_secs(60),
        max_ejected_percent: 100,
    };
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), cfg(outlier)).await;
    let client = client();
    for _ in 0..10 {
        assert_eq!(call(&client, proxy.addr, "GET", "users", Bytes::new()).await.status, 503);
    }
    let st = states(&svc);
    assert!(st.iter().all(|s| s.0 == "ejected"), "{st:?}");
    // Everything is ejected for another minute, but the endpoints have recovered.
    failing.store(false, Ordering::SeqCst);
    let r = call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
    assert_eq!(r.status, 200, "panic mode tried an ejected endpoint");
    assert_eq!(r.body, "ok");
    // The endpoint that answered is active again; requests keep succeeding.
    let st = states(&svc);
    println!("after one successful panic-mode request: {st:?}");
    assert_eq!(st.iter().filter(|s| s.0 == "active").count(), 1, "{st:?}");
    for _ in 0..10 {
        assert_eq!(call(&client, proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
    }
}
