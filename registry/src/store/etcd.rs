//! The etcd store: registry replicas share their state through an etcd cluster.
//!
//! Mapping: each instance is the key `<prefix>/instances/<service>/<id>`, whose
//! value is its registration record (JSON), attached to the lease of the
//! replica that owns it: each replica holds one etcd lease per TTL and keeps it
//! alive. etcd grants leases in whole seconds and raises TTLs below its minimum
//! (`ceil(1.5 * election timeout)`, 2 s with etcd's defaults), so that is the
//! effective shortest lease. A heartbeat to the owner renews a deadline in its
//! memory ([`ownership`]) and sends etcd nothing; a change of status is a put.
//! A heartbeat to another replica adopts the instance: that replica answers
//! for it at once, and a queued transaction ([`adoption`]) re-attaches the
//! unchanged record to its lease, so discovery never sees it leave. The owner deletes the key when the deadline passes; when the
//! owner dies, etcd drops its lease one TTL later, by which time live sidecars
//! have moved to another replica and adopted their instances. Each replica
//! follows the prefix with a require-leader watch from the revision of its
//! initial read and serves every read and blocking query from its [`cache`];
//! indexes are etcd revisions and the epoch is the cluster id, so replicas agree
//! on both and a client failing over between them sees no restart.
//!
//! Without quorum a watch goes silent rather than failing, so a health loop also
//! makes a linearizable read every `--etcd-check-interval`; two failures in a
//! row (or a watch that stays down) mark the store stale: reads keep coming from
//! the cache (the API flags them), writes answer `unavailable` at once. The flag
//! clears, and the watch resumes from its last revision, when etcd answers again.
//!
//! etcd may want TLS and its own users: the registry then proves itself with
//! a client certificate and a password, and stops at start when etcd says no
//! (a wrong password, a certificate that does not verify) instead of retrying
//! as it does while etcd is merely out of reach.
//!
//! - [`client`]: etcd's v3 JSON gateway over reqwest.
//! - [`config`]: the TLS and auth flags, and the files they name.
//! - [`tls`]: the rustls client configuration; what a failed handshake means.
//! - [`auth`]: credentials and the token etcd gives for them, kept fresh.
//! - [`setup`]: `registry etcd-setup`, which turns etcd's auth on for the registry.
//! - [`cache`]: the replica's local copy, per-service snapshots and indexes.
//! - [`ownership`]: this replica's leases and the deadlines of the instances it owns.
//! - [`adoption`]: instances that moved here, waiting for their key to follow.
//! - [`cluster_brake`]: the expiry brake across replicas (renewal tallies per replica).

pub mod adoption;
pub mod auth;
pub mod cache;
pub mod client;
pub mod cluster_brake;
pub mod config;
pub mod ownership;
pub mod setup;
pub mod tls;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};
use trellis_shared::backoff::Backoff;
use trellis_shared::{Instance, InstanceId, ServiceName, ServiceSummary};
use url::Url;

use self::adoption::{Adoption, Adoptions};
use self::cache::{encode, Cache, Cached};
use self::client::{EtcdClient, EtcdError, EventType};
use self::cluster_brake::ClusterBrake;
use self::ownership::{Beat, Ownership};
use super::{
    Change, Heartbeat, LeaseState, LeasedInstance, OwnedCount, ServiceSnapshot, Store, StoreError,
    WriteOutcome,
};
use crate::brake::GuardConfig;
use crate::metrics::{EtcdMetrics, StoreMetrics};

/// Tunables of the etcd store.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    pub endpoints: Vec<Url>,
    /// Key prefix, without a trailing slash.
    pub prefix: String,
    /// Bound of one request to one etcd member.
    pub timeout: Duration,
    /// Period of the linearizable read that detects a lost quorum.
    pub check_interval: Duration,
    /// The expiry brake and the protection threshold (`protection_threshold`).
    pub guards: GuardConfig,
    /// Caps on new services and instances, checked against this replica's cache.
    pub caps: crate::store::table::Caps,
    /// TLS and credentials towards etcd.
    pub access: config::EtcdAccess,
}

/// What became of one transaction of queued adoptions.
enum Moved {
    /// Every key is on this replica's lease now.
    All,
    /// A key changed since its heartbeat: nothing was written.
    Changed,
    /// etcd did not answer: nothing was written; try again later.
    Later,
}

/// The shortest pause between two expiry passes of an owner: expiry may be
/// this much late, and a pass costs the same for one due key as for many.
const EXPIRY_PASS: Duration = Duration::from_millis(50);

/// Failed health checks in a row that mark the store stale: one slow read on a
/// busy machine is not an outage.
const STALE_AFTER: u32 = 2;

pub struct EtcdStore {
    client: EtcdClient,
    cache: Cache,
    /// `<prefix>/instances/`.
    instances: Vec<u8>,
    epoch: String,
    settings: EtcdSettings,
    stale: AtomicBool,
    /// When a health read last succeeded with the watch up.
    fresh_at: std::sync::Mutex<tokio::time::Instant>,
    watch_up: AtomicBool,
    failed_checks: AtomicU32,
    metrics: EtcdMetrics,
    store_metrics: StoreMetrics,
    brake: ClusterBrake,
    ownership: Ownership,
    adoptions: Adoptions,
    /// One grant at a time, so concurrent first registrations share one lease.
    granting: tokio::sync::Mutex<()>,
}

fn unavailable(e: EtcdError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn secs(s: i64) -> Duration {
    Duration::from_secs(u64::try_from(s).unwrap_or(0))
}

/// Period of the keep-alives of a replica lease of `granted`: often enough
/// that a lost keep-alive or two never lets it run out.
fn keep_alive_period(granted: Duration) -> Duration {
    (granted / 4).clamp(Duration::from_millis(250), Duration::from_secs(1))
}

/// etcd leases are whole seconds: round up so an instance never lives shorter than asked.
fn lease_secs(ttl: Duration) -> i64 {
    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(secs.max(1)).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Reads the prefix once (which also learns the cluster id, the epoch) and
    /// fills the cache; [`Store::background`] then follows it from there.
    pub async fn connect(
        settings: EtcdSettings,
        metrics: EtcdMetrics,
        store_metrics: StoreMetrics,
    ) -> Result<Self, EtcdError> {
        let client = EtcdClient::new(settings.endpoints.clone(), settings.timeout, &settings.access)?;
        client.login().await?;
        let instances = format!("{}/instances/", settings.prefix).into_bytes();
        let (header, kvs) = client.range_prefix(&instances).await.map_err(|e| match (e, client.user()) {
            (EtcdError::Refused { message, .. }, Some(user)) if message.contains("permission denied") => {
                EtcdError::Auth {
                    user: user.to_string(),
                    message: format!(
                        "permission denied on {}/ (registry etcd-setup grants the user readwrite on the prefix)",
                        settings.prefix
                    ),
                }
            }
            (e, _) => e,
        })?;
        let cache =
            Cache::new(instances.clone(), settings.guards.protection_threshold).with_caps(settings.caps);
        cache.reset(header.revision, &kvs);
        let epoch = format!("etcd-{:016x}", header.cluster_id as u64);
        info!(epoch = %epoch, revision = header.revision, instances = kvs.len(), prefix = %settings.prefix, "etcd store connected");
        Ok(EtcdStore {
            client,
            cache,
            instances,
            epoch,
            stale: AtomicBool::new(false),
            fresh_at: std::sync::Mutex::new(tokio::time::Instant::now()),
            watch_up: AtomicBool::new(false),
            failed_checks: AtomicU32::new(0),
            metrics,
            brake: ClusterBrake::new(settings.guards, store_metrics.clone()),
            store_metrics,
            ownership: Ownership::default(),
            adoptions: Adoptions::default(),
            granting: tokio::sync::Mutex::new(()),
            settings,
        })
    }

    /// Like [`EtcdStore::connect`], retrying with backoff until etcd answers;
    /// an error that retrying cannot mend ([`EtcdError::is_fatal`]: wrong
    /// credentials, a certificate that does not verify) is returned at once.
    pub async fn connect_retrying(
        settings: EtcdSettings,
        metrics: EtcdMetrics,
        store_metrics: StoreMetrics,
    ) -> Result<Self, EtcdError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            match Self::connect(settings.clone(), metrics.clone(), store_metrics.clone()).await {
                Ok(s) => return Ok(s),
                Err(e) if e.is_fatal() => return Err(e),
                Err(e) => {
                    warn!(error = %e, "cannot reach etcd yet; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }

    /// Whether the store answers from a cache it cannot currently refresh.
    pub fn is_stale(&self) -> bool {
        self.stale.load(Ordering::Relaxed)
    }

    pub fn metrics(&self) -> &EtcdMetrics {
        &self.metrics
    }

    fn check_writable(&self) -> Result<(), StoreError> {
        if self.is_stale() {
            return Err(StoreError::Unavailable(
                "etcd has no quorum; the registry serves from its cache".into(),
            ));
        }
        Ok(())
    }

    /// Waits (briefly) for our own write to come back through the watch, so a
    /// read on this replica right after a write sees it.
    async fn settle(&self, revision: i64) {
        let r = u64::try_from(revision).unwrap_or(0);
        if tokio::time::timeout(self.settings.timeout, self.cache.reach(r)).await.is_err() {
            debug!(revision, "write not yet seen by the watch");
        }
    }

    /// The cached instance, or etcd's copy when the cache has not seen it yet
    /// (a registration made through another replica a moment ago).
    async fn find(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<Option<(Cached, u64)>, StoreError> {
        if let Some(found) = self.cache.lookup(service, id) {
            return Ok(Some(found));
        }
        let (_, kv) = self.client.get(&self.cache.key(service, id)).await.map_err(unavailable)?;
        Ok(kv.and_then(|kv| {
            self.cache.decode(&kv).map(|(_, c)| (c, u64::try_from(kv.mod_revision).unwrap_or(0)))
        }))
    }

    /// The key's current record in etcd, past the cache (which may lag).
    async fn fetch(&self, service: &ServiceName, id: &InstanceId) -> Result<Option<Cached>, StoreError> {
        let (_, kv) = self.client.get(&self.cache.key(service, id)).await.map_err(unavailable)?;
        Ok(kv.and_then(|kv| self.cache.decode(&kv).map(|(_, c)| c)))
    }

    /// This replica's lease for `ttl`, granted on first use.
    async fn replica_lease(&self, ttl: Duration) -> Result<i64, StoreError> {
        let want = lease_secs(ttl);
        if let Some(l) = self.ownership.lease(want) {
            return Ok(l);
        }
        let _one = self.granting.lock().await;
        if let Some(l) = self.ownership.lease(want) {
            return Ok(l);
        }
        let (lease, granted) = self.client.grant(want).await.map_err(unavailable)?;
        info!(lease, ttl_secs = granted, "replica lease granted");
        self.ownership.confirm(want, lease, secs(granted), tokio::time::Instant::now());
        Ok(lease)
    }

    /// Writes the instance under this replica's lease, taking ownership: a
    /// plain put, or with `expect`, only while the key is still at that
    /// revision (`Ok(None)` when it is not). A lease etcd no longer has is
    /// replaced by a new one.
    async fn write(
        &self,
        service: &ServiceName,
        cached: &mut Cached,
        expect: Option<i64>,
    ) -> Result<Option<i64>, StoreError> {
        let key = self.cache.key(service, &cached.instance.id);
        let guard = self.ownership.begin_write(&key);
        for _ in 0..2 {
            cached.lease = self.replica_lease(cached.ttl).await?;
            // A lease not confirmed lately may expire with what is put on it:
            // the sidecar goes to a replica that can keep its lease.
            self.check_lease(cached.lease)?;
            let value = encode(service, cached);
            let written = match expect {
                None => self.client.put(&key, &value, cached.lease).await.map(|h| (h, true)),
                Some(rev) => self.client.put_if(&key, rev, &value, cached.lease).await,
            };
            match written {
                Ok((h, true)) => {
                    cached.mod_revision = h.revision;
                    let now = tokio::time::Instant::now();
                    if !self.ownership.claim_written(&guard, cached.ttl, h.revision, now) {
                        debug!(revision = h.revision, "written, but another replica took it over since");
                    }
                    return Ok(Some(h.revision));
                }
                Ok((_, false)) => return Ok(None),
                Err(e) if e.is_not_found() => {
                    warn!(lease = cached.lease, "etcd no longer has this replica's lease; granting another");
                    self.ownership.lost(cached.lease);
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(StoreError::Unavailable("etcd keeps losing this replica's lease".into()))
    }

    /// Like [`EtcdStore::write`] with a plain put: always written or an error.
    async fn put(&self, service: &ServiceName, cached: &mut Cached) -> Result<i64, StoreError> {
        self.write(service, cached, None)
            .await?
            .ok_or_else(|| StoreError::Unavailable("a plain put reported a failed comparison".into()))
    }

    /// Refuses to answer for the instances of a lease this replica could not
    /// keep alive lately: the sidecar then moves to a replica that can, before
    /// etcd drops the keys.
    fn check_lease(&self, lease: i64) -> Result<(), StoreError> {
        if self.ownership.is_fresh(lease, tokio::time::Instant::now()) {
            return Ok(());
        }
        Err(StoreError::Unavailable("this replica cannot keep its etcd lease alive".into()))
    }

    /// A heartbeat for an instance another replica owns (or that moved while
    /// this one wrote): re-attaches its record, with the new status if any, to
    /// this replica's lease if nobody changed it meanwhile. One more try on a
    /// fresh read when someone did.
    async fn adopt(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        mut current: Cached,
        hb: Heartbeat,
    ) -> Result<WriteOutcome, StoreError> {
        let unknown = || StoreError::UnknownInstance { service: service.clone(), id: id.clone() };
        for attempt in 0..2 {
            if attempt > 0 {
                current = self.fetch(service, id).await?.ok_or_else(unknown)?;
            }
            // Before the write, which may wait behind a crowd of others at
            // etcd: the lease it leaves must outlive them all.
            if self.ownership.foster(current.lease, current.ttl, tokio::time::Instant::now()) {
                let _ = self.client.keep_alive(current.lease).await;
            }
            let previous = current.instance.status;
            let status = hb.status.filter(|s| *s != previous);
            let mut next = current.clone();
            if let Some(status) = status {
                let mut updated: Instance = (*current.instance).clone();
                updated.status = status;
                if let Some(o) = &hb.output {
                    updated.output = o.clone();
                }
                next.instance = Arc::new(updated);
            }
            let Some(revision) = self.write(service, &mut next, Some(current.mod_revision)).await? else {
                continue;
            };
            self.brake.renewed(&self.cache.key(service, id), next.ttl);
            if status.is_some() {
                self.settle(revision).await;
                let index = u64::try_from(revision).unwrap_or(0);
                return Ok(WriteOutcome { change: Change::Updated, index, previous_status: Some(previous) });
            }
            debug!(service = %service, instance = %id, from_lease = current.lease, "instance adopted");
            let index = self.cache.index(service);
            return Ok(WriteOutcome { change: Change::Renewed, index, previous_status: Some(previous) });
        }
        Err(StoreError::Unavailable("the instance kept changing under another replica; try again".into()))
    }

    /// Keeps this replica's leases alive until `shutdown`; a lease etcd no
    /// longer has is forgotten (its keys are gone, and the next write grants
    /// another).
    async fn keep_leases(&self, shutdown: &CancellationToken) {
        let mut period = Duration::from_secs(1);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
            }
            period = Duration::from_secs(1);
            // Side by side: one slow answer must not age the other leases
            // towards the point where their heartbeats are refused.
            let renewals = self.ownership.leases().into_iter().map(|(ttl_secs, lease)| async move {
                match self.client.keep_alive(lease).await {
                    Ok(Some(granted)) => {
                        let granted = secs(granted);
                        self.ownership.confirm(ttl_secs, lease, granted, tokio::time::Instant::now());
                        Some(keep_alive_period(granted))
                    }
                    Ok(None) => {
                        warn!(
                            lease,
                            ttl_secs, "this replica's lease expired in etcd; its instances are gone"
                        );
                        self.ownership.lost(lease);
                        None
                    }
                    Err(e) => {
                        debug!(lease, error = %e, "cannot keep the replica lease alive");
                        None
                    }
                }
            });
            for p in futures_util::future::join_all(renewals).await.into_iter().flatten() {
                period = period.min(p);
            }
            let fostered =
                self.ownership.fostered(tokio::time::Instant::now()).into_iter().map(|lease| async move {
                    match self.client.keep_alive(lease).await {
                        Ok(Some(_)) => {}
                        Ok(None) => self.ownership.unfoster(lease),
                        Err(e) => debug!(lease, error = %e, "cannot keep an adopted-from lease alive"),
                    }
                });
            futures_util::future::join_all(fostered).await;
        }
    }

    /// Deletes the owned instances whose deadline passed, unless the brake
    /// holds. Pauses while heartbeats are being refused for etcd's sake (the
    /// store is stale, or a lease of this replica is not confirmed lately),
    /// and restarts every deadline when they are taken again.
    async fn expire(&self, shutdown: &CancellationToken) {
        let mut was_paused = false;
        loop {
            let now = tokio::time::Instant::now();
            if self.is_stale() || !self.ownership.leases_fresh(now) {
                was_paused = true;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            if std::mem::take(&mut was_paused) {
                info!(owned = self.ownership.owned().owned, "etcd is back: deadlines restart from now");
                self.ownership.extend_all(now);
            }
            // At most one pass per EXPIRY_PASS: deadlines are spread over
            // every owned instance, and a pass per deadline would wake the
            // loop thousands of times a second at scale.
            let next = self.ownership.next_deadline().unwrap_or(now + Duration::from_secs(1));
            let next = next.clamp(now + EXPIRY_PASS, now + Duration::from_secs(1));
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.ownership.earlier.notified() => continue,
                _ = tokio::time::sleep_until(next) => {}
            }
            let now = tokio::time::Instant::now();
            if self.is_stale() || !self.ownership.leases_fresh(now) {
                continue;
            }
            let (expired, held) = self.ownership.due(now, self.brake.engaged());
            self.store_metrics.brake_held.set(i64::try_from(held).unwrap_or(i64::MAX));
            if held > 0 {
                debug!(held, "the expiry brake holds owned instances past their deadline");
            }
            futures_util::stream::iter(expired)
                .for_each_concurrent(16, |e| async move {
                    match self.client.delete_if(&e.key, e.mod_revision).await {
                        Ok((_, true)) => {
                            self.store_metrics.expirations.inc();
                            debug!(key = %String::from_utf8_lossy(&e.key), "lease expired; deleted");
                        }
                        // Someone else wrote it since: no longer ours to expire.
                        Ok((_, false)) => self.ownership.forget_if(&e.key, e.mod_revision),
                        Err(err) => {
                            debug!(error = %err, "cannot delete an expired instance; retrying");
                            self.ownership.retry(&e.key, tokio::time::Instant::now());
                        }
                    }
                })
                .await;
        }
    }

    /// Follows the prefix until `shutdown`, reconnecting (to another member when
    /// one fails) from the revision after the last one applied.
    async fn follow(&self, shutdown: &CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        loop {
            let from = i64::try_from(self.cache.revision()).unwrap_or(i64::MAX - 1) + 1;
            let opened = tokio::select! {
                _ = shutdown.cancelled() => return,
                w = self.client.watch(&self.instances, from) => w,
            };
            match opened {
                Ok(mut stream) => loop {
                    let msg = tokio::select! {
                        _ = shutdown.cancelled() => return,
                        m = stream.next() => m,
                    };
                    match msg {
                        Ok(Some(r)) if r.compact_revision > 0 => {
                            warn!(
                                compacted = r.compact_revision,
                                from, "watch fell behind a compaction; re-reading the prefix"
                            );
                            match self.client.range_prefix(&self.instances).await {
                                Ok((h, kvs)) => {
                                    self.cache.reset(h.revision, &kvs);
                                    self.resync_ownership(&kvs);
                                }
                                Err(e) => warn!(error = %e, "cannot re-read the prefix"),
                            }
                            break;
                        }
                        Ok(Some(r)) if r.canceled => {
                            warn!(reason = %r.cancel_reason, endpoint = %stream.endpoint, "etcd cancelled the watch");
                            // A stale token is mended by a new one, not by another member.
                            if !self.client.renew_for_watch(&r.cancel_reason, stream.generation).await {
                                self.client.avoid(&stream.endpoint);
                            }
                            break;
                        }
                        Ok(Some(r)) => {
                            if r.created {
                                backoff.reset();
                                if !self.watch_up.swap(true, Ordering::Relaxed) {
                                    info!(endpoint = %stream.endpoint, from, "watching etcd");
                                }
                            }
                            let mut last = 0;
                            for ev in &r.events {
                                match ev.kind {
                                    EventType::Put => {
                                        if let Some(ttl) = self.cache.apply_put(&ev.kv) {
                                            let now = tokio::time::Instant::now();
                                            let kv = &ev.kv;
                                            self.ownership.observe_put(
                                                &kv.key,
                                                kv.lease,
                                                ttl,
                                                kv.mod_revision,
                                                now,
                                            );
                                        }
                                    }
                                    EventType::Delete => {
                                        self.cache.apply_delete(&ev.kv);
                                        self.ownership.observe_delete(&ev.kv.key, ev.kv.mod_revision);
                                    }
                                }
                                last = last.max(ev.kv.mod_revision);
                            }
                            if last > 0 {
                                self.cache.advance(last);
                            } else if !r.created {
                                // A progress notification: nothing is pending up to here.
                                self.cache.advance(r.header.revision);
                            }
                        }
                        Ok(None) => {
                            warn!(endpoint = %stream.endpoint, "etcd closed the watch");
                            self.client.avoid(&stream.endpoint);
                            break;
                        }
                        Err(e) => {
                            warn!(endpoint = %stream.endpoint, error = %e, "etcd watch failed");
                            self.client.avoid(&stream.endpoint);
                            break;
                        }
                    }
                },
                Err(e) => debug!(error = %e, "cannot open the etcd watch"),
            }
            self.watch_up.store(false, Ordering::Relaxed);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    /// After re-reading the prefix: owns exactly the keys on this replica's leases.
    fn resync_ownership(&self, kvs: &[client::KeyValue]) {
        let now = tokio::time::Instant::now();
        let mine: std::collections::HashSet<&[u8]> =
            kvs.iter().filter(|kv| self.ownership.is_mine(kv.lease)).map(|kv| kv.key.as_slice()).collect();
        self.ownership.retain(|k| mine.contains(k));
        for kv in kvs.iter().filter(|kv| mine.contains(kv.key.as_slice())) {
            if let Some((_, c)) = self.cache.decode(kv) {
                self.ownership.observe_put(&kv.key, kv.lease, c.ttl, kv.mod_revision, now);
            }
        }
    }

    /// A heartbeat without a change of status for `cached`, on another
    /// replica's lease: this replica answers for the instance from now on and
    /// queues the move of its key to its own lease, keeping the lease it is
    /// on alive until then. A full queue writes the move on the request.
    async fn adopt_later(
        &self,
        service: &ServiceName,
        key: Vec<u8>,
        cached: Cached,
        index: u64,
        hb: Heartbeat,
    ) -> Result<WriteOutcome, StoreError> {
        let lease = self.replica_lease(cached.ttl).await?;
        self.check_lease(lease)?;
        let now = tokio::time::Instant::now();
        // At once rather than at the next round: the lease may be close to
        // running out, its owner having died up to a TTL ago.
        if self.ownership.foster(cached.lease, cached.ttl, now) {
            let _ = self.client.keep_alive(cached.lease).await;
        }
        let previous_status = Some(cached.instance.status);
        let ttl = cached.ttl;
        if self.ownership.adopt_later(&key, ttl, cached.mod_revision, cached.lease, now) {
            let adoption = Adoption { service: service.clone(), key: key.clone(), seen: cached.clone() };
            if !self.adoptions.push(adoption) {
                self.ownership.forget_if(&key, cached.mod_revision);
                return self.adopt(service, &cached.instance.id.clone(), cached, hb).await;
            }
        }
        self.brake.renewed(&key, ttl);
        Ok(WriteOutcome { change: Change::Renewed, index, previous_status })
    }

    /// Writes the queued moves until `shutdown`, a few batches at a time;
    /// waits while etcd has no quorum.
    async fn drain_adoptions(&self, shutdown: &CancellationToken) {
        loop {
            if self.adoptions.is_empty() || self.is_stale() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.adoptions.queued.notified(), if !self.is_stale() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let batches = self.adoptions.take();
            let failed: Vec<Vec<Adoption>> =
                futures_util::future::join_all(batches.into_iter().map(|b| self.adopt_batch(b))).await;
            let failed: Vec<Adoption> = failed.into_iter().flatten().collect();
            if !failed.is_empty() {
                self.adoptions.retry(failed);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
            }
        }
    }

    /// Moves `batch` to this replica's leases, in one transaction; returns the
    /// moves to try again later (etcd out of reach). When a comparison fails
    /// (some key changed since its heartbeat: another replica took it, or
    /// its owner wrote it), each move is tried on its own, and those whose
    /// key changed are no longer this replica's.
    async fn adopt_batch(&self, batch: Vec<Adoption>) -> Vec<Adoption> {
        // Those that moved meanwhile (a status write here, a deletion, a
        // move elsewhere) are done with.
        let batch: Vec<Adoption> = batch
            .into_iter()
            .filter(|a| self.ownership.adopting(&a.key) == Some(a.seen.mod_revision))
            .collect();
        match self.write_moves(&batch).await {
            Moved::All => Vec::new(),
            Moved::Changed if batch.len() == 1 => {
                self.not_adopted(&batch[0]);
                Vec::new()
            }
            Moved::Changed => {
                let one_by_one = batch.iter().map(|a| async move {
                    match self.write_moves(std::slice::from_ref(a)).await {
                        Moved::All => None,
                        Moved::Changed => {
                            self.not_adopted(a);
                            None
                        }
                        Moved::Later => Some(a.clone()),
                    }
                });
                futures_util::future::join_all(one_by_one).await.into_iter().flatten().collect()
            }
            Moved::Later => batch,
        }
    }

    /// The key of `a` changed before its move was written: whoever changed it
    /// has it now.
    fn not_adopted(&self, a: &Adoption) {
        self.ownership.forget_if(&a.key, a.seen.mod_revision);
        debug!(key = %String::from_utf8_lossy(&a.key), "changed before its adoption; not ours");
    }

    /// One transaction putting every move's record under this replica's lease
    /// for its TTL, if every key is still at the revision its heartbeat saw.
    async fn write_moves(&self, batch: &[Adoption]) -> Moved {
        if batch.is_empty() {
            return Moved::All;
        }
        let guards: Vec<_> = batch.iter().map(|a| self.ownership.begin_write(&a.key)).collect();
        let mut writes = Vec::with_capacity(batch.len());
        for a in batch {
            let lease = match self.replica_lease(a.seen.ttl).await {
                Ok(l) => l,
                Err(e) => {
                    debug!(error = %e, "cannot get a lease to adopt onto; retrying");
                    return Moved::Later;
                }
            };
            let record = Cached { lease, ..a.seen.clone() };
            writes.push((a.key.as_slice(), a.seen.mod_revision, encode(&a.service, &record), lease));
        }
        match self.client.put_all_if(&writes).await {
            Ok((h, true)) => {
                let now = tokio::time::Instant::now();
                for (a, guard) in batch.iter().zip(&guards) {
                    if !self.ownership.adopted(guard, a.seen.ttl, h.revision, now) {
                        debug!(revision = h.revision, "adopted, but another replica took it over since");
                    }
                    // Instances nobody adopts (their sidecars died too)
                    // expire with it a TTL after the last move.
                    self.ownership.foster(a.seen.lease, a.seen.ttl, now);
                }
                debug!(instances = batch.len(), revision = h.revision, "instances adopted");
                Moved::All
            }
            Ok((_, false)) => Moved::Changed,
            Err(e) if e.is_not_found() => {
                warn!("etcd no longer has a lease this replica adopts onto; granting another");
                for (_, _, _, lease) in &writes {
                    self.ownership.lost(*lease);
                }
                Moved::Later
            }
            Err(e) => {
                debug!(error = %e, moves = batch.len(), "cannot adopt now; retrying");
                Moved::Later
            }
        }
    }

    /// Marks the store stale or fresh from a linearizable read every
    /// `check_interval` and the state of the watch.
    async fn check_quorum(&self, shutdown: &CancellationToken) {
        let mut watch_down = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.settings.check_interval) => {}
            }
            let read = self.client.check(&self.instances).await;
            let failed = match &read {
                Ok(_) => {
                    self.failed_checks.store(0, Ordering::Relaxed);
                    0
                }
                Err(e) => {
                    debug!(error = %e, "etcd health read failed");
                    self.failed_checks.fetch_add(1, Ordering::Relaxed) + 1
                }
            };
            watch_down = if self.watch_up.load(Ordering::Relaxed) { 0 } else { watch_down + 1 };
            if failed == 0 && watch_down == 0 {
                *crate::lock(&self.fresh_at) = tokio::time::Instant::now();
            }
            let stale = failed >= STALE_AFTER || watch_down >= STALE_AFTER;
            if self.stale.swap(stale, Ordering::Relaxed) != stale {
                self.metrics.stale.set(i64::from(stale));
                if stale {
                    let error = read.err().map(|e| e.to_string()).unwrap_or_else(|| "watch down".into());
                    warn!(%error, "etcd unavailable: serving discovery from the cache, refusing writes");
                } else {
                    info!(revision = self.cache.revision(), "etcd available again");
                }
            }
        }
    }
}

impl Store for EtcdStore {
    fn epoch(&self) -> &str {
        &self.epoch
    }

    async fn register(&self, service: &ServiceName, reg: LeasedInstance) -> Result<WriteOutcome, StoreError> {
        self.check_writable()?;
        let id = reg.instance.id.clone();
        let existing = self.find(service, &id).await?;
        if existing.is_none() {
            // Checked against this replica's cache before the write: replicas
            // registering new services at the same instant can overshoot a
            // cap by a few, which is fine for a bound on memory, and a
            // cluster-wide count would cost a consensus round per registration.
            self.cache.admit(service, &id)?;
        }
        let key = self.cache.key(service, &id);
        if let Some((old, index)) = &existing {
            let unchanged = old.instance.same_membership(&reg.instance)
                && old.instance.output == reg.instance.output
                && old.ttl == reg.ttl;
            // A repeated registration to the owner is a renewal: no write.
            if unchanged && self.ownership.is_mine(old.lease) {
                self.check_lease(old.lease)?;
                if self.ownership.renew(&key, tokio::time::Instant::now()).is_some() {
                    self.brake.renewed(&key, old.ttl);
                    debug!(service = %service, instance = %id, "instance re-registered");
                    let previous_status = Some(old.instance.status);
                    return Ok(WriteOutcome { change: Change::Renewed, index: *index, previous_status });
                }
            }
        }
        let moved = existing.as_ref().is_none_or(|(old, _)| !old.instance.same_membership(&reg.instance));
        let mut cached = Cached { instance: Arc::new(reg.instance), lease: 0, ttl: reg.ttl, mod_revision: 0 };
        let revision = self.put(service, &mut cached).await?;
        self.brake.renewed(&key, cached.ttl);
        self.settle(revision).await;
        let (change, index) = match &existing {
            None => (Change::Added, u64::try_from(revision).unwrap_or(0)),
            Some(_) if moved => (Change::Updated, u64::try_from(revision).unwrap_or(0)),
            Some(_) => (Change::Renewed, self.cache.index(service)),
        };
        Ok(WriteOutcome { change, index, previous_status: existing.map(|(c, _)| c.instance.status) })
    }

    /// On the owner: a deadline renewed in memory (and a put only when the
    /// status changes). Elsewhere: an adoption, queued unless the status
    /// changes too.
    async fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        hb: Heartbeat,
    ) -> Result<WriteOutcome, StoreError> {
        self.check_writable()?;
        let unknown = || StoreError::UnknownInstance { service: service.clone(), id: id.clone() };
        let (cached, index) = self.find(service, id).await?.ok_or_else(unknown)?;
        let key = self.cache.key(service, id);
        let now = tokio::time::Instant::now();
        let beat =
            self.ownership.heartbeat(&key, cached.lease, cached.mod_revision, lease_secs(cached.ttl), now);
        let seen = match beat {
            Beat::Renewed(seen) => seen,
            Beat::LeaseStale => {
                return Err(StoreError::Unavailable("this replica cannot keep its etcd lease alive".into()))
            }
            Beat::NotOwned | Beat::NoLease if hb.status.is_some_and(|s| s != cached.instance.status) => {
                return self.adopt(service, id, cached, hb).await
            }
            Beat::NotOwned | Beat::NoLease => return self.adopt_later(service, key, cached, index, hb).await,
        };
        self.brake.renewed(&key, cached.ttl);
        let previous = cached.instance.status;
        let Some(status) = hb.status.filter(|s| *s != previous) else {
            // Output text alone is not worth a consensus write: it travels
            // with the next health change.
            return Ok(WriteOutcome { change: Change::Renewed, index, previous_status: Some(previous) });
        };
        let mut updated: Instance = (*cached.instance).clone();
        updated.status = status;
        if let Some(o) = hb.output.clone() {
            updated.output = o;
        }
        let mut next = Cached { instance: Arc::new(updated), ..cached.clone() };
        let Some(revision) = self.write(service, &mut next, Some(seen)).await? else {
            // Another replica wrote it since (the sidecar moved there while
            // this write waited): its copy is newer than this heartbeat's
            // status, so taking the instance back would flap it.
            return Err(StoreError::Unavailable(
                "the instance moved to another replica meanwhile; send the heartbeat again".into(),
            ));
        };
        self.settle(revision).await;
        let index = u64::try_from(revision).unwrap_or(0);
        Ok(WriteOutcome { change: Change::Updated, index, previous_status: Some(previous) })
    }

    async fn deregister(&self, service: &ServiceName, id: &InstanceId) -> Result<u64, StoreError> {
        self.check_writable()?;
        let key = self.cache.key(service, id);
        let (header, deleted) = self.client.delete(&key).await.map_err(unavailable)?;
        if deleted == 0 {
            return Err(StoreError::UnknownInstance { service: service.clone(), id: id.clone() });
        }
        self.ownership.forget(&key);
        self.settle(header.revision).await;
        Ok(u64::try_from(header.revision).unwrap_or(0))
    }

    fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        self.cache.snapshot(service)
    }

    fn list(&self) -> Vec<ServiceSummary> {
        self.cache.list()
    }

    fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>> {
        self.cache.snapshots()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.cache.changes()
    }

    fn replica(&self) -> Option<&str> {
        Some(self.brake.replica())
    }

    fn owned(&self) -> Option<OwnedCount> {
        Some(self.ownership.owned())
    }

    /// The owner knows each instance's last heartbeat; other replicas do not
    /// (heartbeats never reach etcd), so they show the TTL alone.
    async fn leases(&self, service: &ServiceName) -> Vec<LeaseState> {
        let now = tokio::time::Instant::now();
        self.cache
            .members(service)
            .into_iter()
            .map(|(id, cached)| {
                let owned = self.ownership.lease_of(&self.cache.key(service, &id), now);
                LeaseState {
                    id,
                    ttl: cached.ttl,
                    since_renewal: owned.map(|o| o.since_renewal),
                    left: owned.map(|o| o.left),
                    held: owned.is_some_and(|o| o.held),
                }
            })
            .collect()
    }

    fn stale(&self) -> bool {
        self.is_stale()
    }

    fn last_contact(&self) -> Duration {
        if self.is_stale() {
            crate::lock(&self.fresh_at).elapsed()
        } else {
            Duration::ZERO
        }
    }

    fn catalog(&self) -> (u64, Vec<Arc<ServiceSnapshot>>) {
        self.cache.catalog()
    }

    async fn watch_catalog_from(&self, index: u64) -> u64 {
        self.cache.watch_catalog_from(index).await
    }

    fn reached(&self, index: u64) -> bool {
        self.cache.revision() >= index
    }

    /// Waits for the cache to reach `index` first: see [`Cache::watch_from`].
    async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        self.cache.watch_from(service, index).await
    }

    async fn background(self: Arc<Self>, shutdown: CancellationToken) {
        let brake = self.brake.run(
            &self.client,
            &self.cache,
            &self.settings.prefix,
            || self.is_stale(),
            |k| self.ownership.owns(k),
            &shutdown,
        );
        tokio::join!(
            self.follow(&shutdown),
            self.check_quorum(&shutdown),
            brake,
            self.keep_leases(&shutdown),
            self.expire(&shutdown),
            self.drain_adoptions(&shutdown),
            self.client.refresh_token(&shutdown)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_round_up_to_whole_seconds() {
        assert_eq!(lease_secs(Duration::from_millis(1500)), 2);
        assert_eq!(lease_secs(Duration::from_secs(5)), 5);
        assert_eq!(lease_secs(Duration::from_millis(10)), 1);
    }
}
