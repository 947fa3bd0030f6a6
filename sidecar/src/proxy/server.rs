//! The proxy's edge: listeners, the accept loop, the connection cap (one more
//! connection is answered `503 overloaded` and closed), the header read
//! timeout (also before the protocol is known), and draining on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};
use trellis_shared::{accept, ErrorCode, ServiceName};

use super::mesh::MeshConnector;
use super::mesh_h2::MeshH2;
use super::{pool, protocol, route, upgrade, ProxyConfig, ProxyContext};
use crate::endpoints::Resolve;
use crate::error::ProxyError;
use crate::identity::MeshIdentity;
use crate::metrics::Metrics;

const REJECT_SLOTS: usize = 64;

/// HTTP/2 upstream connections are pinged this often, idle or not, so a
/// connection whose peer vanished (no RST, a dead NAT entry) is found.
const H2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// A ping unanswered for this long closes the HTTP/2 connection.
const H2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

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
    serve_all_with_identity(listeners, resolver, config, metrics, None, shutdown).await
}

/// Like [`serve_all`], with this sidecar's mesh `identity` for endpoints
/// registered as mesh TLS (see [`super::mesh`]); without one, such endpoints
/// fail every attempt, counted as `no_identity`.
pub async fn serve_all_with_identity(
    listeners: Vec<Listener>,
    resolver: Arc<dyn Resolve>,
    config: ProxyConfig,
    metrics: Arc<Metrics>,
    identity: Option<MeshIdentity>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mesh = Arc::new(MeshConnector::new(identity, Arc::clone(&metrics)));
    let mesh_h2 = MeshH2::new(
        Arc::clone(&mesh),
        config.connect_timeout,
        config.pool_idle_timeout,
        (H2_KEEPALIVE_INTERVAL, H2_KEEPALIVE_TIMEOUT),
    );
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    let pool = pool::Pool::new(
        config.connect_timeout,
        config.pool_idle_timeout,
        config.pool_max_idle_per_endpoint,
        Arc::clone(&mesh),
    );
    // HTTP/2 upstream connections: keepalive pings (hyper's http2 client
    // options, driven by the timer below) and the idle timeout, which is the
    // pool's: a connection with no request for `pool_idle_timeout` is closed.
    let h2_client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .http2_keep_alive_interval(H2_KEEPALIVE_INTERVAL)
        .http2_keep_alive_timeout(H2_KEEPALIVE_TIMEOUT)
        .http2_keep_alive_while_idle(true)
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
    let shared = Arc::new(ProxyContext {
        resolver,
        config,
        metrics,
        pool,
        h2_client,
        mesh_h2,
        mesh,
        protocols: protocol::Protocols::default(),
        pending: AtomicUsize::new(0),
        connections: Arc::clone(&connections),
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
    shared: &Arc<ProxyContext>,
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
    while let Some((stream, peer)) = accept::next(&listener, shutdown.cancelled(), "outbound").await {
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
    shared: Arc<ProxyContext>,
    service: Option<Arc<ServiceName>>,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let gauge = shared.metrics.connections().clone();
    gauge.inc();
    // hyper's header read timeout starts only once the protocol is known, so
    // a connection that never sends a first request head is timed out here.
    let head_timeout = shared.config.header_read_timeout;
    let seen = Arc::new(AtomicBool::new(false));
    let seen_in_service = Arc::clone(&seen);
    // An upgraded connection takes this connection's permit over when it ends.
    let permit = upgrade::ConnectionPermit::new(permit);
    let service = service_fn(move |mut req: Request<Incoming>| {
        if !seen_in_service.load(Ordering::Relaxed) {
            seen_in_service.store(true, Ordering::Relaxed);
        }
        if upgrade::is_upgrade(&req) {
            req.extensions_mut().insert(permit.clone());
        }
        let shared = Arc::clone(&shared);
        let target = service.clone();
        async move { Ok::<_, Infallible>(route::handle(shared, req, target.as_deref()).await) }
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
