//! The outbound proxy: a hyper server on the outbound port that routes each
//! request by its Host (or absolute-form URI host) to an endpoint of that
//! service, picked by least-connections, over a pooled keep-alive connection
//! to it, with retries, timeouts and passive outlier detection.
//!
//! Submodules, in the order a request meets them:
//! - [`server`]: the edge: accept loop, connection caps, header timeouts, drain.
//! - [`route`]: the pending-request cap, the target service, its endpoints.
//! - [`forward`]: one request's attempts over HTTP/1.1 or HTTP/2 ([`upgrade`]
//!   for `Upgrade` requests), with [`attempts`] keeping the tried set, the
//!   backoff, the deadline, the budget and the outcomes; the endpoint for each
//!   attempt comes from [`crate::balance::choose`], and [`connect`] finds it a
//!   connection (pooled, or new and hedged against a dropped SYN).
//! - [`pool`] (idle HTTP/1.1 connections per endpoint), [`protocol`] (which
//!   endpoints speak HTTP/2), [`body`] (the replayable request body and the
//!   response body that carries the in-flight guard), [`headers`] (target
//!   service, hop-by-hop headers), [`grpc`], and [`cause`] (what an error
//!   chain says about an attempt).
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
//! - **Choice**: see [`crate::balance`]: an endpoint whose ejection has ended
//!   gets the request as its probe; else least-loaded (in flight per weight,
//!   weights ramping up over `slow_start`) over endpoints not ejected, not
//!   tried by this request and without a recent failure, then over those with
//!   one, then over ones tried already; when every endpoint is ejected, over
//!   all of them (panic mode). A refused connect ejects at once, whatever the
//!   ejected-share bound, so a dead endpoint never takes first attempts.
//!   With `--zone`, endpoints of other zones come after the caller's own
//!   until its zone cannot carry the load ([`crate::zone`]).
//!   The in-flight count falls when the response body ends.
//! - **Retries** (at most `max_attempts` attempts, full-jitter backoff, each
//!   one taken from the service's retry budget): any method when the attempt
//!   could not connect; idempotent methods also after a reset, a per-try
//!   timeout or a 502/503/504 answer, and only if the body is still
//!   replayable (it fit `replay_buffer_bytes`). A POST that may have reached
//!   an endpoint is never sent again. When no retry is allowed the last
//!   upstream answer is relayed as is; if there is none, `502 upstream_failed`
//!   (or `504 timeout` after a per-try timeout).
//! - **Hedging**: a new HTTP/1.1 connection still pending after
//!   `connect_hedge` races one to another endpoint (see [`connect`]); for the
//!   services named in `hedges`, an idempotent request without a body whose
//!   answer is late goes to a second endpoint too, paid from the budget (see
//!   [`crate::hedge`]).
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
//!   endpoint and the two connections are spliced after `101`. A spliced
//!   connection keeps the `max_connections` permit of the connection it came
//!   on for its whole life (so N WebSockets fill a cap of N, and one more
//!   connection is answered `503 overloaded`) and is closed after
//!   `upgrade_idle_timeout` without a byte either way.
//! - **Dedicated ports** ([`Listener::service`]): a listener bound to one
//!   service sends every request there whatever its Host or `:authority`; the
//!   upstream sees the service name as Host.
//! - **Streaming**: bodies are relayed frame by frame with hyper's flow
//!   control, so a slow reader holds the endpoint back instead of filling
//!   the sidecar's memory.

mod attempts;
mod body;
// Shared with the inbound side: cause, forward's `ensure_host`, grpc,
// headers, pool, protocol and upgrade's splice.
pub(crate) mod cause;
mod connect;
pub(crate) mod forward;
pub(crate) mod grpc;
pub(crate) mod headers;
pub(crate) mod mesh;
mod mesh_h2;
pub(crate) mod pool;
pub(crate) mod protocol;
mod route;
mod server;
pub(crate) mod upgrade;

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use http::Response;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use trellis_shared::ServiceName;

pub use body::{BoxError, ReplayBody, ResponseBody};
pub use mesh::MeshFailure;
pub use server::{serve, serve_all, serve_all_with_identity, Listener};

use crate::balance::BalanceConfig;
use crate::endpoints::Resolve;
use crate::hedge::HedgeDelay;
use crate::metrics::Metrics;
use crate::outlier::OutlierConfig;
use crate::retry::RetryConfig;

/// Settings of the outbound proxy; [`ProxyConfig::DEFAULT`] holds the defaults.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Longest wait for a TCP connection to an endpoint.
    pub connect_timeout: Duration,
    /// A new HTTP/1.1 connection still pending after this races one to another
    /// endpoint (see [`connect`]); zero turns it off.
    pub connect_hedge: Duration,
    /// Longest wait for one attempt's response headers; an idempotent request
    /// is then retried.
    pub per_try_timeout: Duration,
    /// Longest wait for response headers over all attempts and backoffs;
    /// answered `504 timeout`. Does not bound a response body once it streams.
    pub overall_timeout: Duration,
    /// Attempts per request, the first included.
    pub max_attempts: u32,
    /// Request body bytes kept for replay; a larger body streams and is not
    /// retried once any of it was sent.
    pub replay_buffer_bytes: usize,
    /// Open inbound connections; more are answered `503 overloaded` and closed.
    pub max_connections: usize,
    /// Requests waiting for response headers; more are answered `503 overloaded`.
    pub max_pending_requests: usize,
    /// Largest request head (request line and headers) in bytes; larger gets
    /// `431` (HTTP/1.1, at least 8 KiB).
    pub max_header_bytes: usize,
    /// Longest wait for a request head once a connection is open or idle
    /// between requests.
    pub header_read_timeout: Duration,
    /// How long a request for a service never seen before waits for the first
    /// discovery answer before `503 no_endpoints`.
    pub discovery_wait: Duration,
    /// Idle pooled upstream connections are closed after this.
    pub pool_idle_timeout: Duration,
    /// Idle pooled connections kept per endpoint.
    pub pool_max_idle_per_endpoint: usize,
    /// An upgraded (WebSocket) connection with no byte either way for this
    /// long is closed on both sides.
    pub upgrade_idle_timeout: Duration,
    pub retry: RetryConfig,
    pub outlier: OutlierConfig,
    pub balance: BalanceConfig,
    /// Services whose late idempotent requests are hedged, and after how long
    /// (see [`crate::hedge`]); none by default.
    pub hedges: Vec<(ServiceName, HedgeDelay)>,
    /// Only endpoints registered as mesh TLS are used; discovery drops the
    /// others ([`crate::refuse`]). Off: plain-text endpoints are reached as
    /// before, beside mesh ones (a mixed mesh).
    pub require_mtls: bool,
}

impl ProxyConfig {
    /// The defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: ProxyConfig = ProxyConfig {
        connect_timeout: Duration::from_secs(1),
        connect_hedge: Duration::from_millis(100),
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
        upgrade_idle_timeout: Duration::from_secs(300),
        retry: RetryConfig::DEFAULT,
        outlier: OutlierConfig::DEFAULT,
        balance: BalanceConfig::DEFAULT,
        hedges: Vec::new(),
        require_mtls: false,
    };
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig::DEFAULT
    }
}

type UpstreamClient = Client<HttpConnector, ReplayBody<Incoming>>;
type ProxyResponse = Response<ResponseBody<Incoming>>;

/// What every connection and request of the proxy shares: built once by
/// [`serve_all`], read without locks on the request path.
struct ProxyContext {
    resolver: Arc<dyn Resolve>,
    config: ProxyConfig,
    metrics: Arc<Metrics>,
    /// HTTP/1.1: idle connections per endpoint.
    pool: Arc<pool::Pool>,
    /// HTTP/2 with prior knowledge: one multiplexed connection per endpoint.
    h2_client: UpstreamClient,
    /// Mesh endpoints over HTTP/2: one multiplexed mutual-TLS connection per
    /// endpoint (mesh endpoints over HTTP/1.1 are in `pool`).
    mesh_h2: Arc<mesh_h2::MeshH2>,
    /// The mutual-TLS handshakes (with upgrades' own connections).
    mesh: Arc<mesh::MeshConnector>,
    /// Which endpoints speak HTTP/2 (learnt for HTTP/2 callers).
    protocols: protocol::Protocols,
    /// Requests waiting for response headers (capped by `max_pending_requests`).
    pending: AtomicUsize,
    /// The `max_connections` permits: inbound connections and upgraded
    /// (spliced) connections, which outlive the connection they came from.
    connections: Arc<tokio::sync::Semaphore>,
}

impl ProxyContext {
    /// Counts a request to `ep` as in flight; its time is measured only when
    /// zone-aware routing needs it.
    fn begin(&self, ep: &Arc<crate::endpoints::Endpoint>) -> crate::endpoints::InFlight {
        ep.begin_timed(self.config.balance.zone.routing_zone().is_some())
    }
}

/// The size of what `f` returns, without calling it: for the tests that keep
/// per-request futures small.
#[cfg(test)]
pub(crate) fn returned_size<A, B, C, R>(_: fn(A, B, C) -> R) -> usize {
    std::mem::size_of::<R>()
}
