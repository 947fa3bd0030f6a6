//! The expiry brake on the etcd store: stop heartbeats from 80% of 20 instances at
//! once and the cluster-wide expiry brake engages on every replica and nothing is
//! evicted; with the brake off they expire; one instance of three, and one of
//! ten, missing their heartbeats expire normally.
//!
//! The test drives instances itself (register, then a heartbeat every second
//! through one of two replicas, alternating, so the decision must combine both
//! replicas' tallies).
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-tests --bins`.

mod etcd_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_support::*;
use trellis_tests::wait_for;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const HEARTBEAT: Duration = Duration::from_secs(1);

/// Registered instances with heartbeat loops that can be silenced one by one.
struct Fleet {
    silenced: Vec<Arc<AtomicBool>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Fleet {
    async fn start(replicas: &[String], service: &str, n: usize, ttl: &str) -> Fleet {
        let http = http();
        let mut silenced = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..n {
            let base = replicas[i % replicas.len()].clone();
            let id = format!("i{i:02}");
            let (status, code) = register(&http, &base, service, &id, 9000 + i as u16, ttl).await;
            assert_eq!(status, 200, "register {id}: {code}");
            let stop = Arc::new(AtomicBool::new(false));
            let url = format!("{base}/v1/services/{service}/instances/{id}/heartbeat");
            let (http, flag) = (http.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                while !flag.load(Ordering::Relaxed) {
                    let _ = http.put(&url).send().await;
                    // The heartbeat interval itself: the rate the brake learns.
                    tokio::time::sleep(HEARTBEAT).await;
                }
            }));
            silenced.push(stop);
        }
        Fleet { silenced, tasks }
    }

    fn silence(&self, range: std::ops::Range<usize>) {
        for s in &self.silenced[range] {
            s.store(true, Ordering::Relaxed);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// An unlabelled metric of a replica.
async fn metric(base: &str, name: &str) -> Option<f64> {
    let text = http().get(format!("{base}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn brake_engaged(base: &str) -> Option<bool> {
    metric(base, "trellis_registry_expiry_brake_engaged").await.map(|v| v == 1.0)
}

/// Waits until fresh replicas together accepted `each` heartbeats per
/// instance of `n` (their `heartbeats_total`, summed): the renewals the
/// brake's rate estimates and window are learnt from.
async fn wait_renewals(replicas: &[String], n: usize, each: usize) {
    let started = Instant::now();
    let want = (n * each) as f64;
    wait_for(&format!("{want} heartbeats"), Duration::from_secs(120), || async move {
        let mut sum = 0.0;
        for base in replicas {
            sum += metric(base, "trellis_registry_heartbeats_total").await?;
        }
        (sum >= want).then_some(sum)
    })
    .await;
    println!("{each} heartbeats from each of {n} instances accepted in {:?}", started.elapsed());
}

async fn count(base: &str, service: &str) -> usize {
    match discover(&http(), base, service).await {
        Some((v, _)) => ids(&v).len(),
        None => usize::MAX,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brake_holds_when_most_heartbeats_stop() {
    let _serial = SERIAL.lock().await;
    let Some(bin) = etcd_or_skip("the_brake_holds_when_most_heartbeats_stop") else { return };
    let etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/brake-on");
    // A threshold of 70% (default 50%, unit-tested) decides sooner after the
    // silence begins, keeping this test far from etcd's own expiry on a busy machine.
    let r1 = Replica::start_with("registry-1", &store, &["--brake-threshold", "0.7"]).await;
    let r2 = Replica::start_with("registry-2", &store, &["--brake-threshold", "0.7"]).await;
    let replicas = [r1.url(), r2.url()];

    // A TTL long enough that the brake (window = the longest TTL) decides well
    // before etcd would expire the silent leases.
    let fleet = Fleet::start(&replicas, "mass", 20, "20s").await;
    // Heartbeat-rate estimates start at a third of the TTL and settle over a
    // window's worth of heartbeats (the window is the 20s TTL).
    wait_renewals(&replicas, 20, 20).await;
    for base in &replicas {
        assert_eq!(brake_engaged(base).await, Some(false), "no brake while everyone renews");
    }
    fleet.silence(0..16);
    let silenced = Instant::now();
    for base in &replicas {
        wait_for("the brake to engage", Duration::from_secs(60), || async {
            (brake_engaged(base).await == Some(true)).then_some(())
        })
        .await;
    }
    let engaged = silenced.elapsed();
    // Well past the 20s TTL of the silent instances: nothing was evicted. The
    // silence is the scenario: only its length shows that nothing expires.
    tokio::time::sleep(Duration::from_secs(30).saturating_sub(silenced.elapsed())).await;
    for base in &replicas {
        assert_eq!(count(base, "mass").await, 20, "the brake keeps every instance on {base}");
    }
    println!(
        "16 of 20 silenced: brake engaged on both replicas {:.1}s later; all 20 still registered {:.1}s after (TTL 20s)",
        engaged.as_secs_f64(),
        silenced.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_brake_or_with_few_missing_instances_expire() {
    let _serial = SERIAL.lock().await;
    let Some(bin) = etcd_or_skip("without_the_brake_or_with_few_missing_instances_expire") else { return };
    let etcd = Etcd::start(bin, 3).await;

    // Brake off: 16 of 20 silent instances expire.
    let off = etcd.store_flag("/brake-off");
    let r1 = Replica::start_with("registry-off-1", &off, &["--expiry-brake", "false"]).await;
    let r2 = Replica::start_with("registry-off-2", &off, &["--expiry-brake", "false"]).await;
    let replicas = [r1.url(), r2.url()];
    let fleet = Fleet::start(&replicas, "mass", 20, "3s").await;
    // Every instance renewing before the silence, as in the brake-on case.
    wait_renewals(&replicas, 20, 4).await;
    fleet.silence(0..16);
    let silenced = Instant::now();
    for base in &replicas {
        wait_for("16 silent instances to expire", Duration::from_secs(30), || async {
            (count(base, "mass").await == 4).then_some(())
        })
        .await;
    }
    println!(
        "brake off: 16 of 20 expired {:.1}s after going silent (TTL 3s)",
        silenced.elapsed().as_secs_f64()
    );
    drop(fleet);

    // Brake on (default): one of ten, and one of three, missing expire normally.
    let on = etcd.store_flag("/brake-few");
    let r3 = Replica::start("registry-on-1", &on).await;
    let r4 = Replica::start("registry-on-2", &on).await;
    let replicas = [r3.url(), r4.url()];
    let ten = Fleet::start(&replicas, "ten", 10, "3s").await;
    let three = Fleet::start(&replicas, "three", 3, "3s").await;
    // The rates learnt over a window (the 3s TTL) of renewals from all 13.
    wait_renewals(&replicas, 13, 4).await;
    ten.silence(0..1);
    three.silence(0..1);
    let silenced = Instant::now();
    for base in &replicas {
        wait_for("one of ten and one of three to expire", Duration::from_secs(30), || async {
            (count(base, "ten").await == 9 && count(base, "three").await == 2).then_some(())
        })
        .await;
        assert_eq!(brake_engaged(base).await, Some(false));
    }
    println!(
        "brake on: one of ten and one of three expired {:.1}s after going silent (TTL 3s)",
        silenced.elapsed().as_secs_f64()
    );
}
