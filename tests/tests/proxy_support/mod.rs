//! In-process support for the proxy tests: the real `proxy::serve` on a
//! loopback port, a fixed `Resolve`, small hyper backends with programmable
//! answers, raw-socket clients and a client that never retries.

#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use trellis_shared::{Address, InstanceId, ServiceName};
use trellis_sidecar::endpoints::{Endpoint, EndpointSet, Resolve, ServiceEndpoints};
use trellis_sidecar::metrics::Metrics;
use trellis_sidecar::proxy::{self, ProxyConfig};

/// A fixed map of services; unknown names resolve to `None` (the proxy answers
/// `overloaded`, as when the directory's cap is reached).
#[derive(Default)]
pub struct FixedResolver {
    services: HashMap<ServiceName, Arc<ServiceEndpoints>>,
}

impl FixedResolver {
    pub fn with(mut self, svc: Arc<ServiceEndpoints>) -> Self {
        self.services.insert(svc.name.clone(), svc);
        self
    }
}

impl Resolve for FixedResolver {
    fn resolve(&self, name: &ServiceName) -> Option<Arc<ServiceEndpoints>> {
        self.services.get(name).cloned()
    }
}

/// A service whose endpoints are `addrs`, already resolved.
pub fn service(name: &str, addrs: &[SocketAddr]) -> Arc<ServiceEndpoints> {
    let svc = Arc::new(ServiceEndpoints::new(ServiceName::new(name).unwrap()));
    let endpoints = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Arc::new(Endpoint::new(
                InstanceId::new(format!("{name}-{i}")).unwrap(),
                Address::new(a.ip().to_string()).unwrap(),
                a.port(),
                100,
                None,
                BTreeMap::new(),
                Arc::default(),
            ))
        })
        .collect();
    svc.publish(EndpointSet { endpoints, index: 1, epoch: "test".into(), health_panic: false });
    svc
}

/// `(state, ejections)` of every endpoint of `svc`.
pub fn states(svc: &ServiceEndpoints) -> Vec<(&'static str, u32)> {
    svc.load().endpoints.iter().map(|e| e.state.outlier.describe()).collect()
}

pub struct Proxy {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    pub task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub async fn start_proxy(resolver: FixedResolver, config: ProxyConfig) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(proxy::serve(
        listener,
        Arc::new(resolver),
        config,
        Arc::clone(&metrics),
        shutdown.clone(),
    ));
    Proxy { addr, metrics, shutdown, task: Some(task) }
}

/// What a backend answers.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    pub delay: Duration,
}

impl Reply {
    pub fn ok(body: impl Into<Bytes>) -> Reply {
        Reply { status: StatusCode::OK, body: body.into(), delay: Duration::ZERO }
    }
    pub fn status(status: u16) -> Reply {
        Reply { status: StatusCode::from_u16(status).unwrap(), body: Bytes::new(), delay: Duration::ZERO }
    }
    pub fn delayed(mut self, d: Duration) -> Reply {
        self.delay = d;
        self
    }
}

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub at: Instant,
    pub method: String,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

type Handler = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Backend {
    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
    pub fn times(&self) -> Vec<Instant> {
        self.seen.lock().unwrap().iter().map(|s| s.at).collect()
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 backend answering each request with `handler` (after reading its whole body).
pub async fn backend(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let handler: Handler = Arc::new(handler);
    let seen2 = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let handler = Arc::clone(&handler);
            let seen = Arc::clone(&seen2);
            conns.spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    let seen = Arc::clone(&seen);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|c| c.to_bytes()).unwrap_or_default();
                        let s = Seen {
                            at: Instant::now(),
                            method: parts.method.to_string(),
                            headers: parts.headers,
                            body,
                        };
                        let reply = handler(&s);
                        seen.lock().unwrap().push(s);
                        if !reply.delay.is_zero() {
                            tokio::time::sleep(reply.delay).await;
                        }
                        let mut resp = Response::new(Full::new(reply.body));
                        *resp.status_mut() = reply.status;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend { addr, seen, task }
}

/// A loopback port with nothing listening: connecting is refused.
pub fn refused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// A backend that reads each request in full (head and Content-Length body),
/// counts it, then resets the connection without answering.
pub async fn resetting_backend() -> (SocketAddr, Arc<AtomicUsize>, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&count);
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if let Some(end) = find(&buf, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if buf.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                c.fetch_add(1, Ordering::SeqCst);
                let _ = stream.set_zero_linger();
                drop(stream);
            });
        }
    });
    (addr, count, task)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// A pooled HTTP/1.1 client that never retries by itself.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).retry_canceled_requests(false).build_http()
}

pub struct Answer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn error_code(&self) -> Option<&str> {
        self.headers.get("x-trellis-error").and_then(|v| v.to_str().ok())
    }
}

/// Sends `method` to the proxy for service `host` and reads the whole answer.
pub async fn call(client: &TestClient, proxy: SocketAddr, method: &str, host: &str, body: Bytes) -> Answer {
    let req = Request::builder()
        .method(method)
        .uri(format!("http://{proxy}/path?q=1"))
        .header("host", host)
        .body(Full::new(body))
        .unwrap();
    send(client, req).await
}

pub async fn send(client: &TestClient, req: Request<Full<Bytes>>) -> Answer {
    let resp = client.request(req).await.expect("the proxy answers");
    let status = resp.status().as_u16();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("the whole body arrives").to_bytes();
    Answer { status, headers: parts.headers, body }
}

/// Writes `raw` on a new connection and reads until the server closes or
/// a complete response (by Content-Length) has arrived.
pub async fn raw(proxy: SocketAddr, raw: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    raw_on(&mut s, raw).await
}

/// Like [`raw`], on an existing connection (which stays open when the answer
/// keeps it alive).
pub async fn raw_on(s: &mut TcpStream, raw: &[u8]) -> String {
    // The server may answer and close before reading everything.
    let _ = s.write_all(raw).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let read = async {
        loop {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if buf.len() >= end + 4 + len {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("an answer within 10s");
    String::from_utf8_lossy(&buf).into_owned()
}

/// Runs `n` copies of `f` at once and waits for all.
pub async fn concurrently<F, Fut>(n: usize, f: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut set = JoinSet::new();
    for i in 0..n {
        set.spawn(f(i));
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

pub type BoxFut = Pin<Box<dyn Future<Output = ()> + Send>>;

pub fn config() -> ProxyConfig {
    ProxyConfig::default()
}
