//! Blocking queries: the query string, the caps on open ones (in all and per
//! client), wait and jitter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use rand::Rng;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use trellis_shared::ServiceName;

use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::store::{ServiceSnapshot, Store};

/// How long a blocking query waits when it gives an index but no `wait`.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// A blocking query is held up to `wait + wait / JITTER_DIVISOR`, so watchers
/// started together do not all come back in the same instant.
pub const JITTER_DIVISOR: u32 = 16;

/// The query string of `GET /v1/services/{service}`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GetQuery {
    pub all: bool,
    pub index: Option<u64>,
    /// Already capped at `--max-wait`.
    pub wait: Option<Duration>,
    /// The epoch the client's `index` belongs to. A different epoch (the
    /// registry restarted) answers at once: a fresh registry can reach the
    /// same index number with different state, and waiting on it would leave
    /// the client on the old registry's view for a whole `wait`.
    pub epoch: Option<String>,
}

impl GetQuery {
    /// Whether the client's index comes from another epoch than `current`.
    pub fn other_epoch(&self, current: &str) -> bool {
        self.epoch.as_deref().is_some_and(|e| e != current)
    }
}

/// Parses `all`, `index` and `wait`. Unknown or repeated parameters are
/// refused, so a typo (`?indx=5`) does not silently turn a watch into a poll.
pub fn parse_query(raw: Option<&str>, max_wait: Duration) -> Result<GetQuery, ApiError> {
    let mut q = GetQuery::default();
    let (mut seen_all, mut seen_wait) = (false, false);
    let dup = |k: &str| ApiError::InvalidQuery(format!("parameter {k:?} is given more than once"));
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
        match &*k {
            "all" => {
                if std::mem::replace(&mut seen_all, true) {
                    return Err(dup("all"));
                }
                q.all = match &*v {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::InvalidQuery(format!(
                            "all must be true or false, got {:?}",
                            clip(&v)
                        )))
                    }
                };
            }
            "index" => {
                if q.index.is_some() {
                    return Err(dup("index"));
                }
                let i = v.parse::<u64>().map_err(|_| {
                    ApiError::InvalidQuery(format!(
                        "index must be a non-negative integer, got {:?}",
                        clip(&v)
                    ))
                })?;
                q.index = Some(i);
            }
            "wait" => {
                if std::mem::replace(&mut seen_wait, true) {
                    return Err(dup("wait"));
                }
                q.wait = Some(parse_wait(&v, max_wait)?);
            }
            "epoch" => {
                if q.epoch.is_some() {
                    return Err(dup("epoch"));
                }
                q.epoch = Some(v.into_owned());
            }
            other => {
                return Err(ApiError::InvalidQuery(format!(
                    "unknown parameter {:?} (known: all, index, wait, epoch)",
                    clip(other)
                )))
            }
        }
    }
    if q.wait.is_some() && q.index.is_none() {
        return Err(ApiError::InvalidQuery(
            "wait needs index (a blocking query waits for a change after an index)".into(),
        ));
    }
    Ok(q)
}

/// Parses a wait like `30s`; absurd values (overflowing ones included) are
/// capped at `max_wait` rather than refused.
fn parse_wait(v: &str, max_wait: Duration) -> Result<Duration, ApiError> {
    match humantime::parse_duration(v.trim()) {
        Ok(d) => Ok(d.min(max_wait)),
        Err(humantime::DurationError::NumberOverflow) => Ok(max_wait),
        Err(e) => Err(ApiError::InvalidQuery(format!(
            "wait must be a duration like \"30s\" or \"500ms\", got {:?}: {e}",
            clip(v)
        ))),
    }
}

fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}

/// `wait` plus up to `wait / 16` of random jitter.
pub fn jittered(wait: Duration) -> Duration {
    let max = (wait / JITTER_DIVISOR).as_millis() as u64;
    if max == 0 {
        return wait;
    }
    wait + Duration::from_millis(rand::rng().random_range(0..=max))
}

/// Holds blocking queries within the caps and releases them on shutdown.
///
/// Past either cap a query answers at once with the current state, as a poll
/// would: the client loses nothing but the wait. The per-client cap keeps one
/// address from taking every slot of the global one; its table is touched only
/// by queries that are about to wait, and empties as they end.
pub struct Watches {
    slots: Arc<Semaphore>,
    per_client: usize,
    clients: Mutex<HashMap<IpAddr, usize>>,
    shutdown: CancellationToken,
    metrics: Arc<Metrics>,
}

/// One client's held query, given back on drop.
struct ClientSlot<'a> {
    watches: &'a Watches,
    ip: IpAddr,
}

impl Drop for ClientSlot<'_> {
    fn drop(&mut self) {
        let mut clients = crate::lock(&self.watches.clients);
        if let Some(n) = clients.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                clients.remove(&self.ip);
            }
        }
    }
}

struct OpenWatch(Gauge);

impl Drop for OpenWatch {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Watches {
    /// At most `max` held queries in all; no per-client cap until [`Watches::per_client`].
    pub fn new(max: usize, shutdown: CancellationToken, metrics: Arc<Metrics>) -> Self {
        let clients = Mutex::new(HashMap::new());
        Watches { slots: Arc::new(Semaphore::new(max)), per_client: usize::MAX, clients, shutdown, metrics }
    }

    /// The same, holding at most `max` queries per client address.
    pub fn per_client(self, max: usize) -> Self {
        Watches { per_client: max, ..self }
    }

    fn client_slot(&self, ip: IpAddr) -> Option<ClientSlot<'_>> {
        let mut clients = crate::lock(&self.clients);
        let n = clients.entry(ip).or_insert(0);
        if *n >= self.per_client {
            return None;
        }
        *n += 1;
        Some(ClientSlot { watches: self, ip })
    }

    /// Answers when the service's index differs from `index` or after `wait`
    /// (plus jitter); at once when a cap is reached (in all, or for `client`)
    /// or the server is stopping.
    pub async fn wait<S: Store>(
        &self,
        store: &S,
        service: &ServiceName,
        index: u64,
        wait: Duration,
        client: Option<IpAddr>,
    ) -> Arc<ServiceSnapshot> {
        let current = store.snapshot(service);
        let changed = current.index() != index && store.reached(index);
        if changed {
            return current;
        }
        match self.hold(wait, client, store.watch_from(service, index)).await {
            Some(snap) => snap,
            None => store.snapshot(service),
        }
    }

    /// The same for the catalog (Consul's `/v1/catalog/services`): answers
    /// with the catalog's index once it differs from `index`, or after `wait`.
    pub async fn wait_catalog<S: Store>(
        &self,
        store: &S,
        index: u64,
        wait: Duration,
        client: Option<IpAddr>,
    ) -> u64 {
        let current = store.catalog().0;
        if current != index && store.reached(index) {
            return current;
        }
        match self.hold(wait, client, store.watch_catalog_from(index)).await {
            Some(i) => i,
            None => store.catalog().0,
        }
    }

    /// Waits for a change of any service: resolves once the registry's
    /// highest index differs from `index`, or after `wait` (plus jitter),
    /// under the same caps as [`Watches::wait`]. Returns the current highest index.
    pub async fn wait_any<S: Store>(
        &self,
        store: &S,
        index: u64,
        wait: Duration,
        client: Option<IpAddr>,
    ) -> u64 {
        let mut changes = store.changes();
        let current = *changes.borrow_and_update();
        if current != index {
            return current;
        }
        let changed = async move {
            // The sender lives in the store, which the caller borrows: this cannot fail.
            let _ = changes.wait_for(|i| *i != index).await;
        };
        self.hold(wait, client, changed).await;
        *store.changes().borrow()
    }

    /// Holds a query until `changed` resolves (`Some`) or, within the caps,
    /// `wait` plus jitter passes or the server stops (`None`). Past a cap, or
    /// with no wait, it answers `None` at once.
    async fn hold<T>(
        &self,
        wait: Duration,
        client: Option<IpAddr>,
        changed: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        if wait.is_zero() || self.shutdown.is_cancelled() {
            return None;
        }
        let Ok(_permit) = self.slots.try_acquire() else {
            self.metrics.watches_refused.inc();
            return None;
        };
        let _client = match client.map(|ip| self.client_slot(ip)) {
            Some(None) => {
                self.metrics.watches_refused.inc();
                return None;
            }
            Some(Some(slot)) => Some(slot),
            None => None,
        };
        self.metrics.open_watches.inc();
        let _open = OpenWatch(self.metrics.open_watches.clone());
        tokio::select! {
            v = changed => Some(v),
            _ = tokio::time::sleep(jittered(wait)) => None,
            _ = self.shutdown.cancelled() => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ApiError;

    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn parses_blocking_queries() {
        let q = parse_query(Some("index=42&wait=10s&all=true"), MAX).unwrap();
        assert_eq!(
            q,
            GetQuery { all: true, index: Some(42), wait: Some(Duration::from_secs(10)), epoch: None }
        );
        let q = parse_query(Some("index=3&epoch=e1"), MAX).unwrap();
        assert!(q.other_epoch("e2"), "{q:?}");
        assert!(!q.other_epoch("e1"), "{q:?}");
        assert!(!parse_query(Some("index=3"), MAX).unwrap().other_epoch("e2"), "no epoch given: no opinion");
        assert_eq!(parse_query(None, MAX).unwrap(), GetQuery::default());
        assert!(parse_query(Some("all"), MAX).unwrap().all);
        assert_eq!(parse_query(Some("index=1&wait=99999h"), MAX).unwrap().wait, Some(MAX));
        assert_eq!(parse_query(Some("index=1&wait=99999999999999999999999s"), MAX).unwrap().wait, Some(MAX));
    }

    #[test]
    fn refuses_malformed_queries() {
        for bad in [
            "index=-1",
            "index=x",
            "index=1&index=2",
            "wait=5s",
            "index=1&wait=soon",
            "all=maybe",
            "indx=3",
            "epoch=a&epoch=b",
        ] {
            assert!(matches!(parse_query(Some(bad), MAX), Err(ApiError::InvalidQuery(_))), "{bad}");
        }
    }

    #[test]
    fn jitter_stays_within_a_sixteenth() {
        let w = Duration::from_secs(16);
        for _ in 0..100 {
            let j = jittered(w);
            assert!(j >= w && j <= w + Duration::from_secs(1), "{j:?}");
        }
        assert_eq!(jittered(Duration::from_millis(10)), Duration::from_millis(10));
    }

    mod held {
        use std::collections::BTreeMap;

        use tokio::time::Instant;
        use trellis_shared::{Address, HealthStatus, Instance, InstanceId};

        use super::*;
        use crate::metrics::StoreMetrics;
        use crate::store::{LeasedInstance, MemoryStore};

        async fn setup(max: usize) -> (Arc<MemoryStore>, Arc<Watches>, CancellationToken, ServiceName, u64) {
            let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
            let stop = CancellationToken::new();
            tokio::spawn(store.clone().background(stop.child_token()));
            let watches = Arc::new(Watches::new(max, stop.clone(), Arc::new(Metrics::new())));
            let users = ServiceName::new("users").unwrap();
            let instance = Instance {
                id: InstanceId::new("a").unwrap(),
                address: Address::new("10.0.0.1").unwrap(),
                port: 1,
                zone: None,
                weight: 100,
                metadata: BTreeMap::new(),
                status: HealthStatus::Passing,
                output: String::new(),
                tags: Vec::new(),
                mesh_tls: false,
            };
            let w = store
                .register(&users, LeasedInstance { instance, ttl: Duration::from_secs(600) })
                .await
                .unwrap();
            (store, watches, stop, users, w.index)
        }

        #[tokio::test(start_paused = true)]
        async fn a_held_query_ends_after_wait_plus_at_most_a_sixteenth() {
            let (store, watches, _stop, users, index) = setup(10).await;
            let t = Instant::now();
            let snap = watches.wait(&*store, &users, index, Duration::from_secs(16), None).await;
            assert_eq!(snap.index(), index);
            let e = t.elapsed();
            assert!(e >= Duration::from_secs(16) && e <= Duration::from_secs(17), "{e:?}");
        }

        #[tokio::test(start_paused = true)]
        async fn past_the_cap_queries_answer_at_once() {
            let (store, watches, _stop, users, index) = setup(1).await;
            let held = {
                let (store, watches, users) = (store.clone(), watches.clone(), users.clone());
                tokio::spawn(async move {
                    watches.wait(&*store, &users, index, Duration::from_secs(30), None).await
                })
            };
            tokio::task::yield_now().await;
            assert_eq!(watches.metrics.open_watches.get(), 1);
            let t = Instant::now();
            watches.wait(&*store, &users, index, Duration::from_secs(30), None).await;
            assert_eq!(t.elapsed(), Duration::ZERO);
            assert_eq!(watches.metrics.watches_refused.get(), 1);
            held.await.unwrap();
            assert_eq!(watches.metrics.open_watches.get(), 0);
        }

        #[tokio::test(start_paused = true)]
        async fn past_its_own_cap_a_client_answers_at_once_and_others_still_wait() {
            let (store, watches, _stop, users, index) = setup(10).await;
            let watches = Arc::new(Arc::into_inner(watches).unwrap().per_client(1));
            let (a, b) = (Some(IpAddr::from([10, 0, 0, 1])), Some(IpAddr::from([10, 0, 0, 2])));
            let hold = |client| {
                let (store, watches, users) = (store.clone(), watches.clone(), users.clone());
                tokio::spawn(async move {
                    watches.wait(&*store, &users, index, Duration::from_secs(30), client).await
                })
            };
            let held = hold(a);
            tokio::task::yield_now().await;
            let t = Instant::now();
            watches.wait(&*store, &users, index, Duration::from_secs(30), a).await;
            assert_eq!(t.elapsed(), Duration::ZERO, "a second query of the same client is not held");
            assert_eq!(watches.metrics.watches_refused.get(), 1);
            let other = hold(b);
            tokio::task::yield_now().await;
            assert_eq!(watches.metrics.open_watches.get(), 2, "another client still waits");
            held.await.unwrap();
            other.await.unwrap();
            assert!(crate::lock(&watches.clients).is_empty(), "slots given back");
        }

        #[tokio::test(start_paused = true)]
        async fn shutdown_answers_held_queries_at_once() {
            let (store, watches, stop, users, index) = setup(10).await;
            let held = {
                let (store, watches, users) = (store.clone(), watches.clone(), users.clone());
                tokio::spawn(async move {
                    watches.wait(&*store, &users, index, Duration::from_secs(30), None).await
                })
            };
            tokio::task::yield_now().await;
            let t = Instant::now();
            stop.cancel();
            let snap = held.await.unwrap();
            assert_eq!((t.elapsed(), snap.index()), (Duration::ZERO, index));
            // And new ones do not wait either.
            watches.wait(&*store, &users, index, Duration::from_secs(30), None).await;
            assert_eq!(t.elapsed(), Duration::ZERO);
        }
    }
}
