//! The accept loop: connection cap, HTTP serving, graceful shutdown.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::api::{ApiService, ApiState};
use crate::config::{Config, ConfigError};
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
}

/// Body of the answer to a connection past the cap: the client learns why and fails over.
const OVERLOADED_BODY: &str = r#"{"error":"overloaded","message":"too many connections to the registry"}"#;

/// Refused connections being answered at once; past this they are just closed.
const MAX_REFUSERS: usize = 64;

/// Answers a connection past the cap with `503 overloaded`. The request is read
/// and discarded briefly so that closing does not reset the connection before
/// the client has read the answer.
fn refuse(stream: TcpStream, refusers: &Arc<Semaphore>) {
    let Ok(permit) = refusers.clone().try_acquire_owned() else { return };
    tokio::spawn(async move {
        let mut stream = stream;
        let linger = async {
            let resp = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{OVERLOADED_BODY}",
                OVERLOADED_BODY.len()
            );
            stream.write_all(resp.as_bytes()).await?;
            stream.shutdown().await?;
            let mut sink = [0u8; 4096];
            while stream.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), linger).await;
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
            let store = Arc::new(MemoryStore::with_guards(metrics.store.clone(), config.guards()));
            serve(listener, config, store, metrics, shutdown).await
        }
        StoreSpec::Etcd { endpoints, prefix } => {
            let settings = EtcdSettings {
                endpoints,
                prefix,
                timeout: config.etcd_timeout,
                check_interval: config.etcd_check_interval,
                guards: config.guards(),
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
    if let Some(path) = &config.ready_file {
        let addrs = std::collections::BTreeMap::from([("listen", addr.to_string())]);
        trellis_shared::ready_file::write(path, &addrs).map_err(ServerError::ReadyFile)?;
    }
    let stop = CancellationToken::new();
    let background = tokio::spawn(store.clone().background(stop.child_token()));
    let watches = Arc::new(Watches::new(config.max_watches, stop.clone(), metrics.clone()));
    let grace = config.shutdown_grace;
    let connections = Arc::new(Semaphore::new(config.max_connections));
    let refusers = Arc::new(Semaphore::new(MAX_REFUSERS));
    let api = ApiService::new(ApiState::new(store.clone(), config, metrics.clone(), watches)).hyper_service();

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
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), api.clone()).into_owned());
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
