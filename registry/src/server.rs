//! The accept loop: connection cap, HTTP serving, graceful shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::acl::Acl;
use crate::api::{ApiService, ApiState};
use crate::config::{Config, ConfigError};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::etcd::{EtcdSettings, EtcdStore};
use crate::store::{MemoryStore, Store, StoreSpec};
use crate::watch::Watches;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read the listener's address: {0}")]
    Listener(#[from] std::io::Error),
    #[error("cannot write the ready file: {0}")]
    ReadyFile(std::io::Error),
    #[error("invalid ACL file: {0}")]
    Acl(#[from] crate::acl::AclFileError),
}

/// Refused connections being answered at once; past this they are just closed.
const MAX_REFUSERS: usize = 64;

/// How long a refused connection may take to send its request and read the answer.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Answers a connection past the cap with `503 overloaded` and closes it, so
/// the client learns why and fails over rather than hang in the accept queue.
fn refuse(stream: TcpStream, refusers: &Arc<Semaphore>) {
    let Ok(permit) = refusers.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let service = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
            Ok::<_, Infallible>(ApiError::Overloaded.into_response())
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .keep_alive(false)
            .timer(TokioTimer::new())
            .header_read_timeout(REFUSAL_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        let _ = tokio::time::timeout(REFUSAL_TIMEOUT * 2, conn).await;
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
                endpoints,
                prefix,
                timeout: config.etcd_timeout,
                check_interval: config.etcd_check_interval,
                guards: config.guards(),
                caps: config.limits.caps(),
            };
            tokio::pin!(shutdown);
            let store = tokio::select! {
                s = EtcdStore::connect_retrying(settings, metrics.etcd.clone(), metrics.store.clone()) => Arc::new(s),
                _ = &mut shutdown => return Ok(()),
            };
            serve(listener, config, store, metrics, shutdown).await
        }
    }
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
    let addr = listener.local_addr()?;
    let acl = match &config.acl.acl_file {
        Some(path) => {
            let acl = Arc::new(Acl::load(path, metrics.clone())?);
            Some(acl)
        }
        None => {
            if !addr.ip().is_loopback() {
                warn!(%addr, "no --acl-file: anyone who can reach this address can register, change and remove any service's instances");
            }
            None
        }
    };
    if let Some(path) = &config.ready_file {
        let addrs = std::collections::BTreeMap::from([("listen", addr.to_string())]);
        trellis_shared::ready_file::write(path, &addrs).map_err(ServerError::ReadyFile)?;
    }
    let stop = CancellationToken::new();
    let background = tokio::spawn(store.clone().background(stop.child_token()));
    if let Some(acl) = &acl {
        tokio::spawn(acl.clone().follow(stop.child_token()));
    }
    let watches = Arc::new(
        Watches::new(config.max_watches, stop.clone(), metrics.clone())
            .per_client(config.limits.max_watches_per_client),
    );
    let grace = config.shutdown_grace;
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let refusers = Arc::new(Semaphore::new(MAX_REFUSERS));
    let api = ApiService::new(ApiState::new(store.clone(), config, metrics.clone(), watches).with_acl(acl));

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(Duration::from_secs(30));
    let graceful = GracefulShutdown::new();
    info!(%addr, epoch = store.epoch(), "registry listening");

    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Typically EMFILE: back off instead of spinning on the error.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics.connections_refused.inc();
            debug!(%peer, "connection refused: connection cap reached");
            refuse(stream, &refusers);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = graceful
            .watch(builder.serve_connection(TokioIo::new(stream), api.hyper_service(peer)).into_owned());
        let gauge = metrics.connections.clone();
        gauge.inc();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "connection ended with an error");
            }
            gauge.dec();
            drop(permit);
        });
    }

    drop(listener);
    info!("shutting down: answering open queries");
    stop.cancel();
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        warn!(grace = ?grace, "connections still open after the grace period; exiting anyway");
    }
    let _ = background.await;
    info!("registry stopped");
    Ok(())
}
