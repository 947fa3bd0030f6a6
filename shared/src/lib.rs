//! Trellis shared crate: the registry's wire types and the async registry client.
//!
//! Both the registry and the sidecar depend on this crate and never on each other.
//! It holds no server runtime beyond [`accept`] and [`watchdog`], the accept step and the connection
//! deadlines both servers share.
//!
//! - [`accept`]: the next connection off a listener, stopping on shutdown and pausing after errors.
//! - [`names`]: validated service names, instance ids, zones and addresses.
//! - [`duration`]: durations on the wire as strings like `500ms`, `5s`, `1m`.
//! - [`types`]: instance records, health status, service views, request bodies, limits.
//! - [`error`]: the error body every Trellis HTTP error carries, and its codes.
//! - [`backoff`]: capped exponential backoff with full jitter.
//! - [`client`]: the registry client with failover between several registry URLs, and watches.
//! - [`token`]: the bearer token the client presents, from a file it re-reads or a secret.
//! - [`identity`]: the mesh identity's wire types (`POST /v1/identity/sign`) and SPIFFE IDs.
//! - [`tls`]: the CA, client certificate and handshake errors of TLS towards the registry.
//! - [`ready_file`]: the JSON file a process writes with the addresses it bound (port 0).
//! - [`watchdog`]: a server connection's header and idle deadlines (the registry's listener,
//!   the sidecar's inbound side); the one piece of server plumbing kept here, so it is written once.

pub mod accept;
pub mod backoff;
pub mod client;
pub mod duration;
pub mod error;
pub mod identity;
pub mod names;
pub mod ready_file;
pub mod tls;
pub mod token;
pub mod types;
pub mod watchdog;

pub use client::{ClientConfig, ClientError, RegistryClient, Watch};
pub use duration::WireDuration;
pub use error::{ErrorBody, ErrorCode};
pub use names::{Address, InstanceId, NameError, ServiceName, Zone};
pub use types::{
    HealthStatus, HeartbeatRequest, Instance, InstanceRecord, RegisterRequest, ServiceList, ServiceSummary,
    ServiceView,
};

/// Header carrying a service view's index (also in the JSON body).
pub const INDEX_HEADER: &str = "x-trellis-index";
/// Header carrying the registry store's epoch (also in the JSON body).
pub const EPOCH_HEADER: &str = "x-trellis-epoch";
/// Header set to `true` when a registry answers from a cache it knows may be stale.
pub const STALE_HEADER: &str = "x-trellis-stale";
