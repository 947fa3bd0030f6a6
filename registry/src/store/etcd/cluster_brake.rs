//! The expiry brake across replicas.
//!
//! Each replica expires the instances it owns (their keys sit on its leases);
//! while the brake holds, owners delete nothing, and every replica also keeps
//! alive every lease the cached instances are attached to (a handful of
//! replica leases), so instances of a replica that died are not lost either.
//! The decision is cluster-wide: each replica counts the renewals it
//! served and the renewals it expected of the instances it owns (each
//! instance's own heartbeat rate, integrated over time, as in the memory
//! store), over a window of the longest TTL, and publishes both under
//! `<prefix>/brake/<replica>` on a short lease; every replica sums all
//! published records and engages when fewer than the threshold arrived (with at
//! least the minimum number of instances registered), releasing at the release
//! fraction (hysteresis, the same [`Decision`] as the memory store's brake).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::cache::Cache;
use super::client::{EtcdClient, EtcdError};
use crate::brake::{Decision, GuardConfig, RateEstimate, Transition};
use crate::lock;
use crate::metrics::StoreMetrics;

/// Length of one bucket of the local window.
const BUCKET: Duration = Duration::from_secs(1);
/// Period of the tally exchange.
const TICK: Duration = Duration::from_secs(1);
/// Lease of a replica's published tally: a dead replica's tally soon stops counting.
const TALLY_LEASE_SECS: i64 = 5;
/// The tally advances at least every [`TICK`]; a longer gap than this means
/// the replica itself did not run (frozen, starved, or skipping rounds while
/// etcd had no quorum and heartbeats were refused), not that instances fell
/// silent, so the gap is expected of nobody.
const STALLED: Duration = Duration::from_secs(3);

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
        if now.saturating_duration_since(self.last) > STALLED {
            // What was counted before the stall is as old as the window, and
            // its renewals went to other replicas meanwhile: start afresh.
            self.buckets.clear();
            self.last = now;
        } else if now > self.last {
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
        // Looked up before inserting: a renewal of a known key allocates nothing.
        if !self.rates.contains_key(key) {
            self.rates.insert(key.to_vec(), RateEstimate::new(now, ttl));
        }
        let Some(estimate) = self.rates.get_mut(key) else { return };
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

impl Tally {
    /// Every replica's tallies summed.
    pub fn total(tallies: &[Tally]) -> Tally {
        tallies.iter().fold(Tally::default(), |t, b| Tally {
            actual: t.actual + b.actual,
            expected: t.expected + b.expected,
        })
    }
}

/// The brake as the etcd store runs it: this replica's renewals, the
/// cluster-wide decision, and its metrics.
pub struct ClusterBrake {
    config: GuardConfig,
    /// Names this replica's tally under `<prefix>/brake/`.
    replica: String,
    renewals: Mutex<LocalRenewals>,
    decision: Mutex<Decision>,
    metrics: StoreMetrics,
}

impl ClusterBrake {
    pub fn new(config: GuardConfig, metrics: StoreMetrics) -> Self {
        ClusterBrake {
            config,
            replica: format!("{:016x}", rand::random::<u64>()),
            renewals: Mutex::new(LocalRenewals::new(Instant::now())),
            decision: Mutex::new(Decision::new(config)),
            metrics,
        }
    }

    /// The name this replica publishes its tally under.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// Whether the brake holds expiry now (the owners' deletions wait).
    pub fn engaged(&self) -> bool {
        lock(&self.decision).engaged()
    }

    /// Counts a renewal of the instance stored at `key` served by this replica.
    pub fn renewed(&self, key: &[u8], ttl: Duration) {
        lock(&self.renewals).renewed(Instant::now(), key, ttl);
    }

    /// Every second: publishes this replica's renewal tally (of the instances
    /// it owns, by `owns`), sums every replica's, decides, and while the brake
    /// holds keeps every lease the cached instances are attached to alive (a
    /// dead replica's too). Skips rounds while `stale()`. Returns when
    /// `shutdown` is cancelled.
    pub async fn run(
        &self,
        client: &EtcdClient,
        cache: &Cache,
        prefix: &str,
        stale: impl Fn() -> bool,
        owns: impl Fn(&[u8]) -> bool,
        shutdown: &CancellationToken,
    ) {
        if !self.config.brake {
            return;
        }
        let root = format!("{prefix}/brake/").into_bytes();
        let mut key = root.clone();
        key.extend_from_slice(self.replica.as_bytes());
        let mut lease = 0i64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(TICK) => {}
            }
            if stale() {
                continue;
            }
            let (leases, longest, instances) = cache.leases();
            let window = longest.unwrap_or(TICK);
            let now = Instant::now();
            let tally = {
                let mut local = lock(&self.renewals);
                // An instance moved to another replica is expected there, not here.
                local.retain(now, &owns);
                local.tally(now, window)
            };
            if let Err(e) = publish_tally(client, &key, &mut lease, tally).await {
                debug!(error = %e, "cannot publish the renewal tally");
                continue;
            }
            let tallies: Vec<Tally> = match client.range_prefix(&root).await {
                Ok((_, kvs)) => kvs.iter().filter_map(|kv| serde_json::from_slice(&kv.value).ok()).collect(),
                Err(e) => {
                    debug!(error = %e, "cannot read the renewal tallies");
                    continue;
                }
            };
            let total = Tally::total(&tallies);
            let (transition, engaged) = {
                let mut d = lock(&self.decision);
                (d.decide(total.actual, total.expected, instances), d.engaged())
            };
            match transition {
                Some(Transition::Engaged { ratio }) => {
                    self.metrics.brake_engaged.set(1);
                    warn!(
                        ratio,
                        instances,
                        replicas = tallies.len(),
                        "expiry brake engaged: too few renewals arrive; keeping every lease alive"
                    );
                }
                Some(Transition::Released { ratio }) => {
                    self.metrics.brake_engaged.set(0);
                    self.metrics.brake_held.set(0);
                    info!(ratio, instances, "expiry brake released: renewals recovered");
                }
                None => {}
            }
            // The held count is the owners' (each replica's expiry sets it).
            if engaged {
                futures_util::stream::iter(leases.into_iter().filter(|l| *l != 0))
                    .for_each_concurrent(16, |l| async move {
                        let _ = client.keep_alive(l).await;
                    })
                    .await;
            }
        }
    }
}

/// Writes this replica's tally under its own short lease (granted again when
/// it lapsed).
async fn publish_tally(
    client: &EtcdClient,
    key: &[u8],
    lease: &mut i64,
    tally: Tally,
) -> Result<(), EtcdError> {
    if *lease == 0 || client.keep_alive(*lease).await?.is_none() {
        *lease = client.grant(TALLY_LEASE_SECS).await?.0;
    }
    let value = serde_json::to_vec(&tally).unwrap_or_default();
    client.put(key, &value, *lease).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decision on `tallies`: `Some(true)` when it engages, `Some(false)` on release.
    fn decide(d: &mut Decision, tallies: &[Tally], instances: usize) -> Option<bool> {
        let t = Tally::total(tallies);
        d.decide(t.actual, t.expected, instances).map(|t| matches!(t, Transition::Engaged { .. }))
    }

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
        assert_eq!(decide(&mut decision, &[healthy], 20), None);
        // 16 of 20 go silent for a window.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys[..4] {
                local.renewed(Instant::now(), k, ttl);
            }
        }
        let silent = local.tally(Instant::now(), ttl);
        assert_eq!(decide(&mut decision, &[silent], 20), Some(true), "{silent:?}");
        // Half of the tally on another replica sums to the same decision.
        let half = Tally { actual: silent.actual / 2.0, expected: silent.expected / 2.0 };
        let mut other = Decision::new(GuardConfig::default());
        assert_eq!(decide(&mut other, &[half, half], 20), Some(true));
        // Fewer instances than the minimum never engage.
        let mut small = Decision::new(GuardConfig::default());
        assert_eq!(decide(&mut small, &[silent], 9), None);
        // Renewals recover: released.
        for _ in 0..4 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys {
                local.renewed(Instant::now(), k, ttl);
            }
        }
        let back = local.tally(Instant::now(), ttl);
        assert_eq!(decide(&mut decision, &[back], 20), Some(false), "{back:?}");
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
            assert_eq!(decide(&mut decision, &[t], 10), None, "round {round}: {t:?}");
        }
        // Once it left the cache, it is no longer expected.
        local.retain(Instant::now(), |k| k != b"k0");
        assert_eq!(local.rates.len(), 9);
    }
    #[tokio::test(start_paused = true)]
    async fn a_replica_that_did_not_run_expects_nothing_of_the_gap() {
        let ttl = Duration::from_secs(5);
        let mut local = LocalRenewals::new(Instant::now());
        let keys: Vec<Vec<u8>> = (0..20).map(|i| format!("k{i}").into_bytes()).collect();
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            for k in &keys {
                local.renewed(Instant::now(), k, ttl);
            }
            local.tally(Instant::now(), ttl);
        }
        // Frozen for 10 s (SIGSTOP): its sidecars went elsewhere. Thawed, its
        // first tally must not publish 10 s of renewals expected and missed.
        tokio::time::advance(Duration::from_secs(10)).await;
        let thawed = local.tally(Instant::now(), ttl);
        assert_eq!(thawed, Tally::default(), "{thawed:?}");
        // Instances silent while it runs still count against the ratio.
        for _ in 0..3 {
            tokio::time::advance(Duration::from_secs(1)).await;
            local.tally(Instant::now(), ttl);
        }
        let silent = local.tally(Instant::now(), ttl);
        assert!(silent.expected >= 40.0 && silent.actual == 0.0, "{silent:?}");
    }
}
