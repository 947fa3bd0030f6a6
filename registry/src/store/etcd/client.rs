//! A small client for etcd's v3 JSON gateway (`POST /v3/...`) over reqwest.
//!
//! Why the gateway rather than gRPC: it needs no `protoc` at build time and no
//! second HTTP stack (reqwest is already here), and the registry uses a handful
//! of calls: range, put, delete, lease grant/keep-alive/revoke, and one watch.
//! Keys and values travel base64-encoded; 64-bit numbers travel as strings.
//!
//! The client sticks to one member and moves to the next on a transport error,
//! a timeout or a 5xx answer (a member without a leader answers 503).
//!
//! Over https it trusts what [`super::config`] loaded; with etcd's auth on it
//! carries the token of its [`Session`] on every request and renews it when
//! etcd no longer knows it (see [`super::auth`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};
use serde_json::{json, Value};
use url::Url;

use super::auth::{is_token_problem, plain, Credentials, Session};
use super::config::EtcdAccess;
use super::tls;

/// gRPC status code etcd answers for a lease it does not know.
pub const GRPC_NOT_FOUND: i64 = 5;

/// The gRPC metadata key that makes etcd refuse (and cancel) a watch on a
/// member without a leader; the gateway forwards `Grpc-Metadata-*` headers.
const REQUIRE_LEADER: (&str, &str) = ("grpc-metadata-hasleader", "true");

#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd member answered: {0}")]
    Unreachable(String),
    #[error("etcd refused the request (grpc code {code}): {message}")]
    Refused { code: i64, message: String },
    #[error("etcd answered something unexpected: {0}")]
    Protocol(String),
    /// etcd refused the user: wrong password, unknown user, or no right on the prefix.
    #[error("etcd rejected user {user:?}: {message}")]
    Auth { user: String, message: String },
    /// The TLS handshake failed: a certificate did not verify on either side.
    #[error("{0}")]
    Tls(String),
}

impl EtcdError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, EtcdError::Refused { code: GRPC_NOT_FOUND, .. })
    }

    /// etcd said no (credentials, certificates, a refused request) rather than
    /// being out of reach: retrying will not help, an operator must.
    pub fn is_fatal(&self) -> bool {
        matches!(self, EtcdError::Auth { .. } | EtcdError::Tls(_) | EtcdError::Refused { .. })
    }
}

/// Accepts a JSON number or a string holding one (the gateway writes int64 as strings).
fn num<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        S(String),
        I(i64),
        U(u64),
    }
    match N::deserialize(d)? {
        N::S(s) => {
            s.parse::<i64>().or_else(|_| s.parse::<u64>().map(|u| u as i64)).map_err(serde::de::Error::custom)
        }
        N::I(i) => Ok(i),
        N::U(u) => Ok(u as i64),
    }
}

fn b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(serde::de::Error::custom)
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Header {
    /// Identity of the cluster (the registry's epoch). Kept as u64: etcd
    /// writes it as an unsigned decimal.
    #[serde(default, deserialize_with = "num")]
    pub cluster_id: i64,
    #[serde(default, deserialize_with = "num")]
    pub revision: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct KeyValue {
    #[serde(default, deserialize_with = "b64")]
    pub key: Vec<u8>,
    #[serde(default, deserialize_with = "b64")]
    pub value: Vec<u8>,
    #[serde(default, deserialize_with = "num")]
    pub mod_revision: i64,
    #[serde(default, deserialize_with = "num")]
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum EventType {
    #[default]
    #[serde(rename = "PUT")]
    Put,
    #[serde(rename = "DELETE")]
    Delete,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Event {
    #[serde(default, rename = "type")]
    pub kind: EventType,
    #[serde(default)]
    pub kv: KeyValue,
}

/// One message of a watch stream.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct WatchResponse {
    #[serde(default)]
    pub header: Header,
    #[serde(default)]
    pub created: bool,
    #[serde(default)]
    pub canceled: bool,
    #[serde(default, deserialize_with = "num")]
    pub compact_revision: i64,
    #[serde(default)]
    pub cancel_reason: String,
    #[serde(default)]
    pub events: Vec<Event>,
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Debug, Deserialize)]
struct HeaderOnly {
    #[serde(default)]
    header: Header,
}

#[derive(Debug, Deserialize)]
struct DeleteResponse {
    #[serde(default)]
    header: Header,
    #[serde(default, deserialize_with = "num")]
    deleted: i64,
}

#[derive(Debug, Deserialize)]
struct GrantResponse {
    #[serde(default, rename = "ID", deserialize_with = "num")]
    id: i64,
    #[serde(default, rename = "TTL", deserialize_with = "num")]
    ttl: i64,
    #[serde(default)]
    error: String,
}

#[derive(Debug, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    header: Header,
    #[serde(default)]
    succeeded: bool,
}

#[derive(Deserialize)]
struct AuthenticateResponse {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Deserialize)]
struct KeepAliveResult {
    #[serde(default, rename = "TTL", deserialize_with = "num")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct TimeToLiveResult {
    #[serde(default, rename = "TTL", deserialize_with = "num")]
    ttl: i64,
    #[serde(default, rename = "grantedTTL", deserialize_with = "num")]
    granted: i64,
}

/// A streamed answer is `{"result": ...}` or `{"error": ...}` per line.
#[derive(Debug, Deserialize)]
struct Streamed<T> {
    result: Option<T>,
    error: Option<GatewayError>,
}

#[derive(Debug, Default, Deserialize)]
struct GatewayError {
    #[serde(default, deserialize_with = "num")]
    code: i64,
    #[serde(default)]
    message: String,
}

/// The end of the key range holding every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0] // every key
}

fn enc(b: &[u8]) -> String {
    B64.encode(b)
}

pub struct EtcdClient {
    http: reqwest::Client,
    endpoints: Vec<Url>,
    current: AtomicUsize,
    timeout: Duration,
    /// Whether `--etcd-ca` was given, to explain certificates that do not verify.
    private_ca: bool,
    /// With etcd's auth: the credentials and the current token.
    session: Option<Session>,
    token_refresh: Duration,
}

/// Shortest period of proactive re-authentication, whatever the flag says.
const MIN_TOKEN_REFRESH: Duration = Duration::from_secs(1);

impl EtcdClient {
    /// `timeout` bounds each attempt on one member; `access` is the TLS
    /// configuration and credentials the flags named.
    pub fn new(endpoints: Vec<Url>, timeout: Duration, access: &EtcdAccess) -> Result<Self, EtcdError> {
        if endpoints.is_empty() {
            return Err(EtcdError::Protocol("no etcd endpoints given".into()));
        }
        let mut builder =
            reqwest::Client::builder().connect_timeout(timeout).tcp_nodelay(true).no_proxy().http1_only();
        if let Some(tls) = &access.tls {
            builder = builder.use_preconfigured_tls((**tls).clone());
        }
        let http =
            builder.build().map_err(|e| EtcdError::Protocol(format!("cannot build the HTTP client: {e}")))?;
        Ok(EtcdClient {
            http,
            endpoints,
            current: AtomicUsize::new(0),
            timeout,
            private_ca: access.private_ca,
            session: access.credentials.clone().map(Session::new),
            token_refresh: access.token_refresh.max(MIN_TOKEN_REFRESH),
        })
    }

    /// Whether etcd gave a token (it has auth on) at the last authentication.
    pub fn has_token(&self) -> bool {
        self.token().0.is_some()
    }

    /// The etcd user this client authenticates as, if any.
    pub fn user(&self) -> Option<&str> {
        self.session.as_ref().map(|s| s.credentials.user.as_str())
    }

    /// Authenticates once, at start: wrong credentials come out here as
    /// [`EtcdError::Auth`]. Without credentials there is nothing to do.
    pub async fn login(&self) -> Result<(), EtcdError> {
        match &self.session {
            Some(s) => self.renew(s.generation()).await,
            None => Ok(()),
        }
    }

    /// Gets a new token unless another caller already replaced the token of
    /// generation `seen`.
    pub async fn renew(&self, seen: u64) -> Result<(), EtcdError> {
        let Some(session) = &self.session else { return Ok(()) };
        let _one_at_a_time = session.renewing.lock().await;
        if session.generation() != seen {
            return Ok(());
        }
        let token = self.authenticate(&session.credentials).await?;
        if token.is_none() && session.current().0.is_some() {
            warn!(user = %session.credentials.user, "etcd has authentication off: --etcd-user is not used");
        }
        session.replace(token.as_deref()).map_err(EtcdError::Protocol)?;
        debug!(user = %session.credentials.user, "authenticated with etcd");
        Ok(())
    }

    /// A token for `credentials`; `None` when etcd has auth off.
    pub async fn authenticate(&self, credentials: &Credentials) -> Result<Option<String>, EtcdError> {
        let body = json!({"name": credentials.user, "password": credentials.password.expose()});
        match self.call_with::<AuthenticateResponse>("v3/auth/authenticate", &body, None).await {
            Ok(r) if r.token.is_empty() => Err(EtcdError::Protocol("etcd answered no token".into())),
            Ok(r) => Ok(Some(r.token)),
            Err(EtcdError::Refused { message, .. }) if message.contains("authentication is not enabled") => {
                Ok(None)
            }
            Err(EtcdError::Refused { message, .. }) if message.contains("CommonName of client") => {
                Err(EtcdError::Tls(format!(
                    "etcd refuses --etcd-cert because it has a common name, which etcd's JSON gateway does not \
                     accept once auth is on: issue it without one (registry init does); etcd said: {message}"
                )))
            }
            Err(EtcdError::Refused { message, .. }) => {
                Err(EtcdError::Auth { user: credentials.user.clone(), message: plain(&message).to_string() })
            }
            Err(e) => Err(e),
        }
    }

    /// Re-authenticates every `--etcd-token-refresh` until `shutdown`, so a
    /// token never reaches etcd's TTL; a failure keeps the old token (the
    /// next request that meets a stale one renews it again).
    pub async fn refresh_token(&self, shutdown: &CancellationToken) {
        let Some(session) = &self.session else { return };
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.token_refresh) => {}
            }
            if let Err(e) = self.renew(session.generation()).await {
                warn!(user = %session.credentials.user, error = %e, "cannot renew the etcd token");
            }
        }
    }

    /// The token to send and its generation.
    fn token(&self) -> (Option<Arc<HeaderValue>>, u64) {
        self.session.as_ref().map(Session::current).unwrap_or((None, 0))
    }

    /// After etcd cancelled a watch: renews the token when the reason is a
    /// stale one (the watch was opened with generation `seen`).
    pub async fn renew_for_watch(&self, reason: &str, seen: u64) -> bool {
        if self.session.is_none() || !is_token_problem(0, reason) {
            return false;
        }
        match self.renew(seen).await {
            Ok(()) => {
                info!("renewed the etcd token for the watch");
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot renew the etcd token for the watch");
                false
            }
        }
    }

    pub fn endpoints(&self) -> &[Url] {
        &self.endpoints
    }

    fn url(&self, i: usize, path: &str) -> Result<Url, EtcdError> {
        let base = &self.endpoints[i % self.endpoints.len()];
        base.join(path).map_err(|e| EtcdError::Protocol(format!("bad endpoint {base}: {e}")))
    }

    /// Moves to the next member unless another caller already did.
    fn fail_over(&self, from: usize) {
        let _ = self.current.compare_exchange(
            from,
            (from + 1) % self.endpoints.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Posts `body` to `path` with the current token; when etcd no longer
    /// knows the token, renews it and tries once more.
    async fn call<T: DeserializeOwned>(&self, path: &str, body: &Value) -> Result<T, EtcdError> {
        let (token, generation) = self.token();
        match self.call_with(path, body, token.as_deref()).await {
            Err(EtcdError::Refused { code, message })
                if self.session.is_some() && is_token_problem(code, &message) =>
            {
                self.renew(generation).await?;
                info!(path, reason = %plain(&message), "etcd no longer knew the token; renewed it");
                let (token, _) = self.token();
                self.call_with(path, body, token.as_deref()).await
            }
            other => other,
        }
    }

    /// Posts `body` to `path` on the current member, trying each member once.
    async fn call_with<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        token: Option<&HeaderValue>,
    ) -> Result<T, EtcdError> {
        let mut last = String::new();
        let mut tls_failure = None;
        for _ in 0..self.endpoints.len() {
            let i = self.current.load(Ordering::Relaxed);
            let url = self.url(i, path)?;
            let attempt = async {
                let mut req = self.http.post(url.clone()).json(body);
                if let Some(t) = token {
                    req = req.header(AUTHORIZATION, t.clone());
                }
                let resp = req.send().await?;
                let status = resp.status();
                let bytes = resp.bytes().await?;
                Ok::<_, reqwest::Error>((status, bytes))
            };
            match tokio::time::timeout(self.timeout, attempt).await {
                Err(_) => last = format!("{url}: no answer within {:?}", self.timeout),
                Ok(Err(e)) => {
                    if let Some(why) = tls::diagnose(&e, self.private_ca) {
                        tls_failure = Some(format!("{}: {why}", origin(&url)));
                    }
                    last = format!("{url}: {e}");
                }
                Ok(Ok((status, bytes))) if status.is_success() => {
                    return decode_result::<T>(&bytes);
                }
                Ok(Ok((status, bytes))) => {
                    let err = gateway_error(&bytes);
                    if status.is_client_error() {
                        return Err(EtcdError::Refused { code: err.code, message: err.message });
                    }
                    last = format!("{url}: {status}: {}", err.message);
                }
            }
            self.fail_over(i);
        }
        // Every member failed; if TLS was why for one, that is the news.
        Err(tls_failure.map_or(EtcdError::Unreachable(last), EtcdError::Tls))
    }

    /// Any gateway call, with the token (for `registry etcd-setup`'s auth calls).
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value, EtcdError> {
        self.call(path, body).await
    }

    /// Every key under `prefix`, with a linearizable read.
    pub async fn range_prefix(&self, prefix: &[u8]) -> Result<(Header, Vec<KeyValue>), EtcdError> {
        let body = json!({"key": enc(prefix), "range_end": enc(&prefix_end(prefix))});
        let r: RangeResponse = self.call("v3/kv/range", &body).await?;
        Ok((r.header, r.kvs))
    }

    pub async fn get(&self, key: &[u8]) -> Result<(Header, Option<KeyValue>), EtcdError> {
        let r: RangeResponse = self.call("v3/kv/range", &json!({"key": enc(key)})).await?;
        Ok((r.header, r.kvs.into_iter().next()))
    }

    /// A linearizable read that touches no data: it succeeds only while the
    /// cluster has a leader and quorum.
    pub async fn check(&self, key: &[u8]) -> Result<Header, EtcdError> {
        let r: HeaderOnly = self.call("v3/kv/range", &json!({"key": enc(key), "count_only": true})).await?;
        Ok(r.header)
    }

    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<Header, EtcdError> {
        let body = json!({"key": enc(key), "value": enc(value), "lease": lease.to_string()});
        let r: HeaderOnly = self.call("v3/kv/put", &body).await?;
        Ok(r.header)
    }

    /// Puts `value` under `lease` if `key` was last modified at `mod_revision`
    /// (one transaction): `Ok((header, false))` when it was not.
    pub async fn put_if(
        &self,
        key: &[u8],
        mod_revision: i64,
        value: &[u8],
        lease: i64,
    ) -> Result<(Header, bool), EtcdError> {
        self.put_all_if(&[(key, mod_revision, value.to_vec(), lease)]).await
    }

    /// Puts every `(key, expected mod_revision, value, lease)` in one
    /// transaction if every key is still at its revision, else none: `false`
    /// when a comparison failed (the caller cannot tell which).
    pub async fn put_all_if(
        &self,
        writes: &[(&[u8], i64, Vec<u8>, i64)],
    ) -> Result<(Header, bool), EtcdError> {
        let compare: Vec<Value> = writes
            .iter()
            .map(|(key, rev, _, _)| {
                json!({"key": enc(key), "target": "MOD", "result": "EQUAL", "mod_revision": rev.to_string()})
            })
            .collect();
        let success: Vec<Value> = writes
            .iter()
            .map(|(key, _, value, lease)| {
                json!({"request_put": {"key": enc(key), "value": enc(value), "lease": lease.to_string()}})
            })
            .collect();
        let r: TxnResponse = self.call("v3/kv/txn", &json!({"compare": compare, "success": success})).await?;
        Ok((r.header, r.succeeded))
    }

    /// Deletes `key` if it was last modified at `mod_revision`: `false` when it was not.
    pub async fn delete_if(&self, key: &[u8], mod_revision: i64) -> Result<(Header, bool), EtcdError> {
        self.txn_if(key, mod_revision, json!({"request_delete_range": {"key": enc(key)}})).await
    }

    async fn txn_if(&self, key: &[u8], mod_revision: i64, then: Value) -> Result<(Header, bool), EtcdError> {
        let body = json!({
            "compare": [{"key": enc(key), "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision.to_string()}],
            "success": [then],
        });
        let r: TxnResponse = self.call("v3/kv/txn", &body).await?;
        Ok((r.header, r.succeeded))
    }

    /// Deletes `key`; the count says whether it existed.
    pub async fn delete(&self, key: &[u8]) -> Result<(Header, i64), EtcdError> {
        let r: DeleteResponse = self.call("v3/kv/deleterange", &json!({"key": enc(key)})).await?;
        Ok((r.header, r.deleted))
    }

    /// Grants a lease; returns its id and the TTL etcd actually gave (it
    /// raises TTLs below its minimum).
    pub async fn grant(&self, ttl_secs: i64) -> Result<(i64, i64), EtcdError> {
        let r: GrantResponse = self.call("v3/lease/grant", &json!({"TTL": ttl_secs.to_string()})).await?;
        if !r.error.is_empty() {
            return Err(EtcdError::Refused { code: 0, message: r.error });
        }
        Ok((r.id, r.ttl))
    }

    /// Renews a lease once; `None` when etcd no longer has it (it expired).
    pub async fn keep_alive(&self, lease: i64) -> Result<Option<i64>, EtcdError> {
        let r: KeepAliveResult = self.call("v3/lease/keepalive", &json!({"ID": lease.to_string()})).await?;
        Ok((r.ttl > 0).then_some(r.ttl))
    }

    /// `(seconds left, seconds granted)` of a lease; `None` once it has expired.
    pub async fn time_to_live(&self, lease: i64) -> Result<Option<(i64, i64)>, EtcdError> {
        let r: TimeToLiveResult = self.call("v3/lease/timetolive", &json!({"ID": lease.to_string()})).await?;
        Ok((r.ttl >= 0 && r.granted > 0).then_some((r.ttl, r.granted)))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        let _: Value = self.call("v3/lease/revoke", &json!({"ID": lease.to_string()})).await?;
        Ok(())
    }

    /// Opens a require-leader watch of every key under `prefix` from
    /// `start_revision`, on the first member that accepts it.
    pub async fn watch(&self, prefix: &[u8], start_revision: i64) -> Result<WatchStream, EtcdError> {
        let body = json!({"create_request": {
            "key": enc(prefix),
            "range_end": enc(&prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let mut last = String::new();
        for _ in 0..self.endpoints.len() {
            let i = self.current.load(Ordering::Relaxed);
            let url = self.url(i, "v3/watch")?;
            let (token, generation) = self.token();
            let mut req = self.http.post(url.clone()).header(REQUIRE_LEADER.0, REQUIRE_LEADER.1).json(&body);
            if let Some(t) = token {
                req = req.header(AUTHORIZATION, (*t).clone());
            }
            match tokio::time::timeout(self.timeout, req.send()).await {
                Ok(Ok(resp)) if resp.status().is_success() => {
                    return Ok(WatchStream { resp, buf: Vec::new(), endpoint: url, generation });
                }
                Ok(Ok(resp)) => last = format!("{url}: {}", resp.status()),
                Ok(Err(e)) => last = format!("{url}: {e}"),
                Err(_) => last = format!("{url}: no answer within {:?}", self.timeout),
            }
            self.fail_over(i);
        }
        Err(EtcdError::Unreachable(last))
    }

    /// Moves watches and calls to another member after the current one failed a watch.
    pub fn avoid(&self, endpoint: &Url) {
        let i = self.current.load(Ordering::Relaxed);
        if &self.endpoints[i % self.endpoints.len()] == endpoint {
            self.fail_over(i);
        }
    }
}

/// `scheme://host:port` of a member, for messages.
fn origin(url: &Url) -> String {
    url.origin().ascii_serialization()
}

/// The gateway's error body; a body that is not one (a member speaking TLS
/// answering plain HTTP, a proxy) becomes its first line of text.
fn gateway_error(bytes: &[u8]) -> GatewayError {
    serde_json::from_slice(bytes).unwrap_or_else(|_| {
        let text = String::from_utf8_lossy(bytes);
        let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        GatewayError { code: 0, message: line.chars().take(200).collect() }
    })
}

fn decode_result<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, EtcdError> {
    // Streaming calls (keep-alive) wrap their one answer in {"result": ...}.
    if let Ok(Streamed::<T> { result: Some(r), .. }) = serde_json::from_slice(bytes) {
        return Ok(r);
    }
    if let Ok(Streamed::<Value> { error: Some(e), .. }) = serde_json::from_slice(bytes) {
        return Err(EtcdError::Refused { code: e.code, message: e.message });
    }
    serde_json::from_slice(bytes).map_err(|e| EtcdError::Protocol(format!("{e}")))
}

/// The newline-delimited JSON messages of one watch.
pub struct WatchStream {
    resp: reqwest::Response,
    buf: Vec<u8>,
    pub endpoint: Url,
    /// Generation of the token the watch was opened with.
    pub generation: u64,
}

impl WatchStream {
    /// The next message; `Ok(None)` when the member closed the stream.
    pub async fn next(&mut self) -> Result<Option<WatchResponse>, EtcdError> {
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg: Streamed<WatchResponse> = serde_json::from_slice(&line)
                    .map_err(|e| EtcdError::Protocol(format!("watch message: {e}")))?;
                if let Some(e) = msg.error {
                    return Err(EtcdError::Refused { code: e.code, message: e.message });
                }
                return Ok(msg.result);
            }
            match self.resp.chunk().await {
                Ok(Some(chunk)) => self.buf.extend_from_slice(&chunk),
                Ok(None) => return Ok(None),
                Err(e) => return Err(EtcdError::Unreachable(format!("{}: {e}", self.endpoint))),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end(b"/t/"), b"/t0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }

    #[test]
    fn decodes_gateway_messages() {
        let line = br#"{"result":{"header":{"cluster_id":"15118495548433857066","revision":"3"},"events":[{"type":"DELETE","kv":{"key":"L3QvYQ==","mod_revision":"3"}},{"kv":{"key":"L3QvYQ==","value":"aGVsbG8=","mod_revision":"2","lease":"4111120240456007177"}}]}}"#;
        let msg: Streamed<WatchResponse> = serde_json::from_slice(line).unwrap();
        let r = msg.result.unwrap();
        assert_eq!(r.header.cluster_id as u64, 15118495548433857066);
        assert_eq!(r.events[0].kind, EventType::Delete);
        assert_eq!(r.events[0].kv.key, b"/t/a");
        assert_eq!(r.events[1].kind, EventType::Put);
        assert_eq!(r.events[1].kv.value, b"hello");
        assert_eq!(r.events[1].kv.lease, 4111120240456007177);
        let ka: KeepAliveResult =
            decode_result(br#"{"result":{"header":{"revision":"2"},"ID":"1234"}}"#).unwrap();
        assert_eq!(ka.ttl, 0);
        let err =
            decode_result::<Value>(br#"{"error":{"grpc_code":5,"code":5,"message":"lease not found"}}"#);
        assert!(matches!(err, Err(EtcdError::Refused { code: 5, .. })));
    }
}
