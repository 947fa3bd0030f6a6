//! `GET /v1/status`: the registry's own state, for the dashboard's header and
//! for operators' scripts: which store, which replica, whether it answers
//! from a stale copy, the epoch, uptime, registrations and renewals per
//! minute, and the guards against mass expiry.
//!
//! The rates come from [`Activity`]: a task samples the request counters once
//! a second and keeps the last minute of samples, so a status request reads a
//! difference of two samples and the heartbeat path pays nothing for it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Extension, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::handlers::{json_response, to_json};
use super::{ApiState, ClientAddr};
use crate::acl::Need;
use crate::error::ApiError;
use crate::lock;
use crate::metrics::Metrics;
use crate::store::{Store, StoreSpec};

/// How often the counters are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(1);
/// The span the rates are measured over.
const WINDOW: Duration = Duration::from_secs(60);

/// When the registry started and the last minute of its request counters.
pub struct Activity {
    started: Instant,
    samples: Mutex<VecDeque<Sample>>,
}

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    registrations: u64,
    renewals: u64,
}

/// Registrations and renewals per minute, over the last `window`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rates {
    /// The span measured: a minute once the registry has run that long.
    pub window_seconds: f64,
    pub registrations_per_minute: f64,
    pub renewals_per_minute: f64,
}

impl Default for Activity {
    fn default() -> Self {
        Activity { started: Instant::now(), samples: Mutex::new(VecDeque::new()) }
    }
}

impl Activity {
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(&self, sample: Sample) {
        let mut samples = lock(&self.samples);
        samples.push_back(sample);
        // Keep the newest sample at least a window old, to measure from.
        while samples.len() > 1 && samples.get(1).is_some_and(|s| sample.at - s.at >= WINDOW) {
            samples.pop_front();
        }
    }

    /// The rates from the oldest sample kept to `now`'s counts; the registry's
    /// start (counts of zero) stands in until the first sample exists.
    fn rates(&self, now: Sample) -> Rates {
        let from = lock(&self.samples).front().copied().unwrap_or(Sample {
            at: self.started,
            registrations: 0,
            renewals: 0,
        });
        let window = now.at.saturating_duration_since(from.at).as_secs_f64();
        let per_minute = |n: u64, m: u64| {
            if window < 0.5 {
                0.0
            } else {
                (n.saturating_sub(m) as f64 * 60.0 / window * 10.0).round() / 10.0
            }
        };
        Rates {
            window_seconds: (window * 10.0).round() / 10.0,
            registrations_per_minute: per_minute(now.registrations, from.registrations),
            renewals_per_minute: per_minute(now.renewals, from.renewals),
        }
    }

    fn now(metrics: &Metrics) -> Sample {
        Sample {
            at: Instant::now(),
            registrations: metrics.registrations.get(),
            renewals: metrics.heartbeats.get(),
        }
    }

    /// Samples the counters every second until `shutdown`.
    pub async fn sample(self: Arc<Self>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.record(Self::now(&metrics)),
            }
        }
    }
}

/// The answer of `GET /v1/status`.
#[derive(Debug, Serialize)]
struct StatusOut<'a> {
    /// `memory` or `etcd`.
    store: &'static str,
    /// This replica's name among those sharing an etcd store; `null` for memory.
    replica: Option<&'a str>,
    /// The instances whose heartbeats this replica serves (it owns them) on
    /// the etcd store; `null` for memory.
    owned: Option<usize>,
    /// Of those, the ones whose move to this replica's lease is still queued
    /// (their sidecar failed over here); `null` for memory.
    adopting: Option<usize>,
    stale: bool,
    epoch: &'a str,
    uptime_seconds: u64,
    services: usize,
    instances: usize,
    healthy: usize,
    rates: Rates,
    brake: BrakeOut,
    protection_threshold: f64,
    /// Services whose protection threshold is holding critical instances in discovery.
    protected_services: usize,
}

#[derive(Debug, Serialize)]
struct BrakeOut {
    enabled: bool,
    engaged: bool,
    /// Instances whose lease ran out and that the brake keeps.
    held: i64,
    threshold: f64,
    min_instances: usize,
}

/// `GET /v1/status`: what `/metrics` may be read with (it says as much).
pub async fn status<S: Store>(
    State(st): State<Arc<ApiState<S>>>,
    client: Option<Extension<ClientAddr>>,
    headers: HeaderMap,
    RawQuery(q): RawQuery,
) -> Result<Response, ApiError> {
    st.authorize(&headers, client.map(|c| c.0), Need::Metrics)?;
    if q.is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::InvalidQuery("GET /v1/status takes no parameters".into()));
    }
    let snapshots = st.store.snapshots();
    let guards = st.config.guards();
    let store = &st.store;
    let out = StatusOut {
        store: match st.config.store {
            StoreSpec::Memory => "memory",
            StoreSpec::Etcd { .. } => "etcd",
        },
        replica: store.replica(),
        owned: store.owned().map(|o| o.owned + o.adopting),
        adopting: store.owned().map(|o| o.adopting),
        stale: store.stale(),
        epoch: store.epoch(),
        uptime_seconds: st.activity.uptime().as_secs(),
        services: snapshots.len(),
        instances: snapshots.iter().map(|s| s.instances().len()).sum(),
        healthy: snapshots.iter().map(|s| s.healthy()).sum(),
        rates: st.activity.rates(Activity::now(&st.metrics)),
        brake: BrakeOut {
            enabled: guards.brake,
            engaged: st.metrics.store.brake_engaged.get() == 1,
            held: st.metrics.store.brake_held.get(),
            threshold: guards.brake_threshold,
            min_instances: guards.brake_min_instances,
        },
        protection_threshold: guards.protection_threshold,
        protected_services: snapshots.iter().filter(|s| s.protected()).count(),
    };
    Ok(json_response(StatusCode::OK, to_json(&out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, secs: u64, registrations: u64, renewals: u64) -> Sample {
        Sample { at: start + Duration::from_secs(secs), registrations, renewals }
    }

    #[tokio::test(start_paused = true)]
    async fn rates_cover_the_last_minute() {
        let activity = Activity::default();
        let t0 = activity.started;
        // Nothing sampled yet: measured from the start.
        let r = activity.rates(at(t0, 30, 5, 600));
        assert_eq!(
            (r.window_seconds, r.registrations_per_minute, r.renewals_per_minute),
            (30.0, 10.0, 1200.0)
        );
        for s in 0..=120 {
            // 1 registration every 10 s, 20 renewals a second.
            activity.record(at(t0, s, s / 10, s * 20));
        }
        let r = activity.rates(at(t0, 120, 12, 2400));
        assert_eq!(r.window_seconds, 60.0, "{r:?}");
        assert_eq!((r.registrations_per_minute, r.renewals_per_minute), (6.0, 1200.0));
        assert!(lock(&activity.samples).len() <= 62, "a minute of samples is kept, no more");
        // Just started: no rate from a zero-length window.
        let fresh = Activity::default();
        assert_eq!(fresh.rates(at(fresh.started, 0, 3, 3)).renewals_per_minute, 0.0);
    }
}
