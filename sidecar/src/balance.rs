//! Least-connections endpoint selection, a pure function over a snapshot.
//!
//! The load of an endpoint is its in-flight requests from this sidecar divided
//! by its weight; the least loaded wins and ties are broken uniformly at
//! random (reservoir sampling, so the random number generator is consulted only
//! when there is a tie). Which endpoints are candidates (untried, not ejected)
//! is the caller's choice, passed as a filter.

use std::cmp::Ordering;
use std::sync::Arc;

use rand::Rng;

use crate::endpoints::Endpoint;

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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_shared::{Address, InstanceId};

    use super::*;
    use crate::endpoints::InFlight;

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
}
