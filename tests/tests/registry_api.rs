//! The registry's API against the real server over loopback HTTP.

mod registry_support;

use std::time::{Duration, Instant};

use registry_support::{start, test_config};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use trellis_shared::{
    Address, HealthStatus, HeartbeatRequest, InstanceId, RegisterRequest, RegistryClient, ServiceName,
    EPOCH_HEADER, INDEX_HEADER,
};

#[tokio::test]
async fn register_discover_heartbeat_with_each_status() {
    let reg = start(test_config()).await;
    let a = reg
        .register(
            "users",
            "u1",
            json!({"address":"10.0.0.5","port":8080,"ttl":"5s","zone":"a","weight":100,"metadata":{"k":"v"},"status":"passing"}),
        )
        .await;
    assert_eq!(a.body["service"], "users");
    assert_eq!(a.body["ttl"], "5s");
    assert_eq!(a.body["metadata"]["k"], "v");
    reg.register("users", "u2", json!({"address":"app-2.local","port":8081,"status":"warning"})).await;

    let v = reg.view("users", "").await;
    let ids: Vec<&str> = v.instances.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["u1", "u2"], "warning instances are still served");
    assert_eq!(v.instances[1].weight, 100);

    // Critical hides the instance from discovery but not from all=true.
    let hb = reg.heartbeat("users", "u2", Some(json!({"status":"critical","output":"db down"}))).await;
    assert_eq!(hb.status, StatusCode::NO_CONTENT);
    let v2 = reg.view("users", "").await;
    assert!(v2.index > v.index);
    assert_eq!(v2.instances.len(), 1);
    let all = reg.view("users", "all=true").await;
    assert_eq!(all.instances.len(), 2);
    assert_eq!(all.instances[1].status, HealthStatus::Critical);
    assert_eq!(all.instances[1].output, "db down");

    // Warning and passing bring it back; an empty heartbeat only renews.
    for (status, expect) in [("warning", HealthStatus::Warning), ("passing", HealthStatus::Passing)] {
        let hb = reg.heartbeat("users", "u2", Some(json!({ "status": status }))).await;
        assert_eq!(hb.status, StatusCode::NO_CONTENT);
        let v = reg.view("users", "").await;
        assert_eq!(v.instances.len(), 2);
        assert_eq!(v.instances[1].status, expect);
    }
    let before = reg.view("users", "").await.index;
    let hb = reg.heartbeat("users", "u2", None).await;
    assert_eq!(hb.status, StatusCode::NO_CONTENT);
    assert_eq!(reg.view("users", "").await.index, before);

    let list = reg.get("/v1/services").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["services"], json!([{"name":"users","instances":2,"healthy":2}]));
}

#[tokio::test]
async fn views_carry_index_and_epoch_headers_and_list_counts_health() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1})).await;
    reg.register("orders", "o1", json!({"address":"10.0.0.6","port":1,"status":"critical"})).await;
    let a = reg.get("/v1/services/users").await;
    let v = a.view();
    assert_eq!(a.headers[INDEX_HEADER].to_str().unwrap(), v.index.to_string());
    assert_eq!(a.headers[EPOCH_HEADER].to_str().unwrap(), v.epoch);
    let list = reg.get("/v1/services").await;
    assert_eq!(list.body["epoch"], v.epoch.as_str());
    assert_eq!(
        list.body["services"],
        json!([{"name":"orders","instances":1,"healthy":0},{"name":"users","instances":1,"healthy":1}])
    );
    let metrics = reg.http.get(format!("{}/metrics", reg.url)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("trellis_registry_instances{service=\"orders\"} 1"), "{metrics}");
    assert!(metrics.contains("trellis_registry_healthy_instances{service=\"orders\"} 0"), "{metrics}");
    assert!(metrics.contains("trellis_registry_registrations_total 2"), "{metrics}");
}

#[tokio::test]
async fn a_never_registered_service_answers_empty_with_index_zero() {
    let reg = start(test_config()).await;
    let v = reg.view("ghost", "").await;
    assert_eq!((v.index, v.instances.len()), (0, 0));
    // It can be watched before its first instance arrives.
    let watcher = {
        let http = reg.http.clone();
        let url = format!("{}/v1/services/ghost?index=0&wait=30s", reg.url);
        tokio::spawn(
            async move { http.get(url).send().await.unwrap().json::<serde_json::Value>().await.unwrap() },
        )
    };
    reg.wait_open_watches(1.0).await;
    reg.register("ghost", "g1", json!({"address":"10.0.0.1","port":1})).await;
    let seen = watcher.await.unwrap();
    assert_eq!(seen["instances"][0]["id"], "g1");
    assert!(seen["index"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_blocking_query_from_another_epoch_answers_at_once() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1})).await;
    let v = reg.view("users", "").await;
    // The same index from another registry's life (a restart reached the same
    // number): answered at once, so the client learns the new epoch.
    let t = Instant::now();
    let other = reg.view("users", &format!("index={}&wait=30s&epoch=an-older-registry", v.index)).await;
    let took = t.elapsed();
    println!("blocking query with another epoch answered after {took:?}");
    assert_eq!((other.index, other.epoch.as_str()), (v.index, v.epoch.as_str()));
    assert!(took < Duration::from_secs(10), "waited {took:?} on an index of another epoch");
    // The registry's own epoch: it blocks as before.
    let same = {
        let http = reg.http.clone();
        let url = format!("{}/v1/services/users?index={}&wait=30s&epoch={}", reg.url, v.index, v.epoch);
        tokio::spawn(async move { http.get(url).send().await.unwrap().json::<Value>().await.unwrap() })
    };
    reg.wait_open_watches(1.0).await;
    reg.register("users", "u2", json!({"address":"10.0.0.6","port":1})).await;
    let seen = same.await.unwrap();
    assert_eq!(seen["instances"].as_array().map(Vec::len), Some(2), "{seen}");
}

#[tokio::test]
async fn deregister_removes_at_once() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1})).await;
    let d = reg.send(Method::DELETE, "/v1/services/users/instances/u1", None, None).await;
    assert_eq!(d.status, StatusCode::NO_CONTENT);
    assert!(reg.view("users", "all=true").await.instances.is_empty());
    let again = reg.send(Method::DELETE, "/v1/services/users/instances/u1", None, None).await;
    assert_eq!((again.status, again.code()), (StatusCode::NOT_FOUND, "unknown_instance"));
    let hb = reg.heartbeat("users", "u1", None).await;
    assert_eq!((hb.status, hb.code()), (StatusCode::NOT_FOUND, "unknown_instance"));
    assert_eq!(reg.get("/v1/services").await.body["services"], json!([]));
}

#[tokio::test]
async fn an_instance_expires_at_its_ttl_and_watchers_see_it() {
    let reg = start(test_config()).await;
    let ttl = Duration::from_millis(300);
    let t0 = Instant::now();
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"300ms"})).await;
    let mut index = reg.view("users", "").await.index;
    loop {
        let v = reg.view("users", &format!("index={index}&wait=10s")).await;
        index = v.index;
        if v.instances.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never expired");
    }
    let took = t0.elapsed();
    println!("ttl {ttl:?}: watcher saw the expiry after {took:?}");
    assert!(took >= ttl, "expired early: {took:?}");
    assert!(took < ttl * 10 + Duration::from_secs(2), "expired late: {took:?}");
    let hb = reg.heartbeat("users", "u1", None).await;
    assert_eq!(hb.code(), "unknown_instance");
    assert_eq!(reg.metric("trellis_registry_expirations_total").await, 1.0);
}

#[tokio::test]
async fn heartbeats_keep_an_instance_alive_past_its_ttl() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"2s"})).await;
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(4500) {
        let hb = reg.heartbeat("users", "u1", Some(json!({"status":"passing"}))).await;
        assert_eq!(hb.status, StatusCode::NO_CONTENT, "{}", hb.body);
        // The heartbeat interval: renewals well inside the TTL are the scenario.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reg.view("users", "").await.instances.len(), 1);
}

#[tokio::test]
async fn a_blocking_query_wakes_on_a_change_to_its_service() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"1m"})).await;
    let index = reg.view("users", "").await.index;
    let watcher = {
        let http = reg.http.clone();
        let url = format!("{}/v1/services/users?index={index}&wait=30s", reg.url);
        tokio::spawn(async move {
            let v = http.get(url).send().await.unwrap().json::<trellis_shared::ServiceView>().await.unwrap();
            (Instant::now(), v)
        })
    };
    reg.wait_open_watches(1.0).await;
    let changed_at = Instant::now();
    reg.heartbeat("users", "u1", Some(json!({"status":"warning"}))).await;
    let (woke_at, v) = watcher.await.unwrap();
    let latency = woke_at.duration_since(changed_at);
    println!("blocking query answered {latency:?} after the change");
    assert!(latency < Duration::from_secs(2), "{latency:?}");
    assert!(v.index > index);
    assert_eq!(v.instances[0].status, HealthStatus::Warning);
}

#[tokio::test]
async fn a_blocking_query_sleeps_through_other_services_renewals_and_output() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"1m"})).await;
    reg.register("orders", "o1", json!({"address":"10.0.0.6","port":1,"ttl":"1m"})).await;
    let index = reg.view("users", "").await.index;
    let wait = Duration::from_millis(1500);
    let watcher = {
        let http = reg.http.clone();
        let url = format!("{}/v1/services/users?index={index}&wait=1500ms", reg.url);
        tokio::spawn(async move {
            let t = Instant::now();
            let v = http.get(url).send().await.unwrap().json::<trellis_shared::ServiceView>().await.unwrap();
            (t.elapsed(), v)
        })
    };
    reg.wait_open_watches(1.0).await;
    reg.register("orders", "o2", json!({"address":"10.0.0.7","port":1})).await;
    reg.heartbeat("orders", "o1", Some(json!({"status":"critical"}))).await;
    reg.heartbeat("users", "u1", None).await;
    reg.heartbeat("users", "u1", Some(json!({"status":"passing","output":"all good"}))).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1,"ttl":"1m"})).await;
    let (held, v) = watcher.await.unwrap();
    println!("blocking query with wait {wait:?} was held {held:?}");
    assert!(held >= wait, "woke early after {held:?}");
    assert!(held < wait * 4, "{held:?}");
    assert_eq!(v.index, index);
}

#[tokio::test]
async fn an_index_from_the_future_answers_at_once() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1})).await;
    let index = reg.view("users", "").await.index;
    let t = Instant::now();
    let v = reg.view("users", &format!("index={}&wait=30s", index + 1_000_000)).await;
    let took = t.elapsed();
    println!("index from the future answered in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(v.index, index);
}

#[tokio::test]
async fn absurd_waits_are_capped_not_refused() {
    let config = trellis_registry::Config { max_wait: Duration::from_millis(500), ..test_config() };
    let reg = start(config).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":1})).await;
    let index = reg.view("users", "").await.index;
    for wait in ["100000h", "99999999999999999999999s"] {
        let t = Instant::now();
        let v = reg.view("users", &format!("index={index}&wait={wait}")).await;
        let took = t.elapsed();
        println!("wait={wait} with --max-wait 500ms answered in {took:?}");
        assert!(took >= Duration::from_millis(500) && took < Duration::from_secs(5), "{took:?}");
        assert_eq!(v.index, index);
    }
}

#[tokio::test]
async fn the_shared_client_works_against_the_registry() {
    let reg = start(test_config()).await;
    let client = RegistryClient::from_list(&reg.url).unwrap();
    let users = ServiceName::new("users").unwrap();
    let id = InstanceId::new("u1").unwrap();
    let mut req = RegisterRequest::new(Address::new("10.0.0.5").unwrap(), 8080);
    req.ttl = Some(Duration::from_secs(30).into());
    let record = client.register(&users, &id, &req).await.unwrap();
    assert_eq!(record.instance.port, 8080);
    assert_eq!(record.ttl.0, Duration::from_secs(30));

    let mut watch = client.watch(users.clone());
    let first = watch.next().await.unwrap();
    assert_eq!(first.instances.len(), 1);
    let hb = HeartbeatRequest { status: Some(HealthStatus::Critical), output: Some("down".into()) };
    client.heartbeat(&users, &id, &hb).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(10), watch.next()).await.unwrap().unwrap();
    assert!(second.index > first.index);
    assert!(second.instances.is_empty());
    assert_eq!(client.get(&users, true).await.unwrap().instances[0].output, "down");
    assert_eq!(client.list_services().await.unwrap().services[0].healthy, 0);

    client.deregister(&users, &id).await.unwrap();
    let err = client.heartbeat(&users, &id, &HeartbeatRequest::default()).await.unwrap_err();
    assert!(err.is_unknown_instance(), "{err}");
}
