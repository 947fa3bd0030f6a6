//! The Trellis sidecar: runs beside an app, registers it, checks its health and
//! heartbeats it, watches the services the app calls, and proxies the app's
//! outbound calls to healthy instances.
//!
//! Modules (one concept each):
//! - [`config`]: CLI flags and environment variables, mapped to the structs below.
//! - [`host`]: the host's name and address, for registration defaults.
//! - [`health`]: checks of the local app with consecutive thresholds.
//! - [`identity`]: the mesh identity (key, leaf, roots) and its renewal from the registry.
//! - [`registration`]: registers the app once healthy and heartbeats its status.
//! - [`discovery`]: one watch per upstream service, publishing [`endpoints::EndpointSet`]s;
//!   the capped, idle-evicting `Directory` that implements [`endpoints::Resolve`].
//! - [`health_panic`]: below a share of healthy instances, route to every instance (Envoy's panic threshold).
//! - [`refuse`]: endpoints never connected to (own listeners, unspecified, multicast, link-local).
//! - [`endpoints`]: endpoint and snapshot types, read lock-free by the proxy.
//! - [`balance`]: least-connections selection, a pure data structure.
//! - [`outlier`]: passive ejection state machine.
//! - [`hedge`]: hedged requests per service: the delay, fixed or the observed p95.
//! - [`zone`]: zone-aware routing: keep traffic in the caller's zone, spill over with hysteresis.
//! - [`retry`]: retry policy and retry budget.
//! - [`proxy`]: the outbound proxy server.
//! - [`inbound`]: the inbound side: mutual TLS in front of the app, `--allow-from`, `x-trellis-caller`.
//! - [`error`]: sidecar-produced errors mapped to status and JSON in one place.
//! - [`metrics`]: Prometheus metrics.
//! - [`admin`]: `/ready`, `/metrics`, `/endpoints`.
//! - [`shutdown`]: ordered, bounded shutdown.
//! - [`run`]: the sidecar assembled from the above; what the binary calls.

pub mod admin;
pub mod balance;
pub mod config;
pub mod discovery;
pub mod endpoints;
pub mod error;
pub mod health;
pub mod health_panic;
pub mod hedge;
pub mod host;
pub mod identity;
pub mod inbound;
pub mod metrics;
pub mod outlier;
pub mod proxy;
pub mod refuse;
pub mod registration;
pub mod retry;
pub mod run;
pub mod shutdown;
pub mod zone;

pub use run::{run, RunError};
