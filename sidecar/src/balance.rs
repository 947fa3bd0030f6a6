//! The choice of endpoint for each attempt: pure functions over a snapshot.
//!
//! # Load
//! [`least_loaded`]: an endpoint's load is `in flight / effective weight`, the
//! least loaded wins, and ties are broken at random in proportion to the
//! effective weights (weighted reservoir sampling, so the random number
//! generator is consulted only on a tie). Under light load, when every
//! endpoint is idle, the weights alone share the traffic; under heavy load
//! the in-flight counts do, divided by the weights. The effective weight
//! is the registered weight times the endpoint's warmth: during its slow start
//! (`slow_start` after it was first seen or came back from an ejection) it
//! rises linearly from 10 % to 100 %, so a cold instance is not handed a full
//! share in its first second (Envoy's `slow_start_config`, linear).
//!
//! # Candidates: no black holes
//! [`choose`] takes the first rule that finds an endpoint:
//! 1. an endpoint whose ejection has ended gets the request as its one probe;
//! 2. least-loaded over endpoints that are active, not yet tried by this
//!    request, and not suspect (no failure in the last second);
//! 3. the same over suspect ones;
//! 4. least-loaded over active endpoints this request tried already;
//! 5. panic mode: every endpoint is ejected, so all of them, untried first.
//!
//! # Zones
//! With zone-aware routing ([`crate::zone`]) holding a service near, rules 1
//! to 3 look at near endpoints (the caller's zone, or no zone) first, and a
//! remote endpoint gets an attempt only when no near one is left for it: the
//! same rules over every endpoint follow before rule 4, so a retry goes to an
//! untried remote endpoint rather than back to a near one that just failed,
//! and panic mode covers every zone.
//!
//! What keeps a dying endpoint from swallowing traffic: a refused connection
//! ejects at once whatever the ejected-share bound ([`crate::outlier`]), and
//! any other failure makes the endpoint suspect, so an endpoint that fails
//! fast, and therefore has nothing in flight, ranks after every endpoint that
//! works instead of looking the least loaded. The share bound then only
//! decides how long a softly failing endpoint stays out, never whether a dead
//! one gets first attempts.

use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;
use trellis_shared::Zone;

use crate::endpoints::{Endpoint, EndpointSet};
use crate::outlier::{Admission, Via};
use crate::zone::{self, ZoneConfig, ZoneState};

/// Balancer settings.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// How long a new endpoint (or one back from an ejection) takes to reach
    /// its full share; zero turns slow start off.
    pub slow_start: Duration,
    /// Zone-aware routing.
    pub zone: ZoneConfig,
}

impl BalanceConfig {
    /// The defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: BalanceConfig =
        BalanceConfig { slow_start: Duration::from_secs(10), zone: ZoneConfig::DEFAULT };
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig::DEFAULT
    }
}

/// `a_in_flight / a_weight` against the same for b, without division.
fn compare_load(a_in_flight: usize, a_weight: u64, b_in_flight: usize, b_weight: u64) -> Ordering {
    let a = (a_in_flight as u128) * u128::from(b_weight.max(1));
    let b = (b_in_flight as u128) * u128::from(a_weight.max(1));
    a.cmp(&b)
}

/// Index of the least loaded endpoint among those `candidate` accepts, or
/// `None` when it accepts none.
pub fn least_loaded(
    endpoints: &[Arc<Endpoint>],
    now: Instant,
    config: &BalanceConfig,
    mut candidate: impl FnMut(usize, &Endpoint) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, usize, u64)> = None;
    // The summed weight of the endpoints tied for least loaded so far.
    let mut tied_weight = 0u64;
    for (i, ep) in endpoints.iter().enumerate() {
        if !candidate(i, ep) {
            continue;
        }
        let load = ep.state.in_flight();
        let weight = u64::from(ep.weight) * ep.state.outlier.warmth_permille(now, config.slow_start);
        match best {
            None => {
                best = Some((i, load, weight));
                tied_weight = weight.max(1);
            }
            Some((_, best_load, best_weight)) => match compare_load(load, weight, best_load, best_weight) {
                Ordering::Less => {
                    best = Some((i, load, weight));
                    tied_weight = weight.max(1);
                }
                Ordering::Equal => {
                    // Weighted reservoir sampling: each tied endpoint ends up
                    // chosen with probability weight / summed weight.
                    tied_weight = tied_weight.saturating_add(weight.max(1));
                    if rand::rng().random_range(0..tied_weight) < weight.max(1) {
                        best = Some((i, load, weight));
                    }
                }
                Ordering::Greater => {}
            },
        }
    }
    best.map(|(i, _, _)| i)
}

/// The endpoint chosen for one attempt and how it was let through. While it
/// holds an ejected endpoint's probe, dropping it before an outcome was
/// recorded releases the probe, so the next request can probe instead.
#[derive(Debug)]
pub struct Pick<'a> {
    /// Position in the snapshot (what the attempt loop remembers as tried).
    pub index: usize,
    pub endpoint: &'a Arc<Endpoint>,
    pub via: Via,
    /// When the choice was made: outcomes are recorded at this time.
    pub at: Instant,
    holds_probe: bool,
}

impl Pick<'_> {
    /// The attempt's outcome was recorded: the probe, if any, is settled.
    pub fn settled(&mut self) {
        self.holds_probe = false;
    }
}

impl Drop for Pick<'_> {
    fn drop(&mut self) {
        if self.holds_probe {
            self.endpoint.state.outlier.release_probe();
        }
    }
}

/// The endpoint for the next attempt of a request that already tried the
/// endpoints at `tried`; `None` only when the snapshot is empty. `zones` is
/// the service's zone routing state: it decides whether remote endpoints are
/// first-rank candidates, and counts the attempt by zone.
pub fn choose<'a>(
    set: &'a EndpointSet,
    tried: &[usize],
    now: Instant,
    config: &BalanceConfig,
    zones: &ZoneState,
) -> Option<Pick<'a>> {
    let eps = &set.endpoints;
    // As in Envoy, no zone-aware routing in a health panic: the near zone's
    // endpoints may be the critical ones, and the panic is about capacity.
    let near_only = if set.health_panic { None } else { zones.near_only(eps, &config.zone, now) };
    let pick = choose_among(eps, tried, now, config, near_only)?;
    zones.count(pick.endpoint, config.zone.local.as_ref());
    Some(pick)
}

/// [`choose`]'s rules; `near_only` holds back endpoints of other zones.
fn choose_among<'a>(
    eps: &'a [Arc<Endpoint>],
    tried: &[usize],
    now: Instant,
    config: &BalanceConfig,
    near_only: Option<&Zone>,
) -> Option<Pick<'a>> {
    let untried = |i: usize| !tried.contains(&i);
    let active = |ep: &Endpoint| !ep.state.outlier.is_ejected();
    let near = |ep: &Endpoint| near_only.is_none_or(|z| zone::is_near(ep, z));
    let pick = |index: usize, via: Via| Pick {
        index,
        endpoint: &eps[index],
        via,
        at: now,
        holds_probe: via == Via::Probe,
    };
    // An endpoint whose ejection has ended gets its one probe right away.
    for (i, ep) in eps.iter().enumerate() {
        if ep.state.outlier.is_ejected()
            && untried(i)
            && near(ep)
            && ep.state.outlier.admit(now) == Admission::Probe
        {
            return Some(pick(i, Via::Probe));
        }
    }
    let lowest = |f: &dyn Fn(usize, &Endpoint) -> bool| least_loaded(eps, now, config, f);
    let fresh = |i: usize, ep: &Endpoint| untried(i) && active(ep) && !ep.state.outlier.is_suspect(now);
    // Without zone routing every endpoint is near and the remote rules are skipped.
    let zoned = near_only.is_some();
    let found = lowest(&|i, ep| near(ep) && fresh(i, ep))
        .or_else(|| lowest(&|i, ep| near(ep) && untried(i) && active(ep)))
        // No near endpoint left for this attempt: the other zones, untried first.
        .or_else(|| zoned.then(|| lowest(&fresh)).flatten())
        .or_else(|| zoned.then(|| lowest(&|i, ep| untried(i) && active(ep))).flatten())
        .or_else(|| lowest(&|_, ep| near(ep) && active(ep)))
        .or_else(|| zoned.then(|| lowest(&|_, ep| active(ep))).flatten());
    if let Some(i) = found {
        return Some(pick(i, Via::Normal));
    }
    // Panic mode: every endpoint is ejected; trying them beats failing everything.
    let i = lowest(&|i, _| untried(i)).or_else(|| lowest(&|_, _| true))?;
    Some(pick(i, Via::Panic))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, InstanceId};

    use std::time::Duration;

    use super::*;
    use crate::endpoints::InFlight;
    use crate::outlier::{Outcome, OutlierConfig};

    fn ep(id: &str, weight: u32) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            InstanceId::new(id).unwrap(),
            Address::new("127.0.0.1").unwrap(),
            80,
            weight,
            None,
            BTreeMap::new(),
            Arc::default(),
        ))
    }

    /// Slow start off: every endpoint at its full weight.
    fn warm() -> BalanceConfig {
        BalanceConfig { slow_start: Duration::ZERO, ..BalanceConfig::DEFAULT }
    }

    /// A service's zone state that nothing shares.
    fn no_zones() -> ZoneState {
        ZoneState::new(trellis_shared::ServiceName::new("api").unwrap(), Default::default())
    }

    fn ll(eps: &[Arc<Endpoint>], f: impl FnMut(usize, &Endpoint) -> bool) -> Option<usize> {
        least_loaded(eps, Instant::now(), &warm(), f)
    }

    fn load(e: &Arc<Endpoint>, n: usize) -> Vec<InFlight> {
        (0..n).map(|_| e.begin()).collect()
    }

    #[test]
    fn none_for_no_endpoints() {
        assert_eq!(ll(&[], |_, _| true), None);
        let eps = vec![ep("a", 1)];
        assert_eq!(ll(&eps, |_, _| false), None);
    }

    #[test]
    fn one_endpoint_always() {
        let eps = vec![ep("a", 1)];
        let _g = load(&eps[0], 5);
        assert_eq!(ll(&eps, |_, _| true), Some(0));
    }

    #[test]
    fn fewest_in_flight_wins() {
        let eps = vec![ep("a", 1), ep("b", 1), ep("c", 1)];
        let _ga = load(&eps[0], 3);
        let _gb = load(&eps[1], 1);
        let _gc = load(&eps[2], 2);
        for _ in 0..20 {
            assert_eq!(ll(&eps, |_, _| true), Some(1));
        }
        // The filter excludes b: c is next.
        assert_eq!(ll(&eps, |i, _| i != 1), Some(2));
    }

    #[test]
    fn weight_divides_load() {
        // a: 4 in flight / weight 4 = 1; b: 2 / 1 = 2.
        let eps = vec![ep("a", 4), ep("b", 1)];
        let _ga = load(&eps[0], 4);
        let _gb = load(&eps[1], 2);
        assert_eq!(ll(&eps, |_, _| true), Some(0));
        // a: 9/4 > b: 2/1.
        let _more = load(&eps[0], 5);
        assert_eq!(ll(&eps, |_, _| true), Some(1));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let eps = vec![ep("a", 1), ep("b", 1), ep("c", 1), ep("d", 1)];
        let _gd = load(&eps[3], 1);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            counts[ll(&eps, |_, _| true).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        // Each of a, b, c expects 1000; far from flaky at these bounds.
        for c in &counts[..3] {
            assert!((800..1200).contains(c), "{counts:?}");
        }
    }

    fn set(n: usize) -> EndpointSet {
        let endpoints = (0..n).map(|i| ep(&format!("e{i}"), 1)).collect();
        EndpointSet { endpoints, index: 1, epoch: "e".into(), health_panic: false }
    }

    fn eject(set: &EndpointSet, i: usize) {
        let cfg = OutlierConfig { base_ejection: Duration::from_secs(10), ..OutlierConfig::default() };
        let out = set.endpoints[i].state.outlier.record(
            Outcome::Refused,
            Via::Normal,
            &cfg,
            Instant::now(),
            || true,
        );
        assert!(out.is_some());
    }

    /// The choice as (index, via); the pick is dropped, releasing a probe it held.
    fn chosen(set: &EndpointSet, tried: &[usize]) -> Option<(usize, Via)> {
        choose(set, tried, Instant::now(), &warm(), &no_zones()).map(|p| (p.index, p.via))
    }

    #[tokio::test(start_paused = true)]
    async fn retries_prefer_untried_then_tried_active_endpoints() {
        let s = set(3);
        for _ in 0..50 {
            assert_eq!(chosen(&s, &[0, 2]), Some((1, Via::Normal)));
        }
        // Everything tried: any active endpoint, still not ejected ones.
        eject(&s, 1);
        for _ in 0..50 {
            let (i, via) = chosen(&s, &[0, 1, 2]).unwrap();
            assert!(i != 1 && via == Via::Normal);
        }
        // An active tried endpoint beats an untried ejected one.
        assert_eq!(chosen(&s, &[0, 2]).unwrap().1, Via::Normal);
    }

    #[tokio::test(start_paused = true)]
    async fn an_ended_ejection_gets_its_probe_first_then_panic_mode_when_all_are_ejected() {
        let s = set(2);
        eject(&s, 0);
        assert_eq!(chosen(&s, &[]), Some((1, Via::Normal)));
        tokio::time::advance(Duration::from_secs(10)).await;
        let probe = choose(&s, &[], Instant::now(), &warm(), &no_zones()).unwrap();
        assert_eq!((probe.index, probe.via), (0, Via::Probe));
        // The probe is out: others go elsewhere.
        assert_eq!(chosen(&s, &[]), Some((1, Via::Normal)));
        // Dropped without an outcome: the next request probes.
        drop(probe);
        let mut probe = choose(&s, &[], Instant::now(), &warm(), &no_zones()).unwrap();
        assert_eq!((probe.index, probe.via), (0, Via::Probe));
        // Settled: dropping it no longer releases the probe.
        probe.settled();
        drop(probe);
        assert_eq!(chosen(&s, &[]), Some((1, Via::Normal)));
        // Both ejected: panic mode, untried first.
        let s = set(2);
        eject(&s, 0);
        eject(&s, 1);
        assert_eq!(chosen(&s, &[0]), Some((1, Via::Panic)));
        assert!(matches!(chosen(&s, &[0, 1]), Some((_, Via::Panic))));
    }

    #[test]
    fn no_endpoint_no_choice() {
        assert!(choose(&set(0), &[], Instant::now(), &warm(), &no_zones()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_failing_endpoint_never_looks_less_loaded_than_a_working_one() {
        let s = set(3);
        let _busy0 = load(&s.endpoints[0], 5);
        let _busy1 = load(&s.endpoints[1], 5);
        // e2 failed fast: nothing in flight, but it failed.
        let cfg = OutlierConfig::default();
        s.endpoints[2].state.outlier.record(Outcome::Failure, Via::Normal, &cfg, Instant::now(), || false);
        for _ in 0..100 {
            let (i, via) = chosen(&s, &[]).unwrap();
            assert!(i != 2 && via == Via::Normal, "chose the failing endpoint");
        }
        // A retry that tried both working ones goes to it rather than failing.
        assert_eq!(chosen(&s, &[0, 1]), Some((2, Via::Normal)));
        // Once the failure is old news it is least loaded again.
        tokio::time::advance(crate::outlier::SUSPECT_FOR).await;
        assert_eq!(chosen(&s, &[]), Some((2, Via::Normal)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusing_endpoint_gets_no_first_attempts_while_a_soft_ejection_holds_the_share_bound() {
        let s = set(3);
        let cfg = OutlierConfig { base_ejection: Duration::from_secs(30), ..OutlierConfig::default() };
        let now = Instant::now();
        // e0 is slow: ejected by consecutive failures, taking the bound (50 % of 3 = 1).
        for _ in 0..cfg.consecutive_failures {
            s.endpoints[0].state.outlier.record(Outcome::Failure, Via::Normal, &cfg, now, || true);
        }
        assert!(s.endpoints[0].state.outlier.is_ejected());
        // e1 dies: its refusal ejects it although the bound says no more.
        let out = s.endpoints[1].state.outlier.record(Outcome::Refused, Via::Normal, &cfg, now, || false);
        assert!(out.is_some());
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..100 {
            assert_eq!(chosen(&s, &[]), Some((2, Via::Normal)));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_endpoint_gets_its_share_gradually_over_the_slow_start() {
        let slow = BalanceConfig { slow_start: Duration::from_secs(10), zone: ZoneConfig::DEFAULT };
        let old = set(2);
        tokio::time::advance(Duration::from_secs(60)).await;
        // A third instance appears: its state is new.
        let mut endpoints = old.endpoints.clone();
        endpoints.push(ep("new", 1));
        let s = EndpointSet { endpoints, index: 2, epoch: "e".into(), health_panic: false };
        // The share of 300 concurrent requests each endpoint ends up with.
        let share_of_new = || {
            let mut held = Vec::new();
            for _ in 0..300 {
                let p = choose(&s, &[], Instant::now(), &slow, &no_zones()).unwrap();
                held.push(p.endpoint.begin());
            }
            held.iter().filter(|g| g.endpoint().id.as_str() == "new").count() as f64 / 300.0
        };
        let at_start = share_of_new();
        tokio::time::advance(Duration::from_secs(5)).await;
        let halfway = share_of_new();
        tokio::time::advance(Duration::from_secs(5)).await;
        let warm = share_of_new();
        // Weights 0.1 : 1 : 1, then 0.5 : 1 : 1, then 1 : 1 : 1.
        assert!((0.03..0.07).contains(&at_start), "{at_start}");
        assert!((0.17..0.23).contains(&halfway), "{halfway}");
        assert!((0.30..0.37).contains(&warm), "{warm}");
    }

    /// Endpoints a1, a2 in zone a, b1, b2 in zone b.
    fn zoned_set() -> EndpointSet {
        let ep = |id: &str, z: &str| {
            Arc::new(Endpoint::new(
                InstanceId::new(id).unwrap(),
                Address::new("127.0.0.1").unwrap(),
                80,
                1,
                Some(Zone::new(z).unwrap()),
                BTreeMap::new(),
                Arc::default(),
            ))
        };
        let endpoints = vec![ep("a1", "a"), ep("a2", "a"), ep("b1", "b"), ep("b2", "b")];
        EndpointSet { endpoints, index: 1, epoch: "e".into(), health_panic: false }
    }

    #[tokio::test(start_paused = true)]
    async fn held_near_remote_endpoints_get_an_attempt_only_when_no_near_one_is_left() {
        let s = zoned_set();
        let a = Zone::new("a").unwrap();
        let among = |tried: &[usize]| {
            choose_among(&s.endpoints, tried, Instant::now(), &warm(), Some(&a)).map(|p| (p.index, p.via))
        };
        // The near endpoints are busier, and still chosen.
        let _busy = (load(&s.endpoints[0], 3), load(&s.endpoints[1], 3));
        for _ in 0..50 {
            assert!(among(&[]).unwrap().0 < 2);
        }
        // A retry that tried both goes to an untried remote one, not back.
        assert!(among(&[0, 1]).unwrap().0 >= 2);
        // Every endpoint tried: a near one again.
        assert!(among(&[0, 1, 2, 3]).unwrap().0 < 2);
        // Both near ones ejected: remote ones, not panic mode.
        eject(&s, 0);
        eject(&s, 1);
        let (i, via) = among(&[]).unwrap();
        assert!(i >= 2 && via == Via::Normal);
        // Everything ejected: panic mode over every zone.
        eject(&s, 2);
        eject(&s, 3);
        assert_eq!(among(&[]).unwrap().1, Via::Panic);
    }

    #[tokio::test(start_paused = true)]
    async fn choose_keeps_a_zoned_caller_local_and_counts_attempts_by_zone() {
        let s = zoned_set();
        let counters = crate::zone::ZoneCounters::default();
        let zones = ZoneState::new(trellis_shared::ServiceName::new("api").unwrap(), counters.clone());
        let mut config = warm();
        config.zone.local = Some(Zone::new("a").unwrap());
        for _ in 0..100 {
            let p = choose(&s, &[], Instant::now(), &config, &zones).unwrap();
            assert!(p.index < 2, "went remote");
        }
        assert_eq!((counters.local.get(), counters.remote.get()), (100, 0));
        // In a health panic zones do not count: least-loaded over all four.
        let panicked = EndpointSet { health_panic: true, ..zoned_set() };
        let remote = (0..400)
            .filter(|_| choose(&panicked, &[], Instant::now(), &config, &zones).unwrap().index >= 2)
            .count();
        assert!((120..280).contains(&remote), "{remote} of 400 went remote in a health panic");
        let remote_before = counters.remote.get();
        // Turned off: least-loaded over all four.
        config.zone.enabled = false;
        for _ in 0..400 {
            choose(&s, &[], Instant::now(), &config, &zones).unwrap();
        }
        let remote = counters.remote.get() - remote_before;
        assert!((120..280).contains(&remote), "{remote} of 400 went remote");
    }

    #[tokio::test(start_paused = true)]
    async fn under_light_load_a_new_endpoint_gets_a_small_share_at_once() {
        let slow = BalanceConfig { slow_start: Duration::from_secs(10), ..BalanceConfig::default() };
        let old = set(3);
        tokio::time::advance(Duration::from_secs(60)).await;
        let mut endpoints = old.endpoints.clone();
        endpoints.push(ep("new", 1));
        let s = EndpointSet { endpoints, index: 2, epoch: "e".into(), health_panic: false };
        // Nothing in flight: every pick is a tie, broken by the weights 1 : 1 : 1 : 0.1.
        let picks = 20_000;
        let new = (0..picks)
            .filter(|_| choose(&s, &[], Instant::now(), &slow, &no_zones()).unwrap().index == 3)
            .count() as f64
            / picks as f64;
        // Expected 0.1 / 3.1, about 3.2 %: small, but not nothing.
        assert!((0.02..0.045).contains(&new), "{new}");
    }
}
