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
//! The memory store ([`memory`]) is the embedded default. An etcd store fits the
//! same trait: indexes become etcd revisions (comparable across replicas), the
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

use tokio_util::sync::CancellationToken;
use trellis_shared::{HealthStatus, Instance, InstanceId, ServiceName, ServiceSummary};

pub use memory::MemoryStore;
pub use snapshot::ServiceSnapshot;

/// Why a store refused an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("instance {id} of service {service} is not registered")]
    UnknownInstance { service: ServiceName, id: InstanceId },
    /// The store cannot take writes now (an etcd store without quorum).
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
}

/// A validated registration: the instance as it will be stored and its lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
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
        registration: Registration,
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
