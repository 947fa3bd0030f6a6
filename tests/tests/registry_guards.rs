//! Protection from mass expiry against the real server over loopback HTTP:
//! the expiry brake and the per-service protection threshold.

mod registry_support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_support::{start, test_config, Reg};
use serde_json::json;

/// Stops one instance's heartbeat loop.
#[derive(Clone, Default)]
struct StopFlag(Arc<AtomicBool>);

impl StopFlag {
    fn stop(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
    fn stopped(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

// Heartbeats at a fifth of the TTL, so the silent ones' leases run out well
// after the brake can tell (at 0.625 of the window for 80% silent).
const TTL: Duration = Duration::from_secs(2);
const INTERVAL: Duration = Duration::from_millis(400);

/// Registers `n` instances and heartbeats each every 400ms until its flag stops.
async fn fleet(reg: &Reg, n: usize) -> Vec<StopFlag> {
    let mut flags = Vec::new();
    for i in 0..n {
        reg.register("users", &format!("i-{i}"), json!({"address":"10.0.0.1","port":1,"ttl":"2s"})).await;
        let flag = StopFlag::default();
        let (http, url, f) = (
            reg.http.clone(),
            format!("{}/v1/services/users/instances/i-{i}/heartbeat", reg.url),
            flag.clone(),
        );
        tokio::spawn(async move {
            while !f.stopped() {
                let _ = http.put(&url).send().await;
                // The heartbeat interval itself: the rate the brake learns.
                tokio::time::sleep(INTERVAL).await;
            }
        });
        flags.push(flag);
    }
    flags
}

/// Heartbeats per instance before the brake knows the fleet: its rate
/// estimates start at a third of the TTL and settle after about seven (each
/// sample weighs a quarter), and its window (the TTL, five heartbeats) must
/// then fill with the settled rate. About three TTLs at the nominal interval.
const RENEWALS_TO_LEARN: f64 = 15.0;

/// Waits until the registry accepted `RENEWALS_TO_LEARN` heartbeats from each
/// of `n` instances, counted by its own metric.
async fn wait_rates_learnt(reg: &Reg, n: usize) {
    let started = Instant::now();
    let want = RENEWALS_TO_LEARN * n as f64;
    trellis_tests::wait_for(&format!("{want} heartbeats"), Duration::from_secs(60), || async move {
        (reg.metric("trellis_registry_heartbeats_total").await >= want).then_some(())
    })
    .await;
    println!("{want} heartbeats from {n} instances accepted in {:?}", started.elapsed());
}

async fn registered(reg: &Reg) -> usize {
    reg.view("users", "all=true").await.instances.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brake_keeps_instances_when_most_stop_heartbeating() {
    let reg = start(test_config()).await;
    let flags = fleet(&reg, 20).await;
    wait_rates_learnt(&reg, 20).await;
    assert_eq!(registered(&reg).await, 20);
    let stopped_at = Instant::now();
    for f in &flags[..16] {
        f.stop();
    }
    trellis_tests::wait_for("the brake to engage", Duration::from_secs(10), || async {
        (reg.metric("trellis_registry_expiry_brake_engaged").await == 1.0).then_some(())
    })
    .await;
    println!(
        "expiry brake engaged {:?} after 16 of 20 instances went silent (TTL {TTL:?})",
        stopped_at.elapsed()
    );
    // Several TTLs later nothing has been evicted. The silence is the
    // scenario: only its length shows that nothing expires.
    tokio::time::sleep(TTL * 4).await;
    assert_eq!(registered(&reg).await, 20);
    assert_eq!(reg.metric("trellis_registry_expirations_total").await, 0.0);
    assert_eq!(reg.metric("trellis_registry_expiry_brake_held").await, 16.0);
    for f in &flags {
        f.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_brake_off_they_expire() {
    let config = trellis_registry::Config { expiry_brake: false, ..test_config() };
    let reg = start(config).await;
    let flags = fleet(&reg, 20).await;
    wait_rates_learnt(&reg, 20).await;
    let stopped_at = Instant::now();
    for f in &flags[..16] {
        f.stop();
    }
    trellis_tests::wait_for("16 instances to expire", Duration::from_secs(15), || async {
        (registered(&reg).await == 4).then_some(())
    })
    .await;
    let took = stopped_at.elapsed();
    println!("16 silent instances expired {took:?} after their last heartbeat (TTL {TTL:?})");
    assert!(took >= TTL - INTERVAL, "{took:?}");
    assert_eq!(reg.metric("trellis_registry_expiry_brake_engaged").await, 0.0);
    for f in &flags {
        f.stop();
    }
}

#[tokio::test]
async fn one_of_ten_missing_expires_normally() {
    let reg = start(test_config()).await;
    let flags = fleet(&reg, 10).await;
    wait_rates_learnt(&reg, 10).await;
    flags[0].stop();
    trellis_tests::wait_for("the silent instance to expire", Duration::from_secs(15), || async {
        (registered(&reg).await == 9).then_some(())
    })
    .await;
    assert_eq!(reg.metric("trellis_registry_expiry_brake_engaged").await, 0.0);
    for f in &flags {
        f.stop();
    }
}

#[tokio::test]
async fn the_protection_threshold_returns_every_instance_flagged() {
    let config = trellis_registry::Config { protection_threshold: 0.5, ..test_config() };
    let reg = start(config).await;
    for i in 0..4 {
        reg.register("users", &format!("i-{i}"), json!({"address":"10.0.0.1","port":1,"ttl":"1m"})).await;
    }
    reg.heartbeat("users", "i-0", Some(json!({"status":"critical"}))).await;
    let v = reg.view("users", "").await;
    assert_eq!((v.protected, v.instances.len()), (false, 3));
    reg.heartbeat("users", "i-1", Some(json!({"status":"critical"}))).await;
    let v = reg.view("users", "").await;
    assert_eq!((v.protected, v.instances.len()), (true, 4), "2 of 4 healthy is at the threshold");
    let all = reg.get("/v1/services/users?all=true").await;
    assert!(all.body.get("protected").is_none());

    // Off (the default), it changes nothing.
    let reg = start(test_config()).await;
    for i in 0..4 {
        reg.register(
            "users",
            &format!("i-{i}"),
            json!({"address":"10.0.0.1","port":1,"ttl":"1m","status":"critical"}),
        )
        .await;
    }
    let a = reg.get("/v1/services/users").await;
    assert!(a.body.get("protected").is_none());
    assert_eq!(a.view().instances.len(), 0);
}
