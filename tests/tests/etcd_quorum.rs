//! etcd losing members under two registry replicas.
//! One member down: no visible effect. Two down (no quorum): discovery still
//! answers, flagged `X-Trellis-Stale: true`, clients keep routing with zero
//! failures, registrations get `503 unavailable`. Quorum back: the flag clears
//! and writes work again on every replica, with no restart.
//!
//! Build first: `cargo build --release -p trellis-registry -p trellis-sidecar -p trellis-tests --bins`.

mod etcd_support;

use std::time::{Duration, Instant};

use etcd_support::*;
use trellis_tests::wait_for;

const SERVICE: &str = "api";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_and_regaining_quorum() {
    let Some(bin) = etcd_or_skip("losing_and_regaining_quorum") else { return };
    let mut etcd = Etcd::start(bin, 3).await;
    let store = etcd.store_flag("/quorum");
    let r1 = Replica::start("registry-1", &store).await;
    let r2 = Replica::start("registry-2", &store).await;
    let replicas = [r1.url(), r2.url()];
    let registries = replicas.join(",");
    let http = http();

    let _a = Backend::start("a", SERVICE, &registries).await;
    let _b = Backend::start("b", SERVICE, &registries).await;
    let client =
        Sidecar::start("client-sidecar", &registries, &strings(&["--upstream-service", SERVICE])).await;
    client.wait_endpoints(SERVICE, &["a", "b"], Duration::from_secs(30)).await;
    let load = Load::start(client.outbound, SERVICE);
    load.wait_more(50, Duration::from_secs(30)).await;

    // One member down (the one every replica talks to first): no visible effect.
    etcd.kill(0);
    load.wait_more(100, Duration::from_secs(30)).await;
    for (i, url) in replicas.iter().enumerate() {
        let (status, code) = register(&http, url, "probe", &format!("one-down-{i}"), 9000, "30s").await;
        assert_eq!(status, 200, "registration with one member down via {url}: {code}");
    }
    for url in &replicas {
        wait_for("both probe instances on every replica", Duration::from_secs(10), || async {
            let (v, stale) = discover(&http, url, "probe").await?;
            (ids(&v) == ["one-down-0", "one-down-1"] && !stale).then_some(())
        })
        .await;
    }

    // Two down: no quorum.
    etcd.kill(1);
    let lost = Instant::now();
    for url in &replicas {
        wait_for("discovery flagged stale", Duration::from_secs(60), || async {
            let (v, stale) = discover(&http, url, SERVICE).await?;
            (stale && ids(&v) == ["a", "b"]).then_some(())
        })
        .await;
    }
    let detected = lost.elapsed();
    for url in &replicas {
        let (status, code) = register(&http, url, "probe", "no-quorum", 9001, "30s").await;
        assert_eq!((status, code.as_str()), (503, "unavailable"), "registration without quorum via {url}");
    }
    // Clients keep routing while etcd has no quorum, past the sidecars' TTL.
    let during = load.ok();
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(load.ok() > during + 20, "requests must keep flowing without quorum");
    for url in &replicas {
        let (v, stale) = discover(&http, url, SERVICE).await.expect("stale discovery answers");
        assert!(stale);
        assert_eq!(ids(&v), ["a", "b"]);
    }

    // Quorum back: converge without restarting anything.
    etcd.restart(1);
    etcd.restart(0);
    let restored = Instant::now();
    for url in &replicas {
        wait_for("stale flag to clear", Duration::from_secs(90), || async {
            let (_, stale) = discover(&http, url, SERVICE).await?;
            (!stale).then_some(())
        })
        .await;
    }
    let cleared = restored.elapsed();
    wait_for("a registration to succeed again", Duration::from_secs(30), || async {
        (register(&http, &replicas[1], "probe", "after", 9002, "30s").await.0 == 200).then_some(())
    })
    .await;
    let mut indexes = Vec::new();
    for url in &replicas {
        let v = wait_for("every replica to converge", Duration::from_secs(30), || async {
            let (v, _) = discover(&http, url, "probe").await?;
            (ids(&v) == ["after", "one-down-0", "one-down-1"]).then_some(v)
        })
        .await;
        indexes.push((v["index"].as_u64(), v["epoch"].as_str().map(str::to_string)));
        let (v, _) = discover(&http, url, SERVICE).await.expect("discovery");
        assert_eq!(ids(&v), ["a", "b"], "the backends survived the outage");
    }
    assert_eq!(indexes[0], indexes[1], "replicas agree on index and epoch");
    client.wait_endpoints(SERVICE, &["a", "b"], Duration::from_secs(5)).await;

    let (ok, failures) = load.stop().await;
    println!(
        "quorum lost: stale flagged after {:.1}s; quorum restored: flag cleared after {:.1}s; {ok} requests ok, {} failed",
        detected.as_secs_f64(),
        cleared.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:?}");
}
