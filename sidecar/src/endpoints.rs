//! Upstream endpoints and the immutable snapshot of a service's endpoints that
//! the proxy reads without locks.
//!
//! One discovery task per service is the only writer: it builds a new
//! [`EndpointSet`] from each registry answer and publishes it through
//! [`ServiceEndpoints::publish`]. Request handlers only `load()`. Per-endpoint
//! mutable state (in-flight count, outlier state) lives in [`EndpointState`]
//! behind an `Arc` that discovery carries over from one snapshot to the next for
//! the same instance, so counts and ejections survive membership updates, and a
//! snapshot never has to be swapped in two halves that could disagree.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use trellis_shared::{Address, HealthStatus, InstanceId, ServiceName, Zone};

use crate::hedge::Hedge;
use crate::metrics::ServiceMetrics;
use crate::outlier::OutlierState;
use crate::retry::RetryBudget;
use crate::zone::ZoneState;

/// Mutable, shared state of one endpoint.
#[derive(Debug, Default)]
pub struct EndpointState {
    /// Requests (and upgraded connections) from this sidecar now in progress.
    in_flight: AtomicUsize,
    /// Microseconds spent in flight by the requests that ended so far, summed:
    /// its growth over a window is the window's average in-flight count
    /// (Little's law), which zone-aware routing reads ([`crate::zone`]).
    busy_us: AtomicU64,
    /// Passive health: consecutive failures, ejection, probing.
    pub outlier: OutlierState,
}

impl EndpointState {
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// See `busy_us`: grows when a request ends, by how long it was in flight.
    pub fn busy_us(&self) -> u64 {
        self.busy_us.load(Ordering::Relaxed)
    }
}

/// One upstream instance as the proxy sees it.
#[derive(Debug)]
pub struct Endpoint {
    pub id: InstanceId,
    pub host: Address,
    pub port: u16,
    /// `host:port`, ready for a URI authority.
    pub authority: String,
    pub weight: u32,
    pub zone: Option<Zone>,
    pub metadata: BTreeMap<String, String>,
    pub state: Arc<EndpointState>,
    /// The service whose identity the endpoint must prove over mutual TLS,
    /// when it registered `mesh_tls` (see [`Endpoint::with_mesh_tls`]).
    pub mesh_tls: Option<ServiceName>,
    /// What the registry last said of its health. Only a health panic routes to a
    /// critical endpoint (see [`crate::health_panic`]); shown in `/endpoints`.
    pub health: HealthStatus,
    /// What its pooled connections are kept under: `authority`, and for a
    /// mesh endpoint the service too, so a connection verified as one
    /// service is never lent to a request for another.
    pub pool_key: String,
    /// `authority` parsed once for request URIs (cloning it is a reference-count increment).
    pub(crate) uri_authority: Option<http::uri::Authority>,
}

impl Endpoint {
    pub fn new(
        id: InstanceId,
        host: Address,
        port: u16,
        weight: u32,
        zone: Option<Zone>,
        metadata: BTreeMap<String, String>,
        state: Arc<EndpointState>,
    ) -> Self {
        let authority = match host.ip() {
            Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let uri_authority =
            http::uri::Authority::from_maybe_shared(bytes::Bytes::from(authority.clone())).ok();
        Endpoint {
            id,
            host,
            port,
            pool_key: authority.clone(),
            authority,
            weight: weight.max(1),
            zone,
            metadata,
            state,
            mesh_tls: None,
            health: HealthStatus::Passing,
            uri_authority,
        }
    }

    /// The endpoint reached only over mutual TLS, as `service`.
    pub fn with_mesh_tls(mut self, service: ServiceName) -> Self {
        self.pool_key = format!("{}/{service}", self.authority);
        self.mesh_tls = Some(service);
        self
    }

    /// The endpoint with the health the registry reported (a builder step, as
    /// `with_mesh_tls`, so the many places that build endpoints in tests stay short).
    pub fn with_health(mut self, health: HealthStatus) -> Self {
        self.health = health;
        self
    }

    /// Counts a request as in flight until the returned guard drops. The proxy
    /// moves the guard into the response body so the count falls when the last
    /// byte has been sent, not when headers arrive.
    /// The time in flight is added to `busy_us` (what zone-aware routing
    /// measures load by).
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.begin_timed(true)
    }

    /// [`Endpoint::begin`], reading the clock only when `timed`: a sidecar
    /// without zone-aware routing has no use for the busy time, and an
    /// upgraded connection's lifetime says nothing about load.
    pub fn begin_timed(self: &Arc<Self>, timed: bool) -> InFlight {
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight { endpoint: Arc::clone(self), since: timed.then(tokio::time::Instant::now) }
    }

    /// Same instance at the same place: its state can be carried over.
    pub fn same_target(&self, id: &InstanceId, host: &Address, port: u16) -> bool {
        &self.id == id && &self.host == host && self.port == port
    }
}

/// RAII in-flight marker; see [`Endpoint::begin`].
#[derive(Debug)]
pub struct InFlight {
    endpoint: Arc<Endpoint>,
    since: Option<tokio::time::Instant>,
}

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.endpoint.state.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(since) = self.since {
            let busy = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.endpoint.state.busy_us.fetch_add(busy, Ordering::Relaxed);
        }
    }
}

/// An immutable snapshot of one service's endpoints.
#[derive(Debug, Default)]
pub struct EndpointSet {
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Registry index and epoch this snapshot reflects.
    pub index: u64,
    pub epoch: String,
    /// Too few instances are healthy, so the critical ones are in the set too
    /// (see [`crate::health_panic`]).
    pub health_panic: bool,
}

/// The published endpoints of one upstream service.
#[derive(Debug)]
pub struct ServiceEndpoints {
    pub name: ServiceName,
    current: ArcSwap<EndpointSet>,
    /// Becomes true once discovery has published its first answer.
    resolved: watch::Sender<bool>,
    /// Milliseconds (on the sidecar's coarse clock) when a request last used it;
    /// the directory evicts services idle for long.
    last_used_ms: AtomicU64,
    /// What the proxy keeps per service between requests, created on the
    /// first request that finds endpoints (see [`ServiceEndpoints::policy`]).
    policy: OnceLock<ServicePolicy>,
}

/// Per upstream service, the state the proxy's policies keep across requests:
/// the retry budget all requests to the service share, its metric handles, and
/// whether zone-aware routing holds it in the caller's zone.
#[derive(Debug)]
pub struct ServicePolicy {
    pub budget: RetryBudget,
    pub metrics: ServiceMetrics,
    /// Hedging, when `--hedge` names the service.
    pub hedge: Option<Hedge>,
    pub zone: ZoneState,
}

impl ServiceEndpoints {
    pub fn new(name: ServiceName) -> Self {
        ServiceEndpoints {
            name,
            current: ArcSwap::from_pointee(EndpointSet::default()),
            resolved: watch::channel(false).0,
            last_used_ms: AtomicU64::new(0),
            policy: OnceLock::new(),
        }
    }

    /// The current snapshot; lock-free.
    pub fn load(&self) -> Arc<EndpointSet> {
        self.current.load_full()
    }

    /// Discovery only: replaces the snapshot and marks the service resolved.
    pub fn publish(&self, set: EndpointSet) {
        self.current.store(Arc::new(set));
        self.resolved.send_replace(true);
    }

    pub fn is_resolved(&self) -> bool {
        *self.resolved.borrow()
    }

    /// Waits until the first discovery answer, at most `timeout`; true if resolved.
    pub async fn wait_resolved(&self, timeout: Duration) -> bool {
        let mut rx = self.resolved.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|r| *r)).await.is_ok_and(|r| r.is_ok())
    }

    /// The service's policy state, made by `init` on first use.
    pub fn policy(&self, init: impl FnOnce() -> ServicePolicy) -> &ServicePolicy {
        self.policy.get_or_init(init)
    }

    /// The service's policy state if a request made it already.
    pub fn policy_if_made(&self) -> Option<&ServicePolicy> {
        self.policy.get()
    }

    pub fn touch(&self, now_ms: u64) {
        self.last_used_ms.store(now_ms, Ordering::Relaxed);
    }

    pub fn last_used_ms(&self) -> u64 {
        self.last_used_ms.load(Ordering::Relaxed)
    }
}

/// Where the proxy finds a service's endpoints. Discovery's `Directory`
/// implements it by starting (or reusing) a watch of the service; tests use a
/// fixed map.
pub trait Resolve: Send + Sync + 'static {
    /// The endpoints of `name`, starting a watch if there is none yet; `None`
    /// when the cap on watched services is reached and nothing is idle enough
    /// to evict (the proxy answers `overloaded`).
    fn resolve(&self, name: &ServiceName) -> Option<Arc<ServiceEndpoints>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            InstanceId::new(id).unwrap(),
            Address::new("127.0.0.1").unwrap(),
            80,
            100,
            None,
            BTreeMap::new(),
            Arc::default(),
        ))
    }

    #[test]
    fn in_flight_falls_when_guard_drops() {
        let e = ep("a");
        let g1 = e.begin();
        let g2 = e.begin();
        assert_eq!(e.state.in_flight(), 2);
        drop(g1);
        assert_eq!(e.state.in_flight(), 1);
        drop(g2);
        assert_eq!(e.state.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn resolved_after_first_publish() {
        let s = Arc::new(ServiceEndpoints::new(ServiceName::new("users").unwrap()));
        assert!(!s.wait_resolved(Duration::from_millis(10)).await);
        let s2 = Arc::clone(&s);
        tokio::spawn(async move {
            s2.publish(EndpointSet {
                endpoints: vec![ep("a")],
                index: 1,
                epoch: "e".into(),
                health_panic: false,
            })
        });
        assert!(s.wait_resolved(Duration::from_secs(1)).await);
        assert_eq!(s.load().endpoints.len(), 1);
    }
}
