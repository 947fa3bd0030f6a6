//! The expiry brake across replicas.
//!
//! etcd expires leases by itself, so the brake cannot simply skip an expiry:
//! while it holds, every replica keeps the leases of all cached instances alive
//! itself. The decision is cluster-wide: each replica counts the renewals it
//! served and the renewals it expected (each instance's own heartbeat rate,
//! integrated over time, as in the memory store), over a window of the longest
//! TTL, and publishes both under `<prefix>/brake/<replica>` on a short lease; every
//! replica sums all published records and engages when fewer than the threshold
//! arrived (with at least the minimum number of instances registered), releasing
//! at the release fraction (hysteresis).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::brake::{GuardConfig, RateEstimate};

/// Length of one bucket of the local window.
const BUCKET: Duration = Duration::from_secs(1);

/// What one replica publishes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub actual: f64,
    pub expected: f64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    start: Instant,
    actual: f64,
    expected: f64,
}

/// This replica's renewals and expected renewals.
#[derive(Debug)]
pub struct LocalRenewals {
    rates: HashMap<Vec<u8>, RateEstimate>,
    /// Sum of the rates counted, renewals per second.
    rate: f64,
    buckets: VecDeque<Bucket>,
    last: Instant,
}

impl LocalRenewals {
    pub fn new(now: Instant) -> Self {
        LocalRenewals {
            rates: HashMap::new(),
            rate: 0.0,
            buckets: VecDeque::from([Bucket { start: now, actual: 0.0, expected: 0.0 }]),
            last: now,
        }
    }

    fn advance(&mut self, now: Instant) {
        if now > self.last {
            let dt = (now - self.last).as_secs_f64();
            if let Some(b) = self.buckets.back_mut() {
                b.expected += self.rate * dt;
            }
            self.last = now;
        }
        if self.buckets.back().is_none_or(|b| now.saturating_duration_since(b.start) >= BUCKET) {
            self.buckets.push_back(Bucket { start: now, actual: 0.0, expected: 0.0 });
        }
    }

    /// A keep-alive of `key` (TTL `ttl`) succeeded through this replica.
    pub fn renewed(&mut self, now: Instant, key: &[u8], ttl: Duration) {
        self.advance(now);
        if let Some(b) = self.buckets.back_mut() {
            b.actual += 1.0;
        }
        let estimate = self.rates.entry(key.to_vec()).or_insert_with(|| RateEstimate::new(now, ttl));
        if let Some(delta) = estimate.renewed(now) {
            self.rate = (self.rate + delta).max(0.0);
        }
    }

    /// Stops expecting renewals of instances that left (expired, deregistered).
    pub fn retain(&mut self, now: Instant, mut present: impl FnMut(&[u8]) -> bool) {
        self.advance(now);
        let mut dropped = 0.0;
        self.rates.retain(|k, e| {
            let keep = present(k);
            if !keep {
                dropped += e.counted;
            }
            keep
        });
        self.rate = (self.rate - dropped).max(0.0);
    }

    /// Renewals and expected renewals over the last `window`.
    pub fn tally(&mut self, now: Instant, window: Duration) -> Tally {
        self.advance(now);
        let start = now.checked_sub(window).unwrap_or(now);
        while self.buckets.len() > 1 && self.buckets.get(1).is_some_and(|b| b.start <= start) {
            self.buckets.pop_front();
        }
        self.buckets.iter().fold(Tally::default(), |t, b| Tally {
            actual: t.actual + b.actual,
            expected: t.expected + b.expected,
        })
    }
}

/// The cluster-wide decision, with hysteresis.
#[derive(Debug)]
pub struct Decision {
    config: GuardConfig,
    engaged: bool,
    pub ratio: f64,
}

impl Decision {
    pub fn new(config: GuardConfig) -> Self {
        Decision { config, engaged: false, ratio: 1.0 }
    }

    pub fn engaged(&self) -> bool {
        self.engaged
    }

    /// Folds every replica's tally; returns `Some(engaged)` on a transition.
    pub fn evaluate(&mut self, tallies: &[Tally], instances: usize) -> Option<bool> {
        let actual: f64 = tallies.iter().map(|t| t.actual).sum();
        let expected: f64 = tallies.iter().map(|t| t.expected).sum();
        // Too little expected to judge (a quiet or new cluster): healthy.
        self.ratio = if expected >= 1.0 { actual / expected } else { 1.0 };
        let enough = instances >= self.config.brake_min_instances;
        if !self.engaged && self.config.brake && enough && self.ratio < self.config.brake_threshold {
            self.engaged = true;
            return Some(true);
        }
        if self.engaged && (!enough || self.ratio >= self.config.brake_release || !self.config.brake) {
            self.engaged = false;
            return Some(false);
        }
        None
    }
}

pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn silent_instances_lower_the_ratio_and_engage_the_brake() {
        let ttl = Duration::from_secs(3);
        let mut local = LocalRenewals::new(Instant::now());
        let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("k{i}").into_bytes()).collect();
        // Ten seconds of heartbeats every second from all 20.
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys {
                local.renewed(Instant::now(), k, ttl);
            }
        }
        let mut decision = Decision::new(GuardConfig::default());
        let healthy = local.tally(Instant::now(), ttl);
        assert!(healthy.actual / healthy.expected > 0.8, "{healthy:?}");
        assert_eq!(decision.evaluate(&[healthy], 20), None);
        // 16 of 20 go silent for a window.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys[..4] {
                local.renewed(Instant::now(), k, ttl);
            }
        }
        let silent = local.tally(Instant::now(), ttl);
        assert_eq!(decision.evaluate(&[silent], 20), Some(true), "{silent:?}");
        // Half of the tally on another replica sums to the same decision.
        let half = Tally { actual: silent.actual / 2.0, expected: silent.expected / 2.0 };
        let mut other = Decision::new(GuardConfig::default());
        assert_eq!(other.evaluate(&[half, half], 20), Some(true));
        // Fewer instances than the minimum never engage.
        let mut small = Decision::new(GuardConfig::default());
        assert_eq!(small.evaluate(&[silent], 9), None);
        // Renewals recover: released.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys {
                local.renewed(Instant::now(), k, ttl);
            }
        }
        let back = local.tally(Instant::now(), ttl);
        assert_eq!(decision.evaluate(&[back], 20), Some(false), "{back:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_silent_instance_of_ten_does_not_engage() {
        let ttl = Duration::from_secs(3);
        let mut local = LocalRenewals::new(Instant::now());
        let keys: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
        let mut decision = Decision::new(GuardConfig::default());
        for round in 0..12 {
            tokio::time::advance(Duration::from_secs(1)).await;
            let live = if round < 6 { &keys[..] } else { &keys[1..] };
            for k in live {
                local.renewed(Instant::now(), k, ttl);
            }
            let t = local.tally(Instant::now(), ttl);
            assert_eq!(decision.evaluate(&[t], 10), None, "round {round}: {t:?}");
        }
        // Once it left the cache, it is no longer expected.
        local.retain(Instant::now(), |k| k != b"k0");
        assert_eq!(local.rates.len(), 9);
    }
}
