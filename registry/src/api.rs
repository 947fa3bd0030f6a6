//! The HTTP/JSON API (documented in `docs/api.md`).
//!
//! - [`service`]: [`ApiService`], the one entry of every request: it names the
//!   route, serves heartbeats itself, passes the rest to the router, flags
//!   stale answers and records the request's metrics and log line.
//! - [`route`]: which route a request takes, from its method and path.
//! - [`auth`]: [`ApiState::authorize`], the one place tokens are checked.
//! - [`body_timeout`]: request bodies that must arrive within `--body-timeout`.
//! - [`handlers`]: the axum router and its handlers, and the body checks that
//!   the heartbeat fast path shares.
//! - [`identity`]: `POST /v1/identity/sign`, the mesh CA's route.
//! - [`status`]: `GET /v1/status` (store, replica, uptime, rates, the brake)
//!   and [`status::Activity`], the sampled rates behind it.
//! - [`overview`]: `GET /v1/overview`, every service's health counts, blocking
//!   on a change of any service.
//! - [`leases`]: `GET /v1/services/{service}/leases`, each instance's lease.

pub mod auth;
pub mod body_timeout;
pub mod handlers;
pub mod identity;
pub mod leases;
pub mod overview;
pub mod route;
pub mod service;
pub mod status;

use std::sync::Arc;

use axum::http::HeaderValue;

pub use self::service::{ApiService, ClientAddr};
use crate::acl::Acl;
use crate::config::Config;
use crate::identity::MeshCa;
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
    /// The mesh CA; `None` without `--ca-cert` (no identities issued).
    pub mesh_ca: Option<Arc<MeshCa>>,
    /// Uptime and the sampled request rates `GET /v1/status` shows.
    pub activity: Arc<status::Activity>,
    /// `X-Trellis-Epoch`; a store's epoch never changes while it runs.
    epoch: Option<HeaderValue>,
}

impl<S: crate::store::Store> ApiState<S> {
    pub fn new(store: Arc<S>, config: Config, metrics: Arc<Metrics>, watches: Arc<Watches>) -> Self {
        let epoch = HeaderValue::from_str(store.epoch()).ok();
        let activity = Arc::new(status::Activity::default());
        ApiState { store, config, metrics, watches, acl: None, mesh_ca: None, activity, epoch }
    }

    /// The same state, checking requests against `acl`.
    pub fn with_acl(self, acl: Option<Arc<Acl>>) -> Self {
        ApiState { acl, ..self }
    }

    /// The same state, signing mesh identities with `mesh_ca`.
    pub fn with_mesh_ca(self, mesh_ca: Option<Arc<MeshCa>>) -> Self {
        ApiState { mesh_ca, ..self }
    }
}
