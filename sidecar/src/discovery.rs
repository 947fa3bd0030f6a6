//! Discovery: one task per upstream service owns a blocking-query watch of the
//! registry and publishes each new endpoint set as one immutable
//! [`EndpointSet`]; the [`Directory`] holds those services, starts watches on
//! first use, caps their number and evicts idle ones.
//!
//! Rules kept here:
//! - An unchanged answer publishes nothing (the proxy's view and the endpoints'
//!   in-flight counts and ejections stay exactly as they were).
//! - Errors never empty a set: the last known endpoints keep serving while the
//!   registry is unreachable.
//! - After a registry restart (a new epoch) the new registry knows only the
//!   instances that re-registered so far; the others are kept for one
//!   `restart_retention` (the TTL) so they have time to re-register.
//! - The request path never locks: [`Directory::resolve`] reads the map of
//!   watched services through `ArcSwap`; only a miss (a service seen for the
//!   first time) or an eviction takes the writers' mutex and publishes a new
//!   map. At most `max_services` entries, so copying it on a change is cheap.
//! - Every instance is watched, critical ones too (`all=true`); only
//!   healthy ones enter a set unless too few are healthy, when
//!   [`crate::health_panic`] routes to all of them.
//! - Endpoints [`crate::refuse`] refuses (the sidecar's own listeners,
//!   unspecified, multicast and link-local addresses) never enter a set; each
//!   is logged and counted once per service and address.
//! - Host names are untrusted: at most `max_services` services are watched.
//!   At the cap, a service that resolved to nothing is evicted first, then one
//!   idle for at least [`MIN_IDLE_TO_MAKE_ROOM`]; a service in active use is
//!   never evicted to make room, and a new name then gets `None` (`overloaded`).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_shared::{ClientError, Instance, RegistryClient, ServiceName, ServiceView, Watch};

use crate::endpoints::{Endpoint, EndpointSet, EndpointState, Resolve, ServiceEndpoints};
use crate::health_panic;
use crate::refuse::{EndpointFilter, RefuseReason};

/// A service used within this long is never evicted to make room for another.
pub const MIN_IDLE_TO_MAKE_ROOM: Duration = Duration::from_secs(10);

/// Where registry connectivity is reported (the metrics in production).
pub trait ConnectivitySink: Send + Sync + 'static {
    /// `true` after a successful registry call, `false` after a failed one.
    fn report(&self, ok: bool);
    /// The registry refused this sidecar's credentials (`401`/`403`).
    fn auth_refused(&self) {}
    /// An endpoint was refused (once per service and address).
    fn endpoint_refused(&self, _reason: RefuseReason) {}
}

/// One service's stream of registry states ([`Watch`] in production).
pub trait WatchSource: Send + 'static {
    fn next(&mut self) -> impl Future<Output = Result<ServiceView, ClientError>> + Send;
}

impl WatchSource for Watch {
    fn next(&mut self) -> impl Future<Output = Result<ServiceView, ClientError>> + Send {
        Watch::next(self)
    }
}

/// Opens watches ([`RegistryClient`] in production).
pub trait Watcher: Send + Sync + 'static {
    type Source: WatchSource;
    fn watch(&self, service: ServiceName) -> Self::Source;
}

impl Watcher for RegistryClient {
    type Source = Watch;
    /// Critical instances included: a health panic routes to them.
    fn watch(&self, service: ServiceName) -> Watch {
        Watch::new(self.clone(), service, true)
    }
}

/// Discovery settings.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Most services watched at once. Default 256.
    pub max_services: usize,
    /// A service not used for this long is evicted (its watch closed). Default 5m.
    pub idle_timeout: Duration,
    /// After a registry restart, how long instances that have not re-registered
    /// are kept. Default: the TTL.
    pub restart_retention: Duration,
    /// Below this share of healthy instances, route to every instance of the
    /// service (see [`crate::health_panic`]); 0 turns it off. Default 0.5.
    pub panic_threshold: f64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            max_services: 256,
            idle_timeout: Duration::from_secs(300),
            restart_retention: Duration::from_secs(5),
            panic_threshold: health_panic::DEFAULT_THRESHOLD,
        }
    }
}

/// The instances one watch currently believes in: the registry's latest answer
/// plus, after a restart, the instances it has not heard from again yet.
#[derive(Debug)]
struct Tracker {
    epoch: Option<String>,
    index: u64,
    live: Vec<Instance>,
    retained: Vec<(Instance, Instant)>,
    retention: Duration,
}

impl Tracker {
    fn new(retention: Duration) -> Self {
        Tracker { epoch: None, index: 0, live: Vec::new(), retained: Vec::new(), retention }
    }

    fn apply(&mut self, service: &ServiceName, view: ServiceView, now: Instant) {
        let in_view = |id: &trellis_shared::InstanceId| view.instances.iter().any(|i| &i.id == id);
        if self.epoch.as_ref().is_some_and(|e| *e != view.epoch) {
            for inst in std::mem::take(&mut self.live) {
                if !in_view(&inst.id) && !self.retained.iter().any(|(r, _)| r.id == inst.id) {
                    self.retained.push((inst, now + self.retention));
                }
            }
            info!(
                service = %service,
                epoch = %view.epoch,
                kept = self.retained.len(),
                "registry restarted; keeping instances that have not re-registered yet for one TTL"
            );
        }
        self.retained.retain(|(r, _)| !in_view(&r.id));
        self.epoch = Some(view.epoch);
        self.index = view.index;
        self.live = view.instances;
    }

    /// Drops retained instances whose time is up; true if any was dropped.
    fn expire(&mut self, now: Instant) -> bool {
        let before = self.retained.len();
        self.retained.retain(|(_, deadline)| *deadline > now);
        before != self.retained.len()
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.retained.iter().map(|(_, d)| *d).min()
    }

    fn instances(&self) -> Vec<&Instance> {
        let mut all: Vec<&Instance> = self.live.iter().chain(self.retained.iter().map(|(i, _)| i)).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }
}

/// Where an endpoint's shared state lives between sets: an instance a health
/// panic brings in and takes out again keeps its in-flight count, its
/// ejection and its slow-start progress. Holds every instance the watch
/// tracks, routed to or not.
type States = HashMap<(trellis_shared::InstanceId, trellis_shared::Address, u16), Arc<EndpointState>>;

fn state_key(i: &Instance) -> (trellis_shared::InstanceId, trellis_shared::Address, u16) {
    (i.id.clone(), i.address.clone(), i.port)
}

/// Keeps the states of `instances` (creating new ones) and forgets the rest.
fn track_states(states: &mut States, instances: &[&Instance]) {
    let mut kept = States::with_capacity(instances.len());
    for i in instances {
        let key = state_key(i);
        let state = states.remove(&key).unwrap_or_default();
        kept.insert(key, state);
    }
    *states = kept;
}

/// Builds the next snapshot with each endpoint's state from `states`; `None`
/// when nothing the proxy uses changed.
fn build_set(
    service: &ServiceName,
    current: &EndpointSet,
    states: &States,
    instances: &[&Instance],
    health_panic: bool,
    index: u64,
    epoch: &str,
) -> Option<EndpointSet> {
    // The panic flag follows from the endpoints' health (a panic is exactly a
    // set holding a critical endpoint), so comparing health covers it.
    let unchanged = current.endpoints.len() == instances.len()
        && current.endpoints.iter().zip(instances).all(|(e, i)| {
            e.same_target(&i.id, &i.address, i.port)
                && e.weight == i.weight.max(1)
                && e.zone == i.zone
                && e.metadata == i.metadata
                && e.mesh_tls.is_some() == i.mesh_tls
                && e.health == i.status
        });
    if unchanged {
        return None;
    }
    let endpoints = instances
        .iter()
        .map(|i| {
            // Every routable instance is tracked; the default only keeps this total.
            let state = states.get(&state_key(i)).cloned().unwrap_or_default();
            let endpoint = Endpoint::new(
                i.id.clone(),
                i.address.clone(),
                i.port,
                i.weight,
                i.zone.clone(),
                i.metadata.clone(),
                state,
            )
            .with_health(i.status);
            Arc::new(if i.mesh_tls { endpoint.with_mesh_tls(service.clone()) } else { endpoint })
        })
        .collect();
    Some(EndpointSet { endpoints, index, epoch: epoch.to_string(), health_panic })
}

/// The watch task of one service: runs until `cancel`.
async fn run_watch<S: WatchSource>(
    mut source: S,
    endpoints: Arc<ServiceEndpoints>,
    retention: Duration,
    panic_threshold: f64,
    sink: Arc<dyn ConnectivitySink>,
    filter: Arc<EndpointFilter>,
    cancel: CancellationToken,
) {
    let name = endpoints.name.clone();
    let mut tracker = Tracker::new(retention);
    let mut failing = false;
    // Refused addresses already reported, so each is logged and counted once.
    let mut refused: std::collections::HashSet<(trellis_shared::Address, u16)> = Default::default();
    let mut states = States::new();
    loop {
        let expiry = tracker.next_expiry();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep_until(expiry.unwrap_or_else(Instant::now)), if expiry.is_some() => {
                if tracker.expire(Instant::now()) {
                    info!(service = %name, "dropping instances that did not re-register after the registry restart");
                }
            }
            r = source.next() => match r {
                Ok(view) => {
                    sink.report(true);
                    if std::mem::take(&mut failing) {
                        info!(service = %name, "registry reachable again");
                    }
                    tracker.apply(&name, view, Instant::now());
                }
                Err(e) => {
                    sink.report(false);
                    if !std::mem::replace(&mut failing, true) {
                        warn!(service = %name, error = %e, "watch failed; keeping the last known endpoints");
                    } else {
                        debug!(service = %name, error = %e, "watch failed again");
                    }
                    continue;
                }
            }
        }
        let current = endpoints.load();
        let mut instances = tracker.instances();
        instances.retain(|i| {
            let Some(reason) = filter.check_instance(i) else { return true };
            if refused.insert((i.address.clone(), i.port)) {
                warn!(service = %name, instance = %i.id, address = %i.address, port = i.port, reason = reason.as_str(), "refusing an endpoint the registry listed: never connecting to it");
                sink.endpoint_refused(reason);
            }
            false
        });
        track_states(&mut states, &instances);
        let total = instances.len();
        let (instances, panic) = health_panic::routable(&instances, panic_threshold);
        if panic && !current.health_panic {
            let healthy = instances.iter().filter(|i| i.status.is_healthy()).count();
            warn!(service = %name, healthy, total, threshold = panic_threshold, "too few healthy instances: routing to every instance, critical ones too (health panic)");
        } else if !panic && current.health_panic && total == 0 {
            info!(service = %name, "every instance is gone: the health panic ends with nobody to route to");
        } else if !panic && current.health_panic {
            info!(service = %name, healthy = instances.len(), total, "enough healthy instances again: leaving health panic");
        }
        let epoch = tracker.epoch.as_deref().unwrap_or_default();
        match build_set(&name, &current, &states, &instances, panic, tracker.index, epoch) {
            Some(set) => {
                info!(service = %name, endpoints = set.endpoints.len(), index = set.index, "endpoints updated");
                endpoints.publish(set);
            }
            None if !endpoints.is_resolved() => {
                // The first answer always publishes, even when empty, so waiters wake.
                endpoints.publish(EndpointSet {
                    endpoints: Vec::new(),
                    index: tracker.index,
                    epoch: epoch.to_string(),
                    health_panic: panic,
                });
            }
            None => debug!(service = %name, index = tracker.index, "unchanged update"),
        }
    }
}

struct Entry {
    endpoints: Arc<ServiceEndpoints>,
    /// Listed with `--upstream-service`: never evicted.
    pinned: AtomicBool,
    cancel: CancellationToken,
}

impl Entry {
    fn pinned(&self) -> bool {
        self.pinned.load(Ordering::Relaxed)
    }
}

type Services = HashMap<ServiceName, Arc<Entry>>;

/// The services this sidecar watches. Implements [`Resolve`] for the proxy.
pub struct Directory<W: Watcher = RegistryClient> {
    watcher: W,
    config: DiscoveryConfig,
    /// Read lock-free by every request; replaced whole under `writes`.
    services: ArcSwap<Services>,
    /// Serialises changes to `services` (a miss, a pin, an eviction).
    writes: Mutex<()>,
    clock: Instant,
    sink: Arc<dyn ConnectivitySink>,
    filter: Arc<EndpointFilter>,
    shutdown: CancellationToken,
}

impl<W: Watcher> Directory<W> {
    /// Watches stop when `shutdown` is cancelled.
    pub fn new(
        watcher: W,
        config: DiscoveryConfig,
        sink: Arc<dyn ConnectivitySink>,
        shutdown: CancellationToken,
    ) -> Self {
        Directory {
            watcher,
            config,
            services: ArcSwap::from_pointee(HashMap::new()),
            writes: Mutex::new(()),
            clock: Instant::now(),
            sink,
            filter: Arc::new(EndpointFilter::default()),
            shutdown,
        }
    }

    /// Refuses endpoints `filter` refuses (by default: unspecified, multicast
    /// and link-local addresses; the sidecar adds its own listeners).
    pub fn with_filter(mut self, filter: EndpointFilter) -> Self {
        self.filter = Arc::new(filter);
        self
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.clock.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock_writes(&self) -> MutexGuard<'_, ()> {
        // The guarded data is the ArcSwap, which a panic cannot leave half
        // written, so poisoning is ignored.
        self.writes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts watching `name` for good (`--upstream-service`).
    pub fn watch_pinned(&self, name: &ServiceName) -> Arc<ServiceEndpoints> {
        let now = self.now_ms();
        let _writes = self.lock_writes();
        if let Some(e) = self.services.load().get(name) {
            e.pinned.store(true, Ordering::Relaxed);
            return Arc::clone(&e.endpoints);
        }
        let mut map = Services::clone(&self.services.load());
        let endpoints = self.start(&mut map, name, true, now);
        self.services.store(Arc::new(map));
        endpoints
    }

    fn start(&self, map: &mut Services, name: &ServiceName, pinned: bool, now: u64) -> Arc<ServiceEndpoints> {
        let endpoints = Arc::new(ServiceEndpoints::new(name.clone()));
        endpoints.touch(now);
        let cancel = self.shutdown.child_token();
        tokio::spawn(run_watch(
            self.watcher.watch(name.clone()),
            Arc::clone(&endpoints),
            self.config.restart_retention,
            self.config.panic_threshold,
            Arc::clone(&self.sink),
            Arc::clone(&self.filter),
            cancel.clone(),
        ));
        debug!(service = %name, pinned, "watching service");
        let entry = Entry { endpoints: Arc::clone(&endpoints), pinned: AtomicBool::new(pinned), cancel };
        map.insert(name.clone(), Arc::new(entry));
        endpoints
    }

    /// Evicts one service to make room; false when none may go.
    fn make_room(&self, map: &mut Services, now: u64) -> bool {
        let idle = |e: &Entry| now.saturating_sub(e.endpoints.last_used_ms());
        let min_idle = u64::try_from(MIN_IDLE_TO_MAKE_ROOM.as_millis()).unwrap_or(u64::MAX);
        let empty = map
            .iter()
            .filter(|(_, e)| {
                !e.pinned() && e.endpoints.is_resolved() && e.endpoints.load().endpoints.is_empty()
            })
            .max_by_key(|(_, e)| idle(e));
        let victim = empty.or_else(|| {
            map.iter().filter(|(_, e)| !e.pinned() && idle(e) >= min_idle).max_by_key(|(_, e)| idle(e))
        });
        let Some(name) = victim.map(|(n, _)| n.clone()) else {
            return false;
        };
        if let Some(e) = map.remove(&name) {
            e.cancel.cancel();
            debug!(service = %name, "evicted to make room for another service");
        }
        true
    }

    /// Evicts services unused for `idle_timeout`; returns how many.
    pub fn evict_idle(&self) -> usize {
        let now = self.now_ms();
        let limit = u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX);
        let _writes = self.lock_writes();
        let mut map = Services::clone(&self.services.load());
        let before = map.len();
        map.retain(|name, e| {
            let keep = e.pinned() || now.saturating_sub(e.endpoints.last_used_ms()) < limit;
            if !keep {
                e.cancel.cancel();
                debug!(service = %name, "evicted idle service");
            }
            keep
        });
        let evicted = before - map.len();
        if evicted > 0 {
            self.services.store(Arc::new(map));
        }
        evicted
    }

    /// Evicts idle services periodically until shutdown.
    pub async fn run_sweeper(self: Arc<Self>) {
        let period =
            (self.config.idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            self.evict_idle();
        }
    }

    /// Every watched service, sorted by name.
    pub fn services(&self) -> Vec<Arc<ServiceEndpoints>> {
        let mut all: Vec<_> = self.services.load().values().map(|e| Arc::clone(&e.endpoints)).collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    pub fn len(&self) -> usize {
        self.services.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<W: Watcher> Resolve for Directory<W> {
    fn resolve(&self, name: &ServiceName) -> Option<Arc<ServiceEndpoints>> {
        let now = self.now_ms();
        if let Some(e) = self.services.load().get(name) {
            e.endpoints.touch(now);
            return Some(Arc::clone(&e.endpoints));
        }
        let _writes = self.lock_writes();
        // Another request may have started it while this one waited.
        let mut map = Services::clone(&self.services.load());
        if let Some(e) = map.get(name) {
            e.endpoints.touch(now);
            return Some(Arc::clone(&e.endpoints));
        }
        if map.len() >= self.config.max_services && !self.make_room(&mut map, now) {
            return None;
        }
        let endpoints = self.start(&mut map, name, false, now);
        self.services.store(Arc::new(map));
        Some(endpoints)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use tokio::sync::mpsc;
    use trellis_shared::{Address, HealthStatus, InstanceId};

    /// A passing instance on 127.0.0.1 (also used by `health_panic`'s tests).
    pub(crate) fn inst(id: &str, port: u16) -> Instance {
        Instance {
            id: InstanceId::new(id).unwrap(),
            address: Address::new("127.0.0.1").unwrap(),
            port,
            zone: None,
            weight: 100,
            metadata: BTreeMap::new(),
            status: HealthStatus::Passing,
            output: String::new(),
            tags: Vec::new(),
            mesh_tls: false,
        }
    }

    fn view(index: u64, epoch: &str, instances: Vec<Instance>) -> ServiceView {
        ServiceView {
            service: ServiceName::new("users").unwrap(),
            index,
            epoch: epoch.into(),
            instances,
            protected: false,
        }
    }

    /// A watch fed by a channel; a closed channel means "registry down" forever.
    struct ChanSource(mpsc::UnboundedReceiver<Result<ServiceView, String>>);

    impl WatchSource for ChanSource {
        async fn next(&mut self) -> Result<ServiceView, ClientError> {
            match self.0.recv().await {
                Some(Ok(v)) => Ok(v),
                Some(Err(reason)) => {
                    Err(ClientError::Protocol { url: reqwest::Url::parse("http://r:1").unwrap(), reason })
                }
                None => std::future::pending().await,
            }
        }
    }

    type Feed = mpsc::UnboundedSender<Result<ServiceView, String>>;

    /// Hands out channel-fed watches and keeps the senders, by service name.
    #[derive(Default, Clone)]
    struct ChanWatcher {
        senders: Arc<Mutex<HashMap<String, Feed>>>,
        opened: Arc<Mutex<Vec<String>>>,
    }

    impl Watcher for ChanWatcher {
        type Source = ChanSource;
        fn watch(&self, service: ServiceName) -> ChanSource {
            let (tx, rx) = mpsc::unbounded_channel();
            self.senders.lock().unwrap().insert(service.to_string(), tx);
            self.opened.lock().unwrap().push(service.to_string());
            ChanSource(rx)
        }
    }

    impl ChanWatcher {
        fn send(&self, service: &str, v: Result<ServiceView, String>) {
            let _ = self.senders.lock().unwrap()[service].send(v);
        }
    }

    #[derive(Default)]
    struct CountSink(Mutex<Vec<bool>>, Mutex<Vec<RefuseReason>>);
    impl ConnectivitySink for CountSink {
        fn report(&self, ok: bool) {
            self.0.lock().unwrap().push(ok);
        }
        fn endpoint_refused(&self, reason: RefuseReason) {
            self.1.lock().unwrap().push(reason);
        }
    }

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    fn ids(set: &EndpointSet) -> Vec<String> {
        set.endpoints.iter().map(|e| e.id.to_string()).collect()
    }

    /// Lets spawned tasks run until they block (paused clock: no time passes).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn directory(config: DiscoveryConfig) -> (Directory<ChanWatcher>, ChanWatcher, Arc<CountSink>) {
        let w = ChanWatcher::default();
        let sink = Arc::new(CountSink::default());
        let d = Directory::new(w.clone(), config, sink.clone(), CancellationToken::new());
        (d, w, sink)
    }

    #[tokio::test(start_paused = true)]
    async fn publishes_changes_and_skips_no_op_updates() {
        let (d, w, _) = directory(DiscoveryConfig::default());
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![inst("a", 1), inst("b", 2)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        let first = users.load();
        assert_eq!(ids(&first), vec!["a", "b"]);
        let guard = first.endpoints[0].begin();

        // Same membership at a new index (only output changed): nothing published.
        let mut same = vec![inst("b", 2), inst("a", 1)];
        same[0].output = "fine".into();
        w.send("users", Ok(view(2, "e1", same)));
        settle().await;
        assert!(Arc::ptr_eq(&first, &users.load()), "a no-op update replaced the snapshot");

        // A real change publishes, carrying the state of the endpoints that stayed.
        w.send("users", Ok(view(3, "e1", vec![inst("a", 1), inst("c", 3)])));
        settle().await;
        let second = users.load();
        assert_eq!(ids(&second), vec!["a", "c"]);
        assert_eq!(second.index, 3);
        assert!(Arc::ptr_eq(&first.endpoints[0].state, &second.endpoints[0].state));
        assert_eq!(second.endpoints[0].state.in_flight(), 1);
        drop(guard);
        assert_eq!(second.endpoints[0].state.in_flight(), 0);

        // Same id at a new port is a new target with fresh state.
        w.send("users", Ok(view(4, "e1", vec![inst("a", 9), inst("c", 3)])));
        settle().await;
        assert!(!Arc::ptr_eq(&second.endpoints[0].state, &users.load().endpoints[0].state));
    }

    #[tokio::test(start_paused = true)]
    async fn critical_instances_are_routed_to_only_in_health_panic() {
        let with = |id: &str, port, status| Instance { status, ..inst(id, port) };
        let (p, c) = (HealthStatus::Passing, HealthStatus::Critical);
        let (d, w, _) = directory(DiscoveryConfig::default());
        let users = d.resolve(&name("users")).unwrap();
        // Two of three healthy: the critical one stays out.
        w.send("users", Ok(view(1, "e1", vec![with("a", 1, c), with("b", 2, p), with("c", 3, p)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        let normal = users.load();
        assert_eq!((ids(&normal), normal.health_panic), (vec!["b".into(), "c".into()], false));
        let guard = normal.endpoints[0].begin();

        // One of three: every instance, flagged, the survivors' state carried over.
        w.send("users", Ok(view(2, "e1", vec![with("a", 1, c), with("b", 2, p), with("c", 3, c)])));
        settle().await;
        let panic = users.load();
        assert_eq!((ids(&panic), panic.health_panic), (vec!["a".into(), "b".into(), "c".into()], true));
        assert_eq!(panic.endpoints[1].state.in_flight(), 1);
        assert_eq!(panic.endpoints[0].health, c);
        drop(guard);

        // Still panic, but a health change is published (the admin page shows it).
        w.send("users", Ok(view(3, "e1", vec![with("a", 1, c), with("b", 2, c), with("c", 3, c)])));
        settle().await;
        assert!(users.load().health_panic);
        assert!(users.load().endpoints.iter().all(|e| e.health == c));

        // Back to two of three: normal again.
        let a_state = Arc::clone(&panic.endpoints[0].state);
        let b_state = Arc::clone(&panic.endpoints[1].state);
        w.send("users", Ok(view(4, "e1", vec![with("a", 1, p), with("b", 2, c), with("c", 3, p)])));
        settle().await;
        let back = users.load();
        assert_eq!((ids(&back), back.health_panic), (vec!["a".into(), "c".into()], false));
        assert!(Arc::ptr_eq(&a_state, &back.endpoints[0].state), "a's state was not carried into the set");

        // b left the set but not the service: when the next panic brings it
        // back, it still has its state (in-flight count, ejection, warm-up).
        w.send("users", Ok(view(5, "e1", vec![with("a", 1, c), with("b", 2, c), with("c", 3, p)])));
        settle().await;
        let again = users.load();
        assert!(again.health_panic);
        assert!(Arc::ptr_eq(&b_state, &again.endpoints[1].state), "b came back with a fresh state");

        // Turned off: nobody healthy means nobody to call.
        let (d, w, _) = directory(DiscoveryConfig { panic_threshold: 0.0, ..Default::default() });
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![with("a", 1, c), with("b", 2, c)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        assert_eq!((users.load().endpoints.len(), users.load().health_panic), (0, false));
    }

    #[tokio::test(start_paused = true)]
    async fn refused_endpoints_never_enter_a_set_and_are_reported_once() {
        let (d, w, sink) = directory(DiscoveryConfig::default());
        let d = d.with_filter(EndpointFilter::new(vec!["127.0.0.1:15000".parse().unwrap()], vec![]));
        let users = d.resolve(&name("users")).unwrap();
        let mut metadata_service = inst("meta", 80);
        metadata_service.address = Address::new("169.254.169.254").unwrap();
        let own_admin = inst("admin", 15000);
        w.send("users", Ok(view(1, "e1", vec![inst("a", 1), metadata_service.clone(), own_admin.clone()])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        assert_eq!(ids(&users.load()), vec!["a"]);
        w.send("users", Ok(view(2, "e1", vec![inst("a", 1), inst("b", 2), metadata_service, own_admin])));
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a", "b"]);
        let mut refused = sink.1.lock().unwrap().clone();
        refused.sort_by_key(|r| r.as_str());
        assert_eq!(refused, vec![RefuseReason::LinkLocal, RefuseReason::OwnListener]);
    }

    #[tokio::test(start_paused = true)]
    async fn mesh_endpoints_carry_their_service_and_require_mtls_drops_plain_ones() {
        let mesh = |id: &str, port| Instance { mesh_tls: true, ..inst(id, port) };
        let (d, w, _) = directory(DiscoveryConfig::default());
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![mesh("a", 1), inst("b", 2)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        let set = users.load();
        assert_eq!(set.endpoints[0].mesh_tls, Some(name("users")));
        assert_eq!(set.endpoints[0].pool_key, "127.0.0.1:1/users");
        assert_eq!(
            (set.endpoints[1].mesh_tls.as_ref(), set.endpoints[1].pool_key.as_str()),
            (None, "127.0.0.1:2")
        );
        // Turning mesh TLS on at the same address is a change the proxy must see.
        w.send("users", Ok(view(2, "e1", vec![mesh("a", 1), mesh("b", 2)])));
        settle().await;
        assert!(users.load().endpoints.iter().all(|e| e.mesh_tls.is_some()));

        let (d, w, sink) = directory(DiscoveryConfig::default());
        let d = d.with_filter(EndpointFilter::new(vec![], vec![]).require_mtls(true));
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![mesh("a", 1), inst("b", 2), inst("c", 3)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        assert_eq!(ids(&users.load()), vec!["a"]);
        assert_eq!(sink.1.lock().unwrap().as_slice(), &[RefuseReason::PlainText, RefuseReason::PlainText]);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_keep_the_last_endpoints() {
        let (d, w, sink) = directory(DiscoveryConfig::default());
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![inst("a", 1)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        for _ in 0..5 {
            w.send("users", Err("connection refused".into()));
        }
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a"]);
        assert_eq!(sink.0.lock().unwrap().as_slice(), &[true, false, false, false, false, false]);
    }

    #[tokio::test(start_paused = true)]
    async fn first_empty_answer_resolves() {
        let (d, w, _) = directory(DiscoveryConfig::default());
        let ghost = d.resolve(&name("ghost")).unwrap();
        w.send("ghost", Ok(view(0, "e1", vec![])));
        assert!(ghost.wait_resolved(Duration::from_secs(1)).await);
        assert!(ghost.load().endpoints.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_registry_restart_missing_instances_are_kept_for_one_ttl() {
        let config = DiscoveryConfig { restart_retention: Duration::from_secs(5), ..Default::default() };
        let (d, w, _) = directory(config);
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(7, "old", vec![inst("a", 1), inst("b", 2), inst("c", 3)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        let state_b = Arc::clone(&users.load().endpoints[1].state);

        // The restarted registry knows nobody yet: everyone is kept.
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.send("users", Ok(view(0, "new", vec![])));
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a", "b", "c"]);

        // b re-registers at t=2s; a and c are still retained.
        tokio::time::sleep(Duration::from_secs(1)).await;
        w.send("users", Ok(view(1, "new", vec![inst("b", 2)])));
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a", "b", "c"]);
        assert!(Arc::ptr_eq(&state_b, &users.load().endpoints[1].state));

        // a re-registers at t=4s.
        tokio::time::sleep(Duration::from_secs(2)).await;
        w.send("users", Ok(view(2, "new", vec![inst("a", 1), inst("b", 2)])));
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a", "b", "c"]);

        // c never does: just before 1s + 5s it is still there, just after it is gone.
        tokio::time::sleep(Duration::from_millis(1900)).await;
        assert_eq!(ids(&users.load()), vec!["a", "b", "c"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
        settle().await;
        assert_eq!(ids(&users.load()), vec!["a", "b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ordinary_removal_is_immediate() {
        let (d, w, _) = directory(DiscoveryConfig::default());
        let users = d.resolve(&name("users")).unwrap();
        w.send("users", Ok(view(1, "e1", vec![inst("a", 1), inst("b", 2)])));
        assert!(users.wait_resolved(Duration::from_secs(1)).await);
        w.send("users", Ok(view(2, "e1", vec![inst("b", 2)])));
        settle().await;
        assert_eq!(ids(&users.load()), vec!["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_holds_and_evicts_empty_then_idle_services() {
        let config = DiscoveryConfig { max_services: 3, ..Default::default() };
        let (d, w, _) = directory(config);
        d.watch_pinned(&name("pinned"));
        let busy = d.resolve(&name("busy")).unwrap();
        w.send("busy", Ok(view(1, "e", vec![inst("a", 1)])));
        let junk = d.resolve(&name("junk-1")).unwrap();
        assert!(busy.wait_resolved(Duration::from_secs(1)).await);
        assert_eq!(d.len(), 3);

        // junk-1 is not resolved yet and busy is in use: no room.
        assert!(d.resolve(&name("junk-2")).is_none());
        // Once junk-1 resolves to nothing, it makes room at once.
        w.send("junk-1", Ok(view(0, "e", vec![])));
        assert!(junk.wait_resolved(Duration::from_secs(1)).await);
        assert!(d.resolve(&name("junk-2")).is_some());
        assert_eq!(d.len(), 3);
        let names: Vec<String> = d.services().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, vec!["busy", "junk-2", "pinned"]);

        // An unresolved or busy service goes only after MIN_IDLE_TO_MAKE_ROOM idle.
        tokio::time::sleep(MIN_IDLE_TO_MAKE_ROOM - Duration::from_secs(1)).await;
        d.resolve(&name("busy"));
        assert!(d.resolve(&name("junk-3")).is_none());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(d.resolve(&name("junk-3")).is_some(), "idle junk-2 should have been evicted");
        let names: Vec<String> = d.services().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, vec!["busy", "junk-3", "pinned"]);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_services_are_evicted_but_pinned_ones_stay() {
        let config = DiscoveryConfig { idle_timeout: Duration::from_secs(60), ..Default::default() };
        let (d, w, _) = directory(config);
        let d = Arc::new(d);
        tokio::spawn(Arc::clone(&d).run_sweeper());
        d.watch_pinned(&name("pinned"));
        d.resolve(&name("used"));
        d.resolve(&name("idle"));
        for _ in 0..6 {
            tokio::time::sleep(Duration::from_secs(15)).await;
            d.resolve(&name("used"));
        }
        let names: Vec<String> = d.services().iter().map(|s| s.name.to_string()).collect();
        assert_eq!(names, vec!["pinned", "used"]);
        // The evicted service's watch was closed: a new use opens a fresh one.
        d.resolve(&name("idle"));
        assert_eq!(w.opened.lock().unwrap().iter().filter(|n| *n == "idle").count(), 2);
    }
}
