//! The expiry brake: protection from mass expiry.
//!
//! When many instances stop renewing at once, the likelier cause is the
//! registry's own network, and evicting them all would take down every caller.
//! The brake compares the renewals that arrived over a window of the longest
//! TTL with the renewals expected from each instance's own heartbeat rate; when
//! fewer than `threshold` of them arrived (and at least `min_instances` are
//! registered), expiry pauses until renewals recover to `release` (hysteresis).
//!
//! Renewals are counted on the heartbeat path with one relaxed atomic add; the
//! window itself (fixed-length buckets with running sums) sits behind a mutex
//! that the heartbeat path takes only when an instance's heartbeat rate changes
//! noticeably, and that the expiry task takes once per bucket.
//!
//! The memory store runs the brake through [`ExpiryBrake`], which also keeps
//! the leases it holds past their deadline. The etcd store decides across
//! replicas (`store/etcd/cluster_brake.rs`) with the same [`GuardConfig`],
//! [`RateEstimate`] and [`Decision`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::lock;
use crate::metrics::StoreMetrics;

/// Length of one bucket of the renewal window.
pub const BUCKET: Duration = Duration::from_millis(100);

/// Settings of the two guards against mass expiry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardConfig {
    /// Whether the expiry brake may engage at all.
    pub brake: bool,
    /// Engage when fewer than this fraction of expected renewals arrived.
    pub brake_threshold: f64,
    /// Release when at least this fraction arrives again (above the threshold).
    pub brake_release: f64,
    /// The brake never engages with fewer instances registered than this.
    pub brake_min_instances: usize,
    /// Per service: when the healthy share is at or below this, discovery shows
    /// every instance, flagged `protected`. 0 turns it off.
    pub protection_threshold: f64,
}

impl Default for GuardConfig {
    fn default() -> Self {
        GuardConfig {
            brake: true,
            brake_threshold: 0.5,
            brake_release: 0.75,
            brake_min_instances: 10,
            protection_threshold: 0.0,
        }
    }
}

/// A change of the brake's state, to log and export.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Transition {
    Engaged { ratio: f64 },
    Released { ratio: f64 },
}

/// Whether the brake holds, from renewals received and expected: engage below
/// the threshold, release at the release fraction (hysteresis).
#[derive(Debug)]
pub struct Decision {
    config: GuardConfig,
    engaged: bool,
    ratio: f64,
}

impl Decision {
    pub fn new(config: GuardConfig) -> Self {
        Decision { config, engaged: false, ratio: 1.0 }
    }

    /// Decides from the renewals received and expected over the window, with
    /// `instances` registered; returns the transition when the state flips.
    pub fn decide(&mut self, actual: f64, expected: f64, instances: usize) -> Option<Transition> {
        // Too little expected to judge (a quiet or new registry): treat as healthy.
        self.ratio = if expected >= 1.0 { actual / expected } else { 1.0 };
        let enough = instances >= self.config.brake_min_instances;
        let brake = self.config.brake;
        if !self.engaged && brake && enough && self.ratio < self.config.brake_threshold {
            self.engaged = true;
            return Some(Transition::Engaged { ratio: self.ratio });
        }
        if self.engaged && (!enough || !brake || self.ratio >= self.config.brake_release) {
            self.engaged = false;
            return Some(Transition::Released { ratio: self.ratio });
        }
        None
    }

    pub fn engaged(&self) -> bool {
        self.engaged
    }

    /// Renewals received over expected, as of the last decision.
    pub fn ratio(&self) -> f64 {
        self.ratio
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Bucket {
    actual: u64,
    expected: f64,
    /// Span of a closed bucket (start, end).
    span: Option<(Instant, Instant)>,
}

/// The renewal window and the brake's state.
#[derive(Debug)]
pub struct RenewalWindow {
    buckets: VecDeque<Bucket>,
    sum_actual: u64,
    sum_expected: f64,
    current: Bucket,
    current_start: Instant,
    last_advance: Instant,
    /// Expected renewals per second: the sum of each instance's heartbeat rate.
    rate: f64,
    /// TTLs of the registered instances (TTL -> count), for the window length.
    ttls: BTreeMap<Duration, usize>,
    instances: usize,
    decision: Decision,
}

/// Renewals counted on the hot path, drained into the window by `advance`.
#[derive(Debug, Default)]
pub struct RenewalCounter(AtomicU64);

impl RenewalCounter {
    pub fn renewed(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self) -> u64 {
        self.0.swap(0, Ordering::Relaxed)
    }
}

impl RenewalWindow {
    pub fn new(config: GuardConfig, now: Instant) -> Self {
        RenewalWindow {
            buckets: VecDeque::new(),
            sum_actual: 0,
            sum_expected: 0.0,
            current: Bucket::default(),
            current_start: now,
            last_advance: now,
            rate: 0.0,
            ttls: BTreeMap::new(),
            instances: 0,
            decision: Decision::new(config),
        }
    }

    /// The window: the longest TTL registered.
    fn window(&self) -> Duration {
        self.ttls.keys().next_back().copied().unwrap_or(Duration::from_secs(1))
    }

    /// Integrates the expected rate up to `now`, drains counted renewals and
    /// rotates buckets.
    fn advance(&mut self, now: Instant, counter: &RenewalCounter) {
        if now > self.last_advance {
            self.current.expected += self.rate * (now - self.last_advance).as_secs_f64();
            self.last_advance = now;
        }
        self.current.actual += counter.take();
        if now.saturating_duration_since(self.current_start) >= BUCKET {
            let mut done = std::mem::take(&mut self.current);
            done.span = Some((self.current_start, now));
            self.sum_actual += done.actual;
            self.sum_expected += done.expected;
            self.buckets.push_back(done);
            self.current_start = now;
        }
        // Drop buckets that ended before the window; the oldest kept one may
        // straddle its start and is weighted in `evaluate`.
        let start = now.checked_sub(self.window()).unwrap_or(now);
        while self.buckets.front().is_some_and(|b| b.span.is_some_and(|(_, end)| end <= start)) {
            if let Some(old) = self.buckets.pop_front() {
                self.sum_actual -= old.actual;
                self.sum_expected -= old.expected;
            }
        }
        if self.sum_expected < 0.0 {
            self.sum_expected = 0.0; // float drift
        }
    }

    /// An instance's heartbeat rate contribution changed by `delta` per second.
    pub fn rate_changed(&mut self, now: Instant, counter: &RenewalCounter, delta: f64) {
        self.advance(now, counter);
        self.rate = (self.rate + delta).max(0.0);
    }

    pub fn added(&mut self, ttl: Duration) {
        *self.ttls.entry(ttl).or_default() += 1;
        self.instances += 1;
    }

    pub fn removed(&mut self, ttl: Duration) {
        if let Some(n) = self.ttls.get_mut(&ttl) {
            *n -= 1;
            if *n == 0 {
                self.ttls.remove(&ttl);
            }
        }
        self.instances = self.instances.saturating_sub(1);
    }

    /// Brings the window up to `now` and decides whether the brake holds.
    pub fn evaluate(&mut self, now: Instant, counter: &RenewalCounter) -> Option<Transition> {
        self.advance(now, counter);
        let mut expected = self.sum_expected + self.current.expected;
        let mut actual = (self.sum_actual + self.current.actual) as f64;
        // Only the part of the oldest bucket inside the window counts, so the
        // window is the longest TTL exactly, not up to a bucket more.
        let start = now.checked_sub(self.window()).unwrap_or(now);
        if let Some(Bucket { actual: a, expected: e, span: Some((from, to)) }) = self.buckets.front().copied()
        {
            if from < start && to > from {
                let outside = (start - from).as_secs_f64() / (to - from).as_secs_f64();
                actual -= a as f64 * outside;
                expected -= e * outside;
            }
        }
        self.decision.decide(actual, expected, self.instances)
    }

    pub fn engaged(&self) -> bool {
        self.decision.engaged()
    }

    /// Renewals received over expected in the window, as of the last evaluation.
    pub fn ratio(&self) -> f64 {
        self.decision.ratio()
    }
}

/// Per-instance heartbeat rate estimate: a moving average of the intervals
/// between renewals, and the rate it last contributed to the window.
///
/// The average starts at a third of the TTL (the recommended heartbeat
/// interval) and samples shorter than a thirtieth of the TTL count as that, so
/// a burst (a heartbeat right after registering, a retry) cannot inflate the
/// expected rate and trip the brake when the burst ends. An instance adds to
/// the expected rate only from its first renewal.
#[derive(Debug, Clone, Copy)]
pub struct RateEstimate {
    last_renewal: Instant,
    interval: Duration,
    shortest: Duration,
    /// Renewals per second this instance adds to the expected rate.
    pub counted: f64,
}

impl RateEstimate {
    pub fn new(now: Instant, ttl: Duration) -> Self {
        RateEstimate {
            last_renewal: now,
            interval: (ttl / 3).max(Duration::from_millis(10)),
            shortest: (ttl / 30).max(Duration::from_millis(10)),
            counted: 0.0,
        }
    }

    /// Records a renewal; returns the change to the expected rate when the
    /// estimate moved by more than a fifth from what is counted.
    pub fn renewed(&mut self, now: Instant) -> Option<f64> {
        let dt = now.saturating_duration_since(self.last_renewal).max(self.shortest);
        self.last_renewal = now;
        // Weight 1/4 on the newest sample: steady under jitter, quick on a real change.
        self.interval = (self.interval * 3 + dt) / 4;
        let rate = 1.0 / self.interval.as_secs_f64();
        if self.counted == 0.0 || (rate - self.counted).abs() > self.counted * 0.2 {
            let delta = rate - self.counted;
            self.counted = rate;
            Some(delta)
        } else {
            None
        }
    }
}

/// The brake as the memory store runs it: the renewal window, the leases it
/// keeps past their deadline (`K` names a lease), and its metrics.
pub struct ExpiryBrake<K> {
    config: GuardConfig,
    renewals: RenewalCounter,
    window: Mutex<RenewalWindow>,
    /// Leases past their deadline that the brake keeps, with their queue time.
    parked: Mutex<Vec<(Instant, K)>>,
    metrics: StoreMetrics,
}

impl<K> ExpiryBrake<K> {
    pub fn new(config: GuardConfig, metrics: StoreMetrics) -> Self {
        ExpiryBrake {
            config,
            renewals: RenewalCounter::default(),
            window: Mutex::new(RenewalWindow::new(config, Instant::now())),
            parked: Mutex::new(Vec::new()),
            metrics,
        }
    }

    /// Whether the brake may engage at all (else the window needs no ticks).
    pub fn enabled(&self) -> bool {
        self.config.brake
    }

    /// A lease of `ttl` joined the store.
    pub fn added(&self, ttl: Duration) {
        lock(&self.window).added(ttl);
    }

    /// A lease's TTL changed (a re-registration).
    pub fn ttl_changed(&self, from: Duration, to: Duration) {
        if from != to {
            let mut w = lock(&self.window);
            w.removed(from);
            w.added(to);
        }
    }

    /// A lease left the store: it no longer counts, nor is it expected to renew.
    pub fn removed(&self, ttl: Duration, rate: &RateEstimate) {
        let mut w = lock(&self.window);
        w.removed(ttl);
        w.rate_changed(Instant::now(), &self.renewals, -rate.counted);
    }

    /// Counts a renewal (one atomic add) and updates the lease's heartbeat
    /// rate; the window's lock is taken only when that rate moved noticeably.
    pub fn renewed(&self, rate: &mut RateEstimate, now: Instant) {
        self.renewals.renewed();
        if let Some(delta) = rate.renewed(now) {
            lock(&self.window).rate_changed(now, &self.renewals, delta);
        }
    }

    /// Brings the window up to `now`; true while the brake holds. On a
    /// transition it logs and exports it and, on release, returns the leases
    /// it kept so the caller queues them again (they expire unless renewed
    /// meanwhile). Cheap enough to call once per bucket and per due lease.
    pub fn check(&self, now: Instant) -> (bool, Vec<(Instant, K)>) {
        let (holds, transition) = {
            let mut w = lock(&self.window);
            let t = w.evaluate(now, &self.renewals);
            (w.engaged(), t)
        };
        let released = match transition {
            None => Vec::new(),
            Some(Transition::Engaged { ratio }) => {
                self.metrics.brake_engaged.set(1);
                warn!(
                    renewal_ratio = ratio,
                    threshold = self.config.brake_threshold,
                    "expiry brake engaged: too few renewals arrive, expiry paused"
                );
                Vec::new()
            }
            Some(Transition::Released { ratio }) => {
                self.metrics.brake_engaged.set(0);
                let parked = std::mem::take(&mut *lock(&self.parked));
                info!(renewal_ratio = ratio, held = parked.len(), "expiry brake released: expiry resumes");
                self.metrics.brake_held.set(0);
                parked
            }
        };
        (holds, released)
    }

    /// Keeps a lease that fell due while the brake holds (`at`: its queue time).
    pub fn park(&self, at: Instant, lease: K) {
        let mut parked = lock(&self.parked);
        parked.push((at, lease));
        self.metrics.brake_held.set(i64::try_from(parked.len()).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_estimates_settle_and_report_only_real_changes() {
        let t0 = Instant::now();
        let mut r = RateEstimate::new(t0, Duration::from_secs(3));
        // Counted from the first renewal, starting from a third of the TTL.
        assert_eq!(r.renewed(t0 + Duration::from_secs(1)), Some(1.0));
        assert_eq!(r.renewed(t0 + Duration::from_millis(2050)), None, "5% jitter is not a change");
        // A burst right after counts as a tenth of a second at most.
        assert!(r.renewed(t0 + Duration::from_millis(2051)).is_some_and(|d| d < 0.5));
        let mut t = t0 + Duration::from_millis(2051);
        let mut total = r.counted;
        for _ in 0..20 {
            t += Duration::from_millis(250);
            if let Some(d) = r.renewed(t) {
                total += d;
            }
        }
        assert!((total - 4.0).abs() < 0.8, "{total}");
    }

    #[test]
    fn engages_below_the_threshold_and_releases_with_hysteresis() {
        let t0 = Instant::now();
        let counter = RenewalCounter::default();
        let mut w = RenewalWindow::new(GuardConfig::default(), t0);
        for _ in 0..20 {
            w.added(Duration::from_secs(3));
        }
        w.rate_changed(t0, &counter, 20.0); // 20 instances, one renewal a second each
        let mut t = t0;
        let step = |w: &mut RenewalWindow, t: &mut Instant, per_second: u64| {
            let mut out = None;
            for _ in 0..10 {
                *t += BUCKET;
                for _ in 0..per_second / 10 {
                    counter.renewed();
                }
                out = out.or(w.evaluate(*t, &counter));
            }
            out
        };
        for _ in 0..3 {
            assert_eq!(step(&mut w, &mut t, 20), None);
        }
        // 80% go silent: engaged once less than half the expected renewals arrive.
        let mut engaged_after = None;
        for s in 1..=3 {
            if let Some(Transition::Engaged { .. }) = step(&mut w, &mut t, 4) {
                engaged_after = Some(s);
                break;
            }
        }
        assert_eq!(engaged_after, Some(2), "ratio after 2s of 3s window: (20+4+4)/60 < 0.5");
        assert!(w.engaged());
        // Recovery to 60%: still engaged (hysteresis); back to all: released.
        for _ in 0..3 {
            assert_eq!(step(&mut w, &mut t, 12), None);
        }
        assert!(w.engaged());
        let mut released = false;
        for _ in 0..3 {
            released |= matches!(step(&mut w, &mut t, 20), Some(Transition::Released { .. }));
        }
        assert!(released && !w.engaged());
    }

    #[test]
    fn never_engages_below_the_minimum_or_when_off() {
        let t0 = Instant::now();
        let counter = RenewalCounter::default();
        for config in [GuardConfig::default(), GuardConfig { brake: false, ..GuardConfig::default() }] {
            let mut w = RenewalWindow::new(config, t0);
            let n = if config.brake { 9 } else { 20 };
            for _ in 0..n {
                w.added(Duration::from_secs(3));
            }
            w.rate_changed(t0, &counter, n as f64);
            let mut t = t0;
            for _ in 0..100 {
                t += BUCKET;
                assert_eq!(w.evaluate(t, &counter), None);
            }
            assert!(w.ratio() < 0.01);
        }
    }
}
