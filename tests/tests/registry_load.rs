//! Concurrency and limits: many registrants and watchers at once, the cap on
//! open blocking queries, the cap on connections.

mod registry_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use registry_support::{start, test_config};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Barrier;
use trellis_shared::client::parse_urls;
use trellis_shared::{
    Address, ClientConfig, HealthStatus, HeartbeatRequest, InstanceId, RegisterRequest, RegistryClient,
    ServiceName,
};

const SERVICES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];
const REGISTRANTS: usize = 200;
const WATCHERS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_concurrent_registrants_and_watchers() {
    let reg = start(test_config()).await;
    // Generous timeouts: on a loaded 2-core machine a debug build serving 200
    // watchers' wake-ups can be slow, and this test is about correctness.
    let config = ClientConfig { request_timeout: Duration::from_secs(30), ..ClientConfig::default() };
    let client = RegistryClient::new(parse_urls(&reg.url).unwrap(), config).unwrap();
    let per_service = REGISTRANTS / SERVICES.len();

    // Watchers: each follows one service until all its instances are there and warning.
    let mut watchers = Vec::new();
    for w in 0..WATCHERS {
        let service = ServiceName::new(SERVICES[w % SERVICES.len()]).unwrap();
        let mut watch = client.watch(service);
        watch.next().await.unwrap();
        watchers.push(tokio::spawn(async move {
            let mut updates = 0;
            loop {
                let v = watch.next().await.unwrap();
                updates += 1;
                if v.instances.len() == per_service
                    && v.instances.iter().all(|i| i.status == HealthStatus::Warning)
                {
                    return updates;
                }
            }
        }));
    }
    reg.wait_open_watches(WATCHERS as f64).await;

    let t0 = Instant::now();
    let start_line = Arc::new(Barrier::new(REGISTRANTS));
    let mut registrants = Vec::new();
    for r in 0..REGISTRANTS {
        let client = client.clone();
        let start_line = start_line.clone();
        registrants.push(tokio::spawn(async move {
            let service = ServiceName::new(SERVICES[r % SERVICES.len()]).unwrap();
            let id = InstanceId::new(format!("i-{r}")).unwrap();
            let mut req =
                RegisterRequest::new(Address::new(format!("10.0.{}.{}", r / 250, r % 250)).unwrap(), 8080);
            req.ttl = Some(Duration::from_secs(60).into());
            start_line.wait().await;
            client.register(&service, &id, &req).await.unwrap();
            client.heartbeat(&service, &id, &HeartbeatRequest::default()).await.unwrap();
            let hb = HeartbeatRequest { status: Some(HealthStatus::Warning), output: Some("busy".into()) };
            client.heartbeat(&service, &id, &hb).await.unwrap();
        }));
    }
    for r in registrants {
        r.await.unwrap();
    }
    let written = t0.elapsed();
    let mut updates = Vec::new();
    for w in watchers {
        updates
            .push(tokio::time::timeout(Duration::from_secs(60), w).await.expect("watcher finished").unwrap());
    }
    let converged = t0.elapsed();
    println!(
        "{REGISTRANTS} registrants done in {written:?}; all {WATCHERS} watchers converged after {converged:?} \
         ({} to {} updates each)",
        updates.iter().min().unwrap(),
        updates.iter().max().unwrap()
    );
    let list = client.list_services().await.unwrap();
    assert_eq!(list.services.len(), SERVICES.len());
    for s in &list.services {
        assert_eq!((s.instances, s.healthy), (per_service, per_service), "{}", s.name);
    }
    assert_eq!(reg.metric("trellis_registry_registrations_total").await, REGISTRANTS as f64);
    assert_eq!(reg.metric("trellis_registry_heartbeats_total").await, 2.0 * REGISTRANTS as f64);
}

#[tokio::test]
async fn past_the_open_watch_cap_queries_answer_at_once() {
    let config = trellis_registry::Config { max_watches: 2, ..test_config() };
    let reg = start(config).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"1m"})).await;
    let index = reg.view("users", "").await.index;
    let query = format!("index={index}&wait=30s");
    let mut held = Vec::new();
    for _ in 0..2 {
        let http = reg.http.clone();
        let url = format!("{}/v1/services/users?{query}", reg.url);
        held.push(tokio::spawn(async move {
            http.get(url).send().await.unwrap().json::<trellis_shared::ServiceView>().await.unwrap()
        }));
    }
    reg.wait_open_watches(2.0).await;
    let t = Instant::now();
    let v = reg.view("users", &query).await;
    let took = t.elapsed();
    println!("third blocking query past a cap of 2 answered in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(v.index, index);
    assert_eq!(reg.metric("trellis_registry_watches_refused_total").await, 1.0);
    // The held ones are still held, and a change releases them.
    assert!(held.iter().all(|h| !h.is_finished()));
    reg.heartbeat("users", "u1", Some(json!({"status":"warning"}))).await;
    for h in held {
        let v = tokio::time::timeout(Duration::from_secs(10), h).await.unwrap().unwrap();
        assert!(v.index > index);
    }
}

/// One request on its own connection (closed after), so it holds no slot later.
async fn raw_get(addr: &str, path: &str) -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

/// A gauge's value read over a fresh connection.
async fn raw_gauge(addr: &str, name: &str) -> Option<f64> {
    let text = raw_get(addr, "/metrics").await?;
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

#[tokio::test]
async fn past_the_connection_cap_new_connections_get_503_overloaded() {
    let config = trellis_registry::Config { max_connections: 2, ..test_config() };
    let reg = start(config).await;
    let addr = reg.url.trim_start_matches("http://").to_string();
    // Connections left over from start-up close asynchronously: wait until
    // only the scraping connection itself is open.
    trellis_tests::wait_for("start-up connections to close", Duration::from_secs(10), || async {
        (raw_gauge(&addr, "trellis_registry_connections").await == Some(1.0)).then_some(())
    })
    .await;
    // Two connections that hold blocking queries on a service nobody registers.
    // A holder arriving while a scrape's connection is still counted is refused
    // at once (it reads a 503): then it tries again.
    let mut holders = Vec::new();
    while holders.len() < 2 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let req = format!("GET /v1/services/idle?index=0&wait=60s HTTP/1.1\r\nhost: {addr}\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await {
            Err(_) => holders.push(s), // nothing to read: it is being held
            Ok(_) => continue,         // refused: the slot was still taken
        }
    }
    let answer = raw_get(&addr, "/health").await.expect("an answer past the cap");
    println!("past the cap: {}", answer.lines().next().unwrap_or(""));
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["error"], "overloaded");
    // Freeing one connection lets the next one in.
    holders.pop();
    let ok = trellis_tests::wait_for("a connection slot to free up", Duration::from_secs(10), || async {
        raw_get(&addr, "/metrics").await.filter(|a| a.starts_with("HTTP/1.1 200"))
    })
    .await;
    let refused = ok.lines().find_map(|l| l.strip_prefix("trellis_registry_connections_refused_total "));
    assert!(refused.and_then(|v| v.trim().parse::<f64>().ok()).is_some_and(|v| v >= 1.0), "{ok}");
}
