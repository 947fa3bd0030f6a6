//! Every malformed request gets the documented status and error code
//! (docs/api.md) and changes nothing; the registry keeps serving.

mod registry_support;

use registry_support::{start, test_config};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const JSON: Option<&str> = Some("application/json");

struct Row {
    what: &'static str,
    method: Method,
    path: String,
    content_type: Option<&'static str>,
    body: Option<String>,
    status: StatusCode,
    code: &'static str,
}

fn row(
    what: &'static str,
    method: Method,
    path: impl Into<String>,
    content_type: Option<&'static str>,
    body: Option<String>,
    status: u16,
    code: &'static str,
) -> Row {
    Row {
        what,
        method,
        path: path.into(),
        content_type,
        body,
        status: StatusCode::from_u16(status).unwrap(),
        code,
    }
}

fn reg_body(v: Value) -> Option<String> {
    Some(v.to_string())
}

fn table() -> Vec<Row> {
    use Method as M;
    let u2 = "/v1/services/users/instances/u2";
    let u1 = "/v1/services/users/instances/u1";
    let hb1 = "/v1/services/users/instances/u1/heartbeat";
    let big_meta: serde_json::Map<String, Value> = (0..65).map(|i| (format!("k{i}"), json!("v"))).collect();
    vec![
        row(
            "truncated JSON",
            M::PUT,
            u2,
            JSON,
            Some(r#"{"address":"10.0.0.5","port":8080"#.into()),
            400,
            "invalid_json",
        ),
        row("not JSON", M::PUT, u2, JSON, Some("address=10.0.0.5".into()), 400, "invalid_json"),
        row("empty registration body", M::PUT, u2, JSON, None, 400, "invalid_json"),
        row("missing port", M::PUT, u2, JSON, reg_body(json!({"address":"10.0.0.5"})), 400, "invalid_field"),
        row("missing address", M::PUT, u2, JSON, reg_body(json!({"port":80})), 400, "invalid_field"),
        row(
            "port 0",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"10.0.0.5","port":0})),
            400,
            "invalid_field",
        ),
        row(
            "port 70000",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"10.0.0.5","port":70000})),
            400,
            "invalid_field",
        ),
        row(
            "negative port",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"10.0.0.5","port":-1})),
            400,
            "invalid_field",
        ),
        row(
            "port as a string",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"10.0.0.5","port":"80"})),
            400,
            "invalid_field",
        ),
        row(
            "ttl without unit",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"ttl":"5"})),
            400,
            "invalid_field",
        ),
        row(
            "ttl below --min-ttl",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"ttl":"10ms"})),
            400,
            "invalid_field",
        ),
        row(
            "ttl above --max-ttl",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"ttl":"1h"})),
            400,
            "invalid_field",
        ),
        row(
            "weight 0",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"weight":0})),
            400,
            "invalid_field",
        ),
        row(
            "weight 10001",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"weight":10001})),
            400,
            "invalid_field",
        ),
        row(
            "metadata value over 4096 bytes",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"metadata":{"k":"v".repeat(5000)}})),
            400,
            "invalid_field",
        ),
        row(
            "65 metadata entries",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"metadata":big_meta})),
            400,
            "invalid_field",
        ),
        row(
            "unknown status",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"status":"sick"})),
            400,
            "invalid_field",
        ),
        row(
            "unknown field",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"colour":"red"})),
            400,
            "invalid_field",
        ),
        row(
            "bad address",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"not an address!","port":1})),
            400,
            "invalid_field",
        ),
        row(
            "bad zone",
            M::PUT,
            u2,
            JSON,
            reg_body(json!({"address":"a","port":1,"zone":"eu west"})),
            400,
            "invalid_field",
        ),
        row("array body", M::PUT, u2, JSON, Some("[]".into()), 400, "invalid_field"),
        row(
            "replacing u1 with port 0",
            M::PUT,
            u1,
            JSON,
            reg_body(json!({"address":"10.0.0.5","port":0})),
            400,
            "invalid_field",
        ),
        row(
            "upper-case service name",
            M::PUT,
            "/v1/services/Users/instances/u2",
            JSON,
            reg_body(json!({"address":"a","port":1})),
            400,
            "invalid_name",
        ),
        row(
            "underscore in service name",
            M::PUT,
            "/v1/services/user_api/instances/u2",
            JSON,
            reg_body(json!({"address":"a","port":1})),
            400,
            "invalid_name",
        ),
        row(
            "64-character service name",
            M::PUT,
            format!("/v1/services/{}/instances/u2", "a".repeat(64)),
            JSON,
            reg_body(json!({"address":"a","port":1})),
            400,
            "invalid_name",
        ),
        row(
            "space in instance id",
            M::PUT,
            "/v1/services/users/instances/a%20b",
            JSON,
            reg_body(json!({"address":"a","port":1})),
            400,
            "invalid_name",
        ),
        row(
            "129-character instance id",
            M::PUT,
            format!("/v1/services/users/instances/{}", "i".repeat(129)),
            JSON,
            reg_body(json!({"address":"a","port":1})),
            400,
            "invalid_name",
        ),
        row(
            "slash in instance id",
            M::PUT,
            "/v1/services/users/instances/a%2Fb/heartbeat",
            None,
            None,
            400,
            "invalid_name",
        ),
        row("invalid UTF-8 in the path", M::GET, "/v1/services/%FF", None, None, 400, "invalid_name"),
        row("upper-case service on GET", M::GET, "/v1/services/Users", None, None, 400, "invalid_name"),
        row(
            "heartbeat of an unknown instance",
            M::PUT,
            "/v1/services/users/instances/u9/heartbeat",
            None,
            None,
            404,
            "unknown_instance",
        ),
        row(
            "heartbeat of an unknown service",
            M::PUT,
            "/v1/services/orders/instances/u1/heartbeat",
            None,
            None,
            404,
            "unknown_instance",
        ),
        row(
            "heartbeat with an unknown status",
            M::PUT,
            hb1,
            JSON,
            reg_body(json!({"status":"dead"})),
            400,
            "invalid_field",
        ),
        row(
            "heartbeat with an unknown field",
            M::PUT,
            hb1,
            JSON,
            reg_body(json!({"state":"passing"})),
            400,
            "invalid_field",
        ),
        row(
            "heartbeat output over 4096 bytes",
            M::PUT,
            hb1,
            JSON,
            reg_body(json!({"output":"x".repeat(5000)})),
            400,
            "invalid_field",
        ),
        row("heartbeat truncated JSON", M::PUT, hb1, JSON, Some(r#"{"status":"#.into()), 400, "invalid_json"),
        row("heartbeat null body", M::PUT, hb1, JSON, Some("null".into()), 400, "invalid_field"),
        row(
            "deregister an unknown instance",
            M::DELETE,
            "/v1/services/users/instances/u9",
            None,
            None,
            404,
            "unknown_instance",
        ),
        row("unknown route", M::GET, "/v1/nope", None, None, 404, "not_found"),
        row("root", M::GET, "/", None, None, 404, "not_found"),
        row("trailing slash", M::GET, "/v1/services/users/", None, None, 404, "not_found"),
        row("POST a service", M::POST, "/v1/services/users", None, None, 405, "method_not_allowed"),
        row("PATCH an instance", M::PATCH, u1, JSON, reg_body(json!({"port":1})), 405, "method_not_allowed"),
        row("GET a heartbeat", M::GET, hb1, None, None, 405, "method_not_allowed"),
        row("DELETE the service list", M::DELETE, "/v1/services", None, None, 405, "method_not_allowed"),
        row(
            "100 KB body",
            M::PUT,
            u2,
            JSON,
            Some(format!("{{\"address\":\"{}\"}}", "a".repeat(100_000))),
            413,
            "payload_too_large",
        ),
        row(
            "text/plain body",
            M::PUT,
            u2,
            Some("text/plain"),
            reg_body(json!({"address":"a","port":1})),
            415,
            "unsupported_media_type",
        ),
        row(
            "form body",
            M::PUT,
            hb1,
            Some("application/x-www-form-urlencoded"),
            Some("status=critical".into()),
            415,
            "unsupported_media_type",
        ),
        row("index not a number", M::GET, "/v1/services/users?index=abc", None, None, 400, "invalid_query"),
        row("negative index", M::GET, "/v1/services/users?index=-1", None, None, 400, "invalid_query"),
        row("wait without index", M::GET, "/v1/services/users?wait=5s", None, None, 400, "invalid_query"),
        row(
            "wait not a duration",
            M::GET,
            "/v1/services/users?index=1&wait=soon",
            None,
            None,
            400,
            "invalid_query",
        ),
        row("all not a boolean", M::GET, "/v1/services/users?all=maybe", None, None, 400, "invalid_query"),
        row("unknown parameter", M::GET, "/v1/services/users?indx=1", None, None, 400, "invalid_query"),
        row("repeated index", M::GET, "/v1/services/users?index=1&index=2", None, None, 400, "invalid_query"),
        row("parameters on the list", M::GET, "/v1/services?x=1", None, None, 400, "invalid_query"),
    ]
}

/// Everything a client can observe about the registry's state.
async fn state(reg: &registry_support::Reg) -> (Value, Value, Value) {
    let users = reg.get("/v1/services/users?all=true").await.body;
    let orders = reg.get("/v1/services/orders?all=true").await.body;
    let list = reg.get("/v1/services").await.body;
    (users, orders, list)
}

#[tokio::test]
async fn malformed_requests_get_their_documented_error_and_change_nothing() {
    let reg = start(test_config()).await;
    reg.register("users", "u1", json!({"address":"10.0.0.5","port":8080,"ttl":"5m","metadata":{"k":"v"}}))
        .await;
    reg.heartbeat("users", "u1", Some(json!({"status":"warning","output":"slow"}))).await;
    let before = state(&reg).await;
    let rows = table();
    assert!(rows.len() >= 25);
    let mut failures = Vec::new();
    for r in &rows {
        let a = reg.send(r.method.clone(), &r.path, r.content_type, r.body.clone()).await;
        let message_ok = a.body.get("message").and_then(Value::as_str).is_some_and(|m| !m.is_empty());
        if a.status != r.status || a.code() != r.code || !message_ok {
            failures.push(format!(
                "{}: {} {}: expected {} {}, got {} {}",
                r.what,
                r.method,
                r.path.chars().take(80).collect::<String>(),
                r.status,
                r.code,
                a.status,
                a.body
            ));
        }
        if a.headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
            failures.push(format!("{}: error body is not application/json", r.what));
        }
        assert_eq!(state(&reg).await, before, "{} changed the registry's state", r.what);
    }
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n{}",
        failures.len(),
        rows.len(),
        failures.join("\n")
    );
    println!("{} malformed requests refused as documented; state unchanged", rows.len());
    // Still serving, and still accepting good requests.
    reg.register("users", "u2", json!({"address":"10.0.0.6","port":8081})).await;
    assert_eq!(reg.view("users", "").await.instances.len(), 2);
}
