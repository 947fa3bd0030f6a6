//! The outbound proxy in-process over loopback sockets: routing by Host and
//! absolute-form URI, streaming bodies, headers, least-connections, bad input
//! (the in-process side of the end-to-end tests), limits and graceful shutdown.

mod proxy_support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::Request;
use proxy_support::*;

#[tokio::test]
async fn routes_by_host_and_absolute_uri_and_keeps_end_to_end_headers() {
    let a = backend(|s| Reply::ok(format!("a:{}", s.body.len()))).await;
    let b = backend(|s| Reply::ok(format!("b:{}", s.body.len()))).await;
    let other = backend(|_| Reply::ok("other")).await;
    let users = service("users", &[a.addr, b.addr]);
    let resolver = FixedResolver::default().with(users.clone()).with(service("orders", &[other.addr]));
    let proxy = start_proxy(resolver, config()).await;
    let client = client();

    for _ in 0..20 {
        let r = call(&client, proxy.addr, "GET", "users:15001", Bytes::new()).await;
        assert_eq!(r.status, 200);
        assert!(r.body.starts_with(b"a:") || r.body.starts_with(b"b:"));
    }
    assert_eq!(a.hits() + b.hits(), 20);
    assert!(a.hits() > 0 && b.hits() > 0, "both endpoints used: a={} b={}", a.hits(), b.hits());

    // Absolute form, as a client with HTTP_PROXY sends it.
    let req = Request::builder()
        .uri("http://orders/x")
        .header("host", "orders")
        .header("x-request-id", "req-1")
        .header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .header("connection", "x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .body(Full::new(Bytes::new()))
        .unwrap();
    // The test client talks to the proxy, not to "orders".
    let mut req = req;
    *req.uri_mut() = format!("http://{}/x", proxy.addr).parse().unwrap();
    let r = send(&client, req).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "other");
    let seen = other.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.headers["x-request-id"], "req-1");
    assert_eq!(seen.headers["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    assert_eq!(seen.headers["host"], "orders");
    assert!(seen.headers.get("x-hop").is_none(), "headers named in Connection are dropped");
    assert!(seen.headers.get("keep-alive").is_none());

    // A raw absolute-form request line.
    let text =
        raw(proxy.addr, b"GET http://orders/y HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.ends_with("other"), "{text}");
    // Absolute form without a Host header: the upstream still sees the service name.
    let text = raw(proxy.addr, b"GET http://orders:15001/z HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(other.seen.lock().unwrap().last().unwrap().headers["host"], "orders:15001");

    // In-flight counts fall once the responses are read.
    for e in users.load().endpoints.iter() {
        assert_eq!(e.state.in_flight(), 0);
    }
    let m = proxy.metrics.encode();
    assert!(m.contains(r#"trellis_sidecar_requests_total{service="users",class="2xx"} 20"#), "{m}");
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let echo = backend(|s| Reply::ok(s.body.clone())).await;
    let resolver = FixedResolver::default().with(service("echo", &[echo.addr]));
    // The body is far above the replay buffer: it must stream, not be refused.
    let cfg = trellis_sidecar::proxy::ProxyConfig { replay_buffer_bytes: 1024, ..config() };
    let proxy = start_proxy(resolver, cfg).await;
    let body: Bytes = (0..2_000_000u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>().into();
    let r = call(&client(), proxy.addr, "POST", "echo", body.clone()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body, "echoed body differs");
}

#[tokio::test]
async fn least_connections_sends_fewer_requests_to_a_slow_backend() {
    let fast = backend(|_| Reply::ok("fast")).await;
    let slow = backend(|_| Reply::ok("slow").delayed(Duration::from_millis(200))).await;
    let resolver = FixedResolver::default().with(service("users", &[fast.addr, slow.addr]));
    let proxy = start_proxy(resolver, config()).await;
    let client = client();
    let addr = proxy.addr;
    let failures = Arc::new(AtomicUsize::new(0));
    let f = Arc::clone(&failures);
    concurrently(8, move |_| {
        let client = client.clone();
        let f = Arc::clone(&f);
        async move {
            for _ in 0..50 {
                if call(&client, addr, "GET", "users", Bytes::new()).await.status != 200 {
                    f.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
    .await;
    let (fh, sh) = (fast.hits(), slow.hits());
    println!("least-connections: fast backend {fh} requests, slow backend {sh}");
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    assert_eq!(fh + sh, 400);
    assert!(sh * 4 < fh + sh, "slow backend got {sh} of {}", fh + sh);
}

#[tokio::test]
async fn bad_input_gets_documented_errors_and_the_proxy_keeps_serving() {
    let ok = backend(|_| Reply::ok("ok")).await;
    let pending = Arc::new(trellis_sidecar::endpoints::ServiceEndpoints::new(
        trellis_shared::ServiceName::new("pending").unwrap(),
    ));
    let resolver =
        FixedResolver::default().with(service("users", &[ok.addr])).with(service("empty", &[])).with(pending);
    let cfg = trellis_sidecar::proxy::ProxyConfig { discovery_wait: Duration::from_millis(200), ..config() };
    let proxy = start_proxy(resolver, cfg).await;
    let good = b"GET / HTTP/1.1\r\nHost: users\r\nConnection: close\r\n\r\n";

    let cases: Vec<(&str, Vec<u8>, &str, Option<&str>)> = vec![
        ("no Host", b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n".to_vec(), "400", Some("bad_request")),
        (
            "invalid Host",
            b"GET / HTTP/1.1\r\nHost: Not_A_Service!\r\nConnection: close\r\n\r\n".to_vec(),
            "400",
            Some("bad_request"),
        ),
        (
            "dotted Host",
            b"GET / HTTP/1.1\r\nHost: a.b.c\r\nConnection: close\r\n\r\n".to_vec(),
            "400",
            Some("bad_request"),
        ),
        (
            "CONNECT",
            b"CONNECT users:443 HTTP/1.1\r\nHost: users:443\r\n\r\n".to_vec(),
            "400",
            Some("bad_request"),
        ),
        ("malformed request line", b"GARBAGE\r\n\r\n".to_vec(), "400", None),
        (
            "unknown service",
            b"GET / HTTP/1.1\r\nHost: nobody\r\nConnection: close\r\n\r\n".to_vec(),
            "503",
            Some("overloaded"),
        ),
        (
            "no endpoints",
            b"GET / HTTP/1.1\r\nHost: empty\r\nConnection: close\r\n\r\n".to_vec(),
            "503",
            Some("no_endpoints"),
        ),
        (
            "never resolved",
            b"GET / HTTP/1.1\r\nHost: pending\r\nConnection: close\r\n\r\n".to_vec(),
            "503",
            Some("no_endpoints"),
        ),
    ];
    let mut oversized = b"GET / HTTP/1.1\r\nHost: users\r\nX-Big: ".to_vec();
    oversized.extend(std::iter::repeat_n(b'a', 100 * 1024));
    oversized.extend_from_slice(b"\r\n\r\n");
    let mut cases = cases;
    cases.push(("oversized headers", oversized, "431", None));

    for (what, input, status, code) in cases {
        let text = raw(proxy.addr, &input).await;
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{what}: {text}");
        if let Some(code) = code {
            assert!(text.contains(&format!("x-trellis-error: {code}")), "{what}: {text}");
            assert!(text.contains(&format!("\"error\":\"{code}\"")), "{what}: {text}");
        }
        let after = raw(proxy.addr, good).await;
        assert!(after.starts_with("HTTP/1.1 200"), "after {what}: {after}");
    }

    // Thousands of distinct Host names on one keep-alive connection.
    let client = client();
    for i in 0..2000 {
        let r = call(&client, proxy.addr, "GET", &format!("svc-{i}"), Bytes::new()).await;
        assert_eq!(r.status, 503);
    }
    assert_eq!(call(&client, proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
    let m = proxy.metrics.encode();
    assert!(m.contains(r#"trellis_sidecar_proxy_errors_total{code="bad_request"} 4"#), "{m}");
    assert!(!m.contains("svc-1"), "unknown services create no label sets");
}

#[tokio::test]
async fn pending_request_limit_answers_overloaded() {
    let slow = backend(|_| Reply::ok("slow").delayed(Duration::from_secs(2))).await;
    let resolver = FixedResolver::default().with(service("users", &[slow.addr]));
    let cfg = trellis_sidecar::proxy::ProxyConfig { max_pending_requests: 2, ..config() };
    let proxy = start_proxy(resolver, cfg).await;
    let client = client();
    let codes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, addr) = (Arc::clone(&codes), proxy.addr);
    concurrently(6, move |_| {
        let client = client.clone();
        let c = Arc::clone(&c);
        async move {
            let r = call(&client, addr, "GET", "users", Bytes::new()).await;
            c.lock().unwrap().push((r.status, r.error_code().map(str::to_string)));
        }
    })
    .await;
    let codes = codes.lock().unwrap();
    let ok = codes.iter().filter(|(s, _)| *s == 200).count();
    let overloaded = codes.iter().filter(|(s, c)| *s == 503 && c.as_deref() == Some("overloaded")).count();
    println!("pending limit 2, 6 concurrent: {ok} served, {overloaded} overloaded");
    assert_eq!(ok + overloaded, 6);
    assert!((1..=2).contains(&ok), "{codes:?}");
}

#[tokio::test]
async fn connection_limit_answers_overloaded() {
    let ok = backend(|_| Reply::ok("ok")).await;
    let resolver = FixedResolver::default().with(service("users", &[ok.addr]));
    let cfg = trellis_sidecar::proxy::ProxyConfig { max_connections: 1, ..config() };
    let proxy = start_proxy(resolver, cfg).await;
    // Hold the only connection open (idle keep-alive after one request).
    let get = b"GET / HTTP/1.1\r\nHost: users\r\n\r\n";
    let mut held = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let text = raw_on(&mut held, get).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let text = raw(proxy.addr, get).await;
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(text.contains("x-trellis-error: overloaded"), "{text}");
    // The held connection still works.
    let text = raw_on(&mut held, get).await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_returns() {
    let slow = backend(|_| Reply::ok("done").delayed(Duration::from_millis(300))).await;
    let resolver = FixedResolver::default().with(service("users", &[slow.addr]));
    let mut proxy = start_proxy(resolver, config()).await;
    let client = client();
    let addr = proxy.addr;
    let req = tokio::spawn(async move { call(&client, addr, "GET", "users", Bytes::new()).await });
    wait_for_hits(&slow, 1).await;
    let started = Instant::now();
    proxy.shutdown.cancel();
    let r = req.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body, "done");
    let task = proxy.task.take().unwrap();
    tokio::time::timeout(Duration::from_secs(5), task).await.expect("serve returns").unwrap().unwrap();
    println!("serve returned {:?} after shutdown", started.elapsed());
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

async fn wait_for_hits(b: &Backend, n: usize) {
    trellis_tests::wait_for("backend hits", Duration::from_secs(5), || async {
        (b.hits() >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn in_flight_count_falls_when_the_response_body_ends() {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio::sync::mpsc;

    // A backend whose response body the test feeds chunk by chunk.
    let (tx, rx) = mpsc::channel::<Bytes>(4);
    let rx = Arc::new(tokio::sync::Mutex::new(Some(rx)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let svc = hyper::service::service_fn(move |_req| {
            let rx = Arc::clone(&rx);
            async move {
                let rx = rx.lock().await.take().unwrap();
                let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                    rx.recv().await.map(|b| (Ok::<_, std::convert::Infallible>(Frame::data(b)), rx))
                });
                Ok::<_, std::convert::Infallible>(hyper::Response::new(StreamBody::new(stream)))
            }
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
            .await;
    });
    let svc = service("stream", &[addr]);
    let proxy = start_proxy(FixedResolver::default().with(svc.clone()), config()).await;
    let client = client();
    let req = Request::builder()
        .uri(format!("http://{}/", proxy.addr))
        .header("host", "stream")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ep = Arc::clone(&svc.load().endpoints[0]);
    // Headers arrived, the body has not ended: still in flight.
    assert_eq!(ep.state.in_flight(), 1);
    let mut body = resp.into_body();
    tx.send(Bytes::from_static(b"first")).await.unwrap();
    let f = body.frame().await.unwrap().unwrap();
    assert_eq!(f.into_data().unwrap(), "first");
    assert_eq!(ep.state.in_flight(), 1);
    drop(tx);
    assert!(body.frame().await.is_none());
    trellis_tests::wait_for("in-flight count to fall", Duration::from_secs(5), || async {
        (ep.state.in_flight() == 0).then_some(())
    })
    .await;
    server.abort();
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_port() {
    let b = backend(|s| Reply::ok(format!("host={}", s.headers["host"].to_str().unwrap()))).await;
    let proxy = start_proxy(FixedResolver::default().with(service("users", &[b.addr])), config()).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        // The target comes from :authority; the HTTP/1.1 upstream gets it as Host.
        let req = Request::builder().uri("http://users/x").body(Full::new(Bytes::new())).unwrap();
        let resp = h2.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = http_body_util::BodyExt::collect(resp.into_body()).await.unwrap().to_bytes();
        assert_eq!(body, "host=users");
    }
}

#[tokio::test]
async fn silent_and_slow_connections_are_closed_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ok = backend(|_| Reply::ok("ok")).await;
    let cfg =
        trellis_sidecar::proxy::ProxyConfig { header_read_timeout: Duration::from_millis(200), ..config() };
    let proxy = start_proxy(FixedResolver::default().with(service("users", &[ok.addr])), cfg).await;
    for opening in [&b""[..], b"P", b"GET / HTTP/1.1\r\nHost: us"] {
        let started = Instant::now();
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(opening).await.unwrap();
        let mut buf = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
        println!("opening {:?}: closed after {:?}", String::from_utf8_lossy(opening), started.elapsed());
        assert!(closed.is_ok(), "opening {opening:?} kept the connection open");
    }
}
