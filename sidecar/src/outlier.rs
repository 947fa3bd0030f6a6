//! Passive outlier detection: a per-endpoint state machine fed by the outcome
//! of each proxied attempt.
//!
//! `active` -> `ejected` when a connection is refused (at once) or after
//! `consecutive_failures` other failures in a row (timeouts, resets, 502/503/504).
//! An ejection lasts `base_ejection * 2^level` (capped at `max_ejection`), where
//! the level grows with each ejection and resets once the endpoint has stayed
//! healthy for `max_ejection`. When the time is up the endpoint is `probing`:
//! exactly one request is let through, and its outcome decides between
//! `active` and a longer ejection. The share of a service's endpoints ejected at
//! once is bounded by [`may_eject`], for failures that may be systemic (timeouts,
//! resets, gateway errors); a refused connection ejects whatever the bound, since
//! keeping an endpoint nobody listens on in rotation only turns it into a black
//! hole for first attempts. When every endpoint is ejected the balancer ignores
//! ejection altogether (panic mode), see [`crate::balance`].
//!
//! Two softer signals feed the balancer ([`crate::balance`]) without ejecting:
//! - **suspect**: the endpoint's latest outcome was a failure less than
//!   [`SUSPECT_FOR`] ago. The balancer ranks it after endpoints without one, so
//!   an endpoint that fails fast (and so has nothing in flight) never looks
//!   less loaded than one that works. It needs no share bound: a suspect
//!   endpoint is still chosen when nothing better is left.
//! - **warmth**: how far the endpoint is into its slow start, counted from
//!   when it joined (first seen, or restored after an ejection).
//!
//! The request path reads one atomic when the endpoint is active and healthy;
//! the mutex is taken only on failures and while ejected, and never across an
//! `.await`.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Ejection settings.
#[derive(Debug, Clone)]
pub struct OutlierConfig {
    /// Consecutive failures (timeouts, resets, 502/503/504) that eject an
    /// endpoint. A refused connection ejects at once.
    pub consecutive_failures: u32,
    /// Duration of a first ejection.
    pub base_ejection: Duration,
    /// Longest ejection, however often an endpoint was ejected; also how long an
    /// endpoint must stay healthy before its ejection time shrinks back to the
    /// base.
    pub max_ejection: Duration,
    /// Largest share of a service's endpoints ejected at once, in percent; at
    /// least one endpoint can always be ejected.
    pub max_ejected_percent: u8,
}

impl OutlierConfig {
    /// The defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: OutlierConfig = OutlierConfig {
        consecutive_failures: 3,
        base_ejection: Duration::from_secs(5),
        max_ejection: Duration::from_secs(120),
        max_ejected_percent: 50,
    };
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig::DEFAULT
    }
}

/// Whether one more endpoint out of `total` may be ejected while `ejected`
/// already are: the bound is `max_percent` of `total`, but never below one.
pub fn may_eject(total: usize, ejected: usize, max_percent: u8) -> bool {
    let allowed = (total.saturating_mul(usize::from(max_percent.min(100))) / 100).max(1);
    ejected < allowed
}

/// What an attempt on an endpoint found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer other than 502/503/504.
    Success,
    /// The connection was refused: the endpoint is not listening.
    Refused,
    /// A timeout, reset, failed connect or gateway error.
    Failure,
}

/// How the attempt that produced an outcome was let through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The endpoint was active.
    Normal,
    /// It was the endpoint's one probe ([`Admission::Probe`]).
    Probe,
    /// Panic mode: every endpoint was ejected and this one was tried anyway.
    Panic,
}

/// Whether the balancer may send a request to an endpoint now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Active: any number of requests.
    Open,
    /// Its ejection is over and this request is the one probe; the caller must
    /// report the outcome with [`Via::Probe`] or call [`OutlierState::release_probe`].
    Probe,
    /// Ejected, or probing with the probe already out.
    Closed,
}

const ACTIVE: u8 = 0;
const EJECTED: u8 = 1;
const PROBING: u8 = 2;

#[derive(Debug, Default)]
struct Inner {
    /// Ejections so far (reported by `/endpoints`).
    ejections: u32,
    /// Exponent of the next ejection's duration.
    level: u32,
    until: Option<Instant>,
    probe_out: bool,
    recovered_at: Option<Instant>,
}

/// Per-endpoint outlier state, shared by every request to the endpoint.
/// How long a failed attempt marks its endpoint as suspect (see the module doc).
/// Long enough to steer a burst of requests elsewhere, short enough that a
/// healthy endpoint which failed once is back in full rotation almost at once.
pub const SUSPECT_FOR: Duration = Duration::from_secs(1);

/// The smallest share of its weight an endpoint is given during its slow start
/// (Envoy's `min_weight_percent` default). Under least-loaded this bounds how
/// cold an endpoint counts as, not a traffic share: with few requests in flight
/// a new endpoint may get none until its warmth passes the others' load.
const MIN_WARMTH_PERMILLE: u64 = 100;

#[derive(Debug)]
pub struct OutlierState {
    /// Mirror of the state for the lock-free fast path.
    mode: AtomicU8,
    consecutive: AtomicU32,
    inner: Mutex<Inner>,
    /// Base of the millisecond clock of the two fields below.
    epoch: Instant,
    /// 1 + milliseconds since `epoch` of the latest failure; 0 after a success.
    failed_at: AtomicU64,
    /// Milliseconds since `epoch` when the endpoint joined the rotation.
    joined_at: AtomicU64,
    /// Set once its slow start is over, so a warm endpoint costs the balancer
    /// one load instead of a clock computation; cleared when it rejoins.
    warm: AtomicBool,
}

impl Default for OutlierState {
    fn default() -> Self {
        OutlierState {
            mode: AtomicU8::new(ACTIVE),
            consecutive: AtomicU32::new(0),
            inner: Mutex::default(),
            epoch: Instant::now(),
            failed_at: AtomicU64::new(0),
            joined_at: AtomicU64::new(0),
            warm: AtomicBool::new(false),
        }
    }
}

impl OutlierState {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // The state stays consistent across a panic in another holder: every
        // critical section only assigns fields.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `("active" | "ejected" | "probing", times ejected)`.
    pub fn describe(&self) -> (&'static str, u32) {
        let ejections = self.lock().ejections;
        let name = match self.mode.load(Ordering::Acquire) {
            ACTIVE => "active",
            EJECTED => "ejected",
            _ => "probing",
        };
        (name, ejections)
    }

    fn ms(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Its latest attempt failed less than [`SUSPECT_FOR`] before `now`.
    pub fn is_suspect(&self, now: Instant) -> bool {
        let failed = self.failed_at.load(Ordering::Relaxed);
        failed != 0 && self.ms(now).saturating_sub(failed - 1) < SUSPECT_FOR.as_millis() as u64
    }

    /// Marks the endpoint suspect without counting a failure: it was slow (a
    /// connect still pending when another endpoint was tried), which says it
    /// is loaded, not that it is broken.
    pub fn mark_suspect(&self, now: Instant) {
        self.failed_at.store(self.ms(now).saturating_add(1), Ordering::Relaxed);
    }

    /// The share of its weight the endpoint gets at `now`, in permille: the
    /// elapsed fraction of `slow_start` since it joined, never below 10 % (so
    /// flat at 10 % for the first tenth of the window, then linear to 100 %);
    /// always 1000 when `slow_start` is zero.
    pub fn warmth_permille(&self, now: Instant, slow_start: Duration) -> u64 {
        if self.warm.load(Ordering::Relaxed) {
            return 1000;
        }
        let window = u64::try_from(slow_start.as_millis()).unwrap_or(u64::MAX);
        if window == 0 {
            return 1000;
        }
        let elapsed = self.ms(now).saturating_sub(self.joined_at.load(Ordering::Relaxed));
        if elapsed >= window {
            self.warm.store(true, Ordering::Relaxed);
            return 1000;
        }
        (elapsed.saturating_mul(1000) / window).max(MIN_WARMTH_PERMILLE)
    }

    /// Not active: ejected or probing. Counts against the ejected share.
    pub fn is_ejected(&self) -> bool {
        self.mode.load(Ordering::Acquire) != ACTIVE
    }

    /// Whether a request may go to this endpoint now; may start the probe.
    pub fn admit(&self, now: Instant) -> Admission {
        if self.mode.load(Ordering::Acquire) == ACTIVE {
            return Admission::Open;
        }
        let mut inner = self.lock();
        match self.mode.load(Ordering::Acquire) {
            ACTIVE => Admission::Open,
            EJECTED if inner.until.is_some_and(|u| now >= u) => {
                inner.probe_out = true;
                self.mode.store(PROBING, Ordering::Release);
                Admission::Probe
            }
            PROBING if !inner.probe_out => {
                inner.probe_out = true;
                Admission::Probe
            }
            _ => Admission::Closed,
        }
    }

    /// The probe request ended without an outcome (the client went away); the
    /// next request may probe.
    pub fn release_probe(&self) {
        let mut inner = self.lock();
        if self.mode.load(Ordering::Acquire) == PROBING {
            inner.probe_out = false;
        }
    }

    /// Records the outcome of an attempt let through `via`. `may_eject` is
    /// asked (only when an ejection is due) whether the ejected-share bound
    /// allows one more. Returns the ejection's duration when this outcome
    /// ejected the endpoint. Outcomes of requests that were already under way
    /// when the endpoint was ejected change nothing: only its probe, or a
    /// panic-mode request, ends an ejection.
    pub fn record(
        &self,
        outcome: Outcome,
        via: Via,
        config: &OutlierConfig,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let mode = self.mode.load(Ordering::Acquire);
        if outcome == Outcome::Success {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            if self.failed_at.load(Ordering::Relaxed) != 0 {
                self.failed_at.store(0, Ordering::Relaxed);
            }
            if mode != ACTIVE && via != Via::Normal {
                // A probe, or a panic-mode request, found it healthy.
                let mut inner = self.lock();
                inner.until = None;
                inner.probe_out = false;
                inner.recovered_at = Some(now);
                // Back from an ejection: it warms up again, like a new endpoint.
                self.joined_at.store(self.ms(now), Ordering::Relaxed);
                self.warm.store(false, Ordering::Relaxed);
                self.mode.store(ACTIVE, Ordering::Release);
            }
            return None;
        }
        self.failed_at.store(self.ms(now).saturating_add(1), Ordering::Relaxed);
        match mode {
            ACTIVE => {
                let n = self.consecutive.fetch_add(1, Ordering::Relaxed).saturating_add(1);
                // A refusal means nothing listens: sending there cannot help,
                // so the share bound (which keeps capacity through a systemic
                // problem) does not hold it in rotation.
                let due =
                    outcome == Outcome::Refused || (n >= config.consecutive_failures.max(1) && may_eject());
                if due {
                    let mut inner = self.lock();
                    if self.mode.load(Ordering::Acquire) == ACTIVE {
                        return Some(self.eject(&mut inner, config, now));
                    }
                }
                None
            }
            PROBING if via == Via::Probe => {
                let mut inner = self.lock();
                Some(self.eject(&mut inner, config, now))
            }
            // Panic-mode traffic to an ejected endpoint, or a request from
            // before the ejection, says nothing new.
            _ => None,
        }
    }

    fn eject(&self, inner: &mut Inner, config: &OutlierConfig, now: Instant) -> Duration {
        if inner.recovered_at.is_some_and(|r| now.saturating_duration_since(r) >= config.max_ejection) {
            inner.level = 0;
        }
        let factor = 1u32 << inner.level.min(20);
        let duration =
            config.base_ejection.saturating_mul(factor).min(config.max_ejection.max(config.base_ejection));
        inner.level = inner.level.saturating_add(1).min(21);
        inner.ejections = inner.ejections.saturating_add(1);
        inner.until = Some(now + duration);
        inner.probe_out = false;
        inner.recovered_at = None;
        self.consecutive.store(0, Ordering::Relaxed);
        self.mode.store(EJECTED, Ordering::Release);
        duration
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> OutlierConfig {
        OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(60),
            max_ejected_percent: 50,
        }
    }

    fn fail(s: &OutlierState, o: Outcome, via: Via) -> Option<Duration> {
        s.record(o, via, &cfg(), Instant::now(), || true)
    }

    #[tokio::test(start_paused = true)]
    async fn consecutive_failures_eject_at_threshold() {
        let s = OutlierState::default();
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), None);
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), None);
        // A success in between starts the count again.
        fail(&s, Outcome::Success, Via::Normal);
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), None);
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), None);
        assert_eq!(s.describe(), ("active", 0));
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), Some(Duration::from_secs(10)));
        assert_eq!(s.describe(), ("ejected", 1));
        assert_eq!(s.admit(Instant::now()), Admission::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn refused_ejects_at_once() {
        let s = OutlierState::default();
        assert_eq!(fail(&s, Outcome::Refused, Via::Normal), Some(Duration::from_secs(10)));
        assert!(s.is_ejected());
    }

    #[tokio::test(start_paused = true)]
    async fn share_bound_can_refuse_a_soft_ejection_but_never_a_refusal() {
        let s = OutlierState::default();
        let bound_reached = |o| s.record(o, Via::Normal, &cfg(), Instant::now(), || false);
        for _ in 0..5 {
            assert_eq!(bound_reached(Outcome::Failure), None);
        }
        assert_eq!(s.describe(), ("active", 0));
        // Nothing listens there: out of rotation whatever the bound.
        assert_eq!(bound_reached(Outcome::Refused), Some(Duration::from_secs(10)));
        assert_eq!(s.describe(), ("ejected", 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_makes_the_endpoint_suspect_for_a_while_and_a_success_clears_it() {
        let s = OutlierState::default();
        assert!(!s.is_suspect(Instant::now()));
        fail(&s, Outcome::Failure, Via::Normal);
        assert!(s.is_suspect(Instant::now()));
        tokio::time::advance(SUSPECT_FOR - Duration::from_millis(1)).await;
        assert!(s.is_suspect(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!s.is_suspect(Instant::now()));
        fail(&s, Outcome::Failure, Via::Normal);
        assert!(s.is_suspect(Instant::now()));
        fail(&s, Outcome::Success, Via::Normal);
        assert!(!s.is_suspect(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn warmth_rises_over_the_slow_start_and_again_after_an_ejection() {
        let window = Duration::from_secs(10);
        let s = OutlierState::default();
        assert_eq!(s.warmth_permille(Instant::now(), Duration::ZERO), 1000);
        assert_eq!(s.warmth_permille(Instant::now(), window), 100);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(s.warmth_permille(Instant::now(), window), 500);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(s.warmth_permille(Instant::now(), window), 1000);
        // Ejected, then its probe succeeds: it starts warming again.
        fail(&s, Outcome::Refused, Via::Normal);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        fail(&s, Outcome::Success, Via::Probe);
        assert_eq!(s.warmth_permille(Instant::now(), window), 100);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(s.warmth_permille(Instant::now(), window), 200);
    }

    #[tokio::test(start_paused = true)]
    async fn one_probe_decides_and_ejections_grow() {
        let s = OutlierState::default();
        assert_eq!(fail(&s, Outcome::Refused, Via::Normal), Some(Duration::from_secs(10)));
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Closed);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        assert_eq!(s.describe().0, "probing");
        // Only one probe at a time.
        assert_eq!(s.admit(Instant::now()), Admission::Closed);
        // Another (panic-mode) request's failure does not re-eject.
        assert_eq!(fail(&s, Outcome::Failure, Via::Normal), None);
        // The probe fails: ejected again, for twice as long.
        assert_eq!(fail(&s, Outcome::Failure, Via::Probe), Some(Duration::from_secs(20)));
        assert_eq!(s.describe(), ("ejected", 2));
        tokio::time::advance(Duration::from_secs(19)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Closed);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        assert_eq!(fail(&s, Outcome::Refused, Via::Probe), Some(Duration::from_secs(40)));
        tokio::time::advance(Duration::from_secs(40)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        // Capped at max_ejection.
        assert_eq!(fail(&s, Outcome::Refused, Via::Probe), Some(Duration::from_secs(60)));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        assert_eq!(fail(&s, Outcome::Success, Via::Probe), None);
        assert_eq!(s.describe(), ("active", 4));
        assert_eq!(s.admit(Instant::now()), Admission::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn released_probe_lets_the_next_request_probe() {
        let s = OutlierState::default();
        fail(&s, Outcome::Refused, Via::Normal);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        assert_eq!(s.admit(Instant::now()), Admission::Closed);
        s.release_probe();
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
    }

    #[tokio::test(start_paused = true)]
    async fn growth_resets_after_staying_healthy() {
        let s = OutlierState::default();
        fail(&s, Outcome::Refused, Via::Normal);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        fail(&s, Outcome::Success, Via::Probe);
        // Soon after recovering, the next ejection is longer.
        assert_eq!(fail(&s, Outcome::Refused, Via::Normal), Some(Duration::from_secs(20)));
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(s.admit(Instant::now()), Admission::Probe);
        fail(&s, Outcome::Success, Via::Probe);
        // Healthy for max_ejection: back to the base time.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(fail(&s, Outcome::Refused, Via::Normal), Some(Duration::from_secs(10)));
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_success_restores_but_an_older_request_does_not() {
        let s = OutlierState::default();
        fail(&s, Outcome::Refused, Via::Normal);
        // A request sent before the ejection succeeds: still ejected.
        fail(&s, Outcome::Success, Via::Normal);
        assert_eq!(s.describe(), ("ejected", 1));
        // A panic-mode failure changes nothing either.
        assert_eq!(fail(&s, Outcome::Failure, Via::Panic), None);
        assert_eq!(s.describe(), ("ejected", 1));
        // A request sent anyway (panic mode) succeeded.
        fail(&s, Outcome::Success, Via::Panic);
        assert_eq!(s.describe(), ("active", 1));
    }

    #[test]
    fn share_bound_allows_at_least_one() {
        assert!(may_eject(1, 0, 50));
        assert!(!may_eject(1, 1, 50));
        assert!(may_eject(2, 0, 10));
        assert!(!may_eject(2, 1, 10));
        assert!(may_eject(4, 1, 50));
        assert!(!may_eject(4, 2, 50));
        assert!(may_eject(3, 2, 100));
        assert!(!may_eject(3, 3, 100));
        assert!(!may_eject(10, 5, 50));
    }
}
