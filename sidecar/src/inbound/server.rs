//! The inbound side's edge: the accept loop and its connection cap, one task
//! per connection owning its TLS handshake, the caller's identity, hyper's
//! HTTP/1.1 or HTTP/2 server and the connection's deadlines
//! ([`trellis_shared::watchdog`]), and draining on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};
use trellis_shared::watchdog::{Activity, Verdict, Watched};
use trellis_shared::{accept, InstanceId};

use super::caller::Caller;
use super::forward::{self, Context};
use super::InboundConfig;
use crate::endpoints::Endpoint;
use crate::identity::MeshIdentity;
use crate::metrics::Metrics;
use crate::proxy::mesh::MeshConnector;
use crate::proxy::{pool, protocol, upgrade};

/// Serves the inbound port until `shutdown` is cancelled, then stops
/// accepting, lets open connections finish their requests (idle ones are
/// closed) and returns. The caller bounds the wait.
pub async fn serve(
    listener: TcpListener,
    identity: MeshIdentity,
    config: InboundConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (host, port) = crate::config::parse_host_port(&config.app, "the app")
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let id = InstanceId::new("app").map_err(std::io::Error::other)?;
    let app = Arc::new(Endpoint::new(id, host, port, 1, None, Default::default(), Arc::default()));

    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.set_nodelay(true);
    let h2 = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .pool_idle_timeout(config.pool_idle_timeout)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector);
    // Every inbound request goes to the one app: keep as many idle
    // connections as requests may be in flight.
    // The app is plain text on localhost: the pool's mesh connector is never used.
    let plain = Arc::new(MeshConnector::new(None, metrics.clone()));
    let pool =
        pool::Pool::new(config.connect_timeout, config.pool_idle_timeout, config.max_concurrency, plain);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timeout would also close idle keep-alive
    // connections; the watchdog bounds heads instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        // hyper refuses buffers under 8 KiB.
        .max_buf_size(config.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX));

    let connections = Arc::new(Semaphore::new(config.max_connections.max(1)));
    let acceptor = TlsAcceptor::from(identity.server_config());
    let ctx = Arc::new(Context {
        identity,
        config,
        metrics,
        app,
        pool,
        h2,
        protocols: protocol::Protocols::default(),
        builder,
    });
    let local = listener.local_addr()?;
    info!(addr = %local, app = %ctx.app.authority, allow_from = ?ctx.config.allow_from, "inbound listening");
    let tracker = TaskTracker::new();
    while let Some((stream, peer)) = accept::next(&listener, shutdown.cancelled(), "inbound").await {
        let Ok(permit) = Arc::clone(&connections).try_acquire_owned() else {
            ctx.metrics.inbound_closed("over_limit");
            debug!(%peer, "inbound connection over the cap; closed");
            continue;
        };
        let _ = stream.set_nodelay(true);
        tracker.spawn(connection(Arc::clone(&ctx), acceptor.clone(), stream, peer, permit, shutdown.clone()));
    }
    drop(listener);
    info!(open = tracker.len(), "inbound stopped accepting; draining connections");
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Why a handshake failed, as the `inbound_connections_closed` reason.
fn handshake_failure(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::NoCertificatesPresented) => "no_certificate",
        Some(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
        Some(rustls::Error::InvalidMessage(_)) => "not_tls",
        _ => "handshake_failed",
    }
}

/// One connection from accept to close: the handshake, the caller, then HTTP
/// until it closes, the watchdog cuts it, or the sidecar shuts down.
async fn connection(
    ctx: Arc<Context>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    shutdown: CancellationToken,
) {
    let config = &ctx.config;
    let activity = Activity::new(config.header_timeout, config.idle_timeout);
    // The handshake counts against the first head's time.
    let handshake = tokio::time::timeout(config.header_timeout, acceptor.accept(stream));
    let tls = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = handshake_failure(&e);
                ctx.metrics.inbound_closed(reason);
                debug!(%peer, reason, error = %e, "inbound TLS handshake failed");
                return;
            }
            Err(_) => {
                ctx.metrics.inbound_closed("handshake_timeout");
                debug!(%peer, "inbound connection closed: no TLS handshake within the header timeout");
                return;
            }
        },
        _ = shutdown.cancelled() => return,
    };
    let certs = tls.get_ref().1.peer_certificates().unwrap_or_default();
    let Some(caller) = Caller::identify(&ctx.identity, certs, &config.allow_from, &ctx.metrics) else {
        ctx.metrics.inbound_closed("no_identity");
        debug!(%peer, "inbound connection closed: its certificate names no service of this trust domain");
        return;
    };
    debug!(%peer, caller = %caller.service, allowed = caller.allowed, "inbound connection");
    let gauge = ctx.metrics.inbound_connections().clone();
    gauge.inc();
    // An upgraded connection takes this connection's permit over when it ends.
    let permit = upgrade::ConnectionPermit::new(permit);
    let tracked = Arc::clone(&activity);
    let shared = Arc::clone(&ctx);
    let service = service_fn(move |mut req: Request<Incoming>| {
        let in_flight = tracked.start(req.version() == Version::HTTP_2);
        if upgrade::is_upgrade(&req) {
            req.extensions_mut().insert(permit.clone());
        }
        let (ctx, caller) = (Arc::clone(&shared), Arc::clone(&caller));
        async move {
            let resp = forward::handle(&ctx, &caller, req).await;
            drop(in_flight);
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = ctx
        .builder
        .serve_connection_with_upgrades(TokioIo::new(Watched::new(tls, activity.clone())), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let wake = match activity.verdict(tokio::time::Instant::now()) {
            Verdict::WaitUntil(at) => at,
            Verdict::HeaderTimeout => {
                ctx.metrics.inbound_closed("header_timeout");
                debug!(%peer, "inbound connection closed: request head not received within the header timeout");
                break;
            }
            Verdict::Idle => {
                if !closing {
                    ctx.metrics.inbound_closed("idle");
                    debug!(%peer, "closing an idle inbound connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                tokio::time::Instant::now() + config.idle_timeout
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    debug!(%peer, error = %e, "inbound connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
    gauge.dec();
}
