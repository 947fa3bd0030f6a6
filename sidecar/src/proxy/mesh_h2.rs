//! HTTP/2 to mesh endpoints: one multiplexed mutual-TLS connection (ALPN
//! `h2`) per endpoint and service, built on hyper's `client::conn::http2`.
//!
//! hyper-util's client, which carries plain HTTP/2, keys its pool by the
//! request URI's scheme and authority and connects knowing only the URI: it
//! cannot tell which service's identity a connection must be verified
//! against. Here the key is the endpoint's [`Endpoint::pool_key`] (address and
//! service) and the connect knows the service.
//!
//! - **Reuse**: every request to the endpoint shares its connection while it
//!   is open; a closed one is replaced by the next request. Connecting is
//!   serialised per endpoint (an async mutex taken only when there is no open
//!   connection), so a burst makes one handshake, not one per request.
//! - **Request path**: the map of connections is read through `ArcSwap` and
//!   the connection through `ArcSwapOption`, without a lock; only a new
//!   endpoint's first request takes the writers' mutex to add its slot.
//! - **Idle**: a connection without a request for `idle_timeout` is dropped by
//!   the sweeper (its streams still in progress finish first), like the
//!   HTTP/1.1 pool's; HTTP/2 keepalive pings find dead peers meanwhile.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tracing::debug;

use super::body::ReplayBody;
use super::mesh::MeshConnector;
use super::pool::{tcp_connect, SendError};
use crate::endpoints::Endpoint;

type H2Sender = SendRequest<ReplayBody<Incoming>>;

/// The connection of one endpoint (and service).
#[derive(Default)]
struct Slot {
    tx: ArcSwapOption<H2Sender>,
    /// Held while connecting, so concurrent requests wait for one handshake.
    connecting: tokio::sync::Mutex<()>,
    /// Milliseconds since the owner's clock started, at the last request.
    last_used_ms: AtomicU64,
}

impl Slot {
    fn open(&self) -> Option<H2Sender> {
        self.tx.load().as_ref().filter(|tx| !tx.is_closed()).map(|tx| H2Sender::clone(tx))
    }
}

type Slots = HashMap<String, Arc<Slot>>;

/// Multiplexed HTTP/2 connections to mesh endpoints.
pub struct MeshH2 {
    slots: ArcSwap<Slots>,
    /// Serialises changes to `slots` (a new endpoint, the sweeper).
    writes: Mutex<()>,
    mesh: Arc<MeshConnector>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    keepalive: (Duration, Duration),
    clock: Instant,
}

impl MeshH2 {
    /// The connections and their sweeper, which ends once they are dropped.
    /// `keepalive`: the HTTP/2 ping interval and its timeout.
    pub fn new(
        mesh: Arc<MeshConnector>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        keepalive: (Duration, Duration),
    ) -> Arc<Self> {
        let h2 = Arc::new(MeshH2 {
            slots: ArcSwap::from_pointee(HashMap::new()),
            writes: Mutex::new(()),
            mesh,
            connect_timeout,
            idle_timeout,
            keepalive,
            clock: Instant::now(),
        });
        tokio::spawn(sweep(Arc::downgrade(&h2)));
        h2
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock_writes(&self) -> std::sync::MutexGuard<'_, ()> {
        // The guarded data is the ArcSwap, which a panic cannot leave half written.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn slot(&self, key: &str) -> Arc<Slot> {
        if let Some(s) = self.slots.load().get(key) {
            return Arc::clone(s);
        }
        let _writes = self.lock_writes();
        let mut map = Slots::clone(&self.slots.load());
        let slot = Arc::clone(map.entry(key.to_string()).or_default());
        self.slots.store(Arc::new(map));
        slot
    }

    /// Sends `req` to the mesh endpoint `ep` over its connection, making one
    /// (TCP, mutual TLS, HTTP/2) when it has none open. A failed handshake is
    /// a [`SendError::Connect`] marked refused.
    pub async fn send(
        &self,
        ep: &Endpoint,
        req: Request<ReplayBody<Incoming>>,
    ) -> Result<Response<Incoming>, SendError> {
        let slot = self.slot(&ep.pool_key);
        slot.last_used_ms.store(self.now_ms(), Ordering::Relaxed);
        let mut tx = match slot.open() {
            Some(tx) => tx,
            // Boxed: a handshake's state is not carried by every request.
            None => Box::pin(self.connect(&slot, ep)).await?,
        };
        match tx.try_send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(mut e) => match e.take_message() {
                // The connection closed before the request went out: a new
                // connection takes it (once; a second failure is the endpoint's).
                Some(back) => {
                    debug!(endpoint = %ep.authority, error = %e.error(), "mesh h2 connection was closed; reconnecting");
                    let mut tx = Box::pin(self.connect(&slot, ep)).await?;
                    tx.send_request(back).await.map_err(|e| SendError::Send(Box::new(e)))
                }
                None => Err(SendError::Send(Box::new(e.into_error()))),
            },
        }
    }

    async fn connect(&self, slot: &Slot, ep: &Endpoint) -> Result<H2Sender, SendError> {
        let _connecting = slot.connecting.lock().await;
        // Another request may have connected while this one waited.
        if let Some(tx) = slot.open() {
            return Ok(tx);
        }
        let failed = |refused, cause| SendError::Connect { refused, cause, headers: None };
        let Some(service) = &ep.mesh_tls else {
            return Err(failed(false, "not a mesh endpoint".into()));
        };
        let tcp = tcp_connect(&ep.authority, self.connect_timeout).await.map_err(|(r, c)| failed(r, c))?;
        let tls = self
            .mesh
            .handshake(tcp, service, &ep.authority, true, self.connect_timeout)
            .await
            .map_err(|e| failed(true, e.cause))?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(self.keepalive.0)
            .keep_alive_timeout(self.keepalive.1)
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| failed(false, format!("h2 handshake: {e}")))?;
        let authority = ep.authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(%authority, error = %e, "mesh h2 connection ended with an error");
            }
        });
        slot.tx.store(Some(Arc::new(tx.clone())));
        Ok(tx)
    }

    /// Drops connections idle for longer than the timeout, and the slots of
    /// endpoints without one.
    fn sweep_once(&self) {
        let now = self.now_ms();
        let idle_ms = u64::try_from(self.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let idle = |s: &Slot| now.saturating_sub(s.last_used_ms.load(Ordering::Relaxed)) >= idle_ms;
        let _writes = self.lock_writes();
        let current = self.slots.load();
        if !current.values().any(|s| idle(s)) {
            return;
        }
        let mut map = Slots::clone(&current);
        map.retain(|_, s| {
            if idle(s) {
                s.tx.store(None);
                return false;
            }
            true
        });
        self.slots.store(Arc::new(map));
    }
}

async fn sweep(h2: Weak<MeshH2>) {
    let period = match h2.upgrade() {
        Some(h) => h.idle_timeout.max(Duration::from_millis(100)),
        None => return,
    };
    let mut tick = tokio::time::interval_at(Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match h2.upgrade() {
            Some(h) => h.sweep_once(),
            None => return,
        }
    }
}
