//! The per-service table both stores keep: what each service holds, the
//! snapshot readers see, and the wake-up of its watchers.
//!
//! Locking: a map of services behind a `RwLock` that is written only when a
//! service is first seen (and by the sweep); per service, a `Mutex` over its
//! members held for microseconds (never across an `.await`), an `ArcSwap` with
//! the published snapshot that readers load without locking, and a `watch`
//! channel carrying the index that wakes only this service's watchers.
//!
//! The table does not decide indexes: the memory store numbers its own
//! revisions, the etcd store takes etcd's. It does apply the protection
//! threshold, so both stores show the same instances for the same state.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use arc_swap::ArcSwap;
use tokio::sync::watch;
use trellis_shared::{Instance, InstanceId, ServiceName, ServiceSummary};

use super::{ServiceSnapshot, StoreError};
use crate::lock;

/// What a store keeps per instance; the table needs only what discovery shows.
pub trait Member {
    fn instance(&self) -> &Arc<Instance>;
}

/// Every service a store knows, with its members of type `M`.
pub struct ServiceTable<M> {
    services: RwLock<HashMap<ServiceName, Arc<ServiceEntry<M>>>>,
    /// At or below this healthy share, discovery shows every instance of the
    /// service flagged `protected`; 0 turns it off.
    protection_threshold: f64,
    caps: Caps,
    /// Services with at least one instance, kept by [`ServiceTable::publish`].
    occupied: AtomicUsize,
    /// The catalog's index: it moves when a service gains its first instance,
    /// loses its last, or changes the union of its tags (Consul's
    /// `/v1/catalog/services`), and wakes that listing's watchers only.
    catalog_tx: watch::Sender<u64>,
    /// The highest index any service moved to: wakes whoever watches the
    /// whole table (the dashboard's overview) on any change.
    changes: watch::Sender<u64>,
}

/// Size caps on what registrations may add (`--max-services`,
/// `--max-instances-per-service`). Only additions are capped: an instance
/// already registered always re-registers and renews.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub max_services: usize,
    pub max_instances_per_service: usize,
}

impl Default for Caps {
    /// No caps.
    fn default() -> Self {
        Caps { max_services: usize::MAX, max_instances_per_service: usize::MAX }
    }
}

/// One service: its members, its published snapshot, its watchers' channel.
pub struct ServiceEntry<M> {
    name: ServiceName,
    members: Mutex<Members<M>>,
    snapshot: ArcSwap<ServiceSnapshot>,
    index_tx: watch::Sender<u64>,
    /// Whether the last publish had instances (for the table's `occupied` count).
    occupied: AtomicBool,
}

/// A service's members and the index of its last published change.
pub struct Members<M> {
    pub index: u64,
    /// Sorted by id, as snapshots list them.
    pub instances: BTreeMap<InstanceId, M>,
}

impl<M> ServiceEntry<M> {
    pub fn name(&self) -> &ServiceName {
        &self.name
    }

    /// The members, locked; never hold the guard across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, Members<M>> {
        lock(&self.members)
    }
}

impl<M: Member> ServiceTable<M> {
    pub fn new(protection_threshold: f64) -> Self {
        ServiceTable {
            services: RwLock::new(HashMap::new()),
            protection_threshold,
            caps: Caps::default(),
            occupied: AtomicUsize::new(0),
            catalog_tx: watch::channel(0).0,
            changes: watch::channel(0).0,
        }
    }

    /// The same table, refusing additions past `caps`.
    pub fn with_caps(self, caps: Caps) -> Self {
        ServiceTable { caps, ..self }
    }

    /// Whether `members` (of `service`, locked by the caller) may take
    /// instance `id`: always when it is already there; else within the caps.
    ///
    /// Two registrations of new services racing on different services can
    /// both pass the service cap and overshoot it by one each: the cap bounds
    /// memory, it is not an exact quota, and a global lock on every
    /// registration would cost more than the overshoot.
    pub fn admit(
        &self,
        service: &ServiceName,
        members: &Members<M>,
        id: &InstanceId,
    ) -> Result<(), StoreError> {
        if members.instances.contains_key(id) {
            return Ok(());
        }
        let max = self.caps.max_instances_per_service;
        if members.instances.len() >= max {
            return Err(StoreError::LimitExceeded(format!(
                "service {service} already has {max} instances, the most --max-instances-per-service allows"
            )));
        }
        let max = self.caps.max_services;
        if members.instances.is_empty() && self.occupied.load(Ordering::Relaxed) >= max {
            return Err(StoreError::LimitExceeded(format!(
                "the registry already holds {max} services, the most --max-services allows"
            )));
        }
        Ok(())
    }

    /// [`ServiceTable::admit`] by name, for a store that checks before a
    /// remote write (the etcd store).
    pub fn admit_by_name(&self, service: &ServiceName, id: &InstanceId) -> Result<(), StoreError> {
        match self.get(service) {
            Some(entry) => self.admit(service, &entry.lock(), id),
            None => {
                let empty = Members { index: 0, instances: BTreeMap::new() };
                self.admit(service, &empty, id)
            }
        }
    }

    pub fn get(&self, service: &ServiceName) -> Option<Arc<ServiceEntry<M>>> {
        self.services.read().unwrap_or_else(|e| e.into_inner()).get(service).cloned()
    }

    /// The service's entry, created empty (index 0) when unknown.
    pub fn entry(&self, service: &ServiceName) -> Arc<ServiceEntry<M>> {
        if let Some(e) = self.get(service) {
            return e;
        }
        let mut map = self.services.write().unwrap_or_else(|e| e.into_inner());
        map.entry(service.clone())
            .or_insert_with(|| {
                let (index_tx, _) = watch::channel(0);
                Arc::new(ServiceEntry {
                    name: service.clone(),
                    members: Mutex::new(Members { index: 0, instances: BTreeMap::new() }),
                    snapshot: ArcSwap::from_pointee(ServiceSnapshot::empty(service.clone())),
                    index_tx,
                    occupied: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// Every entry, empty ones included (the map's lock is released on return).
    pub fn entries(&self) -> Vec<Arc<ServiceEntry<M>>> {
        self.services.read().unwrap_or_else(|e| e.into_inner()).values().cloned().collect()
    }

    /// Publishes `members` as the service's snapshot. With `index` the
    /// service's index moves there and its watchers wake; without (output
    /// text, a lease) readers just see the new state. Returns the index.
    pub fn publish(&self, entry: &ServiceEntry<M>, members: &mut Members<M>, index: Option<u64>) -> u64 {
        if let Some(i) = index {
            members.index = i;
        }
        let occupied = !members.instances.is_empty();
        if entry.occupied.swap(occupied, Ordering::Relaxed) != occupied {
            if occupied {
                self.occupied.fetch_add(1, Ordering::Relaxed);
            } else {
                self.occupied.fetch_sub(1, Ordering::Relaxed);
            }
        }
        let instances: Vec<Arc<Instance>> =
            members.instances.values().map(|m| m.instance().clone()).collect();
        let protected = self.protected(&instances);
        let snapshot = ServiceSnapshot::new(entry.name.clone(), members.index, instances, protected);
        let previous = entry.snapshot.swap(Arc::new(snapshot));
        if index.is_some() {
            if previous.catalog_entry() != entry.snapshot.load().catalog_entry() {
                self.catalog_moved(members.index);
            }
            entry.index_tx.send_replace(members.index);
            let moved = members.index;
            self.changes.send_if_modified(|last| {
                let later = moved > *last;
                if later {
                    *last = moved;
                }
                later
            });
        }
        members.index
    }

    /// Moves the catalog's index to `index`, or one past its current value
    /// when changes published out of order (two services of the memory store)
    /// or in one revision (an etcd transaction) would not move it: the index
    /// must never repeat for a different catalog.
    fn catalog_moved(&self, index: u64) {
        self.catalog_tx.send_modify(|v| *v = if index > *v { index } else { *v + 1 });
    }

    /// The catalog's index (0 before any service had an instance).
    pub fn catalog_index(&self) -> u64 {
        *self.catalog_tx.borrow()
    }

    /// Resolves with the catalog's index once it differs from `index`.
    /// Cancel-safe.
    pub async fn watch_catalog_from(&self, index: u64) -> u64 {
        let mut rx = self.catalog_tx.subscribe();
        // The sender lives in the table, which we borrow, so this cannot fail.
        let current = match rx.wait_for(|current| *current != index).await {
            Ok(current) => *current,
            Err(_) => index,
        };
        current
    }

    /// The protection threshold: too few healthy instances to carry the load,
    /// so discovery shows every instance rather than overload the few.
    fn protected(&self, instances: &[Arc<Instance>]) -> bool {
        let threshold = self.protection_threshold;
        if threshold <= 0.0 || instances.is_empty() {
            return false;
        }
        let healthy = instances.iter().filter(|i| i.status.is_healthy()).count();
        healthy as f64 / instances.len() as f64 <= threshold
    }

    /// The service's published state; index 0 and no instances when unknown.
    pub fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        match self.get(service) {
            Some(e) => e.snapshot.load_full(),
            None => Arc::new(ServiceSnapshot::empty(service.clone())),
        }
    }

    /// Resolves with the service's state once its index differs from `index`.
    /// Cancel-safe: dropping the future drops the subscription.
    pub async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        let entry = self.entry(service);
        let mut rx = entry.index_tx.subscribe();
        // The sender lives in `entry`, which we hold, so this cannot fail.
        let _ = rx.wait_for(|current| *current != index).await;
        entry.snapshot.load_full()
    }

    /// Every service with at least one instance, sorted by name.
    pub fn list(&self) -> Vec<ServiceSummary> {
        self.snapshots().iter().map(|s| s.summary()).collect()
    }

    /// The snapshot of every service with at least one instance, sorted by name.
    pub fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>> {
        let mut out: Vec<Arc<ServiceSnapshot>> = self
            .entries()
            .iter()
            .map(|e| e.snapshot.load_full())
            .filter(|s| !s.instances().is_empty())
            .collect();
        out.sort_by(|a, b| a.service().cmp(b.service()));
        out
    }

    /// The highest index published so far; it changes whenever any service's does.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Forgets services with no instances that nobody uses: no watcher, no
    /// request in flight, no other reference (a queued lease). Under the map's
    /// write lock no one can take a new reference, so a strong count of one
    /// proves it unused. Bounds the memory that watches of never-registered
    /// names can claim. Returns how many were forgotten.
    pub fn sweep(&self) -> usize {
        let mut map = self.services.write().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, e| {
            Arc::strong_count(e) > 1 || e.index_tx.receiver_count() > 0 || !e.lock().instances.is_empty()
        });
        before - map.len()
    }

    /// Number of services the table keeps an entry for, empty ones included.
    pub fn known(&self) -> usize {
        self.services.read().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {

    use trellis_shared::HealthStatus;

    use super::*;

    struct Plain(Arc<Instance>);

    impl Member for Plain {
        fn instance(&self) -> &Arc<Instance> {
            &self.0
        }
    }

    fn plain(id: &str, status: HealthStatus) -> Plain {
        Plain(crate::store::snapshot::tests::inst(id, status))
    }

    #[test]
    fn the_protection_threshold_shows_every_instance_flagged() {
        for (threshold, critical, protected) in [(0.5, 2, true), (0.5, 1, false), (0.0, 3, false)] {
            let table = ServiceTable::new(threshold);
            let users = ServiceName::new("users").unwrap();
            let entry = table.entry(&users);
            let mut members = entry.lock();
            for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
                let status = if i < critical { HealthStatus::Critical } else { HealthStatus::Passing };
                members.instances.insert(InstanceId::new(*id).unwrap(), plain(id, status));
            }
            table.publish(&entry, &mut members, Some(1));
            let view = table.snapshot(&users).view("e", false);
            let label = format!("threshold {threshold}, {critical} of 4 critical");
            assert_eq!(view.protected, protected, "{label}");
            assert_eq!(view.instances.len(), if protected { 4 } else { 4 - critical }, "{label}");
            let all = table.snapshot(&users).view("e", true);
            assert!(!all.protected && all.instances.len() == 4, "{label}");
        }
    }

    #[test]
    fn caps_refuse_new_services_and_instances_but_never_existing_ones() {
        let table = ServiceTable::new(0.0).with_caps(Caps { max_services: 1, max_instances_per_service: 2 });
        let (users, billing) = (ServiceName::new("users").unwrap(), ServiceName::new("billing").unwrap());
        let id = |s: &str| InstanceId::new(s).unwrap();
        let entry = table.entry(&users);
        for i in ["a", "b"] {
            let mut members = entry.lock();
            table.admit(&users, &members, &id(i)).unwrap();
            members.instances.insert(id(i), plain(i, HealthStatus::Passing));
            table.publish(&entry, &mut members, Some(1));
        }
        let refused = |r: Result<(), StoreError>| matches!(r, Err(StoreError::LimitExceeded(_)));
        assert!(refused(table.admit(&users, &entry.lock(), &id("c"))), "third instance");
        assert!(table.admit(&users, &entry.lock(), &id("a")).is_ok(), "re-registration");
        assert!(refused(table.admit_by_name(&billing, &id("a"))), "second service");
        let mut members = entry.lock();
        members.instances.clear();
        table.publish(&entry, &mut members, Some(2));
        drop(members);
        assert!(table.admit_by_name(&billing, &id("a")).is_ok(), "users emptied: room again");
    }

    #[tokio::test(start_paused = true)]
    async fn only_moved_indexes_wake_watchers_and_unused_empty_services_are_swept() {
        let table = Arc::new(ServiceTable::new(0.0));
        let users = ServiceName::new("users").unwrap();
        let waiter = {
            let (table, users) = (table.clone(), users.clone());
            tokio::spawn(async move { table.watch_from(&users, 0).await })
        };
        tokio::task::yield_now().await;
        let entry = table.entry(&users);
        {
            let mut members = entry.lock();
            members.instances.insert(InstanceId::new("a").unwrap(), plain("a", HealthStatus::Passing));
            table.publish(&entry, &mut members, None);
        }
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "a publish without an index wakes no one");
        assert_eq!(table.list().len(), 1, "but readers see it");
        let mut changes = table.changes();
        assert_eq!(*changes.borrow_and_update(), 0, "nothing moved yet");
        table.publish(&entry, &mut entry.lock(), Some(7));
        assert_eq!(waiter.await.unwrap().index(), 7);
        assert!(
            changes.has_changed().unwrap() && *changes.borrow_and_update() == 7,
            "the whole table's watch moved"
        );
        // Another service at a lower index than the highest seen does not move it back.
        let billing = table.entry(&ServiceName::new("billing").unwrap());
        table.publish(&billing, &mut billing.lock(), Some(5));
        assert_eq!((changes.has_changed().unwrap(), *changes.borrow()), (false, 7));
        drop(billing);
        // Emptied and unused: forgotten; a second, never registered, too.
        entry.lock().instances.clear();
        drop(entry);
        table.entry(&ServiceName::new("ghost").unwrap());
        assert_eq!((table.known(), table.sweep(), table.known()), (3, 3, 0));
    }
}
