//! Lease deadlines kept in order, so expiry never scans every instance.
//!
//! The queue holds at most one live entry per lease. A renewal does not touch
//! the queue: when an entry falls due, its owner compares it with the lease's
//! current deadline and either expires the lease or queues it again at that
//! deadline. Each lease therefore costs about one queue operation per TTL,
//! however often it is renewed, and the heartbeat path takes no shared lock.

use std::collections::BTreeMap;

use tokio::time::Instant;

/// Keys ordered by deadline; the sequence number keeps equal deadlines apart.
#[derive(Debug)]
pub struct ExpiryQueue<K> {
    entries: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K> Default for ExpiryQueue<K> {
    fn default() -> Self {
        ExpiryQueue { entries: BTreeMap::new(), seq: 0 }
    }
}

impl<K> ExpiryQueue<K> {
    /// Queues `key` for `at`; true when it became the earliest entry (the
    /// expiry task must then re-arm its timer).
    pub fn push(&mut self, at: Instant, key: K) -> bool {
        self.seq = self.seq.wrapping_add(1);
        self.entries.insert((at, self.seq), key);
        self.entries.first_key_value().is_some_and(|((first, s), _)| *first == at && *s == self.seq)
    }

    /// The earliest deadline queued.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.entries.first_key_value().map(|((at, _), _)| *at)
    }

    /// Removes and returns the earliest entry if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<(Instant, K)> {
        match self.entries.first_key_value() {
            Some(((at, _), _)) if *at <= now => self.entries.pop_first().map(|((at, _), k)| (at, k)),
            _ => None,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn pops_in_deadline_order_and_only_when_due() {
        let t0 = Instant::now();
        let mut q = ExpiryQueue::default();
        assert!(q.push(t0 + Duration::from_secs(5), "b"));
        assert!(!q.push(t0 + Duration::from_secs(9), "c"));
        assert!(q.push(t0 + Duration::from_secs(1), "a"));
        assert!(!q.push(t0 + Duration::from_secs(1), "a2"));
        assert_eq!(q.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert!(q.pop_due(t0).is_none());
        let now = t0 + Duration::from_secs(5);
        let popped: Vec<_> = std::iter::from_fn(|| q.pop_due(now)).map(|(_, k)| k).collect();
        assert_eq!(popped, ["a", "a2", "b"]);
        assert_eq!(q.len(), 1);
        assert_eq!(q.pop_due(t0 + Duration::from_secs(9)).map(|(_, k)| k), Some("c"));
        assert!(q.is_empty());
    }
}
