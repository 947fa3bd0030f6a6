//! Hedged requests, per upstream service (opt-in with `--hedge SERVICE=DELAY`).
//!
//! An idempotent request without a body whose answer has not started after
//! the service's hedge delay is sent to a second endpoint as well; the first
//! answer wins and the other attempt is cancelled. This cuts the tail a frozen
//! or overloaded instance adds (every request sent to it would otherwise wait
//! out its per-try timeout). A hedge is paid from the retry budget like a
//! retry, so hedging cannot multiply the load, and it never applies to a
//! method that is not idempotent.
//!
//! The delay is fixed, or `auto`: the service's observed 95th percentile of
//! time to response headers, so about one request in twenty is hedged when
//! all is well. The estimate is a lock-free histogram with buckets √2 apart
//! (so within about 20 %), halved every [`DECAY_EVERY`] samples so it follows
//! the service as it changes; until [`MIN_SAMPLES`] answers were seen, `auto`
//! does not hedge.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// How long a request waits for its answer before it is hedged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HedgeDelay {
    Fixed(Duration),
    /// The service's observed p95 time to response headers.
    Auto,
}

impl FromStr for HedgeDelay {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().eq_ignore_ascii_case("auto") {
            return Ok(HedgeDelay::Auto);
        }
        let d = humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (examples: 50ms, auto)"))?;
        if d.is_zero() {
            return Err("a hedge delay must be above zero".into());
        }
        Ok(HedgeDelay::Fixed(d))
    }
}

/// Answers needed before `auto` hedges.
pub const MIN_SAMPLES: u32 = 20;
/// Samples after which the histogram's counts are halved.
pub const DECAY_EVERY: u32 = 2048;
/// Bucket `i` holds latencies below `BASE_US * 2^((i+1)/2)`.
const BASE_US: f64 = 1000.0;
const BUCKETS: usize = 28;

/// One service's hedging: its delay and, for `auto`, the latency estimate.
#[derive(Debug)]
pub struct Hedge {
    delay: HedgeDelay,
    buckets: [AtomicU32; BUCKETS],
    samples: AtomicU32,
}

impl Hedge {
    pub fn new(delay: HedgeDelay) -> Self {
        Hedge { delay, buckets: Default::default(), samples: AtomicU32::new(0) }
    }

    /// The delay to hedge after now, if any.
    pub fn delay(&self) -> Option<Duration> {
        match self.delay {
            HedgeDelay::Fixed(d) => Some(d),
            HedgeDelay::Auto => self.p95(),
        }
    }

    /// Records an answer's time to response headers (used by `auto`).
    pub fn observe(&self, latency: Duration) {
        if self.delay != HedgeDelay::Auto {
            return;
        }
        let us = latency.as_micros() as f64;
        // 2 * log2(us / BASE) is the bucket's index (sqrt(2) steps).
        let i =
            if us <= BASE_US { 0 } else { ((2.0 * (us / BASE_US).log2()).floor() as usize).min(BUCKETS - 1) };
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        if self.samples.fetch_add(1, Ordering::Relaxed) + 1 >= DECAY_EVERY {
            // Racing observers may lose a count or two here; an estimate tolerates it.
            self.samples.store(DECAY_EVERY / 2, Ordering::Relaxed);
            for b in &self.buckets {
                b.store(b.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
        }
    }

    /// The upper bound of the bucket holding the 95th percentile.
    fn p95(&self) -> Option<Duration> {
        let counts: Vec<u32> = self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).collect();
        let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
        if total < u64::from(MIN_SAMPLES) {
            return None;
        }
        let wanted = (total * 95).div_ceil(100);
        let mut seen = 0u64;
        for (i, &c) in counts.iter().enumerate() {
            seen += u64::from(c);
            if seen >= wanted {
                let upper_us = BASE_US * 2f64.powf((i as f64 + 1.0) / 2.0);
                return Some(Duration::from_micros(upper_us as u64));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fixed_and_auto() {
        assert_eq!("50ms".parse::<HedgeDelay>(), Ok(HedgeDelay::Fixed(Duration::from_millis(50))));
        assert_eq!("AUTO".parse::<HedgeDelay>(), Ok(HedgeDelay::Auto));
        assert!("0s".parse::<HedgeDelay>().is_err());
        assert!("soon".parse::<HedgeDelay>().is_err());
    }

    #[test]
    fn fixed_delay_needs_no_samples() {
        let h = Hedge::new(HedgeDelay::Fixed(Duration::from_millis(30)));
        assert_eq!(h.delay(), Some(Duration::from_millis(30)));
    }

    #[test]
    fn auto_follows_the_observed_p95() {
        let h = Hedge::new(HedgeDelay::Auto);
        for _ in 0..(MIN_SAMPLES - 1) {
            h.observe(Duration::from_millis(10));
        }
        assert_eq!(h.delay(), None, "too few samples to hedge");
        // 90 answers at 10 ms and 10 at 200 ms: the p95 is in the slow group.
        let h = Hedge::new(HedgeDelay::Auto);
        for i in 0..100 {
            h.observe(Duration::from_millis(if i % 10 == 0 { 200 } else { 10 }));
        }
        let d = h.delay().unwrap();
        assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(300), "{d:?}");
        // 99 fast and 1 slow: the p95 is fast, within a bucket (about 41 %) of 10 ms.
        let h = Hedge::new(HedgeDelay::Auto);
        for i in 0..100 {
            h.observe(Duration::from_millis(if i == 0 { 900 } else { 10 }));
        }
        let d = h.delay().unwrap();
        assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(15), "{d:?}");
    }

    #[test]
    fn old_samples_fade() {
        let h = Hedge::new(HedgeDelay::Auto);
        for _ in 0..DECAY_EVERY {
            h.observe(Duration::from_millis(500));
        }
        // The service got fast: after a few decays the slow past no longer sets the delay.
        for _ in 0..(4 * DECAY_EVERY) {
            h.observe(Duration::from_millis(5));
        }
        assert!(h.delay().unwrap() < Duration::from_millis(10));
    }
}
