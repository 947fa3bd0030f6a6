//! Zone-aware routing: keep a service's traffic in the caller's zone while
//! that zone can carry it, and add the other zones when it cannot.
//!
//! # The rule
//! Endpoints are *near* (in the caller's `--zone`, or registered without a
//! zone: nothing says they are far, so they are never held back) or *remote*
//! (in another zone). On each choice the balancer asks [`ZoneState::near_only`],
//! which looks at the snapshot and moves one per-service flag:
//!
//! ```text
//!            too few usable near endpoints, half of them ejected,
//!            or near load > spill_load
//!   near ───────────────────────────────────────────────────────► spilled
//!   only ◄─────────────────────────────────────────────────────── (every zone)
//!            enough usable near endpoints, fewer than half ejected,
//!            and (in flight in every zone) / usable near < return_load
//! ```
//!
//! - *usable*: not ejected (ejected or probing endpoints are lost capacity);
//! - *near load*: requests this sidecar has in flight to near endpoints per
//!   usable near endpoint, sampled at the choice (the in-flight count is
//!   latency × request rate, Little's law, so it is Linkerd HAZL's load measure
//!   without a second estimator to keep).
//!
//! While spilled the balancer's least-loaded choice spreads the load over
//! every zone, so the near endpoints' own load no longer says whether their
//! zone could take it all back. The return therefore asks what the near zone
//! would carry alone: everything in flight to the service, in every zone, per
//! usable near endpoint. With a band of 0.8 to 2.0 that is the same as HAZL's
//! for two equal zones, and unlike a band on the near endpoints' own load it
//! does not flap with three or more zones (spilled over three zones the near
//! share is a third of the total: it would return at 2.4 per near endpoint,
//! above the spill mark, and leave again at once).
//!
//! Near only is not a wall: [`crate::balance::choose`] still sends an attempt
//! to a remote endpoint when no near endpoint is left for it (all ejected, or
//! all tried by this request), so panic mode and retries reach every zone
//! rather than failing.
//!
//! # Defaults, and why
//! - `min_local = 2`: one endpoint alone is one failure away from sending
//!   every request on a retry path, and takes its whole zone's traffic.
//!   Envoy skips zone routing below `min_cluster_size` (6 hosts in the whole
//!   cluster) and Kubernetes topology hints with fewer endpoints than zones;
//!   counting usable endpoints in the caller's own zone is finer: a service
//!   with two instances per zone keeps its traffic local. Set it to 1 to keep
//!   a single-instance zone local.
//! - half of the near endpoints ejected: the survivors are about to take
//!   twice their share, so remote capacity comes in before the load shows.
//! - `spill_load = 2.0`, `return_load = 0.8`: Linkerd HAZL's load band. Two
//!   requests waiting per endpoint means the zone queues; the gap between the
//!   marks is the hysteresis that keeps the flag from flapping.
//! - Envoy's proportional split (keep upstream% ÷ caller% local) needs every
//!   caller's zone share and assumes equal capacity per host; this rule needs
//!   only what the sidecar measures itself, and keeps everything local while
//!   the local zone keeps up, which is what saves the cross-zone bill.
//!
//! Endpoints without a zone, a sidecar without `--zone`, or `--zone-aware
//! false`: every endpoint is near, and the balancer behaves as without zones.
//!
//! The request path reads and, on a transition, swaps one atomic per service;
//! transitions are logged with their reason.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use tracing::info;
use trellis_shared::{ServiceName, Zone};

use crate::endpoints::Endpoint;

/// Zone-aware routing settings.
#[derive(Debug, Clone)]
pub struct ZoneConfig {
    /// The caller's zone (the sidecar's `--zone`); `None` turns zone-aware
    /// routing off.
    pub local: Option<Zone>,
    /// Whether zone-aware routing applies when `local` is set.
    pub enabled: bool,
    /// Fewest usable (not ejected) near endpoints that keep traffic near.
    pub min_local: usize,
    /// Requests in flight per usable near endpoint above which the other
    /// zones are added.
    pub spill_load: f64,
    /// Requests in flight (in every zone) per usable near endpoint below which
    /// the other zones are dropped again.
    pub return_load: f64,
}

impl ZoneConfig {
    /// The defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: ZoneConfig =
        ZoneConfig { local: None, enabled: true, min_local: 2, spill_load: 2.0, return_load: 0.8 };

    /// The caller's zone when zone-aware routing applies.
    pub fn routing_zone(&self) -> Option<&Zone> {
        self.local.as_ref().filter(|_| self.enabled)
    }
}

impl Default for ZoneConfig {
    fn default() -> Self {
        ZoneConfig::DEFAULT
    }
}

/// Whether `ep` is near a caller in zone `local`: same zone, or no zone.
pub fn is_near(ep: &Endpoint, local: &Zone) -> bool {
    ep.zone.as_ref().is_none_or(|z| z == local)
}

/// What the rule looks at, counted over one snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ZoneLoad {
    /// Endpoints in the caller's zone or without a zone.
    pub near: usize,
    /// Near endpoints not ejected.
    pub near_usable: usize,
    /// Requests in flight to near endpoints.
    pub near_in_flight: usize,
    /// Endpoints in other zones.
    pub remote: usize,
    /// Requests in flight to every endpoint of the service.
    pub in_flight: usize,
}

impl ZoneLoad {
    pub fn of(endpoints: &[Arc<Endpoint>], local: &Zone) -> ZoneLoad {
        let mut load = ZoneLoad::default();
        for ep in endpoints {
            let in_flight = ep.state.in_flight();
            load.in_flight += in_flight;
            if is_near(ep, local) {
                load.near += 1;
                load.near_in_flight += in_flight;
                if !ep.state.outlier.is_ejected() {
                    load.near_usable += 1;
                }
            } else {
                load.remote += 1;
            }
        }
        load
    }
}

/// Where a service's first attempts may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Routing {
    /// Zone-aware routing does not apply (no zone, turned off, or no request yet).
    Off = 0,
    /// Near endpoints only.
    Near = 1,
    /// Every zone: fewer than `min_local` usable near endpoints.
    SpilledTooFew = 2,
    /// Every zone: half of the near endpoints or more are ejected.
    SpilledEjected = 3,
    /// Every zone: the near load passed `spill_load` and has not fallen back
    /// below `return_load`.
    SpilledLoad = 4,
}

impl Routing {
    fn from_u8(v: u8) -> Routing {
        match v {
            1 => Routing::Near,
            2 => Routing::SpilledTooFew,
            3 => Routing::SpilledEjected,
            4 => Routing::SpilledLoad,
            _ => Routing::Off,
        }
    }

    /// Whether remote endpoints get first attempts.
    pub fn remote_in_use(self) -> bool {
        matches!(self, Routing::SpilledTooFew | Routing::SpilledEjected | Routing::SpilledLoad)
    }

    /// For `/endpoints` and the log.
    pub fn name(self) -> &'static str {
        match self {
            Routing::Off => "off",
            Routing::Near => "local",
            Routing::SpilledTooFew => "spilled: too few local endpoints",
            Routing::SpilledEjected => "spilled: local endpoints ejected",
            Routing::SpilledLoad => "spilled: local load",
        }
    }
}

/// The next routing state from the current one and a snapshot's load: the
/// rule in the module doc, as a pure function.
pub fn next(current: Routing, load: &ZoneLoad, config: &ZoneConfig) -> Routing {
    if load.remote == 0 {
        // Nothing to spill to: every endpoint is near.
        return Routing::Near;
    }
    if load.near_usable < config.min_local.max(1) {
        return Routing::SpilledTooFew;
    }
    if (load.near - load.near_usable) * 2 >= load.near {
        return Routing::SpilledEjected;
    }
    let usable = load.near_usable as f64;
    if load.near_in_flight as f64 / usable > config.spill_load {
        return Routing::SpilledLoad;
    }
    if current.remote_in_use() && load.in_flight as f64 / usable >= config.return_load {
        // Between the marks, or the near zone could not take everything back
        // yet: stay spilled (for the load, whatever spilled first).
        return Routing::SpilledLoad;
    }
    Routing::Near
}

/// One service's zone routing state, kept with its endpoints' policy: the
/// hysteresis flag and the requests counted by zone.
#[derive(Debug)]
pub struct ZoneState {
    service: ServiceName,
    routing: AtomicU8,
    counters: ZoneCounters,
}

/// `zone_requests` counters of one service.
#[derive(Debug, Clone, Default)]
pub struct ZoneCounters {
    /// Attempts sent to an endpoint in the caller's zone.
    pub local: Counter,
    /// Attempts sent to an endpoint in another zone.
    pub remote: Counter,
}

impl ZoneState {
    pub fn new(service: ServiceName, counters: ZoneCounters) -> ZoneState {
        ZoneState { service, routing: AtomicU8::new(Routing::Off as u8), counters }
    }

    /// The state the last choice left.
    pub fn routing(&self) -> Routing {
        Routing::from_u8(self.routing.load(Ordering::Relaxed))
    }

    /// The zone whose (and zone-less) endpoints alone get first attempts now,
    /// or `None` when every endpoint does; moves the hysteresis flag.
    pub fn near_only<'c>(&self, endpoints: &[Arc<Endpoint>], config: &'c ZoneConfig) -> Option<&'c Zone> {
        let Some(local) = config.routing_zone() else {
            self.set(Routing::Off);
            return None;
        };
        let load = ZoneLoad::of(endpoints, local);
        let next = next(self.routing(), &load, config);
        self.set(next);
        (!next.remote_in_use()).then_some(local)
    }

    fn set(&self, next: Routing) {
        let prev = Routing::from_u8(self.routing.swap(next as u8, Ordering::Relaxed));
        if prev.remote_in_use() != next.remote_in_use() && prev != Routing::Off {
            info!(service = %self.service, from = prev.name(), to = next.name(), "zone routing changed");
        }
    }

    /// Counts an attempt by the zone of its endpoint, when both the caller and
    /// the endpoint have one.
    pub fn count(&self, ep: &Endpoint, local: Option<&Zone>) {
        if let (Some(local), Some(zone)) = (local, &ep.zone) {
            let counter = if local == zone { &self.counters.local } else { &self.counters.remote };
            counter.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use tokio::time::Instant;
    use trellis_shared::{Address, InstanceId};

    use super::*;
    use crate::endpoints::InFlight;
    use crate::outlier::{Outcome, OutlierConfig, Via};

    fn zone(z: &str) -> Zone {
        Zone::new(z).unwrap()
    }

    fn ep(id: &str, z: Option<&str>) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            InstanceId::new(id).unwrap(),
            Address::new("127.0.0.1").unwrap(),
            80,
            1,
            z.map(zone),
            BTreeMap::new(),
            Arc::default(),
        ))
    }

    /// Two endpoints in zone a (the caller's), two in b.
    fn two_zones() -> Vec<Arc<Endpoint>> {
        vec![ep("a1", Some("a")), ep("a2", Some("a")), ep("b1", Some("b")), ep("b2", Some("b"))]
    }

    fn config() -> ZoneConfig {
        ZoneConfig { local: Some(zone("a")), ..ZoneConfig::DEFAULT }
    }

    fn state() -> ZoneState {
        ZoneState::new(ServiceName::new("api").unwrap(), ZoneCounters::default())
    }

    fn load(e: &Arc<Endpoint>, n: usize) -> Vec<InFlight> {
        (0..n).map(|_| e.begin()).collect()
    }

    fn refuse(e: &Endpoint, cfg: &OutlierConfig) {
        let out = e.state.outlier.record(Outcome::Refused, Via::Normal, cfg, Instant::now(), || true);
        assert!(out.is_some(), "not ejected");
    }

    fn load_of(
        near: usize,
        usable: usize,
        near_in_flight: usize,
        remote: usize,
        in_flight: usize,
    ) -> ZoneLoad {
        ZoneLoad { near, near_usable: usable, near_in_flight, remote, in_flight }
    }

    #[test]
    fn the_rule_as_a_table() {
        let c = config();
        use Routing::*;
        // (current, load, next)
        let cases = [
            (Near, load_of(2, 2, 0, 2, 0), Near),
            (Near, load_of(2, 2, 4, 2, 4), Near), // 2.0 is not above the spill mark
            (Near, load_of(2, 2, 5, 2, 5), SpilledLoad),
            (SpilledLoad, load_of(2, 2, 1, 2, 4), SpilledLoad), // near zone alone: 2.0
            (SpilledLoad, load_of(2, 2, 1, 2, 2), SpilledLoad), // 1.0: between the marks
            (SpilledLoad, load_of(2, 2, 0, 2, 1), Near),        // 0.5
            (Near, load_of(2, 2, 3, 2, 3), Near),               // 1.5: between the marks
            (Near, load_of(2, 1, 0, 2, 0), SpilledTooFew),
            (Near, load_of(4, 2, 0, 2, 0), SpilledEjected),
            (Near, load_of(4, 3, 0, 2, 0), Near),
            (Near, load_of(0, 0, 0, 4, 0), SpilledTooFew),
            (SpilledTooFew, load_of(2, 2, 0, 2, 0), Near),
            (SpilledLoad, load_of(3, 1, 0, 0, 9), Near), // no remote endpoint: nothing to spill to
        ];
        for (current, l, want) in cases {
            assert_eq!(next(current, &l, &c), want, "{current:?} {l:?}");
        }
        let single = ZoneConfig { min_local: 1, ..config() };
        assert_eq!(next(Near, &load_of(1, 1, 0, 2, 0), &single), Near);
        assert_eq!(next(Near, &load_of(1, 0, 0, 2, 0), &single), SpilledTooFew);
    }

    #[test]
    fn zoneless_endpoints_and_a_zoneless_caller_route_as_without_zones() {
        let s = state();
        let eps = vec![ep("x", None), ep("y", None), ep("b1", Some("b"))];
        // Zone-less endpoints are near: a and the two of them keep traffic near.
        assert_eq!(s.near_only(&eps, &config()), Some(&zone("a")));
        assert_eq!(ZoneLoad::of(&eps, &zone("a")).near, 2);
        // A caller without a zone, or with routing off: every endpoint.
        assert_eq!(s.near_only(&eps, &ZoneConfig::DEFAULT), None);
        assert_eq!(s.routing(), Routing::Off);
        let off = ZoneConfig { enabled: false, ..config() };
        assert_eq!(s.near_only(&two_zones(), &off), None);
        assert_eq!(s.routing(), Routing::Off);
    }

    #[tokio::test(start_paused = true)]
    async fn load_spills_over_and_returns_below_the_low_mark() {
        let s = state();
        let c = config();
        let eps = two_zones();
        assert_eq!(s.near_only(&eps, &c), Some(&zone("a")));
        // The local endpoints slow down: requests pile up, 5 over 2 endpoints.
        let mut slow = load(&eps[0], 3);
        slow.extend(load(&eps[1], 2));
        assert_eq!(s.near_only(&eps, &c), None);
        assert_eq!(s.routing(), Routing::SpilledLoad);
        // Spilled, the balancer spreads: 1 local, 2 remote in flight. The
        // local zone alone would carry 3 / 2 = 1.5: stay spilled.
        drop(slow);
        let _a = load(&eps[0], 1);
        let mut remote = load(&eps[2], 1);
        remote.extend(load(&eps[3], 1));
        assert_eq!(s.near_only(&eps, &c), None);
        // They recover: 1 in flight in all, 0.5 per local endpoint.
        drop(remote);
        assert_eq!(s.near_only(&eps, &c), Some(&zone("a")));
        assert_eq!(s.routing(), Routing::Near);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_local_endpoints_spill_over_and_traffic_returns_once_they_are_restored() {
        let s = state();
        let c = config();
        let outlier = OutlierConfig { base_ejection: Duration::from_secs(5), ..OutlierConfig::DEFAULT };
        let eps = two_zones();
        assert_eq!(s.near_only(&eps, &c), Some(&zone("a")));
        // a1 dies: one usable local endpoint is fewer than two.
        refuse(&eps[0], &outlier);
        assert_eq!(s.near_only(&eps, &c), None);
        assert_eq!(s.routing(), Routing::SpilledTooFew);
        // Its ejection ends: probing still counts as lost capacity.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(eps[0].state.outlier.admit(Instant::now()), crate::outlier::Admission::Probe);
        assert_eq!(s.near_only(&eps, &c), None);
        // The probe succeeds: back to local.
        eps[0].state.outlier.record(Outcome::Success, Via::Probe, &outlier, Instant::now(), || true);
        assert_eq!(s.near_only(&eps, &c), Some(&zone("a")));

        // Four local endpoints, two ejected: enough left, but half are out.
        let mut eps = two_zones();
        eps.extend([ep("a3", Some("a")), ep("a4", Some("a"))]);
        refuse(&eps[0], &outlier);
        assert_eq!(s.near_only(&eps, &c), Some(&zone("a")));
        refuse(&eps[1], &outlier);
        assert_eq!(s.near_only(&eps, &c), None);
        assert_eq!(s.routing(), Routing::SpilledEjected);
    }

    #[test]
    fn attempts_are_counted_by_zone_only_when_both_sides_have_one() {
        let counters = ZoneCounters::default();
        let s = ZoneState::new(ServiceName::new("api").unwrap(), counters.clone());
        let a = zone("a");
        s.count(&ep("a1", Some("a")), Some(&a));
        s.count(&ep("b1", Some("b")), Some(&a));
        s.count(&ep("b2", Some("b")), Some(&a));
        s.count(&ep("x", None), Some(&a));
        s.count(&ep("a1", Some("a")), None);
        assert_eq!((counters.local.get(), counters.remote.get()), (1, 2));
    }
}
