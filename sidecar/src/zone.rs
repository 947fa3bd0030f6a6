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
//! - *near load*: requests this sidecar had in flight to near endpoints per
//!   usable near endpoint, averaged over time with an exponential window
//!   ([`LOAD_WINDOW`]). The average in-flight count is latency × request rate
//!   (Little's law), Linkerd HAZL's load measure. It is computed exactly from
//!   the time each request spent in flight, summed per endpoint when the
//!   request ends ([`crate::endpoints::EndpointState::busy_us`]): the growth of
//!   that sum over a window divided by the window is the window's average.
//!   Averaged, not sampled: callers send in bursts, and a burst of eight
//!   requests onto two idle endpoints is four in flight each for a
//!   millisecond, not a zone that cannot keep up (a first version sampling the
//!   count at each choice sent a fifth of a light bursty load to the other
//!   zone; one averaging those samples over time missed lockstep callers
//!   entirely, since each wave is sampled just after the last one ended).
//!   A request counts once it ends, so the load of slow requests shows one
//!   request duration late; a zone that hangs shows through its timeouts and
//!   ejections instead.
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
//! The request path updates a few atomics per service (the averages and the
//! routing flag) without a lock; two choices racing on the average may lose
//! one sample, which an average over a second does not notice. Transitions
//! are logged with their reason.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
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

/// Time constant of the in-flight averages: a load that persists for about a
/// third of it crosses the spill mark from idle when it is four times the mark;
/// a burst much shorter than it hardly moves them.
pub const LOAD_WINDOW: Duration = Duration::from_secs(1);

/// Whether `ep` is near a caller in zone `local`: same zone, or no zone.
pub fn is_near(ep: &Endpoint, local: &Zone) -> bool {
    ep.zone.as_ref().is_none_or(|z| z == local)
}

/// What the rule looks at, counted over one snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct ZoneLoad {
    /// Endpoints in the caller's zone or without a zone.
    pub near: usize,
    /// Near endpoints not ejected.
    pub near_usable: usize,
    /// Requests in flight to near endpoints, on average.
    pub near_in_flight: f64,
    /// Endpoints in other zones.
    pub remote: usize,
    /// Requests in flight to every endpoint of the service, on average.
    pub in_flight: f64,
}

/// Endpoint counts and busy-time sums of one snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Census {
    near: usize,
    near_usable: usize,
    remote: usize,
    near_busy_us: u64,
    busy_us: u64,
}

impl Census {
    fn of(endpoints: &[Arc<Endpoint>], local: &Zone) -> Census {
        let mut c = Census::default();
        for ep in endpoints {
            let busy = ep.state.busy_us();
            c.busy_us = c.busy_us.saturating_add(busy);
            if is_near(ep, local) {
                c.near += 1;
                c.near_busy_us = c.near_busy_us.saturating_add(busy);
                if !ep.state.outlier.is_ejected() {
                    c.near_usable += 1;
                }
            } else {
                c.remote += 1;
            }
        }
        c
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
    if load.near_in_flight / usable > config.spill_load {
        return Routing::SpilledLoad;
    }
    if current.remote_in_use() && load.in_flight / usable >= config.return_load {
        // Between the marks, or the near zone could not take everything back
        // yet: stay spilled (for the load, whatever spilled first).
        return Routing::SpilledLoad;
    }
    Routing::Near
}

/// One service's zone routing state, kept with its endpoints' policy: the
/// hysteresis flag, the in-flight averages and the requests counted by zone.
#[derive(Debug)]
pub struct ZoneState {
    service: ServiceName,
    routing: AtomicU8,
    /// Time origin of `sampled_us`.
    epoch: Instant,
    /// When the averages were last updated, in µs since `epoch`.
    sampled_us: AtomicU64,
    /// The busy-time sums seen then (near endpoints, all endpoints).
    near_busy_us: AtomicU64,
    busy_us: AtomicU64,
    /// Average requests in flight to near endpoints (`f64` bits).
    near_avg: AtomicU64,
    /// Average requests in flight to the whole service (`f64` bits).
    all_avg: AtomicU64,
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
        ZoneState {
            service,
            routing: AtomicU8::new(Routing::Off as u8),
            epoch: Instant::now(),
            sampled_us: AtomicU64::new(0),
            near_busy_us: AtomicU64::new(0),
            busy_us: AtomicU64::new(0),
            near_avg: AtomicU64::new(0f64.to_bits()),
            all_avg: AtomicU64::new(0f64.to_bits()),
            counters,
        }
    }

    /// The state the last choice left.
    pub fn routing(&self) -> Routing {
        Routing::from_u8(self.routing.load(Ordering::Relaxed))
    }

    /// The zone whose (and zone-less) endpoints alone get first attempts now,
    /// or `None` when every endpoint does; feeds the averages with what is in
    /// flight now and moves the hysteresis flag.
    pub fn near_only<'c>(
        &self,
        endpoints: &[Arc<Endpoint>],
        config: &'c ZoneConfig,
        now: Instant,
    ) -> Option<&'c Zone> {
        let Some(local) = config.routing_zone() else {
            self.set(Routing::Off);
            return None;
        };
        let census = Census::of(endpoints, local);
        let (near_in_flight, in_flight) = self.average(now, &census);
        let load = ZoneLoad {
            near: census.near,
            near_usable: census.near_usable,
            near_in_flight,
            remote: census.remote,
            in_flight,
        };
        let next = next(self.routing(), &load, config);
        self.set(next);
        (!next.remote_in_use()).then_some(local)
    }

    /// Folds the busy time added since the last choice into the average
    /// in-flight counts (near, all) and returns them: over a stretch `dt`
    /// with `busy` seconds of requests ended, the average decays by
    /// `e^(-dt/window)` and gains `busy / window`. A snapshot that lost an
    /// endpoint has a smaller sum: that stretch adds nothing.
    fn average(&self, now: Instant, census: &Census) -> (f64, f64) {
        let now_us = u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX);
        let prev_us = self.sampled_us.swap(now_us, Ordering::Relaxed);
        let dt = now_us.saturating_sub(prev_us) as f64 / 1e6;
        let window = LOAD_WINDOW.as_secs_f64();
        let decay = (-dt / window).exp();
        let fold = |avg: &AtomicU64, seen: &AtomicU64, sum: u64| {
            let busy = sum.saturating_sub(seen.swap(sum, Ordering::Relaxed)) as f64 / 1e6;
            let new = f64::from_bits(avg.load(Ordering::Relaxed)) * decay + busy / window;
            avg.store(new.to_bits(), Ordering::Relaxed);
            new
        };
        (
            fold(&self.near_avg, &self.near_busy_us, census.near_busy_us),
            fold(&self.all_avg, &self.busy_us, census.busy_us),
        )
    }

    fn set(&self, next: Routing) {
        // Most choices change nothing: a load, not a write to a shared line.
        if self.routing.load(Ordering::Relaxed) == next as u8 {
            return;
        }
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

    fn load_of(near: usize, usable: usize, near_in_flight: f64, remote: usize, in_flight: f64) -> ZoneLoad {
        ZoneLoad { near, near_usable: usable, near_in_flight, remote, in_flight }
    }

    #[test]
    fn the_rule_as_a_table() {
        let c = config();
        use Routing::*;
        // (current, load, next)
        let cases = [
            (Near, load_of(2, 2, 0.0, 2, 0.0), Near),
            (Near, load_of(2, 2, 4.0, 2, 4.0), Near), // 2.0 is not above the spill mark
            (Near, load_of(2, 2, 4.2, 2, 4.2), SpilledLoad),
            (SpilledLoad, load_of(2, 2, 1.0, 2, 4.0), SpilledLoad), // near zone alone: 2.0
            (SpilledLoad, load_of(2, 2, 1.0, 2, 2.0), SpilledLoad), // 1.0: between the marks
            (SpilledLoad, load_of(2, 2, 0.5, 2, 1.5), Near),        // 0.75
            (Near, load_of(2, 2, 3.0, 2, 3.0), Near),               // 1.5: between the marks
            (Near, load_of(2, 1, 0.0, 2, 0.0), SpilledTooFew),
            (Near, load_of(4, 2, 0.0, 2, 0.0), SpilledEjected),
            (Near, load_of(4, 3, 0.0, 2, 0.0), Near),
            (Near, load_of(0, 0, 0.0, 4, 0.0), SpilledTooFew),
            (SpilledTooFew, load_of(2, 2, 0.0, 2, 0.0), Near),
            (SpilledLoad, load_of(3, 1, 0.0, 0, 9.0), Near), // no remote endpoint: nothing to spill to
        ];
        for (current, l, want) in cases {
            assert_eq!(next(current, &l, &c), want, "{current:?} {l:?}");
        }
        let single = ZoneConfig { min_local: 1, ..config() };
        assert_eq!(next(Near, &load_of(1, 1, 0.0, 2, 0.0), &single), Near);
        assert_eq!(next(Near, &load_of(1, 0, 0.0, 2, 0.0), &single), SpilledTooFew);
    }

    #[tokio::test(start_paused = true)]
    async fn zoneless_endpoints_and_a_zoneless_caller_route_as_without_zones() {
        let s = state();
        let now = Instant::now();
        let eps = vec![ep("x", None), ep("y", None), ep("b1", Some("b"))];
        // Zone-less endpoints are near: a and the two of them keep traffic near.
        assert_eq!(s.near_only(&eps, &config(), now), Some(&zone("a")));
        assert_eq!(Census::of(&eps, &zone("a")).near, 2);
        // A caller without a zone, or with routing off: every endpoint.
        assert_eq!(s.near_only(&eps, &ZoneConfig::DEFAULT, now), None);
        assert_eq!(s.routing(), Routing::Off);
        let off = ZoneConfig { enabled: false, ..config() };
        assert_eq!(s.near_only(&two_zones(), &off, now), None);
        assert_eq!(s.routing(), Routing::Off);
    }

    /// Requests to `eps` that each last `each`, in lockstep waves: every
    /// wave ends, and the next begins, at once (the e2e test's load when
    /// its backends are slow).
    struct Waves {
        eps: Vec<Arc<Endpoint>>,
        each: Duration,
        started: Instant,
        held: Vec<InFlight>,
    }

    impl Waves {
        fn new(eps: &[&Arc<Endpoint>], per_endpoint: usize, each: Duration) -> Waves {
            let eps: Vec<_> = eps.iter().map(|e| Arc::clone(e)).collect();
            let mut w = Waves { eps, each, started: Instant::now(), held: Vec::new() };
            w.held = w.eps.iter().flat_map(|e| load(e, per_endpoint)).collect();
            w
        }

        fn tick(&mut self) {
            if self.started.elapsed() >= self.each {
                let n = self.held.len() / self.eps.len();
                self.held.clear();
                self.held = self.eps.iter().flat_map(|e| load(e, n)).collect();
                self.started = Instant::now();
            }
        }
    }

    /// Calls `near_only` every 10 ms for `d` while `waves` run; the time the
    /// first call returned `want`, if one did.
    async fn run_for(
        s: &ZoneState,
        eps: &[Arc<Endpoint>],
        waves: &mut [&mut Waves],
        d: Duration,
        want: Option<&Zone>,
    ) -> Option<Duration> {
        let start = Instant::now();
        let mut seen = None;
        while start.elapsed() < d {
            for w in waves.iter_mut() {
                w.tick();
            }
            if s.near_only(eps, &config(), Instant::now()) == want && seen.is_none() {
                seen = Some(start.elapsed());
            }
            tokio::time::advance(Duration::from_millis(10)).await;
        }
        seen
    }

    #[tokio::test(start_paused = true)]
    async fn a_short_burst_stays_near() {
        let s = state();
        let eps = two_zones();
        assert_eq!(run_for(&s, &eps, &mut [], Duration::from_secs(1), None).await, None);
        // Eight requests at once onto the two near endpoints, 2 ms each, every 20 ms.
        for _ in 0..100 {
            let burst = (load(&eps[0], 4), load(&eps[1], 4));
            tokio::time::advance(Duration::from_millis(2)).await;
            drop(burst);
            assert_eq!(run_for(&s, &eps, &mut [], Duration::from_millis(18), None).await, None);
        }
        assert_eq!(s.routing(), Routing::Near);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lasting_load_spills_over_and_returns_below_the_low_mark() {
        let s = state();
        let eps = two_zones();
        let a = zone("a");
        let ms = Duration::from_millis;
        run_for(&s, &eps, &mut [], ms(1000), Some(&a)).await;
        // The near endpoints slow down: 4 requests each, 300 ms long, wave after wave.
        let mut slow = Waves::new(&[&eps[0], &eps[1]], 4, ms(300));
        let spilled = run_for(&s, &eps, &mut [&mut slow], ms(3000), None).await.expect("never spilled");
        // Each wave adds its 8 × 0.3 s of busy time when it ends: 2.4 at
        // 300 ms, 2.4 e^(-0.3) + 2.4 = 4.2 at 600 ms, past 4 (2 per endpoint).
        // Not before the first wave ended, and not from the first alone.
        assert_eq!(spilled, ms(600));
        assert_eq!(s.routing(), Routing::SpilledLoad);
        // Spilled, the balancer spreads: 1 near, 2 remote in flight. The near
        // zone alone would carry 3 / 2 = 1.5: it stays spilled.
        drop(slow);
        let mut spread = Waves::new(&[&eps[0], &eps[2], &eps[3]], 1, ms(300));
        assert_eq!(run_for(&s, &eps, &mut [&mut spread], ms(5000), Some(&a)).await, None);
        // They recover: 1 in flight in all; the average falls from 3 to below
        // 1.6 (0.8 per near endpoint) after about ln(2 / 0.6) s.
        drop(spread);
        let mut light = Waves::new(&[&eps[0]], 1, ms(300));
        let back = run_for(&s, &eps, &mut [&mut light], ms(5000), Some(&a)).await.expect("never came back");
        assert!((ms(900)..ms(1600)).contains(&back), "{back:?}");
        assert_eq!(s.routing(), Routing::Near);
    }

    #[tokio::test(start_paused = true)]
    async fn ejected_local_endpoints_spill_over_at_once_and_traffic_returns_once_they_are_restored() {
        let s = state();
        let c = config();
        let now = Instant::now;
        let outlier = OutlierConfig { base_ejection: Duration::from_secs(5), ..OutlierConfig::DEFAULT };
        let eps = two_zones();
        assert_eq!(s.near_only(&eps, &c, now()), Some(&zone("a")));
        // a1 dies: one usable local endpoint is fewer than two.
        refuse(&eps[0], &outlier);
        assert_eq!(s.near_only(&eps, &c, now()), None);
        assert_eq!(s.routing(), Routing::SpilledTooFew);
        // Its ejection ends: probing still counts as lost capacity.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(eps[0].state.outlier.admit(now()), crate::outlier::Admission::Probe);
        assert_eq!(s.near_only(&eps, &c, now()), None);
        // The probe succeeds: back to local.
        eps[0].state.outlier.record(Outcome::Success, Via::Probe, &outlier, now(), || true);
        assert_eq!(s.near_only(&eps, &c, now()), Some(&zone("a")));

        // Four local endpoints, two ejected: enough left, but half are out.
        let mut eps = two_zones();
        eps.extend([ep("a3", Some("a")), ep("a4", Some("a"))]);
        refuse(&eps[0], &outlier);
        assert_eq!(s.near_only(&eps, &c, now()), Some(&zone("a")));
        refuse(&eps[1], &outlier);
        assert_eq!(s.near_only(&eps, &c, now()), None);
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
