//! HTTP/2 towards endpoints (the real `proxy::serve`, in process): an
//! instance registered with `protocol=h2c` is reached over HTTP/2 even by an
//! HTTP/1.1 caller, over one multiplexed connection; an HTTP/2 caller's
//! request goes upstream over HTTP/2 with its trailers passed through both ways.

mod proxy_support;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use trellis_shared::{Address, InstanceId, ServiceName};
use trellis_sidecar::endpoints::{Endpoint, EndpointSet, ServiceEndpoints};

use proxy_support::FixedResolver;

type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// An HTTP/2-only backend: answers the request's version, its `x-sum`
/// request trailer, and the body length, with a response trailer `x-done: yes`.
/// Counts connections.
async fn h2_only_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conns);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            c.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                    let version = format!("{:?}", req.version());
                    let collected = req.into_body().collect().await.unwrap();
                    let sum = collected
                        .trailers()
                        .and_then(|t| t.get("x-sum"))
                        .map(|v| v.to_str().unwrap_or("").to_string())
                        .unwrap_or_default();
                    let len = collected.to_bytes().len();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("x-done", "yes".parse().unwrap());
                    let frames: Vec<Result<Frame<Bytes>, Infallible>> = vec![
                        Ok(Frame::data(Bytes::from(format!("{version} sum={sum} len={len}")))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let body: Body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
                    Ok::<_, Infallible>(http::Response::new(body))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, conns)
}

fn h2c_service(name: &str, addr: SocketAddr) -> Arc<ServiceEndpoints> {
    let svc = Arc::new(ServiceEndpoints::new(ServiceName::new(name).unwrap()));
    let metadata = BTreeMap::from([("protocol".to_string(), "h2c".to_string())]);
    let ep = Endpoint::new(
        InstanceId::new(format!("{name}-0")).unwrap(),
        Address::new(addr.ip().to_string()).unwrap(),
        addr.port(),
        100,
        None,
        metadata,
        Arc::default(),
    );
    svc.publish(EndpointSet {
        endpoints: vec![Arc::new(ep)],
        index: 1,
        epoch: "test".into(),
        health_panic: false,
    });
    svc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_instance_is_reached_over_http2_even_by_http1_callers() {
    let (addr, conns) = h2_only_backend().await;
    let proxy = proxy_support::start_proxy(
        FixedResolver::default().with(h2c_service("h2svc", addr)),
        proxy_support::config(),
    )
    .await;
    let client = proxy_support::client();
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let client = client.clone();
        let p = proxy.addr;
        set.spawn(async move {
            proxy_support::call(&client, p, "POST", "h2svc", Bytes::from_static(b"hello")).await
        });
    }
    while let Some(a) = set.join_next().await {
        let a = a.unwrap();
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(a.body, "HTTP/2.0 sum= len=5");
    }
    let n = conns.load(Ordering::SeqCst);
    println!("20 concurrent HTTP/1.1 calls reached the h2c instance over {n} connection(s)");
    assert_eq!(n, 1, "one multiplexed connection per endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_callers_get_http2_upstream_with_trailers_both_ways() {
    let (addr, _conns) = h2_only_backend().await;
    // No protocol metadata: HTTP/2 is chosen because the caller used it.
    let svc = proxy_support::service("plain", &[addr]);
    let proxy = proxy_support::start_proxy(FixedResolver::default().with(svc), proxy_support::config()).await;
    // A connection to the proxy whose requests carry `:authority: plain`.
    let tcp = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake::<_, _, Body>(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req_trailers = http::HeaderMap::new();
    req_trailers.insert("x-sum", "42".parse().unwrap());
    let frames: Vec<Result<Frame<Bytes>, Infallible>> =
        vec![Ok(Frame::data(Bytes::from_static(b"abc"))), Ok(Frame::trailers(req_trailers))];
    let req = http::Request::post("http://plain/x")
        .header("te", "trailers")
        .body(StreamBody::new(futures_util::stream::iter(frames)).boxed())
        .unwrap();
    let resp = sender.send_request(req).await.expect("the proxy answers");
    assert_eq!(resp.status(), 200);
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("response trailers passed through");
    assert_eq!(trailers["x-done"], "yes");
    let body = collected.to_bytes();
    println!("answer: {body:?}, trailers {trailers:?}");
    assert_eq!(body, "HTTP/2.0 sum=42 len=3", "request trailers reached the endpoint over HTTP/2");
}
