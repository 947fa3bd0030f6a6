//! A replica's local copy of the instances under the etcd prefix.
//!
//! One writer (the watch task) applies etcd's events in revision order; readers
//! load per-service snapshots without locking, as with the memory store. A
//! service's index is the etcd revision of the last change that moved it, so
//! replicas that saw the same events agree on every index. The highest revision
//! applied is published too, so a blocking query that names an index this
//! replica has not reached yet can wait for the cache to catch up.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};
use trellis_shared::{Instance, InstanceId, InstanceRecord, ServiceName, ServiceSummary};

use super::client::KeyValue;
use crate::store::table::{Member, ServiceTable};
use crate::store::ServiceSnapshot;

/// What the cache knows of one instance besides what discovery shows.
#[derive(Debug, Clone)]
pub struct Cached {
    pub instance: Arc<Instance>,
    /// The lease the key is attached to: the owning replica's lease for this TTL.
    pub lease: i64,
    pub ttl: Duration,
    /// Revision of the key's last write, which adoption and expiry compare against.
    pub mod_revision: i64,
}

impl Member for Cached {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }
}

pub struct Cache {
    /// Keys are `<prefix><service>/<id>`.
    prefix: Vec<u8>,
    table: ServiceTable<Cached>,
    revision: watch::Sender<u64>,
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

/// The stored form of an instance: the registration record as JSON.
pub fn encode(service: &ServiceName, cached: &Cached) -> Vec<u8> {
    let record = InstanceRecord {
        service: service.clone(),
        instance: (*cached.instance).clone(),
        ttl: cached.ttl.into(),
    };
    serde_json::to_vec(&record).unwrap_or_default()
}

impl Cache {
    pub fn new(prefix: Vec<u8>, protection_threshold: f64) -> Self {
        let (revision, _) = watch::channel(0);
        Cache { prefix, table: ServiceTable::new(protection_threshold), revision }
    }

    /// The same cache, refusing new services and instances past `caps`.
    pub fn with_caps(self, caps: crate::store::table::Caps) -> Self {
        Cache { table: self.table.with_caps(caps), ..self }
    }

    /// Whether a registration of `id` in `service` stays within the caps, by this cache's count.
    pub fn admit(&self, service: &ServiceName, id: &InstanceId) -> Result<(), crate::store::StoreError> {
        self.table.admit_by_name(service, id)
    }

    pub fn key(&self, service: &ServiceName, id: &InstanceId) -> Vec<u8> {
        let mut k = self.prefix.clone();
        k.extend_from_slice(service.as_str().as_bytes());
        k.push(b'/');
        k.extend_from_slice(id.as_str().as_bytes());
        k
    }

    fn parse_key(&self, key: &[u8]) -> Option<(ServiceName, InstanceId)> {
        let rest = std::str::from_utf8(key.strip_prefix(self.prefix.as_slice())?).ok()?;
        let (service, id) = rest.split_once('/')?;
        Some((ServiceName::new(service).ok()?, InstanceId::new(id).ok()?))
    }

    /// Decodes a stored instance; `None` (with a warning) for foreign or broken values.
    pub fn decode(&self, kv: &KeyValue) -> Option<(ServiceName, Cached)> {
        let (service, id) = self.parse_key(&kv.key)?;
        let record: InstanceRecord = match serde_json::from_slice(&kv.value) {
            Ok(r) => r,
            Err(e) => {
                warn!(service = %service, instance = %id, error = %e, "ignoring an undecodable instance in etcd");
                return None;
            }
        };
        if record.service != service || record.instance.id != id {
            warn!(service = %service, instance = %id, "ignoring an instance stored under another's key");
            return None;
        }
        let cached = Cached {
            instance: Arc::new(record.instance),
            lease: kv.lease,
            ttl: record.ttl.0,
            mod_revision: kv.mod_revision,
        };
        Some((service, cached))
    }

    /// Applies a put event; returns the instance's TTL, `None` for a value it ignored.
    pub fn apply_put(&self, kv: &KeyValue) -> Option<Duration> {
        let (service, cached) = self.decode(kv)?;
        let ttl = cached.ttl;
        let entry = self.table.entry(&service);
        let mut state = entry.lock();
        let id = cached.instance.id.clone();
        let status = cached.instance.status;
        let index = rev(kv.mod_revision);
        match state.instances.insert(id.clone(), cached) {
            None => {
                self.table.publish(&entry, &mut state, Some(index));
                info!(service = %service, instance = %id, status = status.as_str(), index, "instance registered");
            }
            Some(old) => {
                let new = &state.instances[&id].instance;
                if !old.instance.same_membership(new) {
                    let from = old.instance.status;
                    self.table.publish(&entry, &mut state, Some(index));
                    if from != status {
                        info!(service = %service, instance = %id, from = from.as_str(), to = status.as_str(), index, "instance health changed");
                    } else {
                        info!(service = %service, instance = %id, index, "instance re-registered with changes");
                    }
                } else if old.instance.output != new.output {
                    self.table.publish(&entry, &mut state, None);
                }
            }
        }
        Some(ttl)
    }

    /// Applies a delete event (deregistration or lease expiry).
    pub fn apply_delete(&self, kv: &KeyValue) {
        let Some((service, id)) = self.parse_key(&kv.key) else { return };
        let Some(entry) = self.table.get(&service) else { return };
        let mut state = entry.lock();
        if state.instances.remove(&id).is_some() {
            let index = rev(kv.mod_revision);
            self.table.publish(&entry, &mut state, Some(index));
            info!(service = %service, instance = %id, index, "instance removed");
        }
    }

    /// Records that every event up to `revision` is applied.
    pub fn advance(&self, revision: i64) {
        let r = rev(revision);
        self.revision.send_if_modified(|cur| {
            let moved = r > *cur;
            if moved {
                *cur = r;
            }
            moved
        });
    }

    pub fn revision(&self) -> u64 {
        *self.revision.borrow()
    }

    /// Replaces the whole cache with a range read at `revision` (start-up, or
    /// after the watch fell behind a compaction). A service seen for the first
    /// time takes the newest revision among its keys; one whose instances
    /// changed while we were not watching takes `revision` itself, so its index
    /// moves past anything its watchers saw.
    pub fn reset(&self, revision: i64, kvs: &[KeyValue]) {
        let mut fresh: HashMap<ServiceName, (BTreeMap<InstanceId, Cached>, i64)> = HashMap::new();
        for kv in kvs {
            if let Some((service, cached)) = self.decode(kv) {
                let slot = fresh.entry(service).or_default();
                slot.1 = slot.1.max(kv.mod_revision);
                slot.0.insert(cached.instance.id.clone(), cached);
            }
        }
        for known in self.table.entries() {
            fresh.entry(known.name().clone()).or_default();
        }
        for (service, (instances, newest)) in fresh {
            let entry = self.table.entry(&service);
            let mut state = entry.lock();
            let same = state.instances.len() == instances.len()
                && state
                    .instances
                    .iter()
                    .zip(instances.iter())
                    .all(|((a, x), (b, y))| a == b && x.instance.same_membership(&y.instance));
            let index = if state.index == 0 { rev(newest) } else { rev(revision) };
            state.instances = instances;
            self.table.publish(&entry, &mut state, (!same).then_some(index));
        }
        self.advance(revision);
    }

    pub fn lookup(&self, service: &ServiceName, id: &InstanceId) -> Option<(Cached, u64)> {
        let entry = self.table.get(service)?;
        let state = entry.lock();
        state.instances.get(id).map(|c| (c.clone(), state.index))
    }

    /// Whether `key` names an instance the cache holds.
    pub fn contains_key(&self, key: &[u8]) -> bool {
        self.parse_key(key).is_some_and(|(service, id)| self.lookup(&service, &id).is_some())
    }

    /// The distinct leases the cached instances are attached to (a few
    /// replica leases), the longest TTL and the number of instances.
    pub fn leases(&self) -> (Vec<i64>, Option<Duration>, usize) {
        let mut leases = std::collections::BTreeSet::new();
        let mut longest = None;
        let mut count = 0;
        for e in self.table.entries() {
            let state = e.lock();
            count += state.instances.len();
            for c in state.instances.values() {
                leases.insert(c.lease);
                longest = longest.max(Some(c.ttl));
            }
        }
        (leases.into_iter().collect(), longest, count)
    }

    pub fn index(&self, service: &ServiceName) -> u64 {
        self.table.get(service).map(|e| e.lock().index).unwrap_or(0)
    }

    pub fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        self.table.snapshot(service)
    }

    /// Resolves once every event up to `revision` is applied.
    pub async fn reach(&self, revision: u64) {
        let mut rx = self.revision.subscribe();
        // The sender lives in `self`, which the caller borrows, so this cannot fail.
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// The service's state once the cache has reached `index` and the
    /// service's index differs from it.
    pub async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        self.reach(index).await;
        self.table.watch_from(service, index).await
    }

    pub fn list(&self) -> Vec<ServiceSummary> {
        self.table.list()
    }

    pub fn catalog(&self) -> (u64, Vec<Arc<ServiceSnapshot>>) {
        (self.table.catalog_index(), self.table.snapshots())
    }

    /// Like [`Cache::watch_from`], for the catalog's index.
    pub async fn watch_catalog_from(&self, index: u64) -> u64 {
        self.reach(index).await;
        self.table.watch_catalog_from(index).await
    }

    pub fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>> {
        self.table.snapshots()
    }

    pub fn changes(&self) -> watch::Receiver<u64> {
        self.table.changes()
    }

    /// The cached instances of `service` (sorted by id).
    pub fn members(&self, service: &ServiceName) -> Vec<(InstanceId, Cached)> {
        let Some(entry) = self.table.get(service) else { return Vec::new() };
        let state = entry.lock();
        state.instances.iter().map(|(id, c)| (id.clone(), c.clone())).collect()
    }
}

#[cfg(test)]
mod tests {

    use trellis_shared::HealthStatus;

    use super::*;

    fn kv(cache: &Cache, service: &str, id: &str, status: HealthStatus, rev: i64) -> KeyValue {
        let service = ServiceName::new(service).unwrap();
        let id = InstanceId::new(id).unwrap();
        let instance = crate::store::snapshot::tests::inst(id.as_str(), status);
        let cached = Cached { instance, lease: 7, ttl: Duration::from_secs(5), mod_revision: rev };
        KeyValue {
            key: cache.key(&service, &id),
            value: encode(&service, &cached),
            mod_revision: rev,
            lease: 7,
        }
    }

    #[tokio::test]
    async fn indexes_follow_the_revisions_of_changes() {
        let c = Cache::new(b"/t/instances/".to_vec(), 0.0);
        let users = ServiceName::new("users").unwrap();
        c.apply_put(&kv(&c, "users", "a", HealthStatus::Passing, 5));
        c.apply_put(&kv(&c, "orders", "x", HealthStatus::Passing, 6));
        c.advance(6);
        assert_eq!(c.snapshot(&users).index(), 5);
        // The same instance written again (a new lease) does not move the index.
        c.apply_put(&kv(&c, "users", "a", HealthStatus::Passing, 7));
        assert_eq!(c.snapshot(&users).index(), 5);
        c.apply_put(&kv(&c, "users", "a", HealthStatus::Critical, 8));
        assert_eq!(c.snapshot(&users).index(), 8);
        assert_eq!(c.snapshot(&users).healthy(), 0);
        let mut del = kv(&c, "users", "a", HealthStatus::Critical, 9);
        del.value.clear();
        c.apply_delete(&del);
        assert_eq!(c.snapshot(&users).index(), 9);
        assert!(c.snapshot(&users).instances().is_empty());
        assert_eq!(c.list().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lagging_replica_waits_for_the_index_it_has_not_reached() {
        let c = Arc::new(Cache::new(b"/t/instances/".to_vec(), 0.0));
        let users = ServiceName::new("users").unwrap();
        c.apply_put(&kv(&c, "users", "a", HealthStatus::Passing, 5));
        c.advance(5);
        // A client saw index 9 on another replica: wait, do not answer with 5.
        let waiter = {
            let c = c.clone();
            let users = users.clone();
            tokio::spawn(async move { c.watch_from(&users, 9).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        c.apply_put(&kv(&c, "users", "b", HealthStatus::Passing, 9));
        c.advance(9);
        // Reached 9, and the service's index is 9: still nothing new to tell.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished());
        c.apply_put(&kv(&c, "users", "c", HealthStatus::Passing, 10));
        c.advance(10);
        let snap = waiter.await.unwrap();
        assert_eq!(snap.index(), 10);
        assert_eq!(snap.instances().len(), 3);
    }

    #[test]
    fn reset_moves_only_changed_services() {
        let c = Cache::new(b"/t/instances/".to_vec(), 0.0);
        let users = ServiceName::new("users").unwrap();
        let orders = ServiceName::new("orders").unwrap();
        let a = kv(&c, "users", "a", HealthStatus::Passing, 3);
        let x = kv(&c, "orders", "x", HealthStatus::Passing, 4);
        c.reset(10, &[a.clone(), x.clone()]);
        assert_eq!(c.snapshot(&users).index(), 3);
        assert_eq!(c.snapshot(&orders).index(), 4);
        assert_eq!(c.revision(), 10);
        // After a compaction: orders lost x, users unchanged.
        c.reset(20, &[a]);
        assert_eq!(c.snapshot(&users).index(), 3);
        assert_eq!(c.snapshot(&orders).index(), 20);
        assert!(c.snapshot(&orders).instances().is_empty());
        assert_eq!(c.revision(), 20);
    }
}
