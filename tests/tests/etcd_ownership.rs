//! Heartbeats kept in replica memory, instances on replica leases.
//!
//! A fleet of simulated sidecars (each its own `RegistryClient` given both
//! replica URLs, registering once and heartbeating every second with a 5 s
//! TTL, as the sidecar does) keeps most of its instances on one replica.
//! Killing that replica under client load, or freezing it (SIGSTOP) for
//! longer than its lease, fails no request, drops no instance from discovery,
//! moves no service index, and every instance is re-homed on the other replica
//! (its lease page there shows the last heartbeat) well within one TTL; the
//! frozen one, thawed, lets go of what moved and takes nothing back. etcd losing a member changes nothing; losing quorum flags
//! discovery stale and refuses heartbeats, and when quorum returns no
//! instance expires for the heartbeats refused meanwhile.
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-sidecar -p trellis-tests --bins`.

mod etcd_support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_support::*;
use serde_json::{json, Value};
use trellis_shared::client::{ClientConfig, RegistryClient};
use trellis_shared::types::{HeartbeatRequest, RegisterRequest};
use trellis_shared::{InstanceId, ServiceName};
use trellis_tests::wait_for;

const FLEET: &str = "fleet";
const SERVICE: &str = "api";

/// Simulated sidecars: register, then heartbeat every second; an
/// `unknown_instance` answer makes one register again, as the sidecar does.
struct Fleet {
    stop: Arc<AtomicBool>,
    failed: Arc<Mutex<Vec<String>>>,
    reregistered: Arc<AtomicU64>,
    /// Per instance: when its last heartbeat succeeded.
    last_ok: Arc<Mutex<Vec<Option<Instant>>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    /// `n` instances `i0..`, instance `i` given the URL lists `lists[i % lists.len()]`.
    async fn start(n: usize, lists: &[String]) -> Fleet {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let reregistered = Arc::new(AtomicU64::new(0));
        let last_ok = Arc::new(Mutex::new(vec![None; n]));
        let service = ServiceName::new(FLEET).unwrap();
        let req: RegisterRequest =
            serde_json::from_value(json!({"address": "127.0.0.1", "port": 9000, "ttl": "5s"})).unwrap();
        let mut tasks = Vec::new();
        for i in 0..n {
            let urls = trellis_shared::client::parse_urls(&lists[i % lists.len()]).unwrap();
            let client = RegistryClient::new(urls, ClientConfig::default()).unwrap();
            let id = InstanceId::new(format!("i{i}")).unwrap();
            client.register(&service, &id, &req).await.expect("registration");
            let (stop, failed, reregistered, last_ok) =
                (stop.clone(), failed.clone(), reregistered.clone(), last_ok.clone());
            let (service, req) = (service.clone(), req.clone());
            tasks.push(tokio::spawn(async move {
                // Spread over the second, as independent sidecars are.
                tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 1000)).await;
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    match client.heartbeat(&service, &id, &HeartbeatRequest::default()).await {
                        Ok(()) => last_ok.lock().unwrap()[i] = Some(Instant::now()),
                        Err(e) if e.is_unknown_instance() => {
                            reregistered.fetch_add(1, Ordering::Relaxed);
                            if let Err(e) = client.register(&service, &id, &req).await {
                                failed.lock().unwrap().push(format!("{id} register: {e}"));
                            }
                        }
                        Err(e) => failed.lock().unwrap().push(format!("{id} heartbeat: {e}")),
                    }
                }
            }));
        }
        Fleet { stop, failed, reregistered, last_ok, tasks }
    }

    fn failures(&self) -> Vec<String> {
        self.failed.lock().unwrap().clone()
    }

    /// Instances whose last successful heartbeat came after `t`.
    fn renewed_since(&self, t: Instant) -> usize {
        self.last_ok.lock().unwrap().iter().filter(|l| l.is_some_and(|l| l > t)).count()
    }

    async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// The fleet as one replica shows it: instance ids and the service's index.
async fn fleet_view(http: &reqwest::Client, base: &str) -> Option<(Vec<String>, u64, bool)> {
    let r = http.get(format!("{base}/v1/services/{FLEET}")).send().await.ok()?;
    let index = r.headers().get("x-trellis-index")?.to_str().ok()?.parse().ok()?;
    let stale = r.headers().get("x-trellis-stale").is_some_and(|v| v == "true");
    let v: Value = r.json().await.ok()?;
    Some((ids(&v), index, stale))
}

/// How many instances of the fleet `base` owns: its lease page knows their last heartbeat.
async fn owned_by(http: &reqwest::Client, base: &str) -> Option<usize> {
    let v: Value =
        http.get(format!("{base}/v1/services/{FLEET}/leases")).send().await.ok()?.json().await.ok()?;
    Some(v["leases"].as_array()?.iter().filter(|l| l["since_renewal_ms"].is_u64()).count())
}

/// Instances `base` answers for whose key has yet to move to its lease.
async fn adopting(http: &reqwest::Client, base: &str) -> Option<u64> {
    let v: Value = http.get(format!("{base}/v1/status")).send().await.ok()?.json().await.ok()?;
    v["adopting"].as_u64()
}

/// Watches a replica's view of the fleet every 20 ms: the fewest instances,
/// the indexes seen, how many looks, and how many views showed an instance twice.
struct Watcher {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, Vec<u64>, u64, u64)>,
}

impl Watcher {
    fn start(base: String) -> Watcher {
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let stop = stop.clone();
            tokio::spawn(async move {
                let http = http();
                let (mut fewest, mut indexes, mut looks, mut doubled) = (usize::MAX, Vec::new(), 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    if let Some((ids, index, _)) = fleet_view(&http, &base).await {
                        fewest = fewest.min(ids.len());
                        let distinct: std::collections::HashSet<&String> = ids.iter().collect();
                        if distinct.len() != ids.len() {
                            doubled += 1;
                        }
                        if indexes.last() != Some(&index) {
                            indexes.push(index);
                        }
                        looks += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                (fewest, indexes, looks, doubled)
            })
        };
        Watcher { stop, task }
    }

    async fn stop(self) -> (usize, Vec<u64>, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap()
    }
}

/// How the owner of most instances fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OwnerFailure {
    /// SIGKILL: connections are refused at once.
    Killed,
    /// SIGSTOP for this long, then SIGCONT: requests hang until the
    /// sidecars' 2 s timeout, and its etcd lease runs out meanwhile.
    Frozen(Duration),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_that_owns_most_instances_loses_none() {
    let Some(bin) = etcd_or_skip("killing_the_replica_that_owns_most_instances_loses_none") else { return };
    owner_fails(bin, OwnerFailure::Killed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezing_the_replica_that_owns_most_instances_loses_none() {
    let Some(bin) = etcd_or_skip("freezing_the_replica_that_owns_most_instances_loses_none") else { return };
    // Twice the 5 s TTL: its lease is gone in etcd when it thaws.
    owner_fails(bin, OwnerFailure::Frozen(Duration::from_secs(10))).await;
}

async fn owner_fails(bin: std::path::PathBuf, how: OwnerFailure) {
    const N: usize = 200;
    let etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/ownership");
    let mut first = Replica::start("registry-1", &store).await;
    let second = Replica::start("registry-2", &store).await;
    let (a, b) = (first.url(), second.url());
    let http = http();

    // Client traffic through real sidecars, as in the failover test.
    let registries = format!("{a},{b}");
    let _x = Backend::start("x", SERVICE, &registries).await;
    let _y = Backend::start("y", SERVICE, &registries).await;
    let client =
        Sidecar::start("client-sidecar", &registries, &strings(&["--upstream-service", SERVICE])).await;
    client.wait_endpoints(SERVICE, &["x", "y"], Duration::from_secs(30)).await;
    let load = Load::start(client.outbound, SERVICE);

    // Four of five instances stick to the first replica.
    let lists =
        [registries.clone(), registries.clone(), registries.clone(), registries.clone(), format!("{b},{a}")];
    let fleet = Fleet::start(N, &lists).await;
    let started = Instant::now();
    wait_for("every instance heartbeating", Duration::from_secs(30), || async {
        (fleet.renewed_since(started) == N).then_some(())
    })
    .await;
    let (owned_a, owned_b) = (owned_by(&http, &a).await.unwrap(), owned_by(&http, &b).await.unwrap());
    println!("before the kill: replica 1 owns {owned_a}, replica 2 owns {owned_b}");
    assert_eq!((owned_a, owned_b), (N * 4 / 5, N / 5), "ownership follows the replica each sidecar uses");
    let (ids_before, index_before, _) = fleet_view(&http, &b).await.unwrap();
    assert_eq!(ids_before.len(), N);
    load.wait_more(50, Duration::from_secs(30)).await;
    let watcher = Watcher::start(b.clone());

    match how {
        OwnerFailure::Killed => first.proc.kill9(),
        OwnerFailure::Frozen(_) => first.proc.signal(libc::SIGSTOP),
    }
    let killed = Instant::now();
    // Answered by replica 2 at once, and on its lease once the queued moves
    // are written.
    let answered = wait_for("every instance answered by replica 2", Duration::from_secs(30), || async {
        (owned_by(&http, &b).await? == N).then(|| killed.elapsed())
    })
    .await;
    let rehomed = wait_for("every instance on replica 2's lease", Duration::from_secs(30), || async {
        (adopting(&http, &b).await? == 0).then(|| killed.elapsed())
    })
    .await;
    // Past the dead replica's lease (5 s): nothing it held is lost.
    let past_lease = Duration::from_secs(8);
    let thawed = match how {
        OwnerFailure::Killed => {
            tokio::time::sleep(past_lease).await;
            None
        }
        OwnerFailure::Frozen(frozen) => {
            tokio::time::sleep_until((killed + frozen.max(past_lease)).into()).await;
            first.proc.signal(libc::SIGCONT);
            let thawed = Instant::now();
            // Thawed, it learns from its watch that every instance moved (and
            // that its lease is gone): it lets them go and deletes none.
            let let_go = wait_for("the thawed replica to let go", Duration::from_secs(30), || async {
                (owned_by(&http, &a).await? == 0).then(|| thawed.elapsed())
            })
            .await;
            let (ids, _, stale) = fleet_view(&http, &a).await.expect("the thawed replica answers");
            assert_eq!((ids.len(), stale), (N, false), "the thawed replica's discovery");
            // A few heartbeats later, still nothing taken back or lost.
            tokio::time::sleep(Duration::from_secs(3)).await;
            Some(let_go)
        }
    };
    let (fewest, indexes, looks, doubled) = watcher.stop().await;
    let (ids_after, index_after, stale) = fleet_view(&http, &b).await.unwrap();
    let (ok, failures) = load.stop().await;
    let heartbeat_failures = fleet.failures();
    let reregistered = fleet.reregistered.load(Ordering::Relaxed);
    let renewed = fleet.renewed_since(killed + Duration::from_secs(6));
    fleet.stop().await;
    if let Some(let_go) = thawed {
        println!("the frozen replica, thawed, owned nothing any more after {:.2}s", let_go.as_secs_f64());
        assert_eq!(owned_by(&http, &a).await, Some(0), "the thawed replica took instances back");
    }
    println!(
        "owner {how:?}: {owned_a} of {N} instances answered by replica 2 after {:.2}s, on its lease after \
         {:.2}s; discovery on replica 2 looked at {looks} times showed at least {fewest} of {N} ({doubled} \
         views with an instance twice), indexes {indexes:?}; {} heartbeats failed, {reregistered} re-registrations; client requests {ok} ok, {} failed",
        answered.as_secs_f64(),
        rehomed.as_secs_f64(),
        heartbeat_failures.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed client requests: {failures:?}");
    assert!(heartbeat_failures.is_empty(), "failed heartbeats: {heartbeat_failures:?}");
    assert_eq!(reregistered, 0, "no instance may be lost and registered again");
    assert_eq!(fewest, N, "an instance disappeared from discovery during the move");
    assert_eq!(doubled, 0, "an instance was shown twice during the move");
    assert_eq!(indexes, vec![index_before], "re-homing must not move the service's index");
    assert_eq!((ids_after, index_after, stale), (ids_before, index_before, false));
    assert_eq!(renewed, N, "every instance keeps heartbeating after the move");
    // Within one TTL of the sidecars reaching replica 2: at once when the
    // owner refuses connections, after their 2 s request timeout when it hangs.
    let reached = if how == OwnerFailure::Killed { Duration::ZERO } else { Duration::from_secs(2) };
    assert!(rehomed < reached + Duration::from_secs(5), "re-homing must finish within one TTL: {rehomed:?}");
    // The dead replica's tally went with it and the adopter counts what it
    // took over: the move must not look like heartbeats stopping.
    // Nor, thawed, may the frozen replica's first tally count the time it
    // did not run as renewals missed.
    for replica in [&second, &first] {
        assert!(
            !replica.proc.log_text().contains("expiry brake engaged"),
            "the failover tripped the brake:\n{}",
            replica.proc.log_tail()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_minority_and_quorum_loss_with_owned_instances() {
    let Some(bin) = etcd_or_skip("etcd_minority_and_quorum_loss_with_owned_instances") else { return };
    const N: usize = 20;
    let mut etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/owned-quorum");
    let r1 = Replica::start("registry-1", &store).await;
    let r2 = Replica::start("registry-2", &store).await;
    let replicas = [r1.url(), r2.url()];
    let http = http();
    let fleet = Fleet::start(
        N,
        &[format!("{},{}", replicas[0], replicas[1]), format!("{},{}", replicas[1], replicas[0])],
    )
    .await;
    let started = Instant::now();
    wait_for("every instance heartbeating", Duration::from_secs(30), || async {
        (fleet.renewed_since(started) == N).then_some(())
    })
    .await;
    let owned: Vec<usize> = futures_util::future::join_all(replicas.iter().map(|r| owned_by(&http, r)))
        .await
        .into_iter()
        .map(Option::unwrap)
        .collect();
    assert_eq!(owned, [N / 2, N / 2], "each replica owns the instances that heartbeat to it");

    // One member down (the one every replica talks to first): nothing visible.
    etcd.kill(0);
    let one_down = Instant::now();
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert!(fleet.failures().is_empty(), "heartbeats failed with one member down: {:?}", fleet.failures());
    assert_eq!(fleet.renewed_since(one_down + Duration::from_secs(5)), N);
    for url in &replicas {
        let (ids, _, stale) = fleet_view(&http, url).await.unwrap();
        assert_eq!((ids.len(), stale), (N, false), "via {url}");
    }

    // Two down: no quorum. Discovery stale with every instance, heartbeats refused.
    etcd.kill(1);
    let lost = Instant::now();
    for url in &replicas {
        wait_for("discovery flagged stale", Duration::from_secs(60), || async {
            let (ids, _, stale) = fleet_view(&http, url).await?;
            (stale && ids.len() == N).then_some(())
        })
        .await;
    }
    let detected = lost.elapsed();
    // Longer than the TTL: every deadline in the owners' memory is past.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let refused = fleet.failures().len();
    assert!(refused > 0, "heartbeats must be refused without quorum");
    for url in &replicas {
        let (ids, _, stale) = fleet_view(&http, url).await.unwrap();
        assert_eq!((ids.len(), stale), (N, true), "via {url}");
    }

    // Quorum back: nothing expires for the heartbeats refused meanwhile.
    etcd.restart(1);
    etcd.restart(0);
    let restored = Instant::now();
    etcd.wait_healthy(Duration::from_secs(60)).await;
    for url in &replicas {
        wait_for("fresh again", Duration::from_secs(60), || async {
            let (_, _, stale) = fleet_view(&http, url).await?;
            (!stale).then_some(())
        })
        .await;
    }
    let fresh = restored.elapsed();
    let after = Instant::now();
    let watchers: Vec<Watcher> = replicas.iter().map(|r| Watcher::start(r.clone())).collect();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut fewest = Vec::new();
    for w in watchers {
        fewest.push(w.stop().await.0);
    }
    let reregistered = fleet.reregistered.load(Ordering::Relaxed);
    let renewed = fleet.renewed_since(after + Duration::from_secs(5));
    let owned: Vec<usize> = futures_util::future::join_all(replicas.iter().map(|r| owned_by(&http, r)))
        .await
        .into_iter()
        .map(Option::unwrap)
        .collect();
    fleet.stop().await;
    println!(
        "quorum lost: stale after {:.1}s, {refused} heartbeats refused; back: fresh after {:.1}s, fewest \
         instances seen per replica {fewest:?}, {reregistered} re-registrations, owned {owned:?}",
        detected.as_secs_f64(),
        fresh.as_secs_f64()
    );
    assert_eq!(fewest, [N, N], "an instance expired after quorum came back");
    assert_eq!(reregistered, 0, "no instance may be lost and registered again");
    assert_eq!(renewed, N, "every instance heartbeats again");
    assert_eq!(owned.iter().sum::<usize>(), N, "every instance has exactly one owner: {owned:?}");
}
