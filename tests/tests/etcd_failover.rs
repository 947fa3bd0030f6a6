//! Failover between registry replicas: three etcd members, two registry replicas on them, sidecars
//! given both replica URLs. Killing the replica the sidecars use costs no client
//! request; watches continue on the other replica and registrations go on.
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-sidecar -p trellis-tests --bins`.

mod etcd_support;

use std::time::{Duration, Instant};

use etcd_support::*;

const SERVICE: &str = "api";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_replica_in_use_fails_no_request() {
    let Some(bin) = etcd_or_skip("killing_the_replica_in_use_fails_no_request") else { return };
    let etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/failover");
    let mut first = Replica::start("registry-1", &store).await;
    let second = Replica::start("registry-2", &store).await;
    // Sidecars stick to the first URL they are given.
    let registries = format!("{},{}", first.url(), second.url());

    let _a = Backend::start("a", SERVICE, &registries).await;
    let _b = Backend::start("b", SERVICE, &registries).await;
    let client =
        Sidecar::start("client-sidecar", &registries, &strings(&["--upstream-service", SERVICE])).await;
    client.wait_endpoints(SERVICE, &["a", "b"], Duration::from_secs(30)).await;

    let load = Load::start(client.outbound, SERVICE);
    load.wait_more(50, Duration::from_secs(30)).await;

    first.proc.kill9();
    let killed = Instant::now();
    load.wait_more(100, Duration::from_secs(30)).await;

    // Registrations continue, through the surviving replica.
    let _c = Backend::start("c", SERVICE, &registries).await;
    // Watches continue: the client sidecar learns of c through replica 2.
    client.wait_endpoints(SERVICE, &["a", "b", "c"], Duration::from_secs(30)).await;
    let seen = killed.elapsed();
    // Heartbeats continue too: after several TTLs (5s) nobody has expired.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let http = http();
    let (view, stale) = discover(&http, &second.url(), SERVICE).await.expect("replica 2 answers");
    assert_eq!(ids(&view), vec!["a", "b", "c"]);
    assert!(!stale, "replica 2 must not flag its answers stale");
    client.wait_endpoints(SERVICE, &["a", "b", "c"], Duration::from_secs(5)).await;

    let (ok, failures) = load.stop().await;
    println!(
        "replica killed: {ok} requests succeeded, {} failed; new instance routed {:.1}s after the kill",
        failures.len(),
        seen.as_secs_f64()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    assert!(ok > 150);
}
