//! Health panic: when too few of a service's instances pass their health
//! checks, route to every registered instance, critical ones too.
//!
//! The registry hides critical instances from plain discovery. That is right
//! while most instances are healthy and wrong when most are not, because a
//! health check also fails on an app that is only overloaded: a TCP connect to
//! a full accept queue waits for SYN retransmission (one second), past the
//! check's timeout. Losing one instance pushes its load onto the others; if
//! their checks then fail, callers are left with nobody to call while every
//! "critical" instance would still have answered. The overlapping-failure
//! tests hit exactly this on a slow machine: one backend killed, the two
//! survivors' checks flapping, and the client answering `no_endpoints` for
//! seconds.
//!
//! Envoy's answer is its panic threshold (default 50 %): below that share of
//! healthy hosts, balance over all hosts. The sidecar watches every instance
//! (`all=true`) and applies the same rule to the registry's health:
//! - healthy share (passing or warning) at or above the threshold: only
//!   healthy instances enter the endpoint set;
//! - below it: all of them, and the sidecar says so (a log line on each flip,
//!   `health_panic` in `/endpoints`, `trellis_sidecar_health_panic`).
//!
//! Not to be confused with the balancer's panic mode (every endpoint ejected by
//! outlier detection, see [`crate::balance`]), which works inside whatever set
//! this module chose. In a health panic, outlier detection and retries work as
//! always: an instance that is really gone refuses connections and is ejected
//! whatever the ejected-share bound (behind a live inbound sidecar it answers
//! `502`s instead, ejected after consecutive failures); one that hangs meets
//! the per-try timeout. Zone-aware routing stands aside (as in Envoy), and
//! endpoints keep their state while a panic moves them in and out of the set.
//! A health panic never reaches an app that has not started: the sidecar
//! registers its app only after a first passing check. A threshold of 0 turns
//! it off.

use trellis_shared::Instance;

/// Envoy's default: panic when fewer than half the instances are healthy.
pub const DEFAULT_THRESHOLD: f64 = 0.5;

/// The instances to route to, and whether a health panic chose them.
///
/// A panic means the healthy share lies strictly below `threshold` (Envoy's
/// comparison): one healthy instance of two is not panic at 0.5, one of three
/// is. No instance at all is not panic: there is nothing to widen to.
pub fn routable<'a>(instances: &[&'a Instance], threshold: f64) -> (Vec<&'a Instance>, bool) {
    let healthy = instances.iter().filter(|i| i.status.is_healthy()).count();
    let total = instances.len();
    // The share itself, not `healthy < threshold * total`: 0.55 * 100 is
    // 55.000000000000007 in floating point, which would make 55 of 100 a panic.
    if healthy < total && (healthy as f64 / total as f64) < threshold {
        return (instances.to_vec(), true);
    }
    (instances.iter().copied().filter(|i| i.status.is_healthy()).collect(), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::tests::inst;
    use trellis_shared::HealthStatus;

    fn pick(statuses: &[HealthStatus], threshold: f64) -> (Vec<String>, bool) {
        let all: Vec<Instance> = statuses
            .iter()
            .enumerate()
            .map(|(n, s)| Instance { status: *s, ..inst(&format!("i{n}"), 1) })
            .collect();
        let refs: Vec<&Instance> = all.iter().collect();
        let (chosen, panic) = routable(&refs, threshold);
        (chosen.iter().map(|i| i.id.to_string()).collect(), panic)
    }

    use HealthStatus::{Critical as C, Passing as P, Warning as W};

    #[test]
    fn at_or_above_the_threshold_only_healthy_instances_are_routed_to() {
        assert_eq!(pick(&[P, P, P], 0.5), (vec!["i0".into(), "i1".into(), "i2".into()], false));
        // Two of three healthy: 67 %.
        assert_eq!(pick(&[P, C, W], 0.5), (vec!["i0".into(), "i2".into()], false));
        // One of two: exactly the threshold is not below it.
        assert_eq!(pick(&[C, P], 0.5), (vec!["i1".into()], false));
    }

    #[test]
    fn below_the_threshold_every_instance_is_routed_to() {
        // One of three healthy: 33 %.
        assert_eq!(pick(&[C, P, C], 0.5), (vec!["i0".into(), "i1".into(), "i2".into()], true));
        // None healthy: the critical ones still answer better than nobody.
        assert_eq!(pick(&[C], 0.5), (vec!["i0".into()], true));
        assert!(pick(&[C, C], 0.5).1);
        // A higher threshold panics earlier: two of three is below 80 %.
        assert!(pick(&[P, C, P], 0.8).1);
        // Exactly at a threshold that is not a binary fraction: no panic.
        let mut hundred = vec![P; 55];
        hundred.extend([C; 45]);
        assert!(!pick(&hundred, 0.55).1);
        assert!(pick(&hundred[1..], 0.55).1, "54 of 99 is below 55 %");
    }

    #[test]
    fn zero_turns_it_off_and_no_instance_is_no_panic() {
        assert_eq!(pick(&[C, C, C], 0.0), (vec![], false));
        assert_eq!(pick(&[], 0.5), (vec![], false));
        assert_eq!(pick(&[], 1.0), (vec![], false));
    }
}
