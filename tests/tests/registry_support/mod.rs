//! Shared by the `registry_*` tests: an in-process registry on a loopback port
//! and small HTTP helpers.
#![allow(dead_code)]

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use trellis_registry::{Config, ServerError};
use trellis_shared::ServiceView;

/// A configuration for tests: short TTLs allowed, loopback only.
pub fn test_config() -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        min_ttl: Duration::from_millis(100),
        log_level: "warn".into(),
        ..Config::default()
    }
}

/// A registry running in this process; stopped by [`Reg::stop`] or at the end
/// of the test's runtime.
pub struct Reg {
    pub url: String,
    pub http: reqwest::Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServerError>>>,
}

pub async fn start(config: Config) -> Reg {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(trellis_registry::run(listener, config, async {
        let _ = rx.await;
    }));
    trellis_tests::wait_http_ok(&format!("{url}/health"), Duration::from_secs(10)).await;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client");
    Reg { url, http, stop: Some(tx), task: Some(task) }
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The error code of an error body.
    pub fn code(&self) -> &str {
        self.body.get("error").and_then(Value::as_str).unwrap_or("<no error code>")
    }

    pub fn view(&self) -> ServiceView {
        serde_json::from_value(self.body.clone()).expect("a service view")
    }
}

impl Reg {
    /// Triggers a graceful shutdown and waits for `run` to return.
    pub async fn stop(&mut self) -> Result<(), ServerError> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.task.take() {
            Some(t) => t.await.expect("server task"),
            None => Ok(()),
        }
    }

    /// Sends a request with an optional raw body and content type.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut req = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        if let Some(b) = body {
            req = req.body(b);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.expect("body");
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Answer { status, headers, body }
    }

    pub async fn put_json(&self, path: &str, body: Value) -> Answer {
        self.send(Method::PUT, path, Some("application/json"), Some(body.to_string())).await
    }

    pub async fn register(&self, service: &str, id: &str, body: Value) -> Answer {
        let a = self.put_json(&format!("/v1/services/{service}/instances/{id}"), body).await;
        assert_eq!(a.status, StatusCode::OK, "register {service}/{id}: {}", a.body);
        a
    }

    pub async fn heartbeat(&self, service: &str, id: &str, body: Option<Value>) -> Answer {
        let path = format!("/v1/services/{service}/instances/{id}/heartbeat");
        match body {
            Some(b) => self.put_json(&path, b).await,
            None => self.send(Method::PUT, &path, None, None).await,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        self.send(Method::GET, path, None, None).await
    }

    /// `GET /v1/services/{service}` with a query string (may be empty).
    pub async fn view(&self, service: &str, query: &str) -> ServiceView {
        let q = if query.is_empty() { String::new() } else { format!("?{query}") };
        let a = self.get(&format!("/v1/services/{service}{q}")).await;
        assert_eq!(a.status, StatusCode::OK, "{}", a.body);
        a.view()
    }

    /// The value of an unlabelled metric line, e.g. `trellis_registry_open_watches`.
    pub async fn metric(&self, name: &str) -> f64 {
        let text = self.http.get(format!("{}/metrics", self.url)).send().await.expect("metrics");
        let text = text.text().await.expect("metrics text");
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not in:\n{text}"))
    }

    /// Waits until `open_watches` reaches `n`: the held queries are in place.
    pub async fn wait_open_watches(&self, n: f64) {
        trellis_tests::wait_for(&format!("{n} open watches"), Duration::from_secs(10), || async move {
            (self.metric("trellis_registry_open_watches").await == n).then_some(())
        })
        .await
    }
}
