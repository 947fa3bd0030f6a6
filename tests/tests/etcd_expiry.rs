//! Expiry on the etcd store: a lease expires in etcd, and every replica's watchers see
//! the instance leave soon after etcd deletes its key. Measured from etcd's own
//! delete event (seen through a watch this test opens on etcd), not from the
//! nominal deadline: etcd checks leases on its own cadence.
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-tests --bins`.

mod etcd_support;

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use etcd_support::*;
use serde_json::{json, Value};
use tokio::time::Instant;

const SERVICE: &str = "expiring";

/// Waits for the DELETE of `key` on etcd's JSON gateway watch; returns when it arrived.
async fn etcd_delete_event(member: String, key: String) -> Instant {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = json!({"create_request": {"key": B64.encode(&key)}});
    let mut resp = http.post(format!("{member}/v3/watch")).json(&body).send().await.expect("etcd watch");
    let mut buf = Vec::new();
    loop {
        let chunk = resp.chunk().await.expect("watch stream").expect("watch stream ended");
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let v: Value = serde_json::from_slice(&line).unwrap_or(Value::Null);
            let deleted =
                v["result"]["events"].as_array().is_some_and(|evs| evs.iter().any(|e| e["type"] == "DELETE"));
            if deleted {
                return Instant::now();
            }
        }
    }
}

/// Follows the service with blocking queries until `id` is gone; returns when.
async fn gone_from(base: String, id: &'static str) -> Instant {
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(60)).build().unwrap();
    let mut index = 0u64;
    loop {
        let url = format!("{base}/v1/services/{SERVICE}?index={index}&wait=30s");
        let Ok(r) = http.get(&url).send().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if index > 0 && !ids(&v).iter().any(|i| i == id) {
            return Instant::now();
        }
        index = v["index"].as_u64().unwrap_or(0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_reaches_every_replicas_watchers() {
    let Some(bin) = etcd_or_skip("lease_expiry_reaches_every_replicas_watchers") else { return };
    let etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/expiry");
    let r1 = Replica::start("registry-1", &store).await;
    let r2 = Replica::start("registry-2", &store).await;
    let http = http();

    let (status, code) = register(&http, &r1.url(), SERVICE, "keeper", 9000, "60s").await;
    assert_eq!(status, 200, "{code}");
    let (status, code) = register(&http, &r1.url(), SERVICE, "x", 9001, "2s").await;
    let registered = Instant::now();
    assert_eq!(status, 200, "{code}");

    let delete =
        tokio::spawn(etcd_delete_event(etcd.client_url(2), format!("/expiry/instances/{SERVICE}/x")));
    let w1 = tokio::spawn(gone_from(r1.url(), "x"));
    let w2 = tokio::spawn(gone_from(r2.url(), "x"));

    let deleted =
        tokio::time::timeout(Duration::from_secs(60), delete).await.expect("etcd expires the lease").unwrap();
    let seen1 = tokio::time::timeout(Duration::from_secs(30), w1).await.expect("replica 1 watcher").unwrap();
    let seen2 = tokio::time::timeout(Duration::from_secs(30), w2).await.expect("replica 2 watcher").unwrap();
    let lag1 = seen1.saturating_duration_since(deleted);
    let lag2 = seen2.saturating_duration_since(deleted);
    // Signed: a replica's watch may deliver the delete before the test's own does.
    let signed = |seen: Instant| {
        if seen >= deleted {
            (seen - deleted).as_secs_f64() * 1000.0
        } else {
            -((deleted - seen).as_secs_f64() * 1000.0)
        }
    };
    println!(
        "lease of 2s: etcd deleted the key {:.2}s after registration; watchers saw it {:+.1}ms (replica 1) and {:+.1}ms (replica 2) from the test's own etcd watch seeing the delete",
        (deleted - registered).as_secs_f64(),
        signed(seen1),
        signed(seen2),
    );
    // Expected in milliseconds; generous for a loaded machine.
    assert!(lag1 < Duration::from_secs(5) && lag2 < Duration::from_secs(5));
    for base in [r1.url(), r2.url()] {
        let (v, _) = discover(&http, &base, SERVICE).await.expect("discovery");
        assert_eq!(ids(&v), ["keeper"]);
    }
}
