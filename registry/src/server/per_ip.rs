//! Open connections counted per client address, for `--max-connections-per-ip`.
//!
//! The map is touched twice per connection (open and close), never per
//! request, so a std mutex held for one hash-map operation is enough. An
//! address's entry disappears with its last connection, so the map holds only
//! addresses with connections open (at most `--max-connections` entries).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections open per address, capped.
#[derive(Debug)]
pub struct PerIp {
    limit: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection of an address; dropping it gives the slot back.
#[derive(Debug)]
pub struct IpSlot {
    owner: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    /// `limit` connections per address; 0 is no limit.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerIp { limit, open: Mutex::new(HashMap::new()) })
    }

    /// A slot for a connection from `ip`, or `None` when it has `limit` open.
    /// IPv4 peers of a dual-stack listener (`::ffff:a.b.c.d`) count as their
    /// IPv4 address.
    pub fn try_open(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let ip = ip.to_canonical();
        if self.limit == 0 {
            return Some(IpSlot { owner: self.clone(), ip });
        }
        let mut open = crate::lock(&self.open);
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        drop(open);
        Some(IpSlot { owner: self.clone(), ip })
    }

    fn close(&self, ip: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut open = crate::lock(&self.open);
        if let Some(n) = open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&ip);
            }
        }
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.owner.close(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_each_address_and_frees_on_drop() {
        let per_ip = PerIp::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let first = per_ip.try_open(a).unwrap();
        let _second = per_ip.try_open(mapped).unwrap();
        assert!(per_ip.try_open(a).is_none(), "a third from the same address");
        assert!(per_ip.try_open(b).is_some(), "another address is not affected");
        drop(first);
        assert!(per_ip.try_open(a).is_some(), "a slot freed by a close");
        assert!(crate::lock(&per_ip.open).get(&b).is_none(), "closed addresses leave the map");
        let off = PerIp::new(0);
        let slots: Vec<_> = (0..100).map(|_| off.try_open(a)).collect();
        assert!(slots.iter().all(Option::is_some));
    }
}
