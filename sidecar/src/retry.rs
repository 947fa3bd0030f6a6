//! Retry policy and retry budget.
//!
//! The policy ([`may_retry`]) says whether a failed attempt may be sent again
//! at all; the budget ([`RetryBudget`]) says whether the service can afford one
//! more retry now: retries within the last `window` may not exceed
//! `ratio` × requests in that window plus `min_per_second` × the window's
//! seconds, so when everything fails, retries add about `ratio` to the load
//! instead of multiplying it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::Method;
use tokio::time::Instant;

/// Retry settings.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Retries allowed per original request over the window.
    pub budget_ratio: f64,
    /// Retries per second always allowed, however few requests there were.
    pub min_retries_per_second: u32,
    /// How far back the budget looks.
    pub window: Duration,
    /// Ceiling of the first retry's full-jitter backoff; doubles per retry.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_cap: Duration,
}

impl RetryConfig {
    /// The defaults, written once: the CLI's defaults are these values.
    pub const DEFAULT: RetryConfig = RetryConfig {
        budget_ratio: 0.2,
        min_retries_per_second: 10,
        window: Duration::from_secs(10),
        backoff_base: Duration::from_millis(10),
        backoff_cap: Duration::from_millis(250),
    };
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig::DEFAULT
    }
}

/// Why an attempt failed, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Could not connect, or refused before any byte was sent: nothing reached the endpoint.
    NotSent,
    /// Reset or closed after (part of) the request may have reached the endpoint.
    Reset,
    /// No response headers within the per-try timeout.
    PerTryTimeout,
    /// The endpoint answered 502, 503 or 504.
    GatewayStatus,
}

/// RFC 9110 idempotent methods the sidecar retries after the request may have
/// reached an endpoint.
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Whether a failed attempt may be re-sent. `replayable`: the request body can
/// still be sent again in full (it was empty, fit the replay buffer, or was
/// never read).
pub fn may_retry(failure: Failure, idempotent: bool, replayable: bool) -> bool {
    if !replayable {
        return false;
    }
    match failure {
        Failure::NotSent => true,
        Failure::Reset | Failure::PerTryTimeout | Failure::GatewayStatus => idempotent,
    }
}

const SLOTS: usize = 10;

/// A sliding-window retry budget. Counting a request is two atomic operations;
/// only retries take the lock.
#[derive(Debug)]
pub struct RetryBudget {
    start: Instant,
    slot_ms: u64,
    ratio: f64,
    floor: u64,
    /// Per slot: the slot's epoch (index of its time span since `start`), and
    /// its counts of requests and retries.
    epochs: [AtomicU64; SLOTS],
    requests: [AtomicU64; SLOTS],
    retries: [AtomicU64; SLOTS],
    withdraw: Mutex<()>,
}

impl RetryBudget {
    pub fn new(config: &RetryConfig) -> Self {
        let window_ms = u64::try_from(config.window.as_millis()).unwrap_or(u64::MAX).max(SLOTS as u64);
        let floor = u64::from(config.min_retries_per_second).saturating_mul(window_ms) / 1000;
        RetryBudget {
            start: Instant::now(),
            slot_ms: window_ms / SLOTS as u64,
            ratio: config.budget_ratio.max(0.0),
            floor,
            epochs: Default::default(),
            requests: Default::default(),
            retries: Default::default(),
            withdraw: Mutex::new(()),
        }
    }

    fn epoch(&self, now: Instant) -> u64 {
        // Epoch 0 is "never used", so spans count from 1.
        let ms = u64::try_from(now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX);
        ms / self.slot_ms + 1
    }

    /// The slot for `now`, cleared first if it last held an older span. Two
    /// threads clearing at once can lose a count or two, which a budget tolerates.
    fn slot(&self, now: Instant) -> usize {
        let epoch = self.epoch(now);
        let i = (epoch % SLOTS as u64) as usize;
        let old = self.epochs[i].load(Ordering::Acquire);
        if old != epoch
            && self.epochs[i].compare_exchange(old, epoch, Ordering::AcqRel, Ordering::Acquire).is_ok()
        {
            self.requests[i].store(0, Ordering::Relaxed);
            self.retries[i].store(0, Ordering::Relaxed);
        }
        i
    }

    /// Counts an original request.
    pub fn deposit(&self, now: Instant) {
        let i = self.slot(now);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let _guard = self.withdraw.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.slot(now);
        let epoch = self.epoch(now);
        let (mut requests, mut retries) = (0u64, 0u64);
        for i in 0..SLOTS {
            let e = self.epochs[i].load(Ordering::Acquire);
            if e != 0 && e + (SLOTS as u64) > epoch {
                requests += self.requests[i].load(Ordering::Relaxed);
                retries += self.retries[i].load(Ordering::Relaxed);
            }
        }
        let allowed = self.floor as f64 + self.ratio * requests as f64;
        if (retries as f64) < allowed {
            self.retries[current].fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(floor: u32) -> RetryConfig {
        RetryConfig {
            budget_ratio: 0.2,
            min_retries_per_second: floor,
            window: Duration::from_secs(10),
            ..Default::default()
        }
    }

    #[test]
    fn policy() {
        assert!(is_idempotent(&Method::GET) && is_idempotent(&Method::PUT) && is_idempotent(&Method::DELETE));
        assert!(!is_idempotent(&Method::POST) && !is_idempotent(&Method::PATCH));
        // Nothing reached the endpoint: any method.
        assert!(may_retry(Failure::NotSent, false, true));
        // Something may have reached it: idempotent only.
        for f in [Failure::Reset, Failure::PerTryTimeout, Failure::GatewayStatus] {
            assert!(may_retry(f, true, true));
            assert!(!may_retry(f, false, true));
            // A body that streamed past the replay buffer cannot be sent again.
            assert!(!may_retry(f, true, false));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn budget_allows_the_ratio_of_requests() {
        let b = RetryBudget::new(&cfg(0));
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let granted = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn floor_allows_retries_without_traffic() {
        let b = RetryBudget::new(&cfg(1));
        // 1 per second over 10 seconds.
        let granted = (0..100).filter(|_| b.try_withdraw(Instant::now())).count();
        assert_eq!(granted, 10);
    }

    #[tokio::test(start_paused = true)]
    async fn window_slides() {
        let b = RetryBudget::new(&cfg(0));
        for _ in 0..50 {
            b.deposit(Instant::now());
        }
        assert_eq!((0..100).filter(|_| b.try_withdraw(Instant::now())).count(), 10);
        // Half a window later the requests still count, and so do the retries.
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(!b.try_withdraw(Instant::now()));
        for _ in 0..50 {
            b.deposit(Instant::now());
        }
        assert_eq!((0..100).filter(|_| b.try_withdraw(Instant::now())).count(), 10);
        // A full window after the first burst only the second one counts:
        // 50 requests allow 10 retries, and the 10 taken with them stand.
        tokio::time::advance(Duration::from_millis(5_500)).await;
        assert!(!b.try_withdraw(Instant::now()));
        // Once everything has aged out, nothing is left.
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(!b.try_withdraw(Instant::now()));
        for _ in 0..5 {
            b.deposit(Instant::now());
        }
        assert_eq!((0..10).filter(|_| b.try_withdraw(Instant::now())).count(), 1);
    }
}
