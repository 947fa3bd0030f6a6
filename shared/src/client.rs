//! The async registry client: register, heartbeat, deregister, list, get,
//! watches built on blocking queries, and the mesh identity's signing.
//!
//! It is given several registry URLs, sticks to one, and moves to the next on a
//! transport error, a timeout or a 5xx answer, so that one registry replica dying
//! costs a caller one failed attempt, not an outage. Watches remember the last
//! index and epoch they saw, so a failover resumes where it left off.
//!
//! Every call carries the token of [`crate::token`] and speaks TLS as
//! [`crate::tls`] sets up. The registry is trusted only so far: an answer
//! larger than [`ClientConfig::max_answer`] or a view of another service than
//! the one asked is an error, and a watch keeps its last good view.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;
use url::Url;

use crate::backoff::Backoff;
use crate::error::{ErrorBody, ErrorCode};
use crate::identity::{SignRequest, SignResponse};
use crate::names::{InstanceId, ServiceName};
use crate::tls::{HandshakeFailure, TlsFiles};
use crate::token::{TokenSource, TokenSpec};
use crate::types::{HeartbeatRequest, InstanceRecord, RegisterRequest, ServiceList, ServiceView};

/// Client settings. Every field has a default suited to a sidecar.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Timeout of a whole ordinary (non-blocking) request. Default 2s.
    pub request_timeout: Duration,
    /// TCP connect timeout. Default 1s.
    pub connect_timeout: Duration,
    /// How long a watch asks the registry to hold a blocking query. Default 30s.
    pub watch_wait: Duration,
    /// First backoff ceiling after a failed watch round. Default 100ms.
    pub backoff_base: Duration,
    /// Largest backoff ceiling. Default 5s; the sidecar caps it at its heartbeat interval.
    pub backoff_cap: Duration,
    /// Largest answer body accepted, in bytes; a larger one is an error. Default 16 MiB.
    pub max_answer: usize,
    /// The token sent as `Authorization: Bearer` on every call. Default none.
    pub token: TokenSpec,
    /// CA, client certificate and key for `https://` registries. Default: the web roots, no client certificate.
    pub tls: TlsFiles,
}

/// Default of [`ClientConfig::max_answer`]: 16 MiB.
pub const DEFAULT_MAX_ANSWER: usize = 16 << 20;

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(1),
            watch_wait: Duration::from_secs(30),
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(5),
            max_answer: DEFAULT_MAX_ANSWER,
            token: TokenSpec::None,
            tls: TlsFiles::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid registry URL {url:?}: {reason}")]
    Config { url: String, reason: String },
    #[error("registry {url} unreachable: {source}")]
    Transport {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {url} answered {status}: {}: {}", .body.error, .body.message)]
    Api { url: Url, status: StatusCode, body: ErrorBody },
    #[error("registry {url} answered something unexpected: {reason}")]
    Protocol { url: Url, reason: String },
    #[error("registry {url} sent an answer larger than the {limit}-byte limit; ignoring it")]
    TooLarge { url: Url, limit: usize },
    #[error("registry {url}: its TLS certificate did not verify (check --registry-ca): {source}")]
    Certificate {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
    #[error("registry {url} refused this client's TLS certificate (check --registry-cert/--registry-key): {source}")]
    ClientCertificate {
        url: Url,
        #[source]
        source: reqwest::Error,
    },
}

impl ClientError {
    /// The registry's error code, when it answered with one.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Api { body, .. } => Some(body.error),
            _ => None,
        }
    }

    /// The registry does not know the instance: the caller re-registers.
    pub fn is_unknown_instance(&self) -> bool {
        self.code() == Some(ErrorCode::UnknownInstance)
    }

    /// The registry refused our credentials: `401` (no or unknown token) or
    /// `403` (the token lacks the right).
    pub fn is_auth(&self) -> bool {
        matches!(self, ClientError::Api { status, .. }
            if *status == StatusCode::UNAUTHORIZED || *status == StatusCode::FORBIDDEN)
    }

    /// Worth trying another replica: the registry could not be reached or had
    /// trouble of its own, as opposed to refusing what we sent.
    fn is_failover(&self) -> bool {
        match self {
            ClientError::Transport { .. }
            | ClientError::Protocol { .. }
            | ClientError::TooLarge { .. }
            | ClientError::Certificate { .. }
            | ClientError::ClientCertificate { .. } => true,
            ClientError::Api { status, .. } => status.is_server_error(),
            ClientError::Config { .. } => false,
        }
    }
}

/// Parses a comma-separated list of registry base URLs (`http://h:7600,http://h2:7600`).
pub fn parse_urls(list: &str) -> Result<Vec<Url>, ClientError> {
    let mut urls = Vec::new();
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let bad = |reason: &str| ClientError::Config { url: part.to_string(), reason: reason.to_string() };
        let mut url = Url::parse(part).map_err(|e| bad(&e.to_string()))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad("scheme must be http or https"));
        }
        if url.host().is_none() {
            return Err(bad("URL has no host"));
        }
        // Paths are appended below; normalise so "http://h:1/" and "http://h:1" match.
        let path = url.path().trim_end_matches('/').to_string();
        url.set_path(&path);
        urls.push(url);
    }
    if urls.is_empty() {
        return Err(ClientError::Config { url: list.to_string(), reason: "no registry URL given".into() });
    }
    Ok(urls)
}

/// A cheap, cloneable handle; clones share connections and the current replica.
#[derive(Clone)]
pub struct RegistryClient {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    token: Arc<TokenSource>,
    urls: Vec<Url>,
    current: AtomicUsize,
    config: ClientConfig,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryClient").field("urls", &self.inner.urls).finish()
    }
}

impl RegistryClient {
    pub fn new(urls: Vec<Url>, config: ClientConfig) -> Result<Self, ClientError> {
        if urls.is_empty() {
            return Err(ClientError::Config { url: String::new(), reason: "no registry URL given".into() });
        }
        let config_err = |reason: String| ClientError::Config { url: String::new(), reason };
        if !config.tls.is_empty() {
            if let Some(plain) = urls.iter().find(|u| u.scheme() != "https") {
                // Certificates given but a plain URL: the operator meant TLS; refuse rather than send in clear.
                return Err(ClientError::Config {
                    url: plain.to_string(),
                    reason: "TLS files are given but this URL is not https://".into(),
                });
            }
        }
        let token = Arc::new(TokenSource::load(&config.token).map_err(|e| config_err(e.to_string()))?);
        TokenSource::spawn_poll(&token);
        let builder = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            // The sidecar sets HTTP_PROXY for its app; its own registry calls must not follow it.
            .no_proxy()
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60))
            // A redirect would carry the token elsewhere, perhaps in clear.
            .redirect(reqwest::redirect::Policy::none());
        let builder = crate::tls::apply(builder, &config.tls).map_err(|e| config_err(e.to_string()))?;
        let http = builder.build().map_err(|e| config_err(e.to_string()))?;
        Ok(RegistryClient {
            inner: Arc::new(Inner { http, token, urls, current: AtomicUsize::new(0), config }),
        })
    }

    /// A client for a comma-separated URL list with default settings.
    pub fn from_list(list: &str) -> Result<Self, ClientError> {
        Self::new(parse_urls(list)?, ClientConfig::default())
    }

    pub fn config(&self) -> &ClientConfig {
        &self.inner.config
    }

    /// The replica requests go to now.
    pub fn current_url(&self) -> &Url {
        let i = self.inner.current.load(Ordering::Relaxed) % self.inner.urls.len();
        &self.inner.urls[i]
    }

    pub async fn register(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &RegisterRequest,
    ) -> Result<InstanceRecord, ClientError> {
        let path = format!("v1/services/{service}/instances/{id}");
        self.call(Method::PUT, &path, &[], Some(req), self.inner.config.request_timeout).await
    }

    pub async fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &HeartbeatRequest,
    ) -> Result<(), ClientError> {
        let path = format!("v1/services/{service}/instances/{id}/heartbeat");
        self.call_no_body(Method::PUT, &path, Some(req)).await
    }

    pub async fn deregister(&self, service: &ServiceName, id: &InstanceId) -> Result<(), ClientError> {
        let path = format!("v1/services/{service}/instances/{id}");
        self.call_no_body::<()>(Method::DELETE, &path, None).await
    }

    pub async fn list_services(&self) -> Result<ServiceList, ClientError> {
        self.call::<(), _>(Method::GET, "v1/services", &[], None, self.inner.config.request_timeout).await
    }

    /// The current state of a service: healthy instances, or all with `all`.
    pub async fn get(&self, service: &ServiceName, all: bool) -> Result<ServiceView, ClientError> {
        let query: &[(&str, String)] = if all { &[("all", String::new())] } else { &[] };
        let query: Vec<(&str, String)> = query.iter().map(|(k, _)| (*k, "true".to_string())).collect();
        let path = format!("v1/services/{service}");
        let (url, view) = self
            .call_at::<(), ServiceView>(Method::GET, &path, &query, None, self.inner.config.request_timeout)
            .await?;
        check_service(url, service, view)
    }

    /// A blocking query: answers when the service's index exceeds `index`, or
    /// after `wait` with the unchanged state.
    pub async fn get_blocking(
        &self,
        service: &ServiceName,
        all: bool,
        index: u64,
        epoch: &str,
        wait: Duration,
    ) -> Result<ServiceView, ClientError> {
        // The epoch makes a restarted registry answer at once even when its
        // index happens to equal `index`.
        let mut query = vec![
            ("index", index.to_string()),
            ("wait", format!("{}ms", wait.as_millis())),
            ("epoch", epoch.to_string()),
        ];
        if all {
            query.push(("all", "true".to_string()));
        }
        let path = format!("v1/services/{service}");
        // The registry adds up to wait/16 of jitter; leave room for it and the transfer.
        let timeout = wait + wait / 16 + self.inner.config.request_timeout;
        let (url, view) = self.call_at::<(), ServiceView>(Method::GET, &path, &query, None, timeout).await?;
        check_service(url, service, view)
    }

    /// Has the registry certify the key of `req.csr` as `req.service`
    /// (`POST /v1/identity/sign`; needs a token with write on the service).
    pub async fn sign(&self, req: &SignRequest) -> Result<SignResponse, ClientError> {
        self.call(Method::POST, "v1/identity/sign", &[], Some(req), self.inner.config.request_timeout).await
    }

    /// Follows a service: each `next()` returns a state different from the last.
    pub fn watch(&self, service: ServiceName) -> Watch {
        Watch::new(self.clone(), service, false)
    }

    async fn call_no_body<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        self.send(method, path, &[], body, self.inner.config.request_timeout).await.map(|_| ())
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        self.call_at(method, path, query, body, timeout).await.map(|(_, t)| t)
    }

    /// [`Self::call`], also returning the URL that answered.
    async fn call_at<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(Url, T), ClientError> {
        let (url, bytes) = self.send(method, path, query, body, timeout).await?;
        match serde_json::from_slice(&bytes) {
            Ok(t) => Ok((url, t)),
            Err(e) => Err(ClientError::Protocol { url, reason: format!("bad JSON: {e}") }),
        }
    }

    /// Sends to the current replica, moving on to the next ones on failover errors;
    /// each replica is tried at most once per call.
    async fn send<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(Url, bytes::Bytes), ClientError> {
        let n = self.inner.urls.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let mut last_err = None;
        for k in 0..n {
            let i = (start + k) % n;
            let base = &self.inner.urls[i];
            match self.send_once(base, method.clone(), path, query, body, timeout).await {
                Ok(out) => {
                    if k > 0 {
                        // Stick to the replica that answered.
                        self.inner.current.store(i, Ordering::Relaxed);
                        tracing::info!(registry = %base, "failed over to registry replica");
                    }
                    return Ok(out);
                }
                Err(e) if e.is_failover() => {
                    tracing::debug!(registry = %base, error = %e, "registry request failed");
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        if n > 1 {
            self.inner.current.store((start + 1) % n, Ordering::Relaxed);
        }
        Err(last_err
            .unwrap_or_else(|| ClientError::Config { url: String::new(), reason: "no registry URL".into() }))
    }

    /// One request to one replica. A `401` with a token file re-reads the
    /// file first: if the token changed (rotated since the last poll), the
    /// request is sent once more with the new one.
    async fn send_once<B: Serialize>(
        &self,
        base: &Url,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<(Url, bytes::Bytes), ClientError> {
        let url = Url::parse(&format!("{}/{}", base.as_str().trim_end_matches('/'), path))
            .map_err(|e| ClientError::Config { url: base.to_string(), reason: e.to_string() })?;
        let mut retried = false;
        loop {
            let r = self.attempt(&url, method.clone(), query, body, timeout).await;
            match r {
                Err(ClientError::Api { status: StatusCode::UNAUTHORIZED, .. })
                    if !retried && self.inner.token.is_file() && self.inner.token.reload(true) =>
                {
                    retried = true;
                }
                r => return r.map(|bytes| (url, bytes)),
            }
        }
    }

    async fn attempt<B: Serialize>(
        &self,
        url: &Url,
        method: Method,
        query: &[(&str, String)],
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<bytes::Bytes, ClientError> {
        let mut req = self.inner.http.request(method, url.clone()).timeout(timeout);
        if let Some(token) = self.inner.token.header() {
            req = req.header(reqwest::header::AUTHORIZATION, token);
        }
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let transport = |source: reqwest::Error| match HandshakeFailure::of(&source) {
            Some(HandshakeFailure::ServerCertificate) => {
                ClientError::Certificate { url: url.clone(), source }
            }
            Some(HandshakeFailure::ClientCertificate) => {
                ClientError::ClientCertificate { url: url.clone(), source }
            }
            None => ClientError::Transport { url: url.clone(), source },
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let limit = self.inner.config.max_answer;
        let too_large = || ClientError::TooLarge { url: url.clone(), limit };
        if resp.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        // Content-Length may be absent (chunked) or lie: cap while reading too.
        let mut bytes = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        let bytes = bytes.freeze();
        if status.is_success() {
            return Ok(bytes);
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Err(ClientError::Api { url: url.clone(), status, body }),
            Err(_) => Err(ClientError::Protocol {
                url: url.clone(),
                reason: format!("status {status} without an error body"),
            }),
        }
    }
}

/// A view of another service than the one asked is a protocol error: a
/// confused or hostile registry must not move one service's traffic to
/// another's instances.
fn check_service(url: Url, asked: &ServiceName, view: ServiceView) -> Result<ServiceView, ClientError> {
    if view.service == *asked {
        return Ok(view);
    }
    Err(ClientError::Protocol {
        url,
        reason: format!("asked for service {asked:?}, got a view of {:?}", view.service.as_str()),
    })
}

/// A watch over one service. The first `next()` answers at once with the current
/// state; each later one blocks until the state differs (index or epoch) from the
/// last returned. Errors are returned so the caller can report them; the watch
/// stays usable and backs off before its next attempt.
pub struct Watch {
    client: RegistryClient,
    service: ServiceName,
    all: bool,
    last: Option<(u64, String)>,
    backoff: Backoff,
    pause: bool,
}

impl Watch {
    pub fn new(client: RegistryClient, service: ServiceName, all: bool) -> Self {
        let backoff = Backoff::new(client.inner.config.backoff_base, client.inner.config.backoff_cap);
        Watch { client, service, all, last: None, backoff, pause: false }
    }

    pub fn service(&self) -> &ServiceName {
        &self.service
    }

    /// The index and epoch of the last state returned.
    pub fn last(&self) -> Option<(u64, &str)> {
        self.last.as_ref().map(|(i, e)| (*i, e.as_str()))
    }

    pub async fn next(&mut self) -> Result<ServiceView, ClientError> {
        let wait = self.client.inner.config.watch_wait;
        loop {
            if std::mem::take(&mut self.pause) {
                tokio::time::sleep(self.backoff.next_delay()).await;
            }
            let started = Instant::now();
            let result = match &self.last {
                None => self.client.get(&self.service, self.all).await,
                Some((index, epoch)) => {
                    self.client.get_blocking(&self.service, self.all, *index, epoch, wait).await
                }
            };
            let view = match result {
                Ok(v) => v,
                Err(e) => {
                    self.pause = true;
                    return Err(e);
                }
            };
            let changed = match &self.last {
                None => true,
                Some((index, epoch)) => view.index != *index || view.epoch != *epoch,
            };
            if changed {
                self.backoff.reset();
                self.last = Some((view.index, view.epoch.clone()));
                return Ok(view);
            }
            // An unchanged answer well before the wait (a registry shutting down
            // answers its open queries at once) must not become a busy loop.
            self.pause = started.elapsed() < wait / 2;
            if !self.pause {
                self.backoff.reset();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_lists() {
        let urls = parse_urls("http://a:7600/, http://b:7600").unwrap();
        assert_eq!(urls.len(), 2);
        assert_eq!(urls[0].as_str(), "http://a:7600/");
        assert!(parse_urls("").is_err());
        assert!(parse_urls("ftp://a").is_err());
        assert!(parse_urls("not a url").is_err());
    }

    /// Serves `body` (with a Content-Length) to every request; returns the
    /// address and the `Authorization` headers seen.
    async fn answer_with(body: String) -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen_in = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&buf[..n]).to_string();
                let auth = head.lines().find(|l| l.to_ascii_lowercase().starts_with("authorization:"));
                seen_in.lock().unwrap().push(auth.unwrap_or_default().to_string());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        (addr, seen)
    }

    #[tokio::test]
    async fn a_view_of_another_service_is_a_protocol_error() {
        let body = r#"{"service":"billing","index":3,"epoch":"e","instances":[]}"#.to_string();
        let (addr, _) = answer_with(body).await;
        let client = RegistryClient::from_list(&format!("http://{addr}")).unwrap();
        let err = client.get(&ServiceName::new("users").unwrap(), false).await.unwrap_err();
        assert!(matches!(err, ClientError::Protocol { .. }), "{err}");
        assert!(err.to_string().contains("billing"), "{err}");
    }

    #[tokio::test]
    async fn answers_over_the_limit_are_refused_and_the_token_is_sent() {
        let view = r#"{"service":"users","index":3,"epoch":"e","instances":[]}"#;
        let body = format!("{view}{}", " ".repeat(2048));
        let (addr, seen) = answer_with(body).await;
        let config = ClientConfig {
            max_answer: 1024,
            token: TokenSpec::Secret("t0ken-for-test".into()),
            ..ClientConfig::default()
        };
        let client = RegistryClient::new(parse_urls(&format!("http://{addr}")).unwrap(), config).unwrap();
        let err = client.get(&ServiceName::new("users").unwrap(), false).await.unwrap_err();
        assert!(matches!(err, ClientError::TooLarge { limit: 1024, .. }), "{err}");
        assert_eq!(seen.lock().unwrap()[0].to_ascii_lowercase(), "authorization: bearer t0ken-for-test");
        assert!(!format!("{client:?}").contains("t0ken"));
    }

    #[tokio::test]
    async fn fails_over_to_the_next_replica() {
        // First URL: a port nothing listens on. Second: a tiny server answering one view.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = live.accept().await {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = r#"{"service":"users","index":3,"epoch":"e","instances":[]}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        let client = RegistryClient::from_list(&format!("http://{dead_addr},http://{live_addr}")).unwrap();
        let view = client.get(&ServiceName::new("users").unwrap(), false).await.unwrap();
        assert_eq!(view.index, 3);
        assert_eq!(client.current_url().port(), Some(live_addr.port()));
    }
}
