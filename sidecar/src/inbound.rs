//! The inbound side: a mutual-TLS listener in front of the local app, so only
//! mesh services reach it, and the app learns which one called.
//!
//! Submodules, in the order a connection meets them:
//! - [`server`]: the edge: accept loop, the connection cap, the TLS handshake
//!   (a client certificate from the mesh CA is required), the header and idle
//!   deadlines ([`trellis_shared::watchdog`]), drain on shutdown.
//! - [`caller`]: the caller's service from its certificate, `--allow-from`,
//!   and the decisions counted per caller.
//! - [`forward`]: one request to the app: the concurrency cap, the
//!   `x-trellis-caller` header, HTTP/1.1 or h2c.
//! - [`upgrade`]: `Upgrade` requests (WebSocket) relayed to the app.
//!
//! # The rules
//!
//! - **Handshake**: TLS with [`MeshIdentity::server_config`]: a client
//!   certificate chained to the mesh's roots is required, so a plain-text
//!   connection, one without a certificate, one from another CA or with an
//!   expired certificate never gets past the handshake and never reaches
//!   hyper or the app. The handshake and the first request head share
//!   `header_timeout` from the accept. A verified certificate without a
//!   service identity closes the connection too.
//! - **Connections**: at most `max_connections` are open (an upgraded
//!   connection keeps its permit); one more is closed at once, before its
//!   handshake: answering would cost the handshake the cap is there to spare.
//!   A connection with no request in progress for `idle_timeout` is closed
//!   gracefully (an answer being streamed is never cut).
//! - **Caller**: the service in the caller's SPIFFE ID. With `--allow-from`,
//!   a caller not listed gets `403 not_allowed` for every request (a gRPC
//!   caller gets `PERMISSION_DENIED`); without it any mesh service may call.
//!   Every request is counted by caller and decision (`allowed`,
//!   `not_allowed`, `overloaded`): the callers are mesh services holding a
//!   certificate from the registry, so the label values stay few.
//! - **Concurrency**: at most `max_concurrency` requests are in flight to the
//!   app, from the request head until the last byte of the answer (an SSE
//!   stream or a gRPC stream counts for its whole life, an upgrade until its
//!   `101`); one more is answered `503 overloaded` at once, without touching
//!   the app.
//! - **Forwarding**: to the app at `--app`, over HTTP/1.1 (pooled) for an
//!   HTTP/1.1 caller, over h2c for an HTTP/2 caller (ALPN `h2`) when the app
//!   speaks it (probed once), else HTTP/1.1. Hop-by-hop headers are dropped
//!   both ways, `x-trellis-caller: <service>` is set after removing any
//!   value the caller sent, and trailers pass both ways. An app that cannot
//!   be reached gives `502 upstream_failed`; nothing is retried (the calling
//!   sidecar owns retries).
//! - **Shutdown**: the listener stays open through the drain, then stops
//!   accepting; open connections finish their requests (idle ones are
//!   closed) within the grace.
//!
//! Every sidecar-made answer comes from [`crate::error`].

mod caller;
mod forward;
mod server;
mod upgrade;

use std::time::Duration;

pub use caller::AllowFrom;
pub use server::serve;

#[cfg(doc)]
use crate::identity::MeshIdentity;

/// Settings of the inbound side; [`InboundConfig::DEFAULT`] holds the defaults
/// of the limits.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// Where the local app listens, `host:port`.
    pub app: String,
    /// Which services may call (`--allow-from`).
    pub allow_from: AllowFrom,
    /// Open connections; one more is closed before its handshake.
    pub max_connections: usize,
    /// Requests in flight to the app; one more is answered `503 overloaded`.
    pub max_concurrency: usize,
    /// Longest time from accept to the end of the first request head (TLS
    /// handshake included), and for any later request head from its first byte.
    pub header_timeout: Duration,
    /// A connection without a request in progress for this long is closed.
    pub idle_timeout: Duration,
    /// Largest request head in bytes (HTTP/1.1 gets `431` past it).
    pub max_header_bytes: usize,
    /// Longest wait for a TCP connection to the app.
    pub connect_timeout: Duration,
    /// Idle HTTP/1.1 connections to the app are closed after this.
    pub pool_idle_timeout: Duration,
    /// An upgraded connection with no byte either way for this long is closed.
    pub upgrade_idle_timeout: Duration,
}

impl InboundConfig {
    /// The limits' defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: InboundConfig = InboundConfig {
        app: String::new(),
        allow_from: AllowFrom::Any,
        max_connections: 4096,
        max_concurrency: 1024,
        header_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(60),
        max_header_bytes: 64 * 1024,
        connect_timeout: Duration::from_secs(1),
        pool_idle_timeout: Duration::from_secs(30),
        upgrade_idle_timeout: Duration::from_secs(300),
    };
}
