//! Retries through the in-process proxy over loopback sockets: what is retried and what never is, the budget, the attempt cap and
//! the timeouts.

mod proxy_support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proxy_support::*;
use trellis_sidecar::proxy::ProxyConfig;
use trellis_sidecar::retry::RetryConfig;

fn generous_budget() -> RetryConfig {
    RetryConfig { min_retries_per_second: 1000, ..RetryConfig::default() }
}

#[tokio::test]
async fn post_reset_after_its_body_was_sent_is_not_retried() {
    let (reset_addr, count, _task) = resetting_backend().await;
    let good = backend(|_| Reply::ok("ok")).await;
    // Only the resetting endpoint first, so the POST surely reaches it.
    let svc = service("users", &[reset_addr]);
    let proxy = start_proxy(FixedResolver::default().with(svc), ProxyConfig::default()).await;
    let client = client();
    let r = call(&client, proxy.addr, "POST", "users", Bytes::from_static(b"charge 10 euros")).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    assert_eq!(r.error_code(), Some("upstream_failed"));
    assert_eq!(count.load(Ordering::SeqCst), 1, "the backend saw the POST exactly once");

    // With a healthy endpoint next to it, a reset POST is still not re-sent
    // elsewhere: whichever endpoint it reached first is the only one.
    let svc = service("users", &[reset_addr, good.addr]);
    let proxy = start_proxy(FixedResolver::default().with(svc), ProxyConfig::default()).await;
    let mut failed = 0;
    for _ in 0..20 {
        let before = count.load(Ordering::SeqCst);
        let good_before = good.hits();
        let r = call(&client, proxy.addr, "POST", "users", Bytes::from_static(b"charge")).await;
        let (resets, goods) = (count.load(Ordering::SeqCst) - before, good.hits() - good_before);
        assert_eq!(resets + goods, 1, "each POST reached exactly one endpoint once");
        if resets == 1 {
            assert_eq!(r.status, 502);
            failed += 1;
        } else {
            assert_eq!(r.status, 200);
        }
    }
    println!("{failed} of 20 POSTs reached the resetting endpoint and failed without retry");

    // A GET reset the same way is retried on the other endpoint.
    let svc = service("users", &[reset_addr, good.addr]);
    let cfg = ProxyConfig { retry: generous_budget(), ..ProxyConfig::default() };
    let proxy = start_proxy(FixedResolver::default().with(svc), cfg).await;
    for _ in 0..20 {
        assert_eq!(call(&client, proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
    }
}

#[tokio::test]
async fn post_that_could_not_connect_is_retried_and_succeeds() {
    let echo = backend(|s| Reply::ok(s.body.clone())).await;
    let svc = service("users", &[refused_addr(), echo.addr]);
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), ProxyConfig::default()).await;
    let client = client();
    for i in 0..30 {
        let body = Bytes::from(format!("order {i}"));
        let r = call(&client, proxy.addr, "POST", "users", body.clone()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, body);
    }
    assert_eq!(echo.hits(), 30);
    // The refusing endpoint was ejected at once, on its first refusal.
    let st = states(&svc);
    assert_eq!(st[0], ("ejected", 1), "{st:?}");
    let m = proxy.metrics.encode();
    assert!(m.contains(r#"trellis_sidecar_ejections_total{service="users"} 1"#), "{m}");
}

#[tokio::test]
async fn budget_refuses_retries_when_everything_fails() {
    let backends = [
        backend(|_| Reply::status(503)).await,
        backend(|_| Reply::status(503)).await,
        backend(|_| Reply::status(503)).await,
    ];
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let cfg = ProxyConfig {
        max_attempts: 3,
        retry: RetryConfig {
            budget_ratio: 0.2,
            min_retries_per_second: 0,
            backoff_base: Duration::from_millis(1),
            backoff_cap: Duration::from_millis(2),
            ..RetryConfig::default()
        },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy(FixedResolver::default().with(service("users", &addrs)), cfg).await;
    let client = client();
    let n = 300;
    for _ in 0..n {
        let r = call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
        // The upstream's own 503 is relayed, not replaced by a sidecar error.
        assert_eq!(r.status, 503);
        assert_eq!(r.error_code(), None);
    }
    let attempts: usize = backends.iter().map(Backend::hits).sum();
    let ratio = attempts as f64 / n as f64;
    println!("budget 20%: {n} requests made {attempts} attempts ({ratio:.3} per request; no budget would give 3.0)");
    assert!(attempts > n, "some retries were allowed");
    assert!(attempts <= n + n / 5 + 2, "{attempts} attempts for {n} requests");
    let m = proxy.metrics.encode();
    assert!(m.contains("trellis_sidecar_retries_refused_by_budget_total{service=\"users\"}"), "{m}");
}

#[tokio::test]
async fn max_attempts_holds_and_retries_go_to_untried_endpoints() {
    let mut backends = Vec::new();
    for _ in 0..5 {
        backends.push(backend(|_| Reply::status(502)).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let cfg = ProxyConfig {
        max_attempts: 3,
        retry: generous_budget(),
        outlier: trellis_sidecar::outlier::OutlierConfig { consecutive_failures: 100, ..Default::default() },
        ..ProxyConfig::default()
    };
    let proxy = start_proxy(FixedResolver::default().with(service("users", &addrs)), cfg).await;
    let client = client();
    for round in 1..=4 {
        let r = call(&client, proxy.addr, "PUT", "users", Bytes::from_static(b"x")).await;
        assert_eq!(r.status, 502);
        let total: usize = backends.iter().map(Backend::hits).sum();
        assert_eq!(total, 3 * round, "exactly max_attempts attempts per request");
        if round == 1 {
            // Retries went to endpoints not tried yet.
            assert_eq!(backends.iter().filter(|b| b.hits() == 1).count(), 3);
        }
    }
    // And each PUT body was replayed whole.
    for b in &backends {
        for s in b.seen.lock().unwrap().iter() {
            assert_eq!(s.body, "x");
            assert_eq!(s.method, "PUT");
        }
    }
}

#[tokio::test]
async fn overall_timeout_answers_504() {
    let slow = backend(|_| Reply::ok("late").delayed(Duration::from_secs(10))).await;
    let cfg = ProxyConfig { overall_timeout: Duration::from_millis(300), ..ProxyConfig::default() };
    let proxy = start_proxy(FixedResolver::default().with(service("users", &[slow.addr])), cfg).await;
    let started = Instant::now();
    let r = call(&client(), proxy.addr, "GET", "users", Bytes::new()).await;
    let took = started.elapsed();
    println!("overall timeout 300ms answered 504 after {took:?}");
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), Some("timeout"));
    assert!(took >= Duration::from_millis(300));
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test]
async fn per_try_timeout_retries_an_idempotent_request_elsewhere() {
    let slow = backend(|_| Reply::ok("slow").delayed(Duration::from_secs(10))).await;
    let fast = backend(|_| Reply::ok("fast")).await;
    let cfg = ProxyConfig {
        per_try_timeout: Duration::from_millis(200),
        retry: generous_budget(),
        ..ProxyConfig::default()
    };
    let proxy =
        start_proxy(FixedResolver::default().with(service("users", &[slow.addr, fast.addr])), cfg).await;
    let client = client();
    for _ in 0..5 {
        let started = Instant::now();
        let r = call(&client, proxy.addr, "GET", "users", Bytes::new()).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "fast");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    // A POST that timed out is not re-sent: it answers 504.
    let only_slow = service("users", &[slow.addr]);
    let cfg = ProxyConfig {
        per_try_timeout: Duration::from_millis(200),
        retry: generous_budget(),
        ..ProxyConfig::default()
    };
    let proxy = start_proxy(FixedResolver::default().with(only_slow), cfg).await;
    let before = slow.hits();
    let r = call(&client, proxy.addr, "POST", "users", Bytes::from_static(b"once")).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.error_code(), Some("timeout"));
    assert_eq!(slow.hits() - before, 1);
}

#[tokio::test]
async fn a_body_larger_than_the_replay_buffer_is_not_resent() {
    let (reset_addr, count, _task) = resetting_backend().await;
    let good = backend(|_| Reply::ok("ok")).await;
    let cfg = ProxyConfig { replay_buffer_bytes: 1024, retry: generous_budget(), ..ProxyConfig::default() };
    let proxy =
        start_proxy(FixedResolver::default().with(service("users", &[reset_addr])), cfg.clone()).await;
    let client = client();
    // PUT is idempotent, but 200 KB streamed past the 1 KB buffer cannot be replayed.
    let big = Bytes::from(vec![b'x'; 200 * 1024]);
    let r = call(&client, proxy.addr, "PUT", "users", big.clone()).await;
    assert_eq!(r.status, 502);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    // A small PUT is replayed on the healthy endpoint.
    let proxy =
        start_proxy(FixedResolver::default().with(service("users", &[reset_addr, good.addr])), cfg).await;
    for _ in 0..10 {
        let r = call(&client, proxy.addr, "PUT", "users", Bytes::from_static(b"small")).await;
        assert_eq!(r.status, 200);
    }
    for s in good.seen.lock().unwrap().iter() {
        assert_eq!(s.body, "small");
    }
}

#[tokio::test]
async fn a_client_abandoning_its_upload_does_not_count_against_the_endpoint() {
    let b = backend(|_| Reply::ok("ok")).await;
    let svc = service("users", &[b.addr]);
    let outlier = trellis_sidecar::outlier::OutlierConfig { consecutive_failures: 2, ..Default::default() };
    let proxy = start_proxy(
        FixedResolver::default().with(svc.clone()),
        ProxyConfig { outlier, ..ProxyConfig::default() },
    )
    .await;
    for _ in 0..5 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        use tokio::io::AsyncWriteExt;
        s.write_all(b"POST / HTTP/1.1\r\nHost: users\r\nContent-Length: 100000\r\n\r\nonly a little")
            .await
            .unwrap();
        // Wait until the proxy is streaming it upstream, then give up.
        trellis_tests::wait_for("the upload to reach the endpoint", Duration::from_secs(5), || async {
            (svc.load().endpoints[0].state.in_flight() == 1).then_some(())
        })
        .await;
        drop(s);
        trellis_tests::wait_for("the attempt to end", Duration::from_secs(5), || async {
            (svc.load().endpoints[0].state.in_flight() == 0).then_some(())
        })
        .await;
    }
    assert_eq!(states(&svc), vec![("active", 0)]);
    assert_eq!(call(&client(), proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
}

#[tokio::test]
async fn every_endpoint_refusing_answers_upstream_failed() {
    let svc = service("users", &[refused_addr(), refused_addr()]);
    let cfg = ProxyConfig { retry: generous_budget(), ..ProxyConfig::default() };
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), cfg).await;
    let r = call(&client(), proxy.addr, "POST", "users", Bytes::from_static(b"x")).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.error_code(), Some("upstream_failed"));
    let body: trellis_shared::ErrorBody = serde_json::from_slice(&r.body).unwrap();
    assert!(body.message.contains("3 attempts"), "{}", body.message);
    // Both refused: nothing listens, so both are ejected whatever the share
    // bound (50 % of 2), and the third attempt went out in panic mode.
    let st = states(&svc);
    assert_eq!(st.iter().filter(|s| s.0 == "ejected").count(), 2, "{st:?}");
}
