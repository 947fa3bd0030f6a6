//! The HTTP/JSON API (documented in `docs/api.md`).
//!
//! - [`service`]: [`ApiService`], the one entry of every request: it names the
//!   route, serves heartbeats itself, passes the rest to the router, flags
//!   stale answers and records the request's metrics and log line.
//! - [`route`]: which route a request takes, from its method and path.
//! - [`auth`]: [`ApiState::authorize`], the one place tokens are checked.
//! - [`handlers`]: the axum router and its handlers, and the body checks that
//!   the heartbeat fast path shares.

pub mod auth;
pub mod handlers;
pub mod route;
pub mod service;

use std::sync::Arc;

use axum::http::HeaderValue;

pub use self::service::{ApiService, ClientAddr};
use crate::acl::Acl;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::watch::Watches;

/// What every request is served with, behind one `Arc`: a handler's `State`
/// extraction is one reference-count increment, and the epoch header is
/// validated once rather than per response (both showed in heartbeat profiles).
pub struct ApiState<S> {
    pub store: Arc<S>,
    pub config: Config,
    pub metrics: Arc<Metrics>,
    pub watches: Arc<Watches>,
    /// The live ACL; `None` without `--acl-file` (everything allowed).
    pub acl: Option<Arc<Acl>>,
    /// `X-Trellis-Epoch`; a store's epoch never changes while it runs.
    epoch: Option<HeaderValue>,
}

impl<S: crate::store::Store> ApiState<S> {
    pub fn new(store: Arc<S>, config: Config, metrics: Arc<Metrics>, watches: Arc<Watches>) -> Self {
        let epoch = HeaderValue::from_str(store.epoch()).ok();
        ApiState { store, config, metrics, watches, acl: None, epoch }
    }

    /// The same state, checking requests against `acl`.
    pub fn with_acl(self, acl: Option<Arc<Acl>>) -> Self {
        ApiState { acl, ..self }
    }
}
