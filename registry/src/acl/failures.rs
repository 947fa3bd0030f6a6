//! Failed token checks, counted per client in a bounded table.
//!
//! The table keeps at most [`MAX_CLIENTS`] addresses; when full, the address
//! that failed first is forgotten, so a scan from many addresses costs a fixed
//! amount of memory. A warning names the client and the reason at most once
//! per client per [`WARN_EVERY`]; the per-reason counter in `/metrics` has no
//! per-address label (that would be unbounded cardinality).
//!
//! Repeated failures are not slowed down. Secrets made by `registry init` are
//! 256-bit random values, so guessing one is hopeless at any rate, and holding
//! a failed request's answer back would keep its connection open: that helps
//! an attacker exhaust the registry's connections, not defend against him.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// Most client addresses remembered.
pub const MAX_CLIENTS: usize = 4096;
/// Shortest gap between two warnings about one client.
pub const WARN_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Failures {
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    by_client: HashMap<IpAddr, Entry>,
    /// Addresses in the order they first failed: the front is evicted first.
    order: VecDeque<IpAddr>,
}

struct Entry {
    count: u64,
    warned: Option<Instant>,
}

impl Failures {
    /// Counts a failure from `client` at `now`; returns the client's count and
    /// whether a warning about it is due.
    pub fn record(&self, client: IpAddr, now: Instant) -> (u64, bool) {
        let mut t = lock(&self.table);
        if !t.by_client.contains_key(&client) {
            while t.order.len() >= MAX_CLIENTS {
                if let Some(old) = t.order.pop_front() {
                    t.by_client.remove(&old);
                }
            }
            t.order.push_back(client);
            t.by_client.insert(client, Entry { count: 0, warned: None });
        }
        let Some(e) = t.by_client.get_mut(&client) else { return (0, false) };
        e.count += 1;
        let due = e.warned.is_none_or(|w| now.saturating_duration_since(w) >= WARN_EVERY);
        if due {
            e.warned = Some(now);
        }
        (e.count, due)
    }

    /// Failures remembered for `client`.
    pub fn count(&self, client: IpAddr) -> u64 {
        lock(&self.table).by_client.get(&client).map_or(0, |e| e.count)
    }

    /// Addresses remembered.
    pub fn clients(&self) -> usize {
        lock(&self.table).by_client.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn counts_per_client_warns_once_a_minute_and_stays_bounded() {
        let f = Failures::default();
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let t0 = Instant::now();
        assert_eq!(f.record(a, t0), (1, true));
        assert_eq!(f.record(a, t0 + Duration::from_secs(30)), (2, false));
        assert_eq!(f.record(a, t0 + Duration::from_secs(60)), (3, true));
        for i in 0..(MAX_CLIENTS as u32 + 10) {
            f.record(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i)), t0);
        }
        assert_eq!(f.clients(), MAX_CLIENTS);
        assert_eq!(f.count(a), 0, "the oldest address was forgotten");
    }
}
