//! Case 4's failover at scale: two registry replicas on one etcd, every
//! instance registered through (so owned by) the first and heartbeating
//! through it, the second named as the fallback, as a sidecar's
//! `--registry A,B` does. The first is killed with SIGKILL; each heartbeat
//! then fails over to the second, which answers for the instance at once and
//! queues the move of its key to its own lease (written in batches).
//! Measured: how long until the second answers for them all and until every
//! key is on its lease, the fewest instances discovery showed meanwhile, and
//! the instances lost (heartbeats answered `unknown_instance`, which a
//! sidecar would answer by registering again).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::heartbeat_load::{heartbeats, register_all, register_with_ttl, Fleet};
use super::registry::{start_etcd, start_replicas};
use super::Sizes;
use crate::http1::{request, Conn, Dial};
use crate::peers::Env;

/// The sidecar's default TTL: the dead replica's lease runs out this long
/// after its last keep-alive.
const TTL_SECS: u64 = 5;
/// How often the survivor's `/v1/status` is read during the move.
const POLL: Duration = Duration::from_millis(50);
/// How long the run goes on after the kill: past the dead replica's lease and
/// past the fostering of it, so a loss would show.
const AFTER_KILL: Duration = Duration::from_secs(4 * TTL_SECS);

pub struct Rehome {
    pub instances: usize,
    /// From the kill until the survivor answered for every instance.
    pub answered: Option<Duration>,
    /// From the kill until every instance's key was on the survivor's lease.
    pub rehomed: Option<Duration>,
    /// The fewest instances the survivor's discovery held after the kill.
    pub fewest: usize,
    /// Instances the survivor held at the end of the run.
    pub at_end: usize,
    /// Heartbeats answered 404 (`unknown_instance`): instances lost.
    pub unknown: u64,
    /// Heartbeats that got no 2xx (the dead replica's refused connections
    /// included; each is sent again to the other replica next second).
    pub failed: u64,
}

/// A replica's `/v1/status`, in part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Status {
    /// Instances it answers heartbeats for.
    owned: usize,
    /// Of those, the ones whose key has yet to move to its lease.
    adopting: usize,
    /// Instances in its discovery.
    instances: usize,
}

async fn status(conn: &mut Conn) -> Option<Status> {
    let code = conn.roundtrip(&request("GET", "/v1/status", "")).await.ok()?;
    let v: serde_json::Value = serde_json::from_slice(conn.body()).ok().filter(|_| code == 200)?;
    let count = |field: &str| v[field].as_u64().map(|n| n as usize);
    Some(Status { owned: count("owned")?, adopting: count("adopting")?, instances: count("instances")? })
}

pub fn measure(env: &Env, sizes: &Sizes) -> Result<Rehome, String> {
    let n = sizes.rehome_instances;
    let services = (n / 100).max(1);
    let (_etcd, _data, etcd_addr) = start_etcd(env, "rehome-etcd")?;
    let mut replicas = start_replicas(env, etcd_addr, ["rehome-registry-1", "rehome-registry-2"])?;
    let (a, b) = (replicas[0].1, replicas[1].1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let fleet = Arc::new(Fleet::new(n, services));
        // A long TTL for the burst, then heartbeats, then the sidecar's TTL
        // (a registration again, under the replica's 5 s lease) while they go.
        register_all(&Dial::Plain, a, fleet.clone()).await.map_err(|e| format!("registering: {e}"))?;
        let reqs = Arc::new(fleet.heartbeat_requests());
        // Until the fleet is settled on the short TTL; then stopped, and the
        // measured run takes over the same schedule.
        let far = Instant::now() + Duration::from_secs(3600);
        let warmup = tokio::spawn(heartbeats(Dial::Plain, vec![a, b], reqs.clone(), (far, far, far)));
        register_with_ttl(&Dial::Plain, a, fleet.clone(), (0, 1), TTL_SECS)
            .await
            .map_err(|e| format!("registering with a {TTL_SECS} s TTL: {e}"))?;
        let mut on_a = Conn::connect(a).await.map_err(|e| e.to_string())?;
        let settled = Instant::now() + Duration::from_secs(30);
        let all = Status { owned: n, adopting: 0, instances: n };
        while status(&mut on_a).await != Some(all) {
            if Instant::now() > settled {
                return Err(format!(
                    "replica 1 never owned all {n} instances: {:?}",
                    status(&mut on_a).await
                ));
            }
            tokio::time::sleep(POLL).await;
        }
        let start = Instant::now();
        let kill_at = start + Duration::from_secs(2);
        let stop = kill_at + AFTER_KILL;
        let run = tokio::spawn(heartbeats(Dial::Plain, vec![a, b], reqs, (start, stop, stop)));
        warmup.abort();
        let _ = warmup.await;
        let mut on_b = Conn::connect(b).await.map_err(|e| e.to_string())?;
        tokio::time::sleep_until(kill_at.into()).await;
        replicas[0].0.kill9();
        let killed = Instant::now();
        let (mut answered, mut rehomed, mut fewest, mut at_end) = (None, None, n, 0);
        while Instant::now() < stop {
            if let Some(s) = status(&mut on_b).await {
                fewest = fewest.min(s.instances);
                at_end = s.instances;
                if s.owned == n && answered.is_none() {
                    answered = Some(killed.elapsed());
                }
                if s.owned == n && s.adopting == 0 && rehomed.is_none() {
                    rehomed = Some(killed.elapsed());
                }
            }
            tokio::time::sleep(POLL).await;
        }
        let stats = run.await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Rehome {
            instances: n,
            answered,
            rehomed,
            fewest,
            at_end,
            unknown: stats.unknown,
            failed: stats.failed,
        })
    })
}

/// The section's table.
pub fn report(b: &mut String, r: &Rehome) {
    let _ = writeln!(
        b,
        "\n**Failover at scale.** Two replicas on one etcd, all three on core 0; {} instances registered through \
         replica 1 (which owns them) with the sidecar's {TTL_SECS} s TTL, heartbeating once a second through it with \
         replica 2 as the fallback. Replica 1 is killed with SIGKILL; each heartbeat that finds it gone goes to \
         replica 2, which answers for the instance at once and queues the move of its key to its own lease \
         (written {} moves per etcd transaction), keeping replica 1's lease alive until the last has moved. \
         Replica 2's `/v1/status` is read every {} ms for {} s after the kill.\n",
        r.instances,
        trellis_registry::store::etcd::adoption::BATCH,
        POLL.as_millis(),
        AFTER_KILL.as_secs()
    );
    let _ = writeln!(
        b,
        "| instances | all answered by replica 2 after | all on its lease after | fewest in discovery after the kill | in discovery at the end | heartbeats answered unknown (instances lost) | heartbeats without a 2xx |"
    );
    let _ = writeln!(b, "|---:|---:|---:|---:|---:|---:|---:|");
    let within = |d: Option<Duration>| {
        d.map_or("not within the run".to_string(), |d| format!("{:.2} s", d.as_secs_f64()))
    };
    let _ = writeln!(
        b,
        "| {} | {} | {} | {} | {} | {} | {} |",
        r.instances,
        within(r.answered),
        within(r.rehomed),
        r.fewest,
        r.at_end,
        r.unknown,
        r.failed
    );
}
