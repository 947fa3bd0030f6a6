//! The adoption queue: moves of instances to this replica's lease, written to
//! etcd in the background, many per transaction.
//!
//! When a replica dies, every one of its sidecars fails over within a second
//! or two. Writing each move on the heartbeat's own request made the
//! heartbeats wait behind thousands of etcd transactions, past their TTL.
//! Now the heartbeat is answered from memory at once ([`super::ownership`]
//! owns the instance from that moment) and the move waits here. The queue is
//! drained [`BATCH`] moves per transaction, [`IN_FLIGHT`] transactions at a
//! time, at the pace etcd answers; the lease the instances are still on is
//! kept alive until the last of them moved.
//!
//! A key appears at most once: ownership records the instance as adopting
//! before it is queued, and a second heartbeat finds it owned. The queue is
//! therefore bounded by the instances the registry admits; [`CAPACITY`] is a
//! guard on top, past which a move is written on the request as before.

use std::collections::VecDeque;
use std::sync::Mutex;

use trellis_shared::ServiceName;

use super::cache::Cached;
use crate::lock;

/// Moves per etcd transaction: well under etcd's default `--max-txn-ops`
/// (128), and a few tens of kilobytes of request.
pub const BATCH: usize = 64;

/// Transactions in flight at once.
pub const IN_FLIGHT: usize = 4;

/// Moves queued at most.
pub const CAPACITY: usize = 200_000;

/// One instance to move to this replica's lease.
#[derive(Debug, Clone)]
pub struct Adoption {
    pub service: ServiceName,
    pub key: Vec<u8>,
    /// The record as the heartbeat found it: the value to write again, and
    /// the revision (`mod_revision`) and lease (`lease`) it moves from.
    pub seen: Cached,
}

#[derive(Debug, Default)]
pub struct Adoptions {
    queue: Mutex<VecDeque<Adoption>>,
    /// Wakes the drain when the queue was empty.
    pub queued: tokio::sync::Notify,
}

impl Adoptions {
    /// Queues a move; false when the queue is full.
    pub fn push(&self, adoption: Adoption) -> bool {
        let mut q = lock(&self.queue);
        if q.len() >= CAPACITY {
            return false;
        }
        q.push_back(adoption);
        drop(q);
        self.queued.notify_one();
        true
    }

    /// Up to `IN_FLIGHT` batches of up to `BATCH` moves, oldest first.
    pub fn take(&self) -> Vec<Vec<Adoption>> {
        let mut q = lock(&self.queue);
        let n = q.len().min(BATCH * IN_FLIGHT);
        let taken: Vec<Adoption> = q.drain(..n).collect();
        drop(q);
        let mut batches = Vec::new();
        let mut rest = taken.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(BATCH).collect());
        }
        batches
    }

    /// Puts moves that could not be written (etcd out of reach) back at the
    /// front, in their order.
    pub fn retry(&self, moves: Vec<Adoption>) {
        let mut q = lock(&self.queue);
        for m in moves.into_iter().rev() {
            q.push_front(m);
        }
    }

    pub fn len(&self) -> usize {
        lock(&self.queue).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use trellis_shared::{Instance, InstanceId};

    use super::*;

    fn adoption(i: usize) -> Adoption {
        let id = InstanceId::new(format!("i{i}")).unwrap_or_else(|e| panic!("{e}"));
        let instance: Instance = serde_json::from_value(serde_json::json!({
            "id": id, "address": "127.0.0.1", "port": 9000, "weight": 1, "status": "passing",
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        Adoption {
            service: ServiceName::new("api").unwrap_or_else(|e| panic!("{e}")),
            key: format!("k{i}").into_bytes(),
            seen: Cached {
                instance: Arc::new(instance),
                lease: 7,
                ttl: Duration::from_secs(5),
                mod_revision: 1,
            },
        }
    }

    fn keys(batch: &[Adoption]) -> Vec<String> {
        batch.iter().map(|a| String::from_utf8_lossy(&a.key).into_owned()).collect()
    }

    #[test]
    fn drains_in_batches_oldest_first_and_retries_at_the_front() {
        let q = Adoptions::default();
        let n = BATCH * IN_FLIGHT + 3;
        for i in 0..n {
            assert!(q.push(adoption(i)));
        }
        let batches = q.take();
        assert_eq!(batches.len(), IN_FLIGHT);
        assert!(batches.iter().all(|b| b.len() == BATCH));
        assert_eq!(keys(&batches[0])[0], "k0");
        assert_eq!(q.len(), 3);
        // The first batch failed: it goes before what is left, in its order.
        let first = batches.into_iter().next().unwrap_or_default();
        q.retry(first);
        let again = q.take();
        assert_eq!(again.len(), 2);
        assert_eq!(keys(&again[0])[..2], ["k0", "k1"]);
        assert_eq!(keys(&again[1]), [format!("k{}", n - 3), format!("k{}", n - 2), format!("k{}", n - 1)]);
        assert!(q.is_empty() && q.take().is_empty());
    }
}
