//! Reading a sidecar's admin `/endpoints`, as the tests that wait on what a
//! client sidecar sees all do.

use std::net::SocketAddr;

use serde_json::Value;

/// The sidecar's `/endpoints` entry for `service` (its `endpoints`, and the
/// zone fields), or `Value::Null` when the sidecar does not answer or does
/// not watch the service yet.
pub async fn service_endpoints(admin: SocketAddr, service: &str) -> Value {
    let all = match reqwest::get(format!("http://{admin}/endpoints")).await {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    all["services"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["service"] == service).cloned())
        .unwrap_or(Value::Null)
}

/// The endpoints of `service` the sidecar knows, each as its JSON object.
pub async fn endpoint_list(admin: SocketAddr, service: &str) -> Vec<Value> {
    service_endpoints(admin, service).await["endpoints"].as_array().cloned().unwrap_or_default()
}
