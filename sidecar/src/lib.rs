//! The Trellis sidecar: runs beside an app, registers it, checks its health and
//! heartbeats it, watches the services the app calls, and proxies the app's
//! outbound calls to healthy instances.
//!
//! Modules (one concept each):
//! - [`endpoints`]: endpoint and snapshot types read lock-free by the proxy.
//! - [`outlier`]: passive ejection state machine.

pub mod endpoints;
pub mod outlier;
