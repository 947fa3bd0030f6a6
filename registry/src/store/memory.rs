//! The embedded in-memory store.
//!
//! Per-service state lives in a [`ServiceTable`] (see its locking notes):
//! heartbeats for different services never share a lock, and a renewal
//! touches only its service's mutex. Lease deadlines wait in an ordered
//! [`ExpiryQueue`]; the expiry brake may keep leases past them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};
use trellis_shared::{Instance, InstanceId, ServiceName, ServiceSummary};

use super::table::{Member, ServiceEntry, ServiceTable};
use super::{
    Change, Heartbeat, LeaseState, LeasedInstance, ServiceSnapshot, Store, StoreError, WriteOutcome,
};
use crate::brake::{ExpiryBrake, GuardConfig, RateEstimate, BUCKET};
use crate::expiry::ExpiryQueue;
use crate::lock;
use crate::metrics::StoreMetrics;

/// How often services that emptied and are not watched are forgotten.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

type Entry = ServiceEntry<Slot>;

pub struct MemoryStore {
    epoch: String,
    revision: AtomicU64,
    table: ServiceTable<Slot>,
    expiry: Mutex<ExpiryQueue<Lease>>,
    expiry_wake: Notify,
    metrics: StoreMetrics,
    brake: ExpiryBrake<Lease>,
}

/// A lease, as the expiry queue and the brake name it.
type Lease = (Arc<Entry>, InstanceId);

struct Slot {
    instance: Arc<Instance>,
    ttl: Duration,
    /// When the lease runs out unless renewed.
    deadline: Instant,
    /// Deadline of this lease's live entry in the expiry queue.
    queued: Instant,
    rate: RateEstimate,
}

impl Member for Slot {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }
}

impl MemoryStore {
    pub fn new(metrics: StoreMetrics) -> Self {
        Self::with_guards(metrics, GuardConfig::default())
    }

    /// A store with the given protections from mass expiry.
    pub fn with_guards(metrics: StoreMetrics, guards: GuardConfig) -> Self {
        MemoryStore {
            brake: ExpiryBrake::new(guards, metrics.clone()),
            epoch: format!("{:016x}", rand::random::<u64>()),
            revision: AtomicU64::new(0),
            table: ServiceTable::new(guards.protection_threshold),
            expiry: Mutex::new(ExpiryQueue::default()),
            expiry_wake: Notify::new(),
            metrics,
        }
    }

    /// The same store, refusing new services and instances past `caps`.
    pub fn with_caps(self, caps: super::table::Caps) -> Self {
        MemoryStore { table: self.table.with_caps(caps), ..self }
    }

    /// Number of services the store keeps an entry for (for tests).
    pub fn known_services(&self) -> usize {
        self.table.known()
    }

    /// The next revision when `moved`, for [`ServiceTable::publish`].
    fn next_index(&self, moved: bool) -> Option<u64> {
        moved.then(|| self.revision.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Queues the leases the brake kept, on its release.
    fn requeue(&self, released: Vec<(Instant, Lease)>) {
        for (at, (entry, id)) in released {
            self.enqueue(at, entry, id);
        }
    }

    fn enqueue(&self, at: Instant, entry: Arc<Entry>, id: InstanceId) {
        let first = lock(&self.expiry).push(at, (entry, id));
        if first {
            self.expiry_wake.notify_one();
        }
    }

    /// Handles a due queue entry: expires the lease or queues it again at its
    /// renewed deadline.
    fn check_lease(&self, entry: Arc<Entry>, id: InstanceId, at: Instant, now: Instant) {
        enum Next {
            Done,
            Requeue(Instant),
            Park,
        }
        let mut released = Vec::new();
        let next = {
            let mut state = entry.lock();
            let Some(slot) = state.instances.get_mut(&id) else { return };
            if slot.queued != at {
                return; // superseded by an earlier entry for the same lease
            }
            if now >= slot.deadline {
                let holds;
                (holds, released) = self.brake.check(now);
                if holds {
                    Next::Park
                } else {
                    let ttl = slot.ttl;
                    if let Some(slot) = state.instances.remove(&id) {
                        self.brake.removed(slot.ttl, &slot.rate);
                    }
                    let index = self.table.publish(&entry, &mut state, self.next_index(true));
                    self.metrics.expirations.inc();
                    info!(service = %entry.name(), instance = %id, ttl = ?ttl, index, "instance expired");
                    Next::Done
                }
            } else {
                slot.queued = slot.deadline;
                Next::Requeue(slot.deadline)
            }
        };
        self.requeue(released);
        match next {
            Next::Done => {}
            Next::Requeue(deadline) => self.enqueue(deadline, entry, id),
            Next::Park => {
                debug!(service = %entry.name(), instance = %id, "lease ran out; kept by the expiry brake");
                self.brake.park(at, (entry, id));
            }
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

    async fn register(&self, service: &ServiceName, reg: LeasedInstance) -> Result<WriteOutcome, StoreError> {
        let entry = self.table.entry(service);
        let now = Instant::now();
        let deadline = now + reg.ttl;
        let id = reg.instance.id.clone();
        let (outcome, enqueue) = {
            let mut state = entry.lock();
            match state.instances.get_mut(&id) {
                Some(slot) => {
                    let previous = slot.instance.status;
                    let moved = !slot.instance.same_membership(&reg.instance);
                    let output_changed = slot.instance.output != reg.instance.output;
                    if moved || output_changed {
                        slot.instance = Arc::new(reg.instance);
                    }
                    self.brake.ttl_changed(slot.ttl, reg.ttl);
                    self.brake.renewed(&mut slot.rate, now);
                    slot.ttl = reg.ttl;
                    slot.deadline = deadline;
                    // A shorter TTL than before needs an earlier queue entry.
                    let enqueue = deadline < slot.queued;
                    if enqueue {
                        slot.queued = deadline;
                    }
                    let status = slot.instance.status;
                    let index = if moved || output_changed {
                        self.table.publish(&entry, &mut state, self.next_index(moved))
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
                    self.table.admit(service, &state, &id)?;
                    let status = reg.instance.status;
                    self.brake.added(reg.ttl);
                    let slot = Slot {
                        instance: Arc::new(reg.instance),
                        ttl: reg.ttl,
                        deadline,
                        queued: deadline,
                        rate: RateEstimate::new(now, reg.ttl),
                    };
                    state.instances.insert(id.clone(), slot);
                    let index = self.table.publish(&entry, &mut state, self.next_index(true));
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
        let entry = self.table.get(service).ok_or_else(unknown)?;
        let mut state = entry.lock();
        let slot = state.instances.get_mut(id).ok_or_else(unknown)?;
        // Renewals only move the deadline later, so the queue entry stays valid.
        let now = Instant::now();
        slot.deadline = now + slot.ttl;
        self.brake.renewed(&mut slot.rate, now);
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
        let index = self.table.publish(&entry, &mut state, self.next_index(status_changed));
        if status_changed {
            info!(service = %service, instance = %id, from = previous.as_str(), to = status.as_str(), index, "instance health changed");
        }
        let change = if status_changed { Change::Updated } else { Change::Renewed };
        Ok(WriteOutcome { change, index, previous_status: Some(previous) })
    }

    async fn deregister(&self, service: &ServiceName, id: &InstanceId) -> Result<u64, StoreError> {
        let unknown = || StoreError::UnknownInstance { service: service.clone(), id: id.clone() };
        let entry = self.table.get(service).ok_or_else(unknown)?;
        let mut state = entry.lock();
        let slot = state.instances.remove(id).ok_or_else(unknown)?;
        self.brake.removed(slot.ttl, &slot.rate);
        let index = self.table.publish(&entry, &mut state, self.next_index(true));
        info!(service = %service, instance = %id, index, "instance deregistered");
        Ok(index)
    }

    fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        self.table.snapshot(service)
    }

    async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        self.table.watch_from(service, index).await
    }

    fn list(&self) -> Vec<ServiceSummary> {
        self.table.list()
    }

    fn catalog(&self) -> (u64, Vec<Arc<ServiceSnapshot>>) {
        (self.table.catalog_index(), self.table.snapshots())
    }

    async fn watch_catalog_from(&self, index: u64) -> u64 {
        self.table.watch_catalog_from(index).await
    }

    fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>> {
        self.table.snapshots()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.table.changes()
    }

    async fn leases(&self, service: &ServiceName) -> Vec<LeaseState> {
        let Some(entry) = self.table.get(service) else { return Vec::new() };
        let now = Instant::now();
        let state = entry.lock();
        state
            .instances
            .iter()
            .map(|(id, slot)| LeaseState {
                id: id.clone(),
                ttl: slot.ttl,
                // Every renewal sets the deadline to now + ttl.
                since_renewal: Some(now.saturating_duration_since(slot.deadline - slot.ttl)),
                left: Some(slot.deadline.saturating_duration_since(now)),
                held: now >= slot.deadline,
            })
            .collect()
    }

    async fn background(self: Arc<Self>, shutdown: CancellationToken) {
        // The brake's window advances once per bucket, whether or not leases fall due.
        let mut tick = tokio::time::interval(BUCKET);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let brake = self.brake.enabled();
        let mut sweep = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let next = self.expire_due();
            let ticked = async {
                if brake {
                    tick.tick().await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
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
                _ = sweep.tick() => {
                    let n = self.table.sweep();
                    if n > 0 {
                        debug!(forgotten = n, "forgot unused empty services");
                    }
                }
                _ = ticked => {
                    let (_, released) = self.brake.check(Instant::now());
                    self.requeue(released);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, HealthStatus};

    use super::*;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn id(s: &str) -> InstanceId {
        InstanceId::new(s).unwrap()
    }

    fn reg(i: &str, ttl_ms: u64) -> LeasedInstance {
        LeasedInstance {
            instance: Instance {
                id: id(i),
                address: Address::new("10.0.0.1").unwrap(),
                port: 8080,
                zone: None,
                weight: 100,
                metadata: BTreeMap::new(),
                status: HealthStatus::Passing,
                output: String::new(),
                tags: Vec::new(),
                mesh_tls: false,
            },
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    fn started() -> (Arc<MemoryStore>, CancellationToken) {
        let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
        let stop = CancellationToken::new();
        tokio::spawn(store.clone().background(stop.clone()));
        (store, stop)
    }

    fn hb(status: Option<HealthStatus>, output: Option<&str>) -> Heartbeat {
        Heartbeat { status, output: output.map(str::to_string) }
    }

    #[tokio::test(start_paused = true)]
    async fn expires_exactly_at_the_deadline_and_wakes_watchers() {
        let (store, _stop) = started();
        let users = name("users");
        let t0 = Instant::now();
        let w = store.register(&users, reg("a", 5_000)).await.unwrap();
        assert_eq!(w.change, Change::Added);
        let snap = store.watch_from(&users, w.index).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(5));
        assert!(snap.instances().is_empty());
        assert!(snap.index() > w.index);
        assert_eq!(store.metrics.expirations.get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn still_present_just_before_the_deadline() {
        let (store, _stop) = started();
        let users = name("users");
        store.register(&users, reg("a", 5_000)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(4_999)).await;
        assert_eq!(store.snapshot(&users).instances().len(), 1);
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert!(store.snapshot(&users).instances().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_push_the_deadline_without_moving_the_index() {
        let (store, _stop) = started();
        let users = name("users");
        let t0 = Instant::now();
        let w = store.register(&users, reg("a", 5_000)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let h = store.heartbeat(&users, &id("a"), Heartbeat::default()).await.unwrap();
        assert_eq!(h.change, Change::Renewed);
        assert_eq!(h.index, w.index);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let h = store.heartbeat(&users, &id("a"), Heartbeat::default()).await.unwrap();
        assert_eq!(h.index, w.index);
        // Last renewal at t0+6s: the lease ends at t0+11s, not before.
        let snap = store.watch_from(&users, w.index).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(11));
        assert!(snap.instances().is_empty());
        // About one queue operation per TTL, not one per heartbeat.
        assert_eq!(store.queued_leases(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_shorter_ttl_on_re_registration_takes_effect() {
        let (store, _stop) = started();
        let users = name("users");
        let t0 = Instant::now();
        store.register(&users, reg("a", 60_000)).await.unwrap();
        let w = store.register(&users, reg("a", 2_000)).await.unwrap();
        assert_eq!(w.change, Change::Renewed);
        store.watch_from(&users, w.index).await;
        assert_eq!(t0.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_expire_in_deadline_order() {
        let (store, _stop) = started();
        let users = name("users");
        let t0 = Instant::now();
        for (i, ttl) in [("c", 3_000), ("a", 1_000), ("b", 2_000)] {
            store.register(&users, reg(i, ttl)).await.unwrap();
        }
        let mut index = store.snapshot(&users).index();
        let mut seen = Vec::new();
        while !store.snapshot(&users).instances().is_empty() {
            let snap = store.watch_from(&users, index).await;
            index = snap.index();
            let left: Vec<&str> = snap.instances().iter().map(|i| i.id.as_str()).collect();
            seen.push((t0.elapsed().as_millis(), left.join(",")));
        }
        assert_eq!(seen, [(1000, "b,c".to_string()), (2000, "c".to_string()), (3000, String::new())]);
    }

    #[tokio::test(start_paused = true)]
    async fn watchers_wake_only_for_their_service_and_real_changes() {
        let (store, _stop) = started();
        let (users, orders) = (name("users"), name("orders"));
        let w = store.register(&users, reg("u1", 60_000)).await.unwrap();
        store.register(&orders, reg("o1", 60_000)).await.unwrap();
        let watcher = {
            let store = store.clone();
            let users = users.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), store.watch_from(&users, w.index)).await
            })
        };
        tokio::task::yield_now().await;
        // Another service changes; this one is renewed, re-registered unchanged,
        // and its output text changes: none of it moves users' index.
        store.register(&orders, reg("o2", 60_000)).await.unwrap();
        store.heartbeat(&orders, &id("o1"), hb(Some(HealthStatus::Critical), None)).await.unwrap();
        store.heartbeat(&users, &id("u1"), Heartbeat::default()).await.unwrap();
        store.register(&users, reg("u1", 60_000)).await.unwrap();
        let out =
            store.heartbeat(&users, &id("u1"), hb(Some(HealthStatus::Passing), Some("ok"))).await.unwrap();
        assert_eq!(out.index, w.index);
        assert_eq!(store.snapshot(&users).instances()[0].output, "ok", "output is visible to reads");
        assert!(watcher.await.unwrap().is_err(), "the watcher must sleep through all of that");

        // A status change wakes it at once.
        let watcher = {
            let store = store.clone();
            let users = users.clone();
            tokio::spawn(async move { store.watch_from(&users, w.index).await })
        };
        tokio::task::yield_now().await;
        let t = Instant::now();
        let out = store.heartbeat(&users, &id("u1"), hb(Some(HealthStatus::Warning), None)).await.unwrap();
        assert_eq!(out.change, Change::Updated);
        let snap = watcher.await.unwrap();
        assert_eq!(t.elapsed(), Duration::ZERO);
        assert_eq!(snap.index(), out.index);
        assert_eq!(snap.instances()[0].status, HealthStatus::Warning);
    }

    #[tokio::test(start_paused = true)]
    async fn index_rules() {
        let (store, _stop) = started();
        let users = name("users");
        // Never registered: index 0, no instances; a watch on it waits for the first.
        assert_eq!(store.snapshot(&users).index(), 0);
        let first = {
            let store = store.clone();
            let users = users.clone();
            tokio::spawn(async move { store.watch_from(&users, 0).await })
        };
        tokio::task::yield_now().await;
        let w = store.register(&users, reg("a", 60_000)).await.unwrap();
        assert_eq!(first.await.unwrap().index(), w.index);
        // An index from the future (a client of a previous history) answers at once.
        let t = Instant::now();
        let snap = store.watch_from(&users, w.index + 1000).await;
        assert_eq!((t.elapsed(), snap.index()), (Duration::ZERO, w.index));
        // Membership changes move it; indexes are unique across services.
        let mut changed = reg("a", 60_000);
        changed.instance.port = 9090;
        let w2 = store.register(&users, changed).await.unwrap();
        assert_eq!(w2.change, Change::Updated);
        assert!(w2.index > w.index);
        let o = store.register(&name("orders"), reg("o", 60_000)).await.unwrap();
        assert!(o.index > w2.index);
        let d = store.deregister(&users, &id("a")).await.unwrap();
        assert!(d > o.index);
        assert!(matches!(store.deregister(&users, &id("a")).await, Err(StoreError::UnknownInstance { .. })));
        assert!(matches!(
            store.heartbeat(&name("nope"), &id("a"), Heartbeat::default()).await,
            Err(StoreError::UnknownInstance { .. })
        ));
        // The emptied service keeps its index (it must not go backwards) and leaves the list.
        assert_eq!(store.snapshot(&users).index(), d);
        let list = store.list();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].name.as_str(), "orders");
    }

    #[tokio::test(start_paused = true)]
    async fn unused_empty_services_are_forgotten() {
        let (store, _stop) = started();
        // Watches of names nobody registers, and a service that emptied.
        for i in 0..100 {
            let name = name(&format!("ghost-{i}"));
            let _ = tokio::time::timeout(Duration::from_millis(1), store.watch_from(&name, 0)).await;
        }
        let users = name("users");
        store.register(&users, reg("a", 1_000)).await.unwrap();
        let kept = name("kept");
        store.register(&kept, reg("k", 600_000)).await.unwrap();
        let watched = name("watched");
        let held = {
            let store = store.clone();
            let watched = watched.clone();
            tokio::spawn(async move { store.watch_from(&watched, 0).await })
        };
        tokio::task::yield_now().await;
        assert_eq!(store.known_services(), 103);
        tokio::time::sleep(SWEEP_EVERY + Duration::from_millis(1)).await;
        // Left: the one with an instance and the one being watched.
        assert_eq!(store.known_services(), 2);
        assert!(store.snapshot(&users).instances().is_empty());
        // A forgotten name works as before: watchable, registrable.
        let w = store.register(&watched, reg("w", 60_000)).await.unwrap();
        assert_eq!(held.await.unwrap().index(), w.index);
    }

    #[tokio::test(start_paused = true)]
    async fn deregistered_leases_leave_no_work_behind() {
        let (store, _stop) = started();
        let users = name("users");
        store.register(&users, reg("a", 1_000)).await.unwrap();
        store.deregister(&users, &id("a")).await.unwrap();
        store.register(&users, reg("a", 5_000)).await.unwrap();
        // The stale entry at 1s must not expire the new registration.
        tokio::time::sleep(Duration::from_millis(4_999)).await;
        assert_eq!(store.snapshot(&users).instances().len(), 1);
        assert_eq!(store.metrics.expirations.get(), 0);
        tokio::time::sleep(Duration::from_millis(1)).await;
        tokio::task::yield_now().await;
        assert_eq!(store.metrics.expirations.get(), 1);
    }
}

#[cfg(test)]
mod guards {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, HealthStatus};

    use super::*;

    fn registration(i: usize, ttl: Duration) -> LeasedInstance {
        LeasedInstance {
            instance: Instance {
                id: InstanceId::new(format!("i-{i}")).unwrap(),
                address: Address::new("10.0.0.1").unwrap(),
                port: 8080,
                zone: None,
                weight: 100,
                metadata: BTreeMap::new(),
                status: HealthStatus::Passing,
                output: String::new(),
                tags: Vec::new(),
                mesh_tls: false,
            },
            ttl,
        }
    }

    struct Fleet {
        store: Arc<MemoryStore>,
        service: ServiceName,
        n: usize,
        _stop: CancellationToken,
    }

    impl Fleet {
        /// `n` instances with a 3s TTL heartbeating every second for 5s.
        async fn steady(n: usize, guards: GuardConfig) -> Fleet {
            let store = Arc::new(MemoryStore::with_guards(StoreMetrics::default(), guards));
            let stop = CancellationToken::new();
            tokio::spawn(store.clone().background(stop.clone()));
            let service = ServiceName::new("users").unwrap();
            for i in 0..n {
                store.register(&service, registration(i, Duration::from_secs(3))).await.unwrap();
            }
            let fleet = Fleet { store, service, n, _stop: stop };
            fleet.run(5, |_| true).await;
            fleet
        }

        /// Runs `seconds` of one heartbeat a second from the instances `alive` selects.
        async fn run(&self, seconds: usize, alive: impl Fn(usize) -> bool) {
            for _ in 0..seconds {
                tokio::time::sleep(Duration::from_secs(1)).await;
                for i in (0..self.n).filter(|i| alive(*i)) {
                    let id = InstanceId::new(format!("i-{i}")).unwrap();
                    // Expired ones answer unknown_instance; that is what some tests expect.
                    let _ = self.store.heartbeat(&self.service, &id, Heartbeat::default()).await;
                }
            }
        }

        /// Lets the expiry task handle what fell due at this instant.
        async fn settle(&self) {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        fn registered(&self) -> usize {
            self.store.snapshot(&self.service).instances().len()
        }

        fn expired(&self) -> u64 {
            self.store.metrics.expirations.get()
        }

        fn engaged(&self) -> bool {
            self.store.metrics.brake_engaged.get() == 1
        }
    }

    #[tokio::test(start_paused = true)]
    async fn eighty_percent_silent_engages_the_brake_and_nothing_is_evicted() {
        let fleet = Fleet::steady(20, GuardConfig::default()).await;
        // 16 of 20 stop at once; their leases run out 3s later.
        fleet.run(10, |i| i < 4).await;
        assert!(fleet.engaged());
        assert_eq!((fleet.registered(), fleet.expired()), (20, 0));
        assert_eq!(fleet.store.metrics.brake_held.get(), 16);
        // They come back: the brake releases and, renewed, none expires.
        fleet.run(5, |_| true).await;
        assert!(!fleet.engaged());
        assert_eq!(fleet.store.metrics.brake_held.get(), 0);
        fleet.run(5, |_| true).await;
        assert_eq!((fleet.registered(), fleet.expired()), (20, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn after_release_the_ones_still_silent_expire() {
        let fleet = Fleet::steady(20, GuardConfig::default()).await;
        fleet.run(10, |i| i < 4).await;
        assert!(fleet.engaged());
        // 12 of the 16 come back (80% renew): released; the last 4 expire.
        fleet.run(10, |i| i < 16).await;
        assert!(!fleet.engaged());
        assert_eq!((fleet.registered(), fleet.expired()), (16, 4));
    }

    #[tokio::test(start_paused = true)]
    async fn with_the_brake_off_silent_instances_expire_at_their_deadline() {
        let guards = GuardConfig { brake: false, ..GuardConfig::default() };
        let fleet = Fleet::steady(20, guards).await;
        fleet.run(2, |i| i < 4).await;
        assert_eq!(fleet.registered(), 20, "leases run until 3s after the last heartbeat");
        fleet.run(1, |i| i < 4).await;
        fleet.settle().await;
        assert_eq!((fleet.registered(), fleet.expired()), (4, 16));
        assert!(!fleet.engaged());
    }

    #[tokio::test(start_paused = true)]
    async fn one_of_ten_or_one_of_three_missing_expires_normally() {
        for n in [10, 3] {
            let fleet = Fleet::steady(n, GuardConfig::default()).await;
            fleet.run(3, |i| i != 0).await;
            fleet.settle().await;
            assert_eq!((fleet.registered(), fleet.expired()), (n - 1, 1), "{n} instances");
            assert!(!fleet.engaged());
            fleet.run(10, |i| i != 0).await;
            assert!(!fleet.engaged(), "{n} instances");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn below_the_minimum_everyone_may_expire() {
        let fleet = Fleet::steady(9, GuardConfig::default()).await;
        fleet.run(4, |_| false).await;
        assert_eq!((fleet.registered(), fleet.expired()), (0, 9));
    }

    #[tokio::test(start_paused = true)]
    async fn the_protection_threshold_shows_every_instance_flagged() {
        for (threshold, critical, protected) in [(0.5, 2, true), (0.5, 1, false), (0.0, 3, false)] {
            let guards = GuardConfig { protection_threshold: threshold, ..GuardConfig::default() };
            let store = MemoryStore::with_guards(StoreMetrics::default(), guards);
            let users = ServiceName::new("users").unwrap();
            for i in 0..4 {
                store.register(&users, registration(i, Duration::from_secs(60))).await.unwrap();
            }
            for i in 0..critical {
                let id = InstanceId::new(format!("i-{i}")).unwrap();
                let hb = Heartbeat { status: Some(HealthStatus::Critical), output: None };
                store.heartbeat(&users, &id, hb).await.unwrap();
            }
            let view = store.snapshot(&users).view(store.epoch(), false);
            let label = format!("threshold {threshold}, {critical} of 4 critical");
            assert_eq!(view.protected, protected, "{label}");
            assert_eq!(view.instances.len(), if protected { 4 } else { 4 - critical }, "{label}");
            let all = store.snapshot(&users).view(store.epoch(), true);
            assert!(!all.protected && all.instances.len() == 4, "{label}");
        }
    }
}
