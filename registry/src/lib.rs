//! The Trellis registry: leases, healthy discovery and blocking watches over
//! HTTP/JSON (`docs/api.md`), as a library so tests can run it in-process.
//!
//! - [`config`]: clap CLI and environment variables; the defaults are the flags'.
//! - [`server`]: the accept loop, connection caps (global and per address),
//!   TLS handshakes, header and idle timeouts, graceful shutdown; [`run`].
//! - [`api`]: [`api::ApiService`], the one entry of every request (routing,
//!   the heartbeat fast path, the stale flag, request metrics); the axum
//!   handlers behind it.
//! - [`consul`]: the Consul-compatible read API (`/v1/agent/self`,
//!   `/v1/catalog/*`, `/v1/health/service/*`) and its `--datacenter`.
//! - [`acl`]: tokens and what each may do (`--acl-file`), reloaded live.
//! - [`limits`]: caps on services, instances per service and watches per client.
//! - [`error`]: API errors and their mapping to status and JSON body.
//! - [`store`]: the `Store` trait and `StoreSpec`; the per-service table,
//!   snapshots, the memory store and the etcd store.
//! - [`expiry`]: lease deadlines kept in order.
//! - [`brake`]: protection from mass expiry (the expiry brake, the protection threshold).
//! - [`watch`]: blocking queries: parameters, cap, wait and jitter.
//! - [`metrics`]: Prometheus metrics, the stores' groups included.
//! - [`pki`]: a small CA (rcgen): what `registry init` writes and tests issue.
//! - [`identity`]: the mesh CA (`--ca-*`) signing sidecars' certificate requests.
//! - [`init`]: `registry init DIR`: CA, certificates, ACL file and tokens in one command.
//! - [`probe`]: the `registry probe` healthcheck.
//! - [`cli`]: the operator commands (`services`, `show`, `watch`, `deregister`)
//!   against a running registry.
//! - [`tls`]: the `--tls-*` flags, the rustls configuration and its reload on SIGHUP.
//! - [`ui`]: the dashboard's files, compiled in and served under `/ui/`.

pub mod acl;
pub mod api;
pub mod brake;
pub mod cli;
pub mod config;
pub mod consul;
pub mod error;
pub mod expiry;
pub mod identity;
pub mod init;
pub mod limits;
pub mod metrics;
pub mod pki;
pub mod probe;
pub mod server;
pub mod store;
pub mod tls;
pub mod ui;
pub mod watch;

pub use config::Config;
pub use server::{run, serve, ServerError};

/// Locks a mutex whatever became of a previous holder. Poisoning only follows
/// a panic elsewhere; the data is still consistent because every critical
/// section in the registry leaves it so before anything can panic.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
