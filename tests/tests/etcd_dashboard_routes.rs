//! The dashboard's read routes on the etcd store, across two replicas: each
//! replica names itself in `/v1/status`, the owner of an instance (the
//! replica it registered and heartbeats through) knows its last renewal, and a blocking `/v1/overview` on
//! one replica wakes for a registration made through the other.
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-tests --bins`.

mod etcd_support;

use std::time::Duration;

use etcd_support::*;
use serde_json::{json, Value};
use tokio::time::Instant;

async fn get(http: &reqwest::Client, url: String) -> Value {
    let r = http.get(&url).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    assert!(r.status().is_success(), "GET {url}: {}", r.status());
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_leases_and_overview_on_the_etcd_store() {
    let Some(bin) = etcd_or_skip("status_leases_and_overview_on_the_etcd_store") else { return };
    let etcd = Etcd::start(bin, 1).await;
    let store = etcd.store_flag("/dashboard");
    let a = Replica::start("registry-a", &store).await;
    let b = Replica::start("registry-b", &store).await;
    let http = http();

    let (sa, sb) = (
        get(&http, format!("{}/v1/status", a.url())).await,
        get(&http, format!("{}/v1/status", b.url())).await,
    );
    assert_eq!((sa["store"].as_str(), sb["store"].as_str()), (Some("etcd"), Some("etcd")));
    assert_eq!(sa["epoch"], sb["epoch"], "replicas of one cluster share the epoch");
    let (ra, rb) = (sa["replica"].as_str().unwrap_or(""), sb["replica"].as_str().unwrap_or(""));
    assert!(!ra.is_empty() && !rb.is_empty() && ra != rb, "each replica names itself: {ra:?} {rb:?}");
    assert_eq!(sa["stale"], false);

    // A blocking overview on A wakes for a registration made through B.
    let start = get(&http, format!("{}/v1/overview", a.url())).await;
    let index = start["index"].as_u64().unwrap();
    let epoch = start["epoch"].as_str().unwrap().to_string();
    let held = {
        let (http, url) =
            (http.clone(), format!("{}/v1/overview?index={index}&wait=30s&epoch={epoch}", a.url()));
        tokio::spawn(async move {
            let v: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            (Instant::now(), v)
        })
    };
    // The held query is open once A counts it.
    wait_for_watch(&http, &a.url()).await;
    let registered = Instant::now();
    let (status, code) = register(&http, &b.url(), "users", "u1", 9000, "10s").await;
    assert_eq!(status, 200, "{code}");
    let (woke, v) =
        tokio::time::timeout(Duration::from_secs(30), held).await.expect("the overview answers").unwrap();
    println!("overview on replica A woke {:?} after a registration through B", woke - registered);
    assert!(v["index"].as_u64().unwrap() > index, "{v}");
    let users = &v["services"][0];
    assert_eq!(
        (users["name"].as_str(), users["instances"].as_u64(), users["passing"].as_u64()),
        (Some("users"), Some(1), Some(1)),
        "{v}"
    );

    // Heartbeats stay in the memory of the replica that owns the instance (B,
    // through which it registered): B's lease page knows the last renewal,
    // A's shows the TTL alone.
    tokio::time::sleep(Duration::from_secs(2)).await; // the lease ages, so the renewal has something to reset
    let before = get(&http, format!("{}/v1/services/users/leases", b.url())).await;
    let aged = before["leases"][0]["since_renewal_ms"].as_u64().expect("the owner knows");
    let hb = http
        .put(format!("{}/v1/services/users/instances/u1/heartbeat", b.url()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(hb.status(), 204);
    let after = get(&http, format!("{}/v1/services/users/leases", b.url())).await;
    let lease = &after["leases"][0];
    println!("lease on the owner before the renewal {before}, after {after}");
    assert_eq!(lease["id"], "u1");
    assert_eq!(lease["ttl_ms"], 10_000, "{lease}");
    let (since, left) = (lease["since_renewal_ms"].as_u64().unwrap(), lease["left_ms"].as_u64().unwrap());
    assert!(aged >= 1000, "two seconds after registering, the owner says {aged} ms since the last renewal");
    assert!(since < aged && since <= 2000, "renewed: {since} ms ago (was {aged})");
    assert!((8000..=10_000).contains(&left), "{left} ms left of 10 s");
    let elsewhere = get(&http, format!("{}/v1/services/users/leases", a.url())).await;
    let lease = &elsewhere["leases"][0];
    assert_eq!((lease["id"].as_str(), lease["ttl_ms"].as_u64()), (Some("u1"), Some(10_000)), "{elsewhere}");
    assert!(lease["since_renewal_ms"].is_null(), "only the owner knows the last heartbeat: {elsewhere}");
}

/// Waits until replica `url` holds a blocking query (its open-watch gauge).
async fn wait_for_watch(http: &reqwest::Client, url: &str) {
    trellis_tests::wait_for("the held overview query", Duration::from_secs(30), || async {
        let text = http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
        let open = text.lines().find_map(|l| l.strip_prefix("trellis_registry_open_watches "))?;
        (open.trim().parse::<f64>().ok()? >= 1.0).then_some(())
    })
    .await;
}
