//! The accept loop: connection caps, TLS, HTTP serving, graceful shutdown.
//!
//! - [`limits`]: the flags bounding one connection (timeouts, per-address cap).
//! - [`per_ip`]: open connections counted per client address.
//! - [`watchdog`]: when a connection has been silent or idle too long.
//!
//! Each accepted connection gets one task that owns it from accept to close:
//! the TLS handshake, hyper's auto builder (HTTP/1.1 or HTTP/2), and the
//! watchdog's deadlines, so every way a connection can end is in one place.

pub mod limits;
pub mod per_ip;
pub use trellis_shared::watchdog;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};
use trellis_shared::accept;

use self::limits::ConnectionLimits;
use self::per_ip::PerIp;
use self::watchdog::{Activity, Verdict, Watched};
use crate::acl::Acl;
use crate::api::{ApiService, ApiState};
use crate::config::{Config, ConfigError};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::etcd::client::EtcdError;
use crate::store::etcd::config::{with_scheme, AccessError};
use crate::store::etcd::{EtcdSettings, EtcdStore};
use crate::store::{MemoryStore, Store, StoreSpec};
use crate::tls::{Tls, TlsError};
use crate::watch::Watches;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the listener's address: {0}")]
    Listener(#[from] std::io::Error),
    #[error("cannot write the ready file: {0}")]
    ReadyFile(std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("invalid ACL file: {0}")]
    Acl(#[from] crate::acl::AclFileError),
    #[error(transparent)]
    EtcdAccess(#[from] AccessError),
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("mesh CA: {0}")]
    Identity(#[from] crate::identity::IdentityError),
}

/// Refused connections being answered at once; past this they are just closed.
const MAX_REFUSERS: usize = 64;

/// How long a refused connection may take to send its request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection past a cap with `503 overloaded` (inside TLS when the
/// registry serves TLS) and closes it, so the client learns why and fails
/// over rather than hang in the accept queue.
fn refuse(stream: TcpStream, tls: Option<&Tls>, refusers: &Arc<Semaphore>) {
    let Ok(permit) = refusers.clone().try_acquire_owned() else { return };
    let acceptor = tls.map(Tls::acceptor);
    tokio::spawn(async move {
        let answer = async move {
            let service = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(ApiError::Overloaded.into_response())
            });
            let mut builder = auto::Builder::new(TokioExecutor::new());
            builder.http1().keep_alive(false).timer(TokioTimer::new()).header_read_timeout(REFUSAL_TIMEOUT);
            let _ = match acceptor {
                None => builder.serve_connection(TokioIo::new(stream), service).await,
                Some(acceptor) => match acceptor.accept(stream).await {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Err(_) => return,
                },
            };
        };
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT * 2, answer).await;
        drop(permit);
    });
}

/// Runs the registry with the embedded memory store until `shutdown` resolves,
/// then stops accepting, answers open blocking queries and returns within the
/// configured grace.
pub async fn run(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    let metrics = Arc::new(Metrics::new());
    match config.store.clone() {
        StoreSpec::Memory => {
            let store = Arc::new(
                MemoryStore::with_guards(metrics.store.clone(), config.guards())
                    .with_caps(config.limits.caps()),
            );
            serve(listener, config, store, metrics, shutdown).await
        }
        StoreSpec::Etcd { endpoints, prefix } => {
            let settings = EtcdSettings {
                endpoints: with_scheme(endpoints, &config.etcd_client.tls),
                prefix,
                timeout: config.etcd_timeout,
                check_interval: config.etcd_check_interval,
                guards: config.guards(),
                caps: config.limits.caps(),
                access: config.etcd_client.load()?,
            };
            tokio::pin!(shutdown);
            let store = tokio::select! {
                s = EtcdStore::connect_retrying(settings, metrics.etcd.clone(), metrics.store.clone()) => Arc::new(s?),
                _ = &mut shutdown => return Ok(()),
            };
            serve(listener, config, store, metrics, shutdown).await
        }
    }
}

/// What every connection's task needs, behind one `Arc`.
struct Connections<S> {
    api: ApiService<S>,
    builder: auto::Builder<TokioExecutor>,
    tls: Option<Arc<Tls>>,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
}

/// Runs the registry over any store.
pub async fn serve<S: Store>(
    listener: TcpListener,
    config: Config,
    store: Arc<S>,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    config.validate()?;
    let tls = if config.tls.enabled() { Some(Arc::new(Tls::load(&config.tls)?)) } else { None };
    let addr = listener.local_addr()?;
    let acl = match &config.acl.acl_file {
        Some(path) => {
            let acl = Arc::new(Acl::load(path, metrics.clone())?);
            Some((acl, crate::acl::reload::hangup()))
        }
        None => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "no --acl-file: anyone who can reach this address can register, change and remove any service's instances");
            }
            None
        }
    };
    let mesh_ca = crate::identity::MeshCa::load(&config.identity)?.map(Arc::new);
    if let Some(ca) = &mesh_ca {
        info!(trust_domain = ca.trust_domain(), cert_ttl = %humantime::format_duration(config.identity.cert_ttl), "signing mesh identities");
        if acl.is_none() {
            warn!("mesh CA without --acl-file: anyone who can reach the registry can get a certificate for any service");
        }
    }
    if let Some(path) = &config.ready_file {
        let addrs = std::collections::BTreeMap::from([("listen", addr.to_string())]);
        trellis_shared::ready_file::write(path, &addrs).map_err(ServerError::ReadyFile)?;
    }
    let stop = CancellationToken::new();
    let background = tokio::spawn(store.clone().background(stop.child_token()));
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().reload_on_hangup(stop.child_token()));
    }
    let acl = acl.map(|(acl, hup)| {
        tokio::spawn(acl.clone().follow(hup, stop.child_token()));
        acl
    });
    let watches = Arc::new(
        Watches::new(config.max_watches, stop.clone(), metrics.clone())
            .per_client(config.limits.max_watches_per_client),
    );
    let grace = config.shutdown_grace;
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let per_ip = PerIp::new(config.connections.max_connections_per_ip);
    let refusers = Arc::new(Semaphore::new(MAX_REFUSERS));
    let limits = config.connections.clone();

    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper's own header timeout would also close idle keep-alive
    // connections; the watchdog bounds heads instead (see watchdog.rs).
    builder.http1().timer(TokioTimer::new()).header_read_timeout(None);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    let state =
        ApiState::new(store.clone(), config, metrics.clone(), watches).with_acl(acl).with_mesh_ca(mesh_ca);
    tokio::spawn(state.activity.clone().sample(metrics.clone(), stop.child_token()));
    let shared = Arc::new(Connections {
        api: ApiService::new(state),
        builder,
        tls: tls.clone(),
        limits,
        metrics: metrics.clone(),
        stop: stop.clone(),
    });
    let tasks = TaskTracker::new();
    info!(%addr, epoch = store.epoch(), tls = tls.is_some(), "registry listening");

    tokio::pin!(shutdown);
    while let Some((stream, peer)) = accept::next(&listener, &mut shutdown, "registry").await {
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            debug!(%peer, "connection refused: connection cap reached");
            refuse(stream, tls.as_deref(), &refusers);
            continue;
        };
        let Some(slot) = per_ip.try_open(peer.ip()) else {
            metrics.conn.refused_per_ip.inc();
            debug!(%peer, "connection refused: per-address cap reached");
            refuse(stream, tls.as_deref(), &refusers);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        tasks.spawn(async move {
            shared.metrics.connections.inc();
            connection(&shared, stream, peer).await;
            shared.metrics.connections.dec();
            drop((slot, permit));
        });
    }

    drop(listener);
    info!("shutting down: answering open queries");
    stop.cancel();
    tasks.close();
    if tokio::time::timeout(grace, tasks.wait()).await.is_err() {
        warn!(grace = ?grace, "connections still open after the grace period; exiting anyway");
    }
    let _ = background.await;
    info!("registry stopped");
    Ok(())
}

/// One connection from accept to close: the TLS handshake, then HTTP.
async fn connection<S: Store>(shared: &Connections<S>, stream: TcpStream, peer: SocketAddr) {
    let limits = &shared.limits;
    let activity = Activity::new(limits.header_timeout, limits.idle_timeout);
    let Some(tls) = &shared.tls else {
        return http(shared, Watched::new(stream, activity.clone()), peer, activity).await;
    };
    // The handshake counts against the first head's time.
    let handshake = tokio::time::timeout(limits.header_timeout, tls.acceptor().accept(stream));
    let stream = tokio::select! {
        done = handshake => match done {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                shared.metrics.conn.tls_failures.inc();
                debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                shared.metrics.conn.header_timeouts.inc();
                debug!(%peer, "connection closed: no TLS handshake within the header timeout");
                return;
            }
        },
        _ = shared.stop.cancelled() => return,
    };
    http(shared, Watched::new(stream, activity.clone()), peer, activity).await
}

/// Serves HTTP on an established byte stream until it closes, is cut by the
/// watchdog, or the registry shuts down.
async fn http<S, IO>(shared: &Connections<S>, io: Watched<IO>, peer: SocketAddr, activity: Arc<Activity>)
where
    S: Store,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let api = shared.api.hyper_service(peer);
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let in_flight = tracked.start(req.version() == hyper::Version::HTTP_2);
        let answer = api.call(req);
        async move {
            let resp = answer.await;
            drop(in_flight);
            resp
        }
    });
    let conn = shared.builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let wake = match activity.verdict(tokio::time::Instant::now()) {
            Verdict::WaitUntil(at) => at,
            Verdict::HeaderTimeout => {
                shared.metrics.conn.header_timeouts.inc();
                debug!(%peer, "connection closed: request head not received within the header timeout");
                return;
            }
            Verdict::Idle => {
                if !closing {
                    shared.metrics.conn.idle_closed.inc();
                    debug!(%peer, "closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                tokio::time::Instant::now() + shared.limits.idle_timeout
            }
        };
        tokio::select! {
            ended = conn.as_mut() => {
                if let Err(e) = ended {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep_until(wake) => {}
            _ = shared.stop.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}
