//! The Consul-compatible routes through the registry's one entry
//! ([`ApiService::call`]), over the memory store, with exact timing under
//! tokio's paused clock.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use trellis_shared::{Address, Instance, InstanceId, ServiceName};

use super::*;
use crate::api::ApiService;
use crate::config::Config;
use crate::metrics::{Metrics, StoreMetrics};
use crate::store::{LeasedInstance, MemoryStore};
use crate::watch::Watches;

fn api_with(store: Arc<MemoryStore>, acl: Option<Arc<crate::acl::Acl>>) -> ApiService<MemoryStore> {
    let metrics = Arc::new(Metrics::new());
    let watches = Arc::new(Watches::new(10, CancellationToken::new(), metrics.clone()));
    ApiService::new(ApiState::new(store, Config::default(), metrics, watches).with_acl(acl))
}

fn api() -> (Arc<MemoryStore>, ApiService<MemoryStore>) {
    let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
    (store.clone(), api_with(store, None))
}

async fn register(store: &MemoryStore, service: &str, id: &str, status: HealthStatus, tags: &[&str]) -> u64 {
    let instance = Instance {
        id: InstanceId::new(id).unwrap(),
        address: Address::new("10.0.0.1").unwrap(),
        port: 8080,
        zone: None,
        weight: 100,
        metadata: BTreeMap::from([("metrics_port".to_string(), "15000".to_string())]),
        status,
        output: String::new(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        mesh_tls: false,
    };
    let service = ServiceName::new(service).unwrap();
    store.register(&service, LeasedInstance { instance, ttl: Duration::from_secs(600) }).await.unwrap().index
}

fn req(method: Method, uri: &str) -> Request<Full<Bytes>> {
    Request::builder().method(method).uri(uri).body(Full::new(Bytes::new())).unwrap()
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    json: serde_json::Value,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("no {name} header"))
    }

    fn index(&self) -> u64 {
        self.header("x-consul-index").parse().unwrap()
    }
}

async fn call(api: &ApiService<MemoryStore>, r: Request<Full<Bytes>>) -> Answer {
    let resp = api.call(r).await;
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {body:?}"));
    Answer { status, headers, json }
}

async fn get(api: &ApiService<MemoryStore>, uri: &str) -> Answer {
    call(api, req(Method::GET, uri)).await
}

fn ids(a: &Answer) -> Vec<&str> {
    a.json.as_array().unwrap().iter().map(|e| e["Service"]["ID"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn reads_carry_consuls_headers_fields_and_filters() {
    let (store, api) = api();
    register(&store, "users", "u1", HealthStatus::Passing, &["v1", "eu"]).await;
    register(&store, "users", "u2", HealthStatus::Warning, &["v2"]).await;
    let index = register(&store, "users", "u3", HealthStatus::Critical, &["v1"]).await;
    register(&store, "billing", "b1", HealthStatus::Passing, &[]).await;

    let all = get(&api, "/v1/health/service/users").await;
    assert_eq!(all.status, StatusCode::OK);
    assert_eq!(all.index(), index);
    assert_eq!(all.header("x-consul-knownleader"), "true");
    assert_eq!(all.header("x-consul-lastcontact"), "0");
    assert_eq!(all.header("content-type"), "application/json");
    assert_eq!(ids(&all), ["u1", "u2", "u3"], "every instance, whatever its health");
    let statuses: Vec<&str> =
        all.json.as_array().unwrap().iter().map(|e| e["Checks"][0]["Status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["passing", "warning", "critical"]);
    assert_eq!(all.json[0]["Service"]["Meta"]["metrics_port"], "15000");

    assert_eq!(ids(&get(&api, "/v1/health/service/users?passing=1").await), ["u1"], "passing only");
    assert_eq!(ids(&get(&api, "/v1/health/service/users?passing").await), ["u1"]);
    assert_eq!(ids(&get(&api, "/v1/health/service/users?tag=v1").await), ["u1", "u3"]);
    assert_eq!(ids(&get(&api, "/v1/health/service/users?tag=v1&tag=eu").await), ["u1"], "every tag");
    assert_eq!(ids(&get(&api, "/v1/health/service/users?tag=v1&passing=true&dc=dc1").await), ["u1"]);

    let catalog = get(&api, "/v1/catalog/service/users?tag=v1").await;
    let rows: Vec<&str> =
        catalog.json.as_array().unwrap().iter().map(|e| e["ServiceID"].as_str().unwrap()).collect();
    assert_eq!(rows, ["u1", "u3"]);
    assert_eq!(catalog.json[0]["ServicePort"], 8080);
    assert_eq!(catalog.json[0]["ServiceAddress"], "10.0.0.1");

    let services = get(&api, "/v1/catalog/services").await;
    assert_eq!(services.json, serde_json::json!({"billing": [], "users": ["eu", "v1", "v2"]}));
    assert!(services.index() >= 1);

    let me = get(&api, "/v1/agent/self").await;
    assert_eq!(me.json["Config"]["Datacenter"], "dc1");
    assert!(me.json["Config"]["NodeName"].as_str().is_some_and(|n| !n.is_empty()));

    // An unknown service: empty, at index 1 (never 0, on which clients would spin).
    let none = get(&api, "/v1/health/service/ghost").await;
    assert_eq!((none.json.clone(), none.index()), (serde_json::json!([]), 1));
}

#[tokio::test]
async fn bad_input_gets_400_json_and_another_datacenter_404() {
    let (_store, api) = api();
    for uri in [
        "/v1/health/service/users?wait=soon&index=1",
        "/v1/health/service/users?index=-3",
        "/v1/health/service/users?passing=maybe",
        "/v1/health/service/users?filter=x",
        "/v1/health/service/users?token=secret",
        "/v1/catalog/services?tag=a",
        "/v1/health/service/Not%20A%20Name",
    ] {
        let a = get(&api, uri).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri}: {}", a.json);
        assert!(a.json["message"].as_str().is_some_and(|m| !m.is_empty()), "{uri}: {}", a.json);
        assert!(!a.json.to_string().contains("secret"), "the token is never echoed");
    }
    let a = get(&api, "/v1/health/service/users?dc=dc2").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND, "{}", a.json);
    assert!(a.json.to_string().contains("dc2"), "{}", a.json);
}

#[tokio::test]
async fn writes_are_refused_with_405_naming_trelliss_route() {
    let (_store, api) = api();
    for (method, uri, names) in [
        (Method::PUT, "/v1/agent/service/register", "PUT /v1/services/{service}/instances/{id}"),
        (Method::PUT, "/v1/catalog/register", "PUT /v1/services/{service}/instances/{id}"),
        (Method::PUT, "/v1/agent/service/deregister/u1", "DELETE /v1/services/{service}/instances/{id}"),
        (Method::PUT, "/v1/catalog/deregister", "DELETE /v1/services/{service}/instances/{id}"),
        (
            Method::PUT,
            "/v1/agent/check/pass/service:u1",
            "PUT /v1/services/{service}/instances/{id}/heartbeat",
        ),
        (Method::DELETE, "/v1/catalog/services", "GET only"),
        (Method::PUT, "/v1/health/service/users", "GET only"),
        (Method::POST, "/v1/health/state/any", "GET only"),
    ] {
        let a = call(&api, req(method.clone(), uri)).await;
        assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {uri}");
        let msg = a.json["message"].as_str().unwrap();
        assert!(msg.contains("read-only") && msg.contains(names), "{method} {uri}: {msg}");
        assert_eq!(a.json["error"], "method_not_allowed");
    }
}

#[tokio::test(start_paused = true)]
async fn blocking_queries_wait_for_their_service_or_the_catalog() {
    let (store, api) = api();
    let index = register(&store, "users", "u1", HealthStatus::Passing, &[]).await;
    let api = Arc::new(api);

    // A held query on users returns when users changes, not before.
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (get(&api, &format!("/v1/health/service/users?index={index}&wait=10s")).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    register(&store, "billing", "b1", HealthStatus::Passing, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!held.is_finished(), "another service's change wakes no one here");
    let next = register(&store, "users", "u2", HealthStatus::Passing, &[]).await;
    let (a, waited) = held.await.unwrap();
    assert_eq!((a.index(), ids(&a).len(), waited), (next, 2, Duration::from_secs(3)));

    // Without a change it answers after wait, plus at most a sixteenth.
    let t = Instant::now();
    let a = get(&api, &format!("/v1/health/service/users?index={next}&wait=16s")).await;
    assert_eq!(a.index(), next);
    assert!(t.elapsed() >= Duration::from_secs(16) && t.elapsed() <= Duration::from_secs(17));

    // An unknown service reported at index 1 waits on that 1 rather than spin.
    let ghost = {
        let api = api.clone();
        tokio::spawn(async move { get(&api, "/v1/health/service/ghost?index=1&wait=30s").await })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!ghost.is_finished());
    register(&store, "ghost", "g1", HealthStatus::Passing, &[]).await;
    assert_eq!(ids(&ghost.await.unwrap()), ["g1"]);

    // The catalog's index moves on a new service or new tags, not on health.
    let c = get(&api, "/v1/catalog/services").await.index();
    let held = {
        let api = api.clone();
        tokio::spawn(async move { get(&api, &format!("/v1/catalog/services?index={c}&wait=60s")).await })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    register(&store, "users", "u1", HealthStatus::Warning, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!held.is_finished(), "a change of health leaves the catalog alone");
    register(&store, "users", "u1", HealthStatus::Warning, &["canary"]).await;
    let a = held.await.unwrap();
    assert!(a.index() > c);
    assert_eq!(a.json["users"], serde_json::json!(["canary"]));
}

#[tokio::test(start_paused = true)]
async fn health_state_lists_every_check_and_blocks_on_any_service() {
    let (store, api) = api();
    register(&store, "users", "u1", HealthStatus::Passing, &[]).await;
    register(&store, "users", "u2", HealthStatus::Critical, &[]).await;
    let last = register(&store, "billing", "b1", HealthStatus::Warning, &[]).await;
    let checks = |a: &Answer| -> Vec<String> {
        let rows = a.json.as_array().unwrap().iter();
        rows.map(|c| format!("{}={}", c["CheckID"].as_str().unwrap(), c["Status"].as_str().unwrap()))
            .collect()
    };
    let any = get(&api, "/v1/health/state/any").await;
    assert_eq!(any.status, StatusCode::OK);
    assert_eq!(any.index(), last, "the registry's highest index");
    assert_eq!(checks(&any), ["service:b1=warning", "service:u1=passing", "service:u2=critical"]);
    assert_eq!(any.json[0]["ServiceName"], "billing");
    assert_eq!(checks(&get(&api, "/v1/health/state/critical").await), ["service:u2=critical"]);
    assert_eq!(checks(&get(&api, "/v1/health/state/passing").await), ["service:u1=passing"]);
    let bad = get(&api, "/v1/health/state/sideways").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.json);
    assert!(bad.json["message"].as_str().unwrap().contains("any, passing"), "{}", bad.json);

    // A held query returns on a change of any service.
    let api = Arc::new(api);
    let held = {
        let api = api.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (get(&api, &format!("/v1/health/state/any?index={last}&wait=30s")).await, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(!held.is_finished());
    let next = register(&store, "billing", "b1", HealthStatus::Passing, &[]).await;
    let (a, waited) = held.await.unwrap();
    assert_eq!((a.index(), waited), (next, Duration::from_secs(4)));
    assert_eq!(checks(&a)[0], "service:b1=passing");
}

#[tokio::test]
async fn tokens_from_x_consul_token_see_only_what_they_may_read() {
    let secret = format!("{:032x}", rand::random::<u128>());
    let path = std::env::temp_dir().join(format!("consul-acl-{}-{secret}.toml", std::process::id()));
    let file = format!("default = \"deny\"\n[[tokens]]\nname = \"users-reader\"\nsecret = \"{secret}\"\nread = [\"users\"]\n");
    std::fs::write(&path, file).unwrap();
    let store = Arc::new(MemoryStore::new(StoreMetrics::default()));
    let acl = crate::acl::Acl::load(&path, Arc::new(Metrics::new())).unwrap();
    let _ = std::fs::remove_file(&path);
    let api = api_with(store.clone(), Some(Arc::new(acl)));
    register(&store, "users", "u1", HealthStatus::Passing, &[]).await;
    register(&store, "billing", "b1", HealthStatus::Passing, &[]).await;
    let with_token = |uri: &str| {
        let mut r = req(Method::GET, uri);
        r.headers_mut().insert("x-consul-token", HeaderValue::from_str(&secret).unwrap());
        r
    };
    let a = call(&api, with_token("/v1/catalog/services")).await;
    assert_eq!(a.json, serde_json::json!({"users": []}), "billing is not readable");
    assert_eq!(call(&api, with_token("/v1/health/service/users")).await.status, StatusCode::OK);
    assert_eq!(call(&api, with_token("/v1/health/service/billing")).await.status, StatusCode::FORBIDDEN);
    assert_eq!(get(&api, "/v1/catalog/services").await.status, StatusCode::UNAUTHORIZED);
}

#[test]
fn a_reported_index_of_one_stands_for_zero() {
    assert_eq!(wait_from(1, 0), 0);
    assert_eq!(wait_from(1, 1), 1);
    assert_eq!(wait_from(7, 7), 7);
    assert_eq!(wait_from(5, 7), 5, "a different index answers at once");
}

/// A replica whose copy may be behind: the memory store, flagged stale.
struct StaleReplica(MemoryStore);

impl Store for StaleReplica {
    fn epoch(&self) -> &str {
        self.0.epoch()
    }
    async fn register(
        &self,
        service: &ServiceName,
        registration: LeasedInstance,
    ) -> Result<crate::store::WriteOutcome, crate::store::StoreError> {
        self.0.register(service, registration).await
    }
    async fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        heartbeat: crate::store::Heartbeat,
    ) -> Result<crate::store::WriteOutcome, crate::store::StoreError> {
        self.0.heartbeat(service, id, heartbeat).await
    }
    async fn deregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> Result<u64, crate::store::StoreError> {
        self.0.deregister(service, id).await
    }
    fn snapshot(&self, service: &ServiceName) -> Arc<ServiceSnapshot> {
        self.0.snapshot(service)
    }
    async fn watch_from(&self, service: &ServiceName, index: u64) -> Arc<ServiceSnapshot> {
        self.0.watch_from(service, index).await
    }
    fn list(&self) -> Vec<trellis_shared::ServiceSummary> {
        self.0.list()
    }
    fn catalog(&self) -> (u64, Vec<Arc<ServiceSnapshot>>) {
        self.0.catalog()
    }
    async fn watch_catalog_from(&self, index: u64) -> u64 {
        self.0.watch_catalog_from(index).await
    }
    fn snapshots(&self) -> Vec<Arc<ServiceSnapshot>> {
        self.0.snapshots()
    }
    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.changes()
    }
    async fn leases(&self, service: &ServiceName) -> Vec<crate::store::LeaseState> {
        self.0.leases(service).await
    }
    fn stale(&self) -> bool {
        true
    }
    fn last_contact(&self) -> Duration {
        Duration::from_millis(4200)
    }
    async fn background(self: Arc<Self>, _shutdown: CancellationToken) {}
}

#[tokio::test]
async fn a_stale_replica_says_so_the_way_consul_does() {
    let store = Arc::new(StaleReplica(MemoryStore::new(StoreMetrics::default())));
    register(&store.0, "users", "u1", HealthStatus::Passing, &[]).await;
    let metrics = Arc::new(Metrics::new());
    let watches = Arc::new(Watches::new(10, CancellationToken::new(), metrics.clone()));
    let api = ApiService::new(ApiState::new(store, Config::default(), metrics, watches));
    let call = |uri: &'static str| {
        let api = api.clone();
        async move {
            let resp = api.call(req(Method::GET, uri)).await;
            let (status, headers) = (resp.status(), resp.headers().clone());
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            (status, headers, serde_json::from_slice::<serde_json::Value>(&body).unwrap())
        }
    };
    // Without ?stale (and with ?consistent) a follower without a leader refuses.
    for uri in ["/v1/health/service/users", "/v1/catalog/services?consistent"] {
        let (status, _, body) = call(uri).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{uri}: {body}");
        assert_eq!(body["error"], "unavailable");
        assert!(body["message"].as_str().unwrap().contains("?stale"), "{body}");
    }
    // With ?stale it answers from its copy and says how old it may be.
    let (status, headers, body) = call("/v1/health/service/users?stale").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body[0]["Service"]["ID"], "u1");
    assert_eq!(headers["x-consul-knownleader"], "false");
    assert_eq!(headers["x-consul-lastcontact"], "4200");
    assert_eq!(headers["x-consul-effective-consistency"], "stale");
    assert_eq!(headers[trellis_shared::STALE_HEADER], "true");
}
