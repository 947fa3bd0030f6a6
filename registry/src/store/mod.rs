//! The storage abstraction behind the API.
//!
//! A store keeps, per service, an immutable [`ServiceSnapshot`] that readers
//! load without contending with writers, numbered by a revision of the store's
//! history: every change that moves a service (an instance added or removed, a
//! change of status, address, port, zone, weight or metadata) takes the next
//! revision, and that revision becomes the service's index. Renewals and output
//! text alone do not move it. Watches are "from a revision": they resolve when a
//! service's index passes the one the caller last saw.
//!
//! The memory store ([`memory`]) is the embedded default; [`StoreSpec`] (the
//! `--store` flag) picks it or the etcd store, which fits the same trait: indexes become etcd revisions (comparable across replicas), the
//! epoch becomes the cluster's identity, and `background` runs its watch loop.
//!
//! - [`snapshot`]: the immutable per-service snapshot and its pre-rendered JSON.
//! - [`table`]: the per-service table both stores keep (members, published
//!   snapshots, watchers, the protection threshold).
//! - [`memory`]: the in-memory store with ordered lease expiry.
//! - [`etcd`]: the etcd store, replicas sharing an etcd cluster.

pub mod etcd;
pub mod memory;
pub mod snapshot;
pub mod table;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use trellis_shared::{HealthStatus, Instance, InstanceId, ServiceName, ServiceSummary};
use url::Url;

pub use memory::MemoryStore;
pub use snapshot::ServiceSnapshot;

/// Prefix used when `--store etcd://...` names none.
pub const DEFAULT_ETCD_PREFIX: &str = "/trellis";

/// Which store a registry runs on (`--store`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// The embedded in-memory store (one registry, state lost on restart).
    Memory,
    /// An etcd cluster: client URLs of its members and the key prefix.
    Etcd { endpoints: Vec<Url>, prefix: String },
}

impl std::str::FromStr for StoreSpec {
    type Err = String;

    /// `memory`, or `etcd://host:2379,host:2379[/prefix]` (`etcd+https://`
    /// for TLS; `etcd://` also becomes TLS with `--etcd-ca` or `--etcd-cert`).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s == "memory" {
            return Ok(StoreSpec::Memory);
        }
        let (scheme, rest) = match (s.strip_prefix("etcd://"), s.strip_prefix("etcd+https://")) {
            (Some(rest), _) => ("http", rest),
            (_, Some(rest)) => ("https", rest),
            _ => return Err(format!("expected \"memory\" or \"etcd://host:port,...[/prefix]\", got {s:?}")),
        };
        let (hosts, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() { DEFAULT_ETCD_PREFIX.to_string() } else { prefix.to_string() };
        let mut endpoints = Vec::new();
        for h in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
            let url =
                Url::parse(&format!("{scheme}://{h}/")).map_err(|e| format!("bad etcd member {h:?}: {e}"))?;
            if url.port().is_none() {
                return Err(format!("etcd member {h:?} needs a port (etcd's client port is 2379)"));
            }
            endpoints.push(url);
        }
        if endpoints.is_empty() {
            return Err("etcd:// needs at least one host:port".into());
        }
        Ok(StoreSpec::Etcd { endpoints, prefix })
    }
}

impl std::fmt::Display for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("memory"),
            StoreSpec::Etcd { endpoints, prefix } => {
                let hosts: Vec<String> = endpoints
                    .iter()
                    .map(|u| format!("{}:{}", u.host_str().unwrap_or(""), u.port().unwrap_or(2379)))
                    .collect();
                let tls = endpoints.first().is_some_and(|u| u.scheme() == "https");
                write!(f, "{}://{}{}", if tls { "etcd+https" } else { "etcd" }, hosts.join(","), prefix)
            }
        }
    }
}

/// Why a store refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("instance {id} of service {service} is not registered")]
    UnknownInstance { service: ServiceName, id: InstanceId },
    /// The store cannot take writes now (an etcd store without quorum).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// A new service or instance past `--max-services` or `--max-instances-per-service`.
    #[error("{0}")]
    LimitExceeded(String),
}

/// A validated registration: the instance as it will be stored and the length
/// of its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedInstance {
    pub instance: Instance,
    pub ttl: Duration,
}

/// A validated heartbeat: fields left `None` keep their stored value.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heartbeat {
    pub status: Option<HealthStatus>,
    pub output: Option<String>,
}

/// What a write did, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The instance is new.
    Added,
    /// Something that moves the index changed.
    Updated,
    /// Only the lease (and perhaps the output text) was renewed.
    Renewed,
}

/// Result of a write: what happened and the service's index afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub change: Change,
    pub index: u64,
    /// The health status before the write, when the instance existed.
    pub previous_status: Option<HealthStatus>,
}

/// An instance's lease as the store keeps it, for the dashboard's service page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseState {
    pub id: InstanceId,
    /// The lease's length, as registered (etcd: as granted, whole seconds).
    pub ttl: Duration,
    /// Time since the last renewal (a heartbeat or a registration); `None`
    /// when the store cannot tell (an etcd lease it could not look up).
    pub since_renewal: Option<Duration>,
    /// Time until the lease runs out unless renewed; zero once it has.
    pub left: Option<Duration>,
    /// The lease ran out and the instance is still listed: the expiry brake holds it.
    pub held: bool,
}

/// The instances one replica of a shared store answers heartbeats for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct OwnedCount {
    /// Those on its leases.
    pub owned: usize,
    /// Those whose sidecar moved here and whose key has yet to follow (the
    /// move is queued).
    pub adopting: usize,
}

/// Storage of registrations with revision-numbered changes and watches.
///
/// Writes are async because a distributed store answers over the network; reads
/// are synchronous because every store serves them from a local snapshot.
pub trait Store: Send + Sync + 'static {
    /// Identity of the store's history; changes when the history restarts.
    fn epoch(&self) -> &str;

    /// Registers or replaces an instance and starts (or renews) its lease.
    fn register(
        &self,
        service: &ServiceName,
        registration: LeasedInstance,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Renews an instance's lease and records the health it reports.
    fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        heartbeat: Heartbeat,
    ) -> impl Future<Output = Result<WriteOutcome, StoreError>> + Send;

    /// Removes an instance at once.
    fn deregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// The current state of a service; index 0 and no instances when unknown.
    fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot>;

    /// Resolves with the service's state once its index differs from `index`
    /// (at once when it already does, including an index the store has not
    /// reached: a client that saw a previous history). Cancel-safe: dropping
    /// the future drops the watch.
    fn watch_from(
        &self,
        service: &ServiceName,
        index: u64,
    ) -> impl Future<Output = Arc<ServiceSnapshot>> + Send;

    /// Every service with at least one instance, sorted by name.
    fn list(&self) -> Vec<ServiceSummary>;

    /// The catalog (Consul's `/v1/catalog/services`): its index, then the
    /// snapshot of every service with at least one instance, sorted by name.
    /// The index is read first, so it never runs ahead of the services.
    fn catalog(&self) -> (u64, Vec<Arc<ServiceSnapshot>>);

    /// Resolves with the catalog's index once it differs from `index` (see
    /// [`table::ServiceTable::watch_catalog_from`]). Cancel-safe.
    fn watch_catalog_from(&self, index: u64) -> impl Future<Output = u64> + Send;

    /// How long ago the store last confirmed its copy is current (Consul's
    /// `X-Consul-LastContact`); zero for a store that is its own truth.
    fn last_contact(&self) -> Duration {
        Duration::ZERO
    }

    /// The snapshot of every service with at least one instance, sorted by name.
    fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>>;

    /// The highest index any service has moved to; it changes on every change
    /// of any service (a watch of the whole registry).
    fn changes(&self) -> watch::Receiver<u64>;

    /// The lease of each instance of `service`, sorted by id; empty when unknown.
    fn leases(&self, service: &ServiceName) -> impl Future<Output = Vec<LeaseState>> + Send;

    /// This registry's name among the replicas sharing the store; `None` for a
    /// store of one (the memory store).
    fn replica(&self) -> Option<&str> {
        None
    }

    /// How many instances this replica answers heartbeats for, among those
    /// sharing the store; `None` for a store of one (it owns them all).
    fn owned(&self) -> Option<OwnedCount> {
        None
    }

    /// Whether reads come from a copy the store cannot refresh right now (an
    /// etcd store without quorum); the API flags such answers.
    fn stale(&self) -> bool {
        false
    }

    /// Whether the store has applied its history up to `index`. A replica that
    /// lags behind the one a client last saw has not: a blocking query then
    /// waits for it instead of answering at once with older state.
    fn reached(&self, _index: u64) -> bool {
        true
    }

    /// Work the store does in the background (lease expiry, following a remote
    /// store); returns when `shutdown` is cancelled.
    fn background(self: Arc<Self>, shutdown: CancellationToken) -> impl Future<Output = ()> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_store_specs() {
        assert_eq!("memory".parse::<StoreSpec>().unwrap(), StoreSpec::Memory);
        let StoreSpec::Etcd { endpoints, prefix } = "etcd://10.0.0.1:2379,etcd-2:2379/reg".parse().unwrap()
        else {
            panic!("not etcd")
        };
        assert_eq!(endpoints.len(), 2);
        assert_eq!(endpoints[1].as_str(), "http://etcd-2:2379/");
        assert_eq!(prefix, "/reg");
        let StoreSpec::Etcd { prefix, .. } = "etcd://a:1".parse().unwrap() else { panic!("not etcd") };
        assert_eq!(prefix, DEFAULT_ETCD_PREFIX);
        for bad in ["", "etcd://", "etcd://host", "consul://a:1", "etcd://a:b"] {
            assert!(bad.parse::<StoreSpec>().is_err(), "{bad}");
        }
        let spec: StoreSpec = "etcd://a:1,b:2/x".parse().unwrap();
        assert_eq!(spec.to_string(), "etcd://a:1,b:2/x");
        let spec: StoreSpec = "etcd+https://a:1,b:2/x".parse().unwrap();
        assert_eq!(spec.to_string(), "etcd+https://a:1,b:2/x");
        let StoreSpec::Etcd { endpoints, .. } = spec else { panic!("not etcd") };
        assert_eq!(endpoints[0].as_str(), "https://a:1/");
    }
}
