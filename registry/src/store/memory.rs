//! The embedded in-memory store.
//!
//! Locking: a map of services behind a `RwLock` that is written only when a
//! service is first seen; per service, a `Mutex` over its instances held for
//! microseconds (never across an `.await`), an `ArcSwap` with the published
//! snapshot that readers load without locking, and a `watch` channel carrying
//! the index that wakes only this service's watchers. Heartbeats for different
//! services never share a lock; a renewal touches only its service's mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use trellis_shared::{Instance, InstanceId, ServiceName, ServiceSummary};

use super::{Change, Heartbeat, Registration, ServiceSnapshot, Store, StoreError, WriteOutcome};
use crate::expiry::ExpiryQueue;

/// Counters the memory store feeds; clones share the values with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub expirations: Counter,
}

pub struct MemoryStore {
    epoch: String,
    revision: AtomicU64,
    services: RwLock<HashMap<ServiceName, Arc<ServiceEntry>>>,
    expiry: Mutex<ExpiryQueue<(Arc<ServiceEntry>, InstanceId)>>,
    expiry_wake: Notify,
    metrics: StoreMetrics,
}

struct ServiceEntry {
    name: ServiceName,
    state: Mutex<ServiceState>,
    snapshot: ArcSwap<ServiceSnapshot>,
    index_tx: watch::Sender<u64>,
}

#[derive(Default)]
struct ServiceState {
    index: u64,
    instances: BTreeMap<InstanceId, Slot>,
}

struct Slot {
    instance: Arc<Instance>,
    ttl: Duration,
    /// When the lease runs out unless renewed.
    deadline: Instant,
    /// Deadline of this lease's live entry in the expiry queue.
    queued: Instant,
}

/// Poisoning only follows a panic elsewhere; the data is still consistent
/// because every critical section leaves it so before anything can panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl MemoryStore {
    pub fn new(metrics: StoreMetrics) -> Self {
        MemoryStore {
            epoch: format!("{:016x}", rand::random::<u64>()),
            revision: AtomicU64::new(0),
            services: RwLock::new(HashMap::new()),
            expiry: Mutex::new(ExpiryQueue::default()),
            expiry_wake: Notify::new(),
            metrics,
        }
    }

    fn get(&self, service: &ServiceName) -> Option<Arc<ServiceEntry>> {
        self.services.read().unwrap_or_else(|e| e.into_inner()).get(service).cloned()
    }

    fn entry(&self, service: &ServiceName) -> Arc<ServiceEntry> {
        if let Some(e) = self.get(service) {
            return e;
        }
        let mut map = self.services.write().unwrap_or_else(|e| e.into_inner());
        map.entry(service.clone())
            .or_insert_with(|| {
                let (index_tx, _) = watch::channel(0);
                Arc::new(ServiceEntry {
                    name: service.clone(),
                    state: Mutex::new(ServiceState::default()),
                    snapshot: ArcSwap::from_pointee(ServiceSnapshot::empty(service.clone())),
                    index_tx,
                })
            })
            .clone()
    }

    /// Publishes the service's state; `moved` takes a new revision and wakes
    /// the service's watchers, otherwise (output text only) readers just see it.
    fn publish(&self, entry: &ServiceEntry, state: &mut ServiceState, moved: bool) -> u64 {
        if moved {
            state.index = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
        }
        let instances = state.instances.values().map(|s| s.instance.clone()).collect();
        entry.snapshot.store(Arc::new(ServiceSnapshot::new(
            entry.name.clone(),
            state.index,
            instances,
            false,
        )));
        if moved {
            entry.index_tx.send_replace(state.index);
        }
        state.index
    }

    fn enqueue(&self, at: Instant, entry: Arc<ServiceEntry>, id: InstanceId) {
        let first = lock(&self.expiry).push(at, (entry, id));
        if first {
            self.expiry_wake.notify_one();
        }
    }

    /// Handles a due queue entry: expires the lease or queues it again at its
    /// renewed deadline.
    fn check_lease(&self, entry: Arc<ServiceEntry>, id: InstanceId, at: Instant, now: Instant) {
        let requeue = {
            let mut state = lock(&entry.state);
            let Some(slot) = state.instances.get_mut(&id) else { return };
            if slot.queued != at {
                return; // superseded by an earlier entry for the same lease
            }
            if now >= slot.deadline {
                let ttl = slot.ttl;
                state.instances.remove(&id);
                let index = self.publish(&entry, &mut state, true);
                self.metrics.expirations.inc();
                info!(service = %entry.name, instance = %id, ttl = ?ttl, index, "instance expired");
                None
            } else {
                slot.queued = slot.deadline;
                Some(slot.deadline)
            }
        };
        if let Some(deadline) = requeue {
            self.enqueue(deadline, entry, id);
        }
    }

    /// Expires every lease due now; returns the next deadline to wake for.
    fn expire_due(&self) -> Option<Instant> {
        loop {
            let now = Instant::now();
            let due = lock(&self.expiry).pop_due(now);
            match due {
                Some((at, (entry, id))) => self.check_lease(entry, id, at, now),
                None => return lock(&self.expiry).next_deadline(),
            }
        }
    }

    /// Number of lease entries queued (for tests).
    pub fn queued_leases(&self) -> usize {
        lock(&self.expiry).len()
    }
}

impl Store for MemoryStore {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn register(&self, service: &ServiceName, reg: Registration) -> Result<WriteOutcome, StoreError> {
        let entry = self.entry(service);
        let now = Instant::now();
        let deadline = now + reg.ttl;
        let id = reg.instance.id.clone();
        let (outcome, enqueue) = {
            let mut state = lock(&entry.state);
            match state.instances.get_mut(&id) {
                Some(slot) => {
                    let previous = slot.instance.status;
                    let moved = !slot.instance.same_membership(&reg.instance);
                    let output_changed = slot.instance.output != reg.instance.output;
                    if moved || output_changed {
                        slot.instance = Arc::new(reg.instance);
                    }
                    slot.ttl = reg.ttl;
                    slot.deadline = deadline;
                    // A shorter TTL than before needs an earlier queue entry.
                    let enqueue = deadline < slot.queued;
                    if enqueue {
                        slot.queued = deadline;
                    }
                    let status = slot.instance.status;
                    let index = if moved || output_changed {
                        self.publish(&entry, &mut state, moved)
                    } else {
                        state.index
                    };
                    if moved {
                        info!(service = %service, instance = %id, status = status.as_str(), index, "instance re-registered with changes");
                    } else {
                        debug!(service = %service, instance = %id, "instance re-registered");
                    }
                    let change = if moved { Change::Updated } else { Change::Renewed };
                    (WriteOutcome { change, index, previous_status: Some(previous) }, enqueue)
                }
                None => {
                    let status = reg.instance.status;
                    let slot =
                        Slot { instance: Arc::new(reg.instance), ttl: reg.ttl, deadline, queued: deadline };
                    state.instances.insert(id.clone(), slot);
                    let index = self.publish(&entry, &mut state, true);
                    info!(service = %service, instance = %id, status = status.as_str(), ttl = ?reg.ttl, index, "instance registered");
                    (WriteOutcome { change: Change::Added, index, previous_status: None }, true)
                }
            }
        };
        if enqueue {
            self.enqueue(deadline, entry, id);
        }
        Ok(outcome)
    }

    async fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        hb: Heartbeat,
    ) -> Result<WriteOutcome, StoreError> {
        let unknown = || StoreError::UnknownInstance { service: service.clone(), id: id.clone() };
        let entry = self.get(service).ok_or_else(unknown)?;
        let mut state = lock(&entry.state);
        let slot = state.instances.get_mut(id).ok_or_else(unknown)?;
        // Renewals only move the deadline later, so the queue entry stays valid.
        slot.deadline = Instant::now() + slot.ttl;
        let previous = slot.instance.status;
        let status_changed = hb.status.is_some_and(|s| s != previous);
        let output_changed = hb.output.as_deref().is_some_and(|o| o != slot.instance.output);
        if !status_changed && !output_changed {
            let index = state.index;
            return Ok(WriteOutcome { change: Change::Renewed, index, previous_status: Some(previous) });
        }
        let mut updated = (*slot.instance).clone();
        if let Some(s) = hb.status {
            updated.status = s;
        }
        if let Some(o) = hb.output {
            updated.output = o;
        }
        let status = updated.status;
        slot.instance = Arc::new(updated);
        let index = self.publish(&entry, &mut state, status_changed);
        if status_changed {
            info!(service = %service, instance = %id, from = previous.as_str(), to = status.as_str(), index, "instance health changed");
        }
        let change = if status_changed { Change::Updated } else { Change::Renewed };
        Ok(WriteOutcome { change, index, previous_status: Some(previous) })
    }

    async fn deregister(&self, service: &ServiceName, id: &InstanceId) -> Result<u64, StoreError> {
        let unknown = || StoreError::UnknownInstance { service: service.clone(), id: id.clone() };
        let entry = self.get(service).ok_or_else(unknown)?;
        let mut state = lock(&entry.state);
        state.instances.remove(id).ok_or_else(unknown)?;
        let index = self.publish(&entry, &mut state, true);
        info!(service = %service, instance = %id, index, "instance deregistered");
        Ok(index)
    }

    fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        match self.get(service) {
            Some(e) => e.snapshot.load_full(),
            None => Arc::new(ServiceSnapshot::empty(service.clone())),
        }
    }

    async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        let entry = self.entry(service);
        let mut rx = entry.index_tx.subscribe();
        // The sender lives in `entry`, which we hold, so this cannot fail.
        let _ = rx.wait_for(|current| *current != index).await;
        entry.snapshot.load_full()
    }

    fn list(&self) -> Vec<ServiceSummary> {
        let entries: Vec<Arc<ServiceEntry>> =
            self.services.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect();
        let mut out: Vec<ServiceSummary> = entries
            .iter()
            .map(|e| e.snapshot.load())
            .filter(|s| !s.instances().is_empty())
            .map(|s| s.summary())
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    async fn background(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            let next = self.expire_due();
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.expiry_wake.notified() => {}
                _ = sleep => {}
            }
        }
    }
}
