//! The outbound proxy: a hyper server on the outbound port that routes each
//! request by its Host (or absolute-form URI host) to an endpoint of that
//! service, picked by least-connections, over a pooled keep-alive connection
//! to it, with retries, timeouts and passive outlier detection.
//!
//! Submodules: [`body`] (the replayable request body and the response body that
//! carries the in-flight guard), [`headers`] (target service, hop-by-hop headers),
//! [`pool`] (idle HTTP/1.1 connections per endpoint).
//!
//! # The rules
//!
//! - **Connections**: HTTP/1.1, and HTTP/2 with prior knowledge on the same port
//!   (hyper-util's `auto` builder detects it per connection). At most
//!   `max_connections` are open; one more is answered `503 overloaded` and
//!   closed. A connection that sends no request head within
//!   `header_read_timeout` (first request, or idle between requests) is closed.
//! - **Target**: the host of an absolute-form URI (`HTTP_PROXY` clients) or of
//!   HTTP/2's `:authority`, else the Host header; the port and a trailing dot
//!   are dropped, letters are lowercased, and the result must be a valid
//!   service name, else `400 bad_request` (as is `CONNECT`). The upstream sees
//!   the same Host.
//! - **Malformed requests** are answered by hyper's parser before routing: a bad
//!   request line or header `400`, a request head over `max_header_bytes`
//!   `431`; neither carries a JSON body. The connection is closed, the proxy
//!   keeps serving.
//! - **Headers**: hop-by-hop headers (`Connection` and those it names,
//!   `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`)
//!   are dropped both ways; everything else (`x-request-id`, `traceparent`)
//!   passes untouched. Bodies stream both ways.
//! - **Endpoints**: from [`Resolve`]; a service seen for the first time waits
//!   up to `discovery_wait` for discovery's first answer. No endpoints:
//!   `503 no_endpoints`. No room to watch another service: `503 overloaded`.
//! - **Choice**: an endpoint whose ejection has ended gets the request as its
//!   probe; else least-connections (in-flight / weight, random tie-break) over
//!   active endpoints not tried yet by this request, else over active ones
//!   tried already, else (every endpoint ejected) over all of them: panic mode.
//!   The in-flight count falls when the response body ends.
//! - **Retries** (at most `max_attempts` attempts, full-jitter backoff, each
//!   one taken from the service's retry budget): any method when the attempt
//!   could not connect; idempotent methods also after a reset, a per-try
//!   timeout or a 502/503/504 answer, and only if the body is still
//!   replayable (it fit `replay_buffer_bytes`). A POST that may have reached
//!   an endpoint is never sent again. When no retry is allowed the last
//!   upstream answer is relayed as is; if there is none, `502 upstream_failed`
//!   (or `504 timeout` after a per-try timeout).
//! - **Timeouts**: `connect_timeout` per connection, `per_try_timeout` per
//!   attempt until response headers, `overall_timeout` for everything until
//!   response headers (`504 timeout`). A response body, once it streams, is
//!   not timed out.
//! - **Outlier detection**: see [`crate::outlier`]; outcomes are recorded per
//!   attempt (a refused connect ejects at once; timeouts, resets and
//!   502/503/504 count as consecutive failures; a client abandoning its own
//!   upload does not count).
//! - **Pending requests**: at most `max_pending_requests` wait for response
//!   headers at once; more are answered `503 overloaded`.
//!
//! Every sidecar-made answer comes from [`crate::error`]: JSON
//! `{"error","message"}` and `x-trellis-error: <code>`.
//!
//! # HTTP/2, gRPC, upgrades, dedicated ports
//!
//! - **HTTP/2 upstream**: a request to an endpoint whose metadata says
//!   `protocol=h2c`, or that arrived over HTTP/2 and goes to an endpoint that
//!   speaks HTTP/2 (see [`protocol`]: probed once per endpoint), is sent over
//!   HTTP/2 with prior knowledge through hyper-util's client, so each endpoint
//!   gets one multiplexed connection; everything else goes over pooled HTTP/1.1
//!   (see [`pool`]: a connection is reused once its response was read). The
//!   client's `TE: trailers` is kept towards HTTP/2 upstreams and trailers
//!   pass through both ways.
//! - **gRPC** (see [`grpc`]): `grpc-timeout` shortens the overall timeout; a
//!   stream the endpoint refused (`REFUSED_STREAM`: nothing processed) counts
//!   as not sent and is retried elsewhere like a refused connect; the
//!   `grpc-status` of every relayed gRPC response (trailers, or headers of a
//!   trailers-only answer) is counted in `grpc_responses`.
//! - **Upgrades** (see [`upgrade`]): an HTTP/1.1 `Upgrade` request goes to one
//!   endpoint and the two connections are spliced after `101`.
//! - **Dedicated ports** ([`Listener::service`]): a listener bound to one
//!   service sends every request there whatever its Host or `:authority`; the
//!   upstream sees the service name as Host.
//! - **Streaming**: bodies are relayed frame by frame with hyper's flow
//!   control, so a slow reader holds the endpoint back instead of filling
//!   the sidecar's memory.

mod body;
mod grpc;
mod headers;
mod pool;
mod protocol;
mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use trellis_shared::backoff::Backoff;
use trellis_shared::{ErrorCode, ServiceName};

pub use body::{BoxError, ReplayBody, ResponseBody};
use pool::{Checkin, SendError};

use crate::balance::least_loaded;
use crate::endpoints::{Endpoint, EndpointSet, InFlight, Resolve, ServiceEndpoints};
use crate::error::ProxyError;
use crate::metrics::{Metrics, ServiceMetrics};
use crate::outlier::{may_eject, Admission, Outcome, OutlierConfig, Via};
use crate::retry::{is_idempotent, may_retry, Failure, RetryBudget, RetryConfig};

/// Settings of the outbound proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Longest wait for a TCP connection to an endpoint. Default 1s.
    pub connect_timeout: Duration,
    /// Longest wait for one attempt's response headers; an idempotent request
    /// is then retried. Default 10s.
    pub per_try_timeout: Duration,
    /// Longest wait for response headers over all attempts and backoffs;
    /// answered `504 timeout`. Does not bound a response body once it streams.
    /// Default 30s.
    pub overall_timeout: Duration,
    /// Attempts per request, the first included. Default 3.
    pub max_attempts: u32,
    /// Request body bytes kept for replay; a larger body streams and is not
    /// retried once any of it was sent. Default 64 KiB.
    pub replay_buffer_bytes: usize,
    /// Open inbound connections; more are answered `503 overloaded` and closed.
    /// Default 4096.
    pub max_connections: usize,
    /// Requests waiting for response headers; more are answered `503 overloaded`.
    /// Default 4096.
    pub max_pending_requests: usize,
    /// Largest request head (request line and headers) in bytes; larger gets
    /// `431` (HTTP/1.1, at least 8 KiB). Default 64 KiB.
    pub max_header_bytes: usize,
    /// Longest wait for a request head once a connection is open or idle
    /// between requests. Default 10s.
    pub header_read_timeout: Duration,
    /// How long a request for a service never seen before waits for the first
    /// discovery answer before `503 no_endpoints`. Default 2s.
    pub discovery_wait: Duration,
    /// Idle pooled upstream connections are closed after this. Default 30s.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per endpoint. Default 128.
    pub pool_max_idle_per_endpoint: usize,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            connect_timeout: Duration::from_secs(1),
            per_try_timeout: Duration::from_secs(10),
            overall_timeout: Duration::from_secs(30),
            max_attempts: 3,
            replay_buffer_bytes: 64 * 1024,
            max_connections: 4096,
            max_pending_requests: 4096,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            discovery_wait: Duration::from_secs(2),
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_endpoint: 128,
            retry: RetryConfig::default(),
            outlier: OutlierConfig::default(),
        }
    }
}

/// Per upstream service: its retry budget and metric handles (kept in
/// [`ServiceEndpoints::proxy`]).
#[derive(Debug)]
pub struct ServiceState {
    pub budget: RetryBudget,
    pub metrics: ServiceMetrics,
}

/// Connections over `max_connections` that may be answered `overloaded` at
/// once; beyond this they are closed without an answer.
const REJECT_SLOTS: usize = 64;

type UpstreamClient = Client<HttpConnector, ReplayBody<Incoming>>;
type ProxyResponse = Response<ResponseBody<Incoming>>;

struct Shared {
    resolver: Arc<dyn Resolve>,
    config: ProxyConfig,
    metrics: Arc<Metrics>,
    /// HTTP/1.1: idle connections per endpoint.
    pool: Arc<pool::Pool>,
    /// HTTP/2 with prior knowledge: one multiplexed connection per endpoint.
    h2_client: UpstreamClient,
    /// Which endpoints speak HTTP/2 (learnt for HTTP/2 callers).
    protocols: protocol::Protocols,
    pending: AtomicUsize,
}

/// A listening socket of the proxy.
pub struct Listener {
    pub listener: TcpListener,
    /// `None`: the outbound port, where each request names its service. Some:
    /// a dedicated port sending everything to this service.
    pub service: Option<ServiceName>,
}

/// Serves the outbound port until `shutdown` is cancelled, then stops
/// accepting, lets open connections finish their requests (idle keep-alive
/// connections are closed) and returns. The caller bounds the wait.
pub async fn serve(
    listener: TcpListener,
    resolver: Arc<dyn Resolve>,
    config: ProxyConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    serve_all(vec![Listener { listener, service: None }], resolver, config, metrics, shutdown).await
}

/// Like [`serve`], for several listeners (the outbound port and dedicated
/// upstream ports) sharing one set of limits, connection pools and budgets.
pub async fn serve_all(
    listeners: Vec<Listener>,
    resolver: Arc<dyn Resolve>,
    config: ProxyConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    let pool =
        pool::Pool::new(config.connect_timeout, config.pool_idle_timeout, config.pool_max_idle_per_endpoint);
    let h2_client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        // hyper refuses buffers under 8 KiB.
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);

    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let rejections = Arc::new(Semaphore::new(REJECT_SLOTS));
    let shared = Arc::new(Shared {
        resolver,
        config,
        metrics,
        pool,
        h2_client,
        protocols: protocol::Protocols::default(),
        pending: AtomicUsize::new(0),
    });
    let tracker = TaskTracker::new();
    let loops = listeners
        .into_iter()
        .map(|l| accept_loop(l, &builder, &shared, &connections, &rejections, &tracker, &shutdown));
    let results = futures_util::future::join_all(loops).await;
    info!(open = tracker.len(), "outbound proxy stopped accepting; draining connections");
    tracker.close();
    tracker.wait().await;
    results.into_iter().collect()
}

async fn accept_loop(
    l: Listener,
    builder: &Arc<auto::Builder<TokioExecutor>>,
    shared: &Arc<Shared>,
    connections: &Arc<Semaphore>,
    rejections: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let Listener { listener, service } = l;
    let service = service.map(Arc::new);
    let local = listener.local_addr()?;
    match &service {
        Some(s) => info!(addr = %local, service = %s, "dedicated upstream port listening"),
        None => info!(addr = %local, "outbound proxy listening"),
    }
    loop {
        let accepted = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        match Arc::clone(connections).try_acquire_owned() {
            Ok(permit) => {
                tracker.spawn(serve_connection(
                    Arc::clone(builder),
                    stream,
                    peer,
                    Arc::clone(shared),
                    service.clone(),
                    shutdown.clone(),
                    permit,
                ));
            }
            Err(_) => {
                shared.metrics.proxy_error(ErrorCode::Overloaded);
                if let Ok(permit) = Arc::clone(rejections).try_acquire_owned() {
                    tracker.spawn(reject_connection(stream, shared.config.header_read_timeout, permit));
                }
            }
        }
    }
    drop(listener);
    debug!(addr = %local, "listener closed");
    Ok(())
}

async fn serve_connection(
    builder: Arc<auto::Builder<TokioExecutor>>,
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    service: Option<Arc<ServiceName>>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
) {
    let gauge = shared.metrics.connections().clone();
    gauge.inc();
    // hyper's header read timeout starts only once the protocol is known, so
    // a connection that never sends a first request head is timed out here.
    let head_timeout = shared.config.header_read_timeout;
    let seen = Arc::new(AtomicBool::new(false));
    let seen_in_service = Arc::clone(&seen);
    let service = service_fn(move |req: Request<Incoming>| {
        if !seen_in_service.load(Ordering::Relaxed) {
            seen_in_service.store(true, Ordering::Relaxed);
        }
        let shared = Arc::clone(&shared);
        let target = service.clone();
        async move { Ok::<_, Infallible>(handle(shared, req, target.as_deref()).await) }
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let first_head = tokio::time::sleep(head_timeout);
    tokio::pin!(first_head);
    let (mut waiting_first, mut draining) = (true, false);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = &mut first_head, if waiting_first => {
                if !seen.load(Ordering::Relaxed) {
                    debug!(%peer, "no request head within the header read timeout; closing");
                    break Ok(());
                }
                waiting_first = false;
            }
            _ = shutdown.cancelled(), if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "connection ended with an error");
    }
    gauge.dec();
}

/// Answers one request on an over-limit connection with `overloaded`, then closes it.
async fn reject_connection(stream: TcpStream, read_timeout: Duration, _permit: OwnedSemaphorePermit) {
    let service = service_fn(|_req: Request<Incoming>| async {
        let err = ProxyError::Overloaded("too many connections");
        Ok::<_, Infallible>(err.to_response(http_body_util::Full::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(read_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let _ = tokio::time::timeout(read_timeout.saturating_mul(2), conn).await;
}

/// Counts a request as pending until dropped.
struct Pending<'a>(&'a AtomicUsize);

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>, target: Option<&ServiceName>) -> ProxyResponse {
    let start = Instant::now();
    let is_grpc = grpc::is_grpc(req.headers());
    if shared.pending.fetch_add(1, Ordering::Relaxed) >= shared.config.max_pending_requests {
        shared.pending.fetch_sub(1, Ordering::Relaxed);
        return shared.error(&ProxyError::Overloaded("too many pending requests"), is_grpc);
    }
    let _pending = Pending(&shared.pending);
    match route(&shared, req, start, target).await {
        Ok(resp) => resp,
        Err(e) => shared.error(&e, is_grpc),
    }
}

impl Shared {
    fn error(&self, e: &ProxyError, is_grpc: bool) -> ProxyResponse {
        self.metrics.proxy_error(e.code());
        debug!(error = %e, "answered with a sidecar error");
        if is_grpc {
            e.to_grpc_response(ResponseBody::empty())
        } else {
            e.to_response(ResponseBody::full)
        }
    }
}

async fn route(
    shared: &Shared,
    mut req: Request<Incoming>,
    start: Instant,
    target: Option<&ServiceName>,
) -> Result<ProxyResponse, ProxyError> {
    if req.method() == http::Method::CONNECT {
        return Err(ProxyError::BadRequest(
            "CONNECT is not supported: send plain HTTP through the sidecar".into(),
        ));
    }
    let name = match target {
        Some(name) => {
            // A dedicated port: the upstream sees the service name, not the local address.
            if let Ok(v) = http::HeaderValue::from_str(name.as_str()) {
                req.headers_mut().insert(http::header::HOST, v);
            }
            name.clone()
        }
        None => headers::target_service(&req)?,
    };
    let svc = shared
        .resolver
        .resolve(&name)
        .ok_or(ProxyError::Overloaded("too many upstream services are watched"))?;
    if !svc.is_resolved() && !svc.wait_resolved(shared.config.discovery_wait).await {
        return Err(ProxyError::NoEndpoints(name));
    }
    let set = svc.load();
    if set.endpoints.is_empty() {
        return Err(ProxyError::NoEndpoints(name));
    }
    let state = service_state(shared, &svc);
    let result = if upgrade::is_upgrade(&req) {
        upgrade::forward(shared, &svc, state, &set, req, start).await
    } else {
        forward(shared, &svc, state, &set, req, start).await
    };
    let status = match &result {
        Ok(resp) => resp.status(),
        Err(e) => e.status(),
    };
    state.metrics.request(status.as_u16(), start.elapsed().as_secs_f64());
    result
}

fn service_state<'a>(shared: &Shared, svc: &'a ServiceEndpoints) -> &'a ServiceState {
    svc.proxy.get_or_init(|| ServiceState {
        budget: RetryBudget::new(&shared.config.retry),
        metrics: shared.metrics.service(svc.name.as_str()),
    })
}

/// Releases an endpoint's probe if the probing attempt ends without an outcome.
struct ProbeGuard<'a> {
    endpoint: Option<&'a Endpoint>,
}

impl ProbeGuard<'_> {
    fn disarm(&mut self) {
        self.endpoint = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(ep) = self.endpoint {
            ep.state.outlier.release_probe();
        }
    }
}

/// The endpoint for the next attempt and how it was let through.
fn choose(set: &EndpointSet, tried: &[usize], now: Instant) -> Option<(usize, Via)> {
    let eps = &set.endpoints;
    let untried = |i: usize| !tried.contains(&i);
    // An endpoint whose ejection has ended gets its one probe right away.
    for (i, ep) in eps.iter().enumerate() {
        if ep.state.outlier.is_ejected() && untried(i) && ep.state.outlier.admit(now) == Admission::Probe {
            return Some((i, Via::Probe));
        }
    }
    if let Some(i) = least_loaded(eps, |i, ep| untried(i) && !ep.state.outlier.is_ejected())
        .or_else(|| least_loaded(eps, |_, ep| !ep.state.outlier.is_ejected()))
    {
        return Some((i, Via::Normal));
    }
    // Panic mode: every endpoint is ejected; trying them beats failing everything.
    let i = least_loaded(eps, |i, _| untried(i)).or_else(|| least_loaded(eps, |_, _| true))?;
    Some((i, Via::Panic))
}

fn upstream_uri(ep: &Endpoint, path: Option<&PathAndQuery>) -> Option<Uri> {
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(ep.uri_authority.clone()?);
    parts.path_and_query = Some(path.cloned().unwrap_or_else(root));
    Uri::from_parts(parts).ok()
}

/// Whether an HTTP/2 endpoint refused the stream (`REFUSED_STREAM`): by the
/// protocol, it processed nothing of it.
fn is_refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            if h2.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn is_refused(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Whether sending failed because reading the client's request body failed.
fn is_client_body_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// Result of one attempt.
enum Attempt {
    Response(Response<Incoming>),
    Failed { failure: Failure, cause: String },
}

async fn forward(
    shared: &Shared,
    svc: &ServiceEndpoints,
    state: &ServiceState,
    set: &EndpointSet,
    req: Request<Incoming>,
    start: Instant,
) -> Result<ProxyResponse, ProxyError> {
    let config = &shared.config;
    // A gRPC client's own deadline bounds the call when it is the shorter one.
    let timeout =
        grpc::timeout(req.headers()).map_or(config.overall_timeout, |t| t.min(config.overall_timeout));
    let deadline = start + timeout;
    state.budget.deposit(start);
    let (mut parts, body) = req.into_parts();
    let wants_trailers = parts
        .headers
        .get_all(http::header::TE)
        .iter()
        .any(|v| v.to_str().unwrap_or("").split(',').any(|t| t.trim().eq_ignore_ascii_case("trailers")));
    let downstream_h2 = parts.version == Version::HTTP_2;
    headers::strip_hop_by_hop(&mut parts.headers);
    ensure_host(&mut parts);
    let idempotent = is_idempotent(&parts.method);
    let body = ReplayBody::new(body, config.replay_buffer_bytes);
    let path = parts.uri.path_and_query().cloned();
    let max_attempts = config.max_attempts.max(1);
    let mut tried: Vec<usize> = Vec::new();
    let mut backoff: Option<Backoff> = None;
    let mut attempt = 0u32;

    // No timer of its own for the overall timeout: each attempt's timer ends
    // at the deadline at the latest, and so does each backoff.
    loop {
        attempt += 1;
        let now = Instant::now();
        if attempt > 1 && now >= deadline {
            return Err(ProxyError::Timeout { service: svc.name.clone(), waited: timeout });
        }
        let (idx, via) = choose(set, &tried, now).ok_or_else(|| ProxyError::NoEndpoints(svc.name.clone()))?;
        let ep = &set.endpoints[idx];
        let mut probe_guard = ProbeGuard { endpoint: (via == Via::Probe).then_some(&**ep) };
        let guard = ep.begin();
        let h2 = ep.metadata.get("protocol").is_some_and(|p| p == "h2c")
            || (downstream_h2 && {
                let probe = shared.protocols.speaks_h2(&ep.authority, config.connect_timeout);
                match tokio::time::timeout_at(deadline, probe).await {
                    Ok(h2) => h2,
                    Err(_) => return Err(ProxyError::Timeout { service: svc.name.clone(), waited: timeout }),
                }
            });
        let uri = if h2 {
            upstream_uri(ep, path.as_ref())
        } else {
            // hyper's HTTP/1.1 client writes the URI as given: origin-form.
            ep.uri_authority.as_ref().map(|_| Uri::from(path.clone().unwrap_or_else(root)))
        };
        let uri = uri.ok_or_else(|| ProxyError::UpstreamFailed {
            service: svc.name.clone(),
            attempts: attempt,
            cause: format!("endpoint authority {:?} is not valid in a URI", ep.authority),
        })?;
        let mut up = Request::new(body.retry());
        *up.method_mut() = parts.method.clone();
        *up.uri_mut() = uri;
        // A copy of the headers only when a later attempt may need them
        // after this one consumed its own: the HTTP/1.1 pool hands them
        // back when it could not connect (the only retry a non-idempotent
        // request gets there); HTTP/2 does not.
        let keep_copy = attempt < max_attempts && (idempotent || h2);
        *up.headers_mut() =
            if keep_copy { parts.headers.clone() } else { std::mem::take(&mut parts.headers) };
        // Whether `parts.headers` still holds the headers for a retry.
        let mut have_headers = keep_copy;
        if h2 {
            *up.version_mut() = Version::HTTP_2;
            if wants_trailers {
                up.headers_mut().insert(http::header::TE, http::HeaderValue::from_static("trailers"));
            }
        } else {
            *up.version_mut() = Version::HTTP_11;
        }

        // A protocol probe may have taken a while.
        let sent_at = if downstream_h2 { Instant::now() } else { now };
        let per_try = config.per_try_timeout.min(deadline.saturating_duration_since(sent_at));
        let mut conn = None;
        let result = match tokio::time::timeout(per_try, send(shared, ep, up, h2)).await {
            Ok(Ok((resp, checkin))) => match resp.status() {
                StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                    conn = checkin;
                    Attempt::Response(resp)
                }
                _ => {
                    let was_ejected = ep.state.outlier.is_ejected();
                    ep.state.outlier.record(Outcome::Success, via, &config.outlier, now, || true);
                    if was_ejected && !ep.state.outlier.is_ejected() {
                        info!(service = %svc.name, instance = %ep.id, ?via, "endpoint restored");
                    }
                    probe_guard.disarm();
                    let resp = relay(resp, guard, state, checkin);
                    debug!(service = %svc.name, instance = %ep.id, status = resp.status().as_u16(), attempt, "proxied");
                    return Ok(resp);
                }
            },
            Ok(Err(SendError::Connect { refused, cause, headers })) => {
                if let Some(h) = headers.filter(|_| !have_headers) {
                    parts.headers = h;
                    have_headers = true;
                }
                let outcome = if refused { Outcome::Refused } else { Outcome::Failure };
                record_failure(shared, svc, state, set, ep, outcome, via, now);
                probe_guard.disarm();
                Attempt::Failed { failure: Failure::NotSent, cause: format!("{}: {cause}", ep.authority) }
            }
            Ok(Err(SendError::Send(e))) => {
                let e: &(dyn std::error::Error + 'static) = &*e;
                sent_failure(shared, svc, state, set, ep, &mut probe_guard, e, via, now)?
            }
            Err(_) => {
                record_failure(shared, svc, state, set, ep, Outcome::Failure, via, now);
                probe_guard.disarm();
                Attempt::Failed {
                    failure: Failure::PerTryTimeout,
                    cause: format!("no response headers within {per_try:?}"),
                }
            }
        };
        let failure = match &result {
            Attempt::Response(_) => {
                record_failure(shared, svc, state, set, ep, Outcome::Failure, via, now);
                probe_guard.disarm();
                Failure::GatewayStatus
            }
            Attempt::Failed { failure, .. } => *failure,
        };
        drop(probe_guard);

        let mut retry = attempt < max_attempts
            && have_headers
            && may_retry(failure, idempotent, body.is_replayable())
            && Instant::now() < deadline;
        if retry && !state.budget.try_withdraw(Instant::now()) {
            state.metrics.retries_refused.inc();
            debug!(service = %svc.name, "retry refused by the budget");
            retry = false;
        }
        if !retry {
            return match result {
                Attempt::Response(resp) => Ok(relay(resp, guard, state, conn)),
                Attempt::Failed { failure: Failure::PerTryTimeout, .. } => {
                    Err(ProxyError::Timeout { service: svc.name.clone(), waited: start.elapsed() })
                }
                Attempt::Failed { cause, .. } => {
                    Err(ProxyError::UpstreamFailed { service: svc.name.clone(), attempts: attempt, cause })
                }
            };
        }
        drop(result);
        drop(conn);
        drop(guard);
        state.metrics.retries.inc();
        debug!(service = %svc.name, instance = %ep.id, ?failure, attempt, "retrying");
        tried.push(idx);
        let delay = backoff
            .get_or_insert_with(|| Backoff::new(config.retry.backoff_base, config.retry.backoff_cap))
            .next_delay();
        tokio::time::sleep_until((Instant::now() + delay).min(deadline)).await;
    }
}

fn root() -> PathAndQuery {
    PathAndQuery::from_static("/")
}

/// Sends one attempt: over HTTP/2 through hyper-util's client, else over a
/// pooled HTTP/1.1 connection, which the response body gives back.
async fn send(
    shared: &Shared,
    ep: &Endpoint,
    up: Request<ReplayBody<Incoming>>,
    h2: bool,
) -> Result<(Response<Incoming>, Option<Checkin>), SendError> {
    if !h2 {
        return shared.pool.send(&ep.authority, up).await.map(|(r, c)| (r, Some(c)));
    }
    match shared.h2_client.request(up).await {
        Ok(r) => Ok((r, None)),
        Err(e) if e.is_connect() => {
            Err(SendError::Connect { refused: is_refused(&e), cause: error_chain(&e), headers: None })
        }
        Err(e) => Err(SendError::Send(Box::new(e))),
    }
}

/// The outcome of an attempt that failed once the request may have been sent.
#[allow(clippy::too_many_arguments)]
fn sent_failure(
    shared: &Shared,
    svc: &ServiceEndpoints,
    state: &ServiceState,
    set: &EndpointSet,
    ep: &Endpoint,
    probe_guard: &mut ProbeGuard<'_>,
    e: &(dyn std::error::Error + 'static),
    via: Via,
    now: Instant,
) -> Result<Attempt, ProxyError> {
    if is_client_body_error(e) && !is_refused_stream(e) {
        // The client's own body failed (it went away mid-upload): not the
        // endpoint's fault, and nothing left to send.
        return Err(ProxyError::BadRequest(format!(
            "the request body could not be read: {}",
            error_chain(e)
        )));
    }
    record_failure(shared, svc, state, set, ep, Outcome::Failure, via, now);
    probe_guard.disarm();
    // A refused HTTP/2 stream: overloaded, not broken; it counts towards
    // ejection like a gateway error, and is safe to send elsewhere.
    let failure = if is_refused_stream(e) { Failure::NotSent } else { Failure::Reset };
    Ok(Attempt::Failed { failure, cause: format!("{}: {}", ep.authority, error_chain(e)) })
}

/// Absolute-form or HTTP/2 without Host: the upstream sees the service name
/// it was addressed by, not the endpoint's address.
fn ensure_host(parts: &mut http::request::Parts) {
    if !parts.headers.contains_key(http::header::HOST) {
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = http::HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(http::header::HOST, v);
            }
        }
    }
}

/// An endpoint's response as relayed to the client: hop-by-hop headers
/// dropped, the in-flight guard in the body, and gRPC's status counted (now
/// for a trailers-only answer, else when the trailers pass).
fn relay(
    resp: Response<Incoming>,
    guard: InFlight,
    state: &ServiceState,
    conn: Option<Checkin>,
) -> ProxyResponse {
    let grpc = grpc::is_grpc(resp.headers());
    let mut resp = match resp.headers().get("grpc-status") {
        Some(status) if grpc => {
            state.metrics.grpc.record(Some(status.as_bytes()));
            resp.map(|b| ResponseBody::upstream(b, guard, conn))
        }
        _ if grpc => {
            resp.map(|b| ResponseBody::upstream_grpc(b, guard, Arc::clone(&state.metrics.grpc), conn))
        }
        _ => resp.map(|b| ResponseBody::upstream(b, guard, conn)),
    };
    headers::strip_hop_by_hop(resp.headers_mut());
    resp
}

#[allow(clippy::too_many_arguments)]
fn record_failure(
    shared: &Shared,
    svc: &ServiceEndpoints,
    state: &ServiceState,
    set: &EndpointSet,
    ep: &Endpoint,
    outcome: Outcome,
    via: Via,
    now: Instant,
) {
    let config = &shared.config.outlier;
    let may = || {
        let ejected = set.endpoints.iter().filter(|e| e.state.outlier.is_ejected()).count();
        may_eject(set.endpoints.len(), ejected, config.max_ejected_percent)
    };
    if let Some(duration) = ep.state.outlier.record(outcome, via, config, now, may) {
        state.metrics.ejections.inc();
        info!(service = %svc.name, instance = %ep.id, authority = %ep.authority, ?outcome, ejection = ?duration, "endpoint ejected");
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(err) = cur {
        out.push_str(": ");
        out.push_str(&err.to_string());
        cur = err.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, InstanceId};

    use super::*;

    fn set(n: usize) -> EndpointSet {
        let endpoints = (0..n)
            .map(|i| {
                Arc::new(Endpoint::new(
                    InstanceId::new(format!("e{i}")).unwrap(),
                    Address::new("127.0.0.1").unwrap(),
                    1000 + i as u16,
                    1,
                    None,
                    BTreeMap::new(),
                    Arc::default(),
                ))
            })
            .collect();
        EndpointSet { endpoints, index: 1, epoch: "e".into() }
    }

    fn eject(set: &EndpointSet, i: usize) {
        let cfg = OutlierConfig { base_ejection: Duration::from_secs(10), ..OutlierConfig::default() };
        let out = set.endpoints[i].state.outlier.record(
            Outcome::Refused,
            Via::Normal,
            &cfg,
            Instant::now(),
            || true,
        );
        assert!(out.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn retries_prefer_untried_then_tried_active_endpoints() {
        let s = set(3);
        for _ in 0..50 {
            let (i, via) = choose(&s, &[0, 2], Instant::now()).unwrap();
            assert_eq!((i, via), (1, Via::Normal));
        }
        // Everything tried: any active endpoint, still not ejected ones.
        eject(&s, 1);
        for _ in 0..50 {
            let (i, via) = choose(&s, &[0, 1, 2], Instant::now()).unwrap();
            assert!(i != 1 && via == Via::Normal);
        }
        // An active tried endpoint beats an untried ejected one.
        assert_eq!(choose(&s, &[0, 2], Instant::now()).unwrap().1, Via::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_ejection_gets_its_probe_first_then_panic_mode_when_all_are_ejected() {
        let s = set(2);
        eject(&s, 0);
        assert_eq!(choose(&s, &[], Instant::now()), Some((1, Via::Normal)));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(choose(&s, &[], Instant::now()), Some((0, Via::Probe)));
        // The probe is out: others go elsewhere.
        assert_eq!(choose(&s, &[], Instant::now()), Some((1, Via::Normal)));
        s.endpoints[0].state.outlier.release_probe();
        assert_eq!(choose(&s, &[], Instant::now()), Some((0, Via::Probe)));
        // Both ejected: panic mode, untried first.
        let s = set(2);
        eject(&s, 0);
        eject(&s, 1);
        assert_eq!(choose(&s, &[0], Instant::now()), Some((1, Via::Panic)));
        assert!(matches!(choose(&s, &[0, 1], Instant::now()), Some((_, Via::Panic))));
    }

    #[test]
    fn no_endpoint_no_choice() {
        assert_eq!(choose(&set(0), &[], Instant::now()), None);
    }
}
