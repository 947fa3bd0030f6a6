//! What one replica owns: its leases and the deadlines of its instances.
//!
//! An instance's key is attached to the lease of the replica that serves its
//! heartbeats, one lease per TTL, so ownership needs no record of its own:
//! a replica owns the keys on its leases. Heartbeats to the owner renew a
//! deadline here, in memory, and etcd hears nothing; the owner deletes the key
//! when the deadline passes. The watch tells a replica when a key moved to
//! another replica's lease, and it forgets the deadline.
//!
//! Deadlines sit in an [`ExpiryQueue`], as in the memory store: a renewal only
//! moves the deadline, and a due entry is checked against it before it counts.
//!
//! An instance whose sidecar moved here from another replica is owned at once,
//! in memory, while the write that moves its key to this replica's lease waits
//! in the adoption queue ([`super::adoption`]): it is *adopting* until then,
//! and the lease it comes from is kept alive meanwhile.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::expiry::ExpiryQueue;
use crate::lock;
use crate::store::OwnedCount;

/// How long a replica lease stays usable after its last confirmed keep-alive,
/// as a fraction of its TTL: past it, heartbeats are refused so that sidecars
/// move to a replica that can keep its lease, before etcd drops the keys.
const FRESH_FRACTION: u32 = 2;

/// One of this replica's leases.
#[derive(Debug, Clone, Copy)]
struct ReplicaLease {
    id: i64,
    /// As etcd granted it (it raises TTLs below its minimum).
    granted: Duration,
    confirmed: Instant,
}

#[derive(Debug)]
struct Entry {
    deadline: Instant,
    ttl: Duration,
    /// The key's revision as of this replica's last write or sighting: expiry
    /// and status writes compare against it.
    mod_revision: i64,
    /// Passed its deadline and kept by the brake.
    held: bool,
    /// When its one live queue entry falls due; other entries are left over.
    queued: Option<Instant>,
    /// Still on this other replica's lease: its move here is queued.
    adopting_from: Option<i64>,
}

/// Writes of one key under way on this replica, and the latest revision at
/// which the watch saw the key leave it meanwhile (deleted, or put on another
/// replica's lease).
#[derive(Debug, Default)]
struct Pending {
    writes: u32,
    left_at: i64,
}

#[derive(Debug, Default)]
struct Inner {
    /// By TTL in whole seconds.
    leases: HashMap<i64, ReplicaLease>,
    owned: HashMap<Vec<u8>, Entry>,
    queue: ExpiryQueue<Vec<u8>>,
    /// Only keys with a write in flight: a write that lands at a revision the
    /// watch has already seen superseded must not bring ownership back.
    pending: HashMap<Vec<u8>, Pending>,
    /// Other replicas' leases this one keeps alive, until when: those it
    /// adopted instances from lately (see [`Ownership::foster`]).
    fostered: HashMap<i64, Instant>,
    /// Owned instances still adopting, by the lease they are still on.
    adopting: HashMap<i64, usize>,
}

impl ReplicaLease {
    fn is_fresh(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.confirmed) < self.granted / FRESH_FRACTION
    }
}

impl Inner {
    fn is_mine(&self, lease: i64) -> bool {
        lease != 0 && self.leases.values().any(|l| l.id == lease)
    }

    /// Stops counting `from` as a lease an owned instance is still on.
    fn adopted_from(&mut self, from: Option<i64>) {
        let Some(from) = from else { return };
        if let Some(n) = self.adopting.get_mut(&from) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.adopting.remove(&from);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) {
        if let Some(o) = self.owned.remove(key) {
            self.adopted_from(o.adopting_from);
        }
    }

    /// The watch saw `key` leave this replica at `revision`.
    fn left(&mut self, key: &[u8], revision: i64) {
        if let Some(p) = self.pending.get_mut(key) {
            p.left_at = p.left_at.max(revision);
        }
        if self.owned.get(key).is_some_and(|o| o.mod_revision <= revision) {
            self.remove(key);
        }
    }

    /// Queues `key` for `at` unless it is already queued no later; true when
    /// `at` became the earliest deadline.
    fn schedule(&mut self, key: &[u8], at: Instant) -> bool {
        let Some(o) = self.owned.get_mut(key) else { return false };
        if o.queued.is_some_and(|q| q <= at) {
            return false;
        }
        o.queued = Some(at);
        self.queue.push(at, key.to_vec())
    }
}

/// A key whose deadline passed, to delete if it is still at `mod_revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expired {
    pub key: Vec<u8>,
    pub mod_revision: i64,
}

/// What a heartbeat finds in this replica's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// Owned: the deadline moved; the revision the owner last saw, which a
    /// status write compares against.
    Renewed(i64),
    /// Another replica's, or not known here yet.
    NotOwned,
    /// Owned by the cache's account, but this replica has no lease for its
    /// TTL (etcd dropped it).
    NoLease,
    /// Owned, but its lease was not confirmed lately: answering would risk a
    /// key etcd is about to drop.
    LeaseStale,
}

/// An owned instance's lease, for the dashboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnedLease {
    pub since_renewal: Duration,
    pub left: Duration,
    pub held: bool,
}

/// A write of one key under way; dropping it (also when the request is
/// cancelled) ends it.
#[derive(Debug)]
pub struct WriteGuard<'a> {
    ownership: &'a Ownership,
    key: Vec<u8>,
}

impl Drop for WriteGuard<'_> {
    fn drop(&mut self) {
        self.ownership.end_write(&self.key);
    }
}

#[derive(Debug, Default)]
pub struct Ownership {
    inner: Mutex<Inner>,
    /// Wakes the expiry task when a deadline earlier than its timer was queued.
    pub earlier: tokio::sync::Notify,
}

impl Ownership {
    /// This replica's lease for TTLs of `secs` seconds, if it has one.
    pub fn lease(&self, secs: i64) -> Option<i64> {
        lock(&self.inner).leases.get(&secs).map(|l| l.id)
    }

    /// Records a lease granted (or confirmed by a keep-alive) at `now`.
    pub fn confirm(&self, secs: i64, id: i64, granted: Duration, now: Instant) {
        lock(&self.inner).leases.insert(secs, ReplicaLease { id, granted, confirmed: now });
    }

    /// Forgets a lease etcd no longer has (it expired: its keys are gone).
    pub fn lost(&self, id: i64) {
        lock(&self.inner).leases.retain(|_, l| l.id != id);
    }

    /// Every lease: TTL in seconds and id.
    pub fn leases(&self) -> Vec<(i64, i64)> {
        lock(&self.inner).leases.iter().map(|(s, l)| (*s, l.id)).collect()
    }

    pub fn is_mine(&self, lease: i64) -> bool {
        lock(&self.inner).is_mine(lease)
    }

    /// Whether `lease` was confirmed recently enough to answer for its keys.
    pub fn is_fresh(&self, lease: i64, now: Instant) -> bool {
        lock(&self.inner).leases.values().find(|l| l.id == lease).is_some_and(|l| l.is_fresh(now))
    }

    /// A heartbeat of `key`, cached on `lease` at `mod_revision` with a TTL
    /// of `ttl_secs`: renews its deadline if this replica owns it. Owned means
    /// on one of its leases, or written or adopted here as of a revision at
    /// least the cache's (the watch has not caught up with that write yet).
    pub fn heartbeat(&self, key: &[u8], lease: i64, mod_revision: i64, ttl_secs: i64, now: Instant) -> Beat {
        let mut inner = lock(&self.inner);
        let mine =
            inner.is_mine(lease) || inner.owned.get(key).is_some_and(|o| o.mod_revision >= mod_revision);
        if !mine {
            return Beat::NotOwned;
        }
        match inner.leases.get(&ttl_secs) {
            None => return Beat::NoLease,
            Some(l) if !l.is_fresh(now) => return Beat::LeaseStale,
            Some(_) => {}
        }
        let Some(o) = inner.owned.get_mut(key) else { return Beat::NotOwned };
        o.deadline = now + o.ttl;
        o.held = false;
        Beat::Renewed(o.mod_revision)
    }

    /// A heartbeat of `key`, which is on `from`, another replica's lease, at
    /// `mod_revision`: this replica owns it from now on, with a deadline one
    /// `ttl` away, and its move here is to be queued. True when it was not
    /// owned yet (the caller queues the move); false when a concurrent
    /// heartbeat got here first (only the deadline moved).
    pub fn adopt_later(&self, key: &[u8], ttl: Duration, mod_revision: i64, from: i64, now: Instant) -> bool {
        let mut inner = lock(&self.inner);
        let deadline = now + ttl;
        if let Some(o) = inner.owned.get_mut(key) {
            o.deadline = o.deadline.max(deadline);
            o.held = false;
            return false;
        }
        let entry =
            Entry { deadline, ttl, mod_revision, held: false, queued: None, adopting_from: Some(from) };
        inner.owned.insert(key.to_vec(), entry);
        *inner.adopting.entry(from).or_default() += 1;
        if inner.schedule(key, deadline) {
            self.earlier.notify_one();
        }
        true
    }

    /// The revision `key` is to be moved from, while it is still adopting
    /// here; `None` once it moved, was written here meanwhile, or left.
    pub fn adopting(&self, key: &[u8]) -> Option<i64> {
        lock(&self.inner).owned.get(key).filter(|o| o.adopting_from.is_some()).map(|o| o.mod_revision)
    }

    /// The queued move `guard` stands for landed at `mod_revision`: the key
    /// is on this replica's lease now, and its deadline (set by its
    /// heartbeats meanwhile) stays. False, and the key is not claimed, when
    /// the watch saw it leave at a later revision.
    pub fn adopted(&self, guard: &WriteGuard<'_>, ttl: Duration, mod_revision: i64, now: Instant) -> bool {
        let mut inner = lock(&self.inner);
        if inner.pending.get(&guard.key).is_some_and(|p| p.left_at > mod_revision) {
            return false;
        }
        match inner.owned.get_mut(&guard.key) {
            Some(o) => {
                o.mod_revision = o.mod_revision.max(mod_revision);
                let from = o.adopting_from.take();
                inner.adopted_from(from);
            }
            None => {
                drop(inner);
                self.claim(&guard.key, ttl, mod_revision, now);
            }
        }
        true
    }

    /// A heartbeat of `key`: when this replica owns it, moves its deadline and
    /// returns the revision the owner last saw; `None` when it does not own it.
    pub fn renew(&self, key: &[u8], now: Instant) -> Option<i64> {
        let mut inner = lock(&self.inner);
        let o = inner.owned.get_mut(key)?;
        o.deadline = now + o.ttl;
        o.held = false;
        Some(o.mod_revision)
    }

    /// A write of `key` under this replica's lease begins; the guard ends it.
    pub fn begin_write(&self, key: &[u8]) -> WriteGuard<'_> {
        lock(&self.inner).pending.entry(key.to_vec()).or_default().writes += 1;
        WriteGuard { ownership: self, key: key.to_vec() }
    }

    /// The write `guard` stands for landed at `mod_revision`: this replica
    /// owns the key, unless the watch has meanwhile seen it leave at a later
    /// revision (another replica adopted it, or it was deleted). Returns
    /// whether it claimed.
    pub fn claim_written(
        &self,
        guard: &WriteGuard<'_>,
        ttl: Duration,
        mod_revision: i64,
        now: Instant,
    ) -> bool {
        let left_at = lock(&self.inner).pending.get(&guard.key).map_or(0, |p| p.left_at);
        if left_at > mod_revision {
            return false;
        }
        self.claim(&guard.key, ttl, mod_revision, now);
        true
    }

    fn end_write(&self, key: &[u8]) {
        let mut inner = lock(&self.inner);
        if let Some(p) = inner.pending.get_mut(key) {
            p.writes = p.writes.saturating_sub(1);
            if p.writes == 0 {
                inner.pending.remove(key);
            }
        }
    }

    /// This replica wrote `key` under its lease at `mod_revision`: it owns it,
    /// with a deadline one TTL from `now`.
    pub fn claim(&self, key: &[u8], ttl: Duration, mod_revision: i64, now: Instant) {
        let deadline = now + ttl;
        let mut inner = lock(&self.inner);
        match inner.owned.get_mut(key) {
            Some(o) => {
                o.deadline = deadline;
                o.ttl = ttl;
                o.mod_revision = o.mod_revision.max(mod_revision);
                o.held = false;
                let from = o.adopting_from.take();
                inner.adopted_from(from);
            }
            None => {
                let o = Entry { deadline, ttl, mod_revision, held: false, queued: None, adopting_from: None };
                inner.owned.insert(key.to_vec(), o);
            }
        }
        if inner.schedule(key, deadline) {
            self.earlier.notify_one();
        }
    }

    /// The watch saw `key` written at `mod_revision` under `lease`. On one of
    /// this replica's leases: it owns the key (an instance it did not know of
    /// gets a full TTL). On another's: it moved, and is forgotten, unless this
    /// replica's own write is newer than the event.
    pub fn observe_put(&self, key: &[u8], lease: i64, ttl: Duration, mod_revision: i64, now: Instant) {
        let mut inner = lock(&self.inner);
        if inner.is_mine(lease) {
            match inner.owned.get_mut(key) {
                Some(o) => o.mod_revision = o.mod_revision.max(mod_revision),
                None => {
                    drop(inner);
                    self.claim(key, ttl, mod_revision, now);
                }
            }
        } else {
            inner.left(key, mod_revision);
        }
    }

    /// The watch saw `key` deleted at `mod_revision`.
    pub fn observe_delete(&self, key: &[u8], mod_revision: i64) {
        lock(&self.inner).left(key, mod_revision);
    }

    /// Keeps only the owned keys `present` still holds under one of this
    /// replica's leases (after re-reading the prefix).
    pub fn retain(&self, mut present: impl FnMut(&[u8]) -> bool) {
        let mut inner = lock(&self.inner);
        let gone: Vec<Vec<u8>> = inner.owned.keys().filter(|k| !present(k)).cloned().collect();
        for key in gone {
            inner.remove(&key);
        }
    }

    pub fn owns(&self, key: &[u8]) -> bool {
        lock(&self.inner).owned.contains_key(key)
    }

    pub fn owned(&self) -> OwnedCount {
        let inner = lock(&self.inner);
        let adopting = inner.adopting.values().sum::<usize>();
        OwnedCount { owned: inner.owned.len().saturating_sub(adopting), adopting }
    }

    /// The earliest deadline queued.
    pub fn next_deadline(&self) -> Option<Instant> {
        lock(&self.inner).queue.next_deadline()
    }

    /// The owned keys whose deadline passed by `now`. With `hold` (the brake
    /// holds expiry) they are kept, marked held, and looked at again a second
    /// later; the count of held instances comes back with them.
    pub fn due(&self, now: Instant, hold: bool) -> (Vec<Expired>, usize) {
        let mut inner = lock(&self.inner);
        let inner = &mut *inner;
        let mut expired = Vec::new();
        let mut again = Vec::new();
        while let Some((at, key)) = inner.queue.pop_due(now) {
            let Some(o) = inner.owned.get_mut(&key) else { continue };
            if o.queued != Some(at) {
                continue;
            }
            o.queued = None;
            if o.deadline > now {
                again.push((o.deadline, key));
            } else if hold {
                o.held = true;
                again.push((now + Duration::from_secs(1), key));
            } else {
                expired.push(Expired { mod_revision: o.mod_revision, key });
            }
        }
        for (at, key) in again {
            inner.schedule(&key, at);
        }
        // Without the brake nothing stays held past this pass (each held key
        // was due, and is now expired or renewed), so the count, a walk over
        // every owned key, is only taken while it holds.
        let held = if hold { inner.owned.values().filter(|o| o.held).count() } else { 0 };
        (expired, held)
    }

    /// The owner could not delete `key` (etcd out of reach): look again in a second.
    pub fn retry(&self, key: &[u8], now: Instant) {
        lock(&self.inner).schedule(key, now + Duration::from_secs(1));
    }

    /// Forgets `key` (deregistered).
    pub fn forget(&self, key: &[u8]) {
        lock(&self.inner).remove(key);
    }

    /// Forgets `key` if this replica still knows it at `mod_revision`: its
    /// expiry was refused because someone else wrote it since. A write of its
    /// own in the meantime (a late heartbeat's status change) keeps it owned.
    pub fn forget_if(&self, key: &[u8], mod_revision: i64) {
        let mut inner = lock(&self.inner);
        if inner.owned.get(key).is_some_and(|o| o.mod_revision == mod_revision) {
            inner.remove(key);
        }
    }

    /// An instance was adopted from `lease`, another replica's. If that
    /// replica died, its other instances' sidecars are failing over too, and
    /// each adoption is one etcd transaction: at thousands of instances they
    /// could take longer than the lease has left, and the keys not yet
    /// adopted would vanish from discovery although their sidecars are alive.
    /// So the adopter keeps that lease alive for one `ttl` past the latest
    /// adoption from it; instances nobody adopts (their sidecars died too)
    /// then expire with it, that much later.
    ///
    /// Returns true when `lease` was not fostered yet: the caller keeps it
    /// alive at once rather than at the next round, since etcd may be slow to
    /// answer the adoptions themselves.
    pub fn foster(&self, lease: i64, ttl: Duration, now: Instant) -> bool {
        let mut inner = lock(&self.inner);
        if lease == 0 || inner.is_mine(lease) {
            return false;
        }
        let new = !inner.fostered.contains_key(&lease);
        let until = inner.fostered.entry(lease).or_insert(now);
        *until = (*until).max(now + ttl);
        new
    }

    /// The leases to keep alive for others at `now`: those adopted from in
    /// the last TTL, and those owned instances are still on while their
    /// move waits in the queue, however long that takes. The others are
    /// dropped.
    pub fn fostered(&self, now: Instant) -> Vec<i64> {
        let mut inner = lock(&self.inner);
        inner.fostered.retain(|_, until| *until > now);
        let mut leases: Vec<i64> = inner.fostered.keys().chain(inner.adopting.keys()).copied().collect();
        leases.sort_unstable();
        leases.dedup();
        leases
    }

    /// Stops keeping `lease` alive for others (etcd no longer has it).
    pub fn unfoster(&self, lease: i64) {
        lock(&self.inner).fostered.remove(&lease);
    }

    /// Whether every lease of this replica was confirmed recently enough to
    /// answer for its keys. While one is not, heartbeats to it are refused, so
    /// its instances must not be expired for missing them.
    pub fn leases_fresh(&self, now: Instant) -> bool {
        lock(&self.inner).leases.values().all(|l| l.is_fresh(now))
    }

    /// Restarts every owned deadline from `now` (quorum came back: heartbeats
    /// were refused meanwhile, as etcd extends leases after an election).
    pub fn extend_all(&self, now: Instant) {
        let mut inner = lock(&self.inner);
        for o in inner.owned.values_mut() {
            o.deadline = o.deadline.max(now + o.ttl);
        }
    }

    /// The state of an owned instance's lease at `now`.
    pub fn lease_of(&self, key: &[u8], now: Instant) -> Option<OwnedLease> {
        let inner = lock(&self.inner);
        let o = inner.owned.get(key)?;
        let left = o.deadline.saturating_duration_since(now);
        Some(OwnedLease { since_renewal: o.ttl.saturating_sub(left), left, held: o.held })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(5);

    fn owning(lease: i64) -> Ownership {
        let o = Ownership::default();
        o.confirm(5, lease, TTL, Instant::now());
        o
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeats_move_the_deadline_and_silence_expires() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(o.renew(b"k", Instant::now()), Some(10));
            assert_eq!(o.due(Instant::now(), false).0, vec![]);
        }
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![]);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![Expired { key: b"k".to_vec(), mod_revision: 10 }]);
        assert_eq!(o.renew(b"other", Instant::now()), None, "not owned");
    }

    #[tokio::test(start_paused = true)]
    async fn the_brake_holds_expiry_until_it_releases() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        tokio::time::advance(TTL * 2).await;
        let (expired, held) = o.due(Instant::now(), true);
        assert_eq!((expired.len(), held), (0, 1));
        assert_eq!(o.lease_of(b"k", Instant::now()).map(|l| l.held), Some(true));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(o.due(Instant::now(), false).0.len(), 1, "released: expires at the next look");
    }

    #[tokio::test(start_paused = true)]
    async fn an_instance_moved_to_another_replica_is_forgotten() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        // An event older than our own write changes nothing.
        o.observe_put(b"k", 2, TTL, 9, Instant::now());
        assert!(o.owns(b"k"));
        // Another replica adopted it.
        o.observe_put(b"k", 2, TTL, 11, Instant::now());
        assert!(!o.owns(b"k"));
        tokio::time::advance(TTL * 2).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![], "never deleted by its old owner");
        // Seen on one of our leases (registered here before a restart of the watch): owned.
        o.observe_put(b"j", 1, TTL, 12, Instant::now());
        assert!(o.owns(b"j"));
        o.observe_delete(b"j", 13);
        assert!(!o.owns(b"j"));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_go_stale_at_half_their_ttl() {
        let o = owning(1);
        assert!(o.is_fresh(1, Instant::now()));
        assert!(!o.is_fresh(2, Instant::now()), "not ours");
        tokio::time::advance(Duration::from_millis(2499)).await;
        assert!(o.is_fresh(1, Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!o.is_fresh(1, Instant::now()));
        o.confirm(5, 1, TTL, Instant::now());
        assert!(o.is_fresh(1, Instant::now()));
        o.lost(1);
        assert_eq!(o.lease(5), None);
    }

    #[tokio::test(start_paused = true)]
    async fn quorum_back_restarts_the_deadlines() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        tokio::time::advance(TTL * 3).await;
        o.extend_all(Instant::now());
        assert_eq!(o.due(Instant::now(), false).0, vec![]);
        tokio::time::advance(TTL).await;
        assert_eq!(o.due(Instant::now(), false).0.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_the_watch_saw_superseded_does_not_bring_ownership_back() {
        let o = owning(1);
        // Adopting at 20 while another replica adopts at 21 and its event
        // arrives first: this replica must not think it owns the key.
        let guard = o.begin_write(b"k");
        o.observe_put(b"k", 2, TTL, 21, Instant::now());
        assert!(!o.claim_written(&guard, TTL, 20, Instant::now()));
        assert!(!o.owns(b"k"));
        drop(guard);
        // With no competing event the write claims it, and the bookkeeping
        // of writes in flight is gone once the guard is.
        let guard = o.begin_write(b"k");
        assert!(o.claim_written(&guard, TTL, 22, Instant::now()));
        drop(guard);
        assert!(o.owns(b"k"));
        assert!(lock(&o.inner).pending.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_expiry_forgets_only_the_revision_it_tried() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        tokio::time::advance(TTL).await;
        let (expired, _) = o.due(Instant::now(), false);
        assert_eq!(expired, vec![Expired { key: b"k".to_vec(), mod_revision: 10 }]);
        // A late heartbeat's status change lands (revision 11) before the
        // delete comparing 10 is refused: the key stays owned, with a deadline.
        o.claim(b"k", TTL, 11, Instant::now());
        o.forget_if(b"k", 10);
        assert!(o.owns(b"k"));
        // Seen by the cache on another replica's lease at 11: ours (the watch
        // is behind our write); at 12: someone wrote it after us.
        o.confirm(5, 1, TTL, Instant::now());
        assert_eq!(o.heartbeat(b"k", 2, 11, 5, Instant::now()), Beat::Renewed(11));
        assert_eq!(o.heartbeat(b"k", 2, 12, 5, Instant::now()), Beat::NotOwned);
        tokio::time::advance(TTL).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![Expired { key: b"k".to_vec(), mod_revision: 11 }]);
        o.forget_if(b"k", 11);
        assert!(!o.owns(b"k"));
    }

    #[tokio::test(start_paused = true)]
    async fn leases_are_fresh_for_half_their_ttl_after_a_keep_alive() {
        let o = owning(1);
        assert!(o.leases_fresh(Instant::now()));
        tokio::time::advance(TTL / 2 - Duration::from_millis(1)).await;
        assert!(o.leases_fresh(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!o.leases_fresh(Instant::now()), "expiry pauses: heartbeats are being refused");
        o.confirm(5, 1, TTL, Instant::now());
        assert!(o.leases_fresh(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopted_from_lease_is_kept_alive_one_ttl_past_the_last_adoption() {
        let o = owning(1);
        assert!(!o.foster(1, TTL, Instant::now()));
        assert!(!o.foster(0, TTL, Instant::now()));
        assert!(o.fostered(Instant::now()).is_empty(), "never its own lease, nor none");
        assert!(o.foster(7, TTL, Instant::now()), "new");
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!o.foster(7, TTL, Instant::now()), "extended");
        tokio::time::advance(TTL - Duration::from_millis(1)).await;
        assert_eq!(o.fostered(Instant::now()), vec![7], "renewed by the later adoption");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(o.fostered(Instant::now()).is_empty());
        o.foster(8, TTL, Instant::now());
        o.unfoster(8);
        assert!(o.fostered(Instant::now()).is_empty());
    }
    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_finds_owned_stale_and_foreign_instances() {
        let o = owning(1);
        o.claim(b"k", TTL, 10, Instant::now());
        assert_eq!(o.heartbeat(b"k", 1, 10, 5, Instant::now()), Beat::Renewed(10));
        assert_eq!(o.heartbeat(b"j", 2, 10, 5, Instant::now()), Beat::NotOwned);
        assert_eq!(o.heartbeat(b"k", 1, 10, 7, Instant::now()), Beat::NoLease, "no lease for a 7 s TTL");
        tokio::time::advance(TTL / 2).await;
        assert_eq!(o.heartbeat(b"k", 1, 10, 5, Instant::now()), Beat::LeaseStale);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopting_instance_is_answered_here_and_its_lease_kept_until_it_moved() {
        let o = owning(1);
        assert!(o.adopt_later(b"k", TTL, 10, 7, Instant::now()), "queued once");
        assert!(!o.adopt_later(b"k", TTL, 10, 7, Instant::now()), "a second heartbeat queues nothing");
        assert_eq!(o.owned(), OwnedCount { owned: 0, adopting: 1 });
        assert_eq!(o.adopting(b"k"), Some(10));
        // Its next heartbeats are renewals in memory, though the cache still
        // shows it on lease 7.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(o.heartbeat(b"k", 7, 10, 5, Instant::now()), Beat::Renewed(10));
        // The queue is slow: the lease it is on is kept alive however long
        // the move waits.
        tokio::time::advance(TTL * 3).await;
        o.renew(b"k", Instant::now());
        assert_eq!(o.fostered(Instant::now()), vec![7]);
        let guard = o.begin_write(b"k");
        assert!(o.adopted(&guard, TTL, 20, Instant::now()));
        drop(guard);
        assert_eq!(o.owned(), OwnedCount { owned: 1, adopting: 0 });
        assert_eq!(o.adopting(b"k"), None);
        assert!(o.fostered(Instant::now()).is_empty(), "moved, and nothing was fostered by time");
        // The deadline set by the last heartbeat stays: no extra TTL for the move.
        tokio::time::advance(TTL).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![Expired { key: b"k".to_vec(), mod_revision: 20 }]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_adopting_instance_taken_by_another_replica_is_let_go() {
        let o = owning(1);
        o.adopt_later(b"k", TTL, 10, 7, Instant::now());
        let guard = o.begin_write(b"k");
        // Another replica moved it at 21 and the watch said so before our
        // move's answer (at 20) came back.
        o.observe_put(b"k", 2, TTL, 21, Instant::now());
        assert!(!o.adopted(&guard, TTL, 20, Instant::now()));
        drop(guard);
        assert!(!o.owns(b"k"));
        assert_eq!(o.owned(), OwnedCount::default());
        assert!(o.fostered(Instant::now()).is_empty());
        // One that stops heartbeating before its move expires from the
        // revision it was seen at, like any owned instance.
        o.adopt_later(b"j", TTL, 30, 7, Instant::now());
        tokio::time::advance(TTL).await;
        assert_eq!(o.due(Instant::now(), false).0, vec![Expired { key: b"j".to_vec(), mod_revision: 30 }]);
        o.observe_delete(b"j", 31);
        assert_eq!(o.owned(), OwnedCount::default());
    }
}
