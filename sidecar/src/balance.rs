//! The choice of endpoint for each attempt: pure functions over a snapshot.
//!
//! [`least_loaded`]: the load of an endpoint is its in-flight requests from
//! this sidecar divided by its weight; the least loaded wins and ties are
//! broken uniformly at random (reservoir sampling, so the random number
//! generator is consulted only when there is a tie).
//!
//! [`choose`] decides which endpoints are candidates, in this order:
//! 1. an endpoint whose ejection has ended gets the request as its one probe;
//! 2. else least-loaded over active endpoints this request has not tried yet,
//! 3. else over active ones it tried already,
//! 4. else (every endpoint ejected) over all of them: panic mode, untried first.

use std::cmp::Ordering;
use std::sync::Arc;

use rand::Rng;
use tokio::time::Instant;

use crate::endpoints::{Endpoint, EndpointSet};
use crate::outlier::{Admission, Via};

/// Compares `a_in_flight / a_weight` with `b_in_flight / b_weight` without division.
fn compare_load(a_in_flight: usize, a_weight: u32, b_in_flight: usize, b_weight: u32) -> Ordering {
    let a = (a_in_flight as u128) * u128::from(b_weight.max(1));
    let b = (b_in_flight as u128) * u128::from(a_weight.max(1));
    a.cmp(&b)
}

/// Index of the least loaded endpoint among those `candidate` accepts, or
/// `None` when it accepts none.
pub fn least_loaded(
    endpoints: &[Arc<Endpoint>],
    mut candidate: impl FnMut(usize, &Endpoint) -> bool,
) -> Option<usize> {
    let mut best: Option<(usize, usize, u32)> = None;
    let mut ties = 0u32;
    for (i, ep) in endpoints.iter().enumerate() {
        if !candidate(i, ep) {
            continue;
        }
        let load = ep.state.in_flight();
        match best {
            None => {
                best = Some((i, load, ep.weight));
                ties = 1;
            }
            Some((_, best_load, best_weight)) => {
                match compare_load(load, ep.weight, best_load, best_weight) {
                    Ordering::Less => {
                        best = Some((i, load, ep.weight));
                        ties = 1;
                    }
                    Ordering::Equal => {
                        ties += 1;
                        if rand::rng().random_range(0..ties) == 0 {
                            best = Some((i, load, ep.weight));
                        }
                    }
                    Ordering::Greater => {}
                }
            }
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
/// endpoints at `tried`; `None` only when the snapshot is empty.
pub fn choose<'a>(set: &'a EndpointSet, tried: &[usize], now: Instant) -> Option<Pick<'a>> {
    let eps = &set.endpoints;
    let untried = |i: usize| !tried.contains(&i);
    let pick = |index: usize, via: Via| Pick {
        index,
        endpoint: &eps[index],
        via,
        at: now,
        holds_probe: via == Via::Probe,
    };
    // An endpoint whose ejection has ended gets its one probe right away.
    for (i, ep) in eps.iter().enumerate() {
        if ep.state.outlier.is_ejected() && untried(i) && ep.state.outlier.admit(now) == Admission::Probe {
            return Some(pick(i, Via::Probe));
        }
    }
    if let Some(i) = least_loaded(eps, |i, ep| untried(i) && !ep.state.outlier.is_ejected())
        .or_else(|| least_loaded(eps, |_, ep| !ep.state.outlier.is_ejected()))
    {
        return Some(pick(i, Via::Normal));
    }
    // Panic mode: every endpoint is ejected; trying them beats failing everything.
    let i = least_loaded(eps, |i, _| untried(i)).or_else(|| least_loaded(eps, |_, _| true))?;
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

    fn load(e: &Arc<Endpoint>, n: usize) -> Vec<InFlight> {
        (0..n).map(|_| e.begin()).collect()
    }

    #[test]
    fn none_for_no_endpoints() {
        assert_eq!(least_loaded(&[], |_, _| true), None);
        let eps = vec![ep("a", 1)];
        assert_eq!(least_loaded(&eps, |_, _| false), None);
    }

    #[test]
    fn one_endpoint_always() {
        let eps = vec![ep("a", 1)];
        let _g = load(&eps[0], 5);
        assert_eq!(least_loaded(&eps, |_, _| true), Some(0));
    }

    #[test]
    fn fewest_in_flight_wins() {
        let eps = vec![ep("a", 1), ep("b", 1), ep("c", 1)];
        let _ga = load(&eps[0], 3);
        let _gb = load(&eps[1], 1);
        let _gc = load(&eps[2], 2);
        for _ in 0..20 {
            assert_eq!(least_loaded(&eps, |_, _| true), Some(1));
        }
        // The filter excludes b: c is next.
        assert_eq!(least_loaded(&eps, |i, _| i != 1), Some(2));
    }

    #[test]
    fn weight_divides_load() {
        // a: 4 in flight / weight 4 = 1; b: 2 / 1 = 2.
        let eps = vec![ep("a", 4), ep("b", 1)];
        let _ga = load(&eps[0], 4);
        let _gb = load(&eps[1], 2);
        assert_eq!(least_loaded(&eps, |_, _| true), Some(0));
        // a: 9/4 > b: 2/1.
        let _more = load(&eps[0], 5);
        assert_eq!(least_loaded(&eps, |_, _| true), Some(1));
    }

    #[test]
    fn ties_are_broken_at_random() {
        let eps = vec![ep("a", 1), ep("b", 1), ep("c", 1), ep("d", 1)];
        let _gd = load(&eps[3], 1);
        let mut counts = [0u32; 4];
        for _ in 0..3000 {
            counts[least_loaded(&eps, |_, _| true).unwrap()] += 1;
        }
        assert_eq!(counts[3], 0);
        // Each of a, b, c expects 1000; far from flaky at these bounds.
        for c in &counts[..3] {
            assert!((800..1200).contains(c), "{counts:?}");
        }
    }

    fn set(n: usize) -> EndpointSet {
        let endpoints = (0..n).map(|i| ep(&format!("e{i}"), 1)).collect();
        EndpointSet { endpoints, index: 1, epoch: "e".into() }
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
        choose(set, tried, Instant::now()).map(|p| (p.index, p.via))
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
        let probe = choose(&s, &[], Instant::now()).unwrap();
        assert_eq!((probe.index, probe.via), (0, Via::Probe));
        // The probe is out: others go elsewhere.
        assert_eq!(chosen(&s, &[]), Some((1, Via::Normal)));
        // Dropped without an outcome: the next request probes.
        drop(probe);
        let mut probe = choose(&s, &[], Instant::now()).unwrap();
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
        assert!(choose(&set(0), &[], Instant::now()).is_none());
    }
}
