//! The outbound side of mutual TLS, through the real proxy in process
//! (`proxy::serve_all_with_identity`) over real sockets: mesh endpoints are
//! rustls servers presenting leaves made here at run time by an rcgen CA, in
//! front of a small hyper app.
//!
//! - HTTP/1.1 and HTTP/2 reach a mesh endpoint over TLS (ALPN `http/1.1` or
//!   `h2`), many requests over few handshakes, and reconnects resume.
//! - WebSocket upgrades go over TLS with ALPN `http/1.1`.
//! - Forged endpoints (another service's leaf, a leaf of another CA, an
//!   expired leaf, no TLS at all) get zero requests while the client sees zero
//!   failures, and each reason is counted.
//! - A mesh endpoint while this sidecar has no identity: a clear error, counted.

mod proxy_support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use trellis_shared::{Address, InstanceId, ServiceName};
use trellis_sidecar::endpoints::{Endpoint, EndpointSet, ServiceEndpoints};
use trellis_sidecar::identity::{MeshIdentity, TrustDomain};
use trellis_sidecar::metrics::Metrics;
use trellis_sidecar::proxy::{self, Listener, ProxyConfig};

use proxy_support::{call, client, FixedResolver};

// ---- Certificates, made at run time.

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages =
        vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let cert = params.self_signed(&key).unwrap();
    Ca { pem: cert.pem(), issuer: Issuer::new(params, key) }
}

/// A leaf for `service` (PEM certificate, PEM key), signed by `ca`; `expired`
/// makes one whose validity ended long ago.
fn leaf(ca: &Ca, service: &str, expired: bool) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    let uri = format!("spiffe://trellis.local/svc/{service}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 2);
    } else {
        let now = std::time::SystemTime::now();
        params.not_before = (now - Duration::from_secs(300)).into();
        params.not_after = (now + Duration::from_secs(3600)).into();
    }
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

/// `service`'s identity with a leaf from `ca` (trust roots: `roots`).
fn identity(roots: &Ca, ca: &Ca, service: &str, expired: bool) -> MeshIdentity {
    let (cert, key) = leaf(ca, service, expired);
    MeshIdentity::from_pem(TrustDomain::default(), name(service), &roots.pem, &cert, &key).unwrap()
}

// ---- Mesh servers: rustls in front of a tiny hyper app.

#[derive(Default)]
struct Seen {
    /// Requests the app answered.
    requests: AtomicUsize,
    /// Completed TLS handshakes, and the resumed ones among them.
    handshakes: AtomicUsize,
    resumed: AtomicUsize,
    /// Handshakes that failed (the client gave up on this server).
    failed_handshakes: AtomicUsize,
    /// ALPN protocols agreed, one per connection.
    alpn: Mutex<Vec<String>>,
}

struct MeshServer {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

/// A mesh endpoint presenting `id`'s leaf and requiring a mesh client
/// certificate; the app answers its `label` and the HTTP version it saw, and
/// echoes WebSocket text messages with `label:` before them.
async fn mesh_server(label: &'static str, id: &MeshIdentity) -> MeshServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let acceptor = TlsAcceptor::from(id.server_config());
    let counts = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), Arc::clone(&counts));
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(_) => {
                        seen.failed_handshakes.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                };
                let conn = tls.get_ref().1;
                seen.handshakes.fetch_add(1, Ordering::SeqCst);
                if conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                    seen.resumed.fetch_add(1, Ordering::SeqCst);
                }
                let alpn = String::from_utf8_lossy(conn.alpn_protocol().unwrap_or(b"none")).into_owned();
                seen.alpn.lock().unwrap().push(alpn);
                let app = service_fn(move |req: Request<Incoming>| {
                    let seen = Arc::clone(&seen);
                    async move { Ok::<_, std::convert::Infallible>(answer(label, &seen, req)) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tls), app)
                    .await;
            });
        }
    });
    MeshServer { addr, seen }
}

fn answer(label: &'static str, seen: &Seen, mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    seen.requests.fetch_add(1, Ordering::SeqCst);
    if req.headers().get("upgrade").is_some_and(|v| v == "websocket") {
        let key = req.headers().get("sec-websocket-key").cloned().unwrap();
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let Ok(io) = on.await else { return };
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(io),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                None,
            )
            .await;
            while let Some(Ok(Message::Text(t))) = ws.next().await {
                if ws.send(Message::text(format!("{label}:{t}"))).await.is_err() {
                    break;
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        return Response::builder()
            .status(101)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(Full::default())
            .unwrap();
    }
    Response::new(Full::new(Bytes::from(format!("{label} {:?}", req.version()))))
}

/// A plain-text HTTP server (registered as mesh TLS by a forger), counting requests.
async fn plain_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&hits);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let app = service_fn(move |_req: Request<Incoming>| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from("plain"))))
                    }
                });
                let _ =
                    auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tcp), app).await;
            });
        }
    });
    (addr, hits)
}

// ---- The proxy.

/// `service`'s endpoints at `addrs`, each registered as mesh TLS or not.
fn endpoints(service: &str, addrs: &[(SocketAddr, bool)]) -> Arc<ServiceEndpoints> {
    let svc = Arc::new(ServiceEndpoints::new(name(service)));
    let endpoints = addrs
        .iter()
        .enumerate()
        .map(|(i, (a, mesh))| {
            let ep = Endpoint::new(
                InstanceId::new(format!("{service}-{i}")).unwrap(),
                Address::new(a.ip().to_string()).unwrap(),
                a.port(),
                100,
                None,
                BTreeMap::new(),
                Arc::default(),
            );
            Arc::new(if *mesh { ep.with_mesh_tls(name(service)) } else { ep })
        })
        .collect();
    svc.publish(EndpointSet { endpoints, index: 1, epoch: "test".into(), health_panic: false });
    svc
}

struct Proxy {
    addr: SocketAddr,
    /// A dedicated port for `svc` (what an HTTP/2 client whose `:authority` is
    /// an address calls).
    dedicated: SocketAddr,
    metrics: Arc<Metrics>,
    _stop: tokio_util::sync::DropGuard,
}

async fn start(svc: &Arc<ServiceEndpoints>, config: ProxyConfig, identity: Option<MeshIdentity>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let port = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dedicated = port.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    tokio::spawn(proxy::serve_all_with_identity(
        vec![
            Listener { listener, service: None },
            Listener { listener: port, service: Some(svc.name.clone()) },
        ],
        Arc::new(FixedResolver::default().with(Arc::clone(svc))),
        config,
        Arc::clone(&metrics),
        identity,
        shutdown.clone(),
    ));
    Proxy { addr, dedicated, metrics, _stop: shutdown.drop_guard() }
}

/// The value of the metric line starting with `prefix` (0 when absent).
fn metric(metrics: &Metrics, prefix: &str) -> u64 {
    metrics
        .encode()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

fn handshakes(m: &Metrics, kind: &str) -> u64 {
    metric(m, &format!("trellis_sidecar_mtls_handshakes_total{{kind=\"{kind}\"}}"))
}

fn failures(m: &Metrics, reason: &str) -> u64 {
    metric(m, &format!("trellis_sidecar_mtls_failures_total{{service=\"users\",reason=\"{reason}\"}}"))
}

// ---- Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_reaches_a_mesh_endpoint_over_pooled_tls() {
    let mesh_ca = ca("mesh");
    let server = mesh_server("users-0", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let svc = endpoints("users", &[(server.addr, true)]);
    let proxy = start(&svc, ProxyConfig::default(), Some(identity(&mesh_ca, &mesh_ca, "web", false))).await;
    let c = client();
    let n = 200;
    for _ in 0..n {
        let a = call(&c, proxy.addr, "GET", "users", Bytes::new()).await;
        assert_eq!((a.status, &a.body[..]), (200, &b"users-0 HTTP/1.1"[..]));
    }
    let s = &server.seen;
    let alpn = s.alpn.lock().unwrap().clone();
    println!(
        "{n} sequential HTTP/1.1 requests: {} TLS handshakes at the endpoint, ALPN {alpn:?}; proxy counted {} full, {} resumed",
        s.handshakes.load(Ordering::SeqCst),
        handshakes(&proxy.metrics, "full"),
        handshakes(&proxy.metrics, "resumed"),
    );
    assert_eq!(s.requests.load(Ordering::SeqCst), n);
    assert!(s.handshakes.load(Ordering::SeqCst) <= 2, "sequential requests reuse a pooled TLS connection");
    assert_eq!(alpn, ["http/1.1"]);
    assert_eq!(handshakes(&proxy.metrics, "full"), 1);

    // 50 at once open a few more connections, which return to the pool.
    proxy_support::concurrently(50, |_| {
        let (c, addr) = (c.clone(), proxy.addr);
        async move {
            let a = call(&c, addr, "GET", "users", Bytes::new()).await;
            assert_eq!(a.status, 200);
        }
    })
    .await;
    let after_burst = s.handshakes.load(Ordering::SeqCst);
    for _ in 0..50 {
        assert_eq!(call(&c, proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
    }
    println!("after a burst of 50: {after_burst} handshakes; 50 more sequential requests added none");
    assert!(after_burst <= 51, "{after_burst} handshakes for 50 concurrent requests");
    assert_eq!(s.handshakes.load(Ordering::SeqCst), after_burst, "pooled TLS connections are reused");
    // A connect still pending after `connect_hedge` on a loaded machine races
    // a second one, abandoned mid-handshake when the first wins: not an error.
    println!("handshakes abandoned by connect hedging: {}", s.failed_handshakes.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnects_resume_the_tls_session() {
    let mesh_ca = ca("mesh");
    let server = mesh_server("users-0", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let svc = endpoints("users", &[(server.addr, true)]);
    // No idle connection is kept: every request connects again.
    let config = ProxyConfig { pool_max_idle_per_endpoint: 0, ..ProxyConfig::default() };
    let proxy = start(&svc, config, Some(identity(&mesh_ca, &mesh_ca, "web", false))).await;
    let c = client();
    let n = 10;
    for _ in 0..n {
        assert_eq!(call(&c, proxy.addr, "GET", "users", Bytes::new()).await.status, 200);
    }
    let s = &server.seen;
    let (all, resumed) = (s.handshakes.load(Ordering::SeqCst), s.resumed.load(Ordering::SeqCst));
    println!(
        "{n} requests without pooling: {all} handshakes, {resumed} resumed at the endpoint; proxy: {} full, {} resumed",
        handshakes(&proxy.metrics, "full"),
        handshakes(&proxy.metrics, "resumed")
    );
    assert_eq!(all, n);
    assert_eq!(resumed, n - 1, "every reconnect after the first resumes");
    assert_eq!(handshakes(&proxy.metrics, "full"), 1);
    assert_eq!(handshakes(&proxy.metrics, "resumed"), (n - 1) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_reaches_a_mesh_endpoint_over_one_multiplexed_tls_connection() {
    let mesh_ca = ca("mesh");
    let server = mesh_server("users-0", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let svc = endpoints("users", &[(server.addr, true)]);
    let proxy = start(&svc, ProxyConfig::default(), Some(identity(&mesh_ca, &mesh_ca, "web", false))).await;
    // The app speaks HTTP/2 (prior knowledge) to its sidecar.
    let h2: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    let n = 100;
    proxy_support::concurrently(n, |_| {
        let (h2, addr) = (h2.clone(), proxy.dedicated);
        async move {
            let req = Request::get(format!("http://{addr}/x")).body(Full::default()).unwrap();
            let resp = h2.request(req).await.unwrap();
            let status = resp.status();
            let body = resp.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(
                (status.as_u16(), &body[..]),
                (200, &b"users-0 HTTP/2.0"[..]),
                "{}",
                String::from_utf8_lossy(&body)
            );
        }
    })
    .await;
    let s = &server.seen;
    let alpn = s.alpn.lock().unwrap().clone();
    println!(
        "{n} concurrent HTTP/2 requests: {} TLS handshake(s), ALPN {alpn:?}",
        s.handshakes.load(Ordering::SeqCst)
    );
    assert_eq!(s.requests.load(Ordering::SeqCst), n);
    assert_eq!(s.handshakes.load(Ordering::SeqCst), 1, "one multiplexed connection");
    assert_eq!(alpn, ["h2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_go_over_tls_with_http1() {
    let mesh_ca = ca("mesh");
    let server = mesh_server("chat-0", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let svc = endpoints("users", &[(server.addr, true)]);
    let proxy = start(&svc, ProxyConfig::default(), Some(identity(&mesh_ca, &mesh_ca, "web", false))).await;
    let req = "ws://users/echo".into_client_request().unwrap();
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("upgrade through the proxy");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(got.into_text().unwrap().as_str(), format!("chat-0:hi {i}"));
    }
    ws.close(None).await.unwrap();
    assert_eq!(server.seen.alpn.lock().unwrap().as_slice(), ["http/1.1"]);
    println!("WebSocket echoed over mesh TLS (ALPN http/1.1)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_endpoints_get_no_request_and_the_client_sees_no_failure() {
    let mesh_ca = ca("mesh");
    let other_ca = ca("elsewhere");
    let good = mesh_server("users-good", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    // Registered under `users`, none can prove it: another service's leaf,
    // a `users` leaf from another CA, an expired `users` leaf, no TLS at all.
    let orders = mesh_server("forged-orders", &identity(&mesh_ca, &mesh_ca, "orders", false)).await;
    let foreign = mesh_server("forged-foreign", &identity(&other_ca, &other_ca, "users", false)).await;
    let expired = mesh_server("forged-expired", &identity(&mesh_ca, &mesh_ca, "users", true)).await;
    let (plain, plain_hits) = plain_server().await;
    let svc = endpoints(
        "users",
        &[(orders.addr, true), (foreign.addr, true), (expired.addr, true), (plain, true), (good.addr, true)],
    );
    // Enough attempts to get past every forged endpoint in one request.
    let config = ProxyConfig { max_attempts: 5, ..ProxyConfig::default() };
    let proxy = start(&svc, config, Some(identity(&mesh_ca, &mesh_ca, "web", false))).await;
    let c = client();
    let n = 200;
    for i in 0..n {
        // POSTs too: a failed handshake sent nothing, so any method goes elsewhere.
        let method = if i % 2 == 0 { "GET" } else { "POST" };
        let a = call(&c, proxy.addr, method, "users", Bytes::from_static(b"payload")).await;
        assert_eq!((a.status, &a.body[..]), (200, &b"users-good HTTP/1.1"[..]), "request {i} ({method})");
    }
    let forged_requests = orders.seen.requests.load(Ordering::SeqCst)
        + foreign.seen.requests.load(Ordering::SeqCst)
        + expired.seen.requests.load(Ordering::SeqCst)
        + plain_hits.load(Ordering::SeqCst);
    let reasons =
        ["wrong_identity", "untrusted", "expired", "handshake"].map(|r| (r, failures(&proxy.metrics, r)));
    let ejections = metric(&proxy.metrics, "trellis_sidecar_ejections_total{service=\"users\"}");
    println!(
        "{n} requests: {} served by the good endpoint, {forged_requests} by forged ones; failures {reasons:?}; {ejections} ejections",
        good.seen.requests.load(Ordering::SeqCst)
    );
    assert_eq!(forged_requests, 0, "a forged endpoint never receives a request");
    assert_eq!(good.seen.requests.load(Ordering::SeqCst), n);
    for (reason, count) in reasons {
        assert!(count >= 1, "mtls_failures{{reason={reason}}} did not move");
    }
    assert!(ejections >= 4, "every forged endpoint is ejected: {ejections}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_endpoint_without_an_identity_fails_clearly_and_is_counted() {
    let mesh_ca = ca("mesh");
    let server = mesh_server("users-0", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let (plain, plain_hits) = plain_server().await;
    let svc = endpoints("users", &[(server.addr, true)]);
    let proxy = start(&svc, ProxyConfig::default(), None).await;
    let a = call(&client(), proxy.addr, "GET", "users", Bytes::new()).await;
    let body = String::from_utf8_lossy(&a.body).into_owned();
    println!("without an identity: {} {body}", a.status);
    assert_eq!(a.status, 502);
    assert_eq!(a.error_code(), Some("upstream_failed"));
    assert!(body.contains("--mtls"), "the error says what is missing: {body}");
    assert_eq!(
        server.seen.handshakes.load(Ordering::SeqCst) + server.seen.requests.load(Ordering::SeqCst),
        0
    );
    assert!(failures(&proxy.metrics, "no_identity") >= 1);

    // A mixed mesh: plain-text endpoints are reached as before, identity or not.
    let mixed = endpoints("users", &[(plain, false)]);
    let proxy = start(&mixed, ProxyConfig::default(), None).await;
    let a = call(&client(), proxy.addr, "GET", "users", Bytes::new()).await;
    assert_eq!((a.status, &a.body[..]), (200, &b"plain"[..]));
    assert_eq!(plain_hits.load(Ordering::SeqCst), 1);
}

// ---- Through the real binaries: `--require-mtls`.

/// `n` GETs to `service` through the sidecar's outbound port: their statuses.
async fn statuses(outbound: SocketAddr, service: &str, n: usize) -> Vec<u16> {
    let c = reqwest::Client::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let r = c.get(format!("http://{outbound}/")).header("host", service).send().await.unwrap();
        out.push(r.status().as_u16());
    }
    out
}

async fn scrape(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap()
}

fn value(text: &str, prefix: &str) -> u64 {
    text.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_mtls_drops_plain_endpoints_and_a_mixed_mesh_still_reaches_them() {
    use trellis_tests::{admin::endpoint_list, strings, wait_for, AppInstance, RegistryProc, SidecarProc};
    let registry = RegistryProc::start("registry", &[]).await;
    let url = registry.url();
    // A plain-text instance, registered by its sidecar as today.
    let _plain = AppInstance::start(&url, "users", "plain-1", &[], &[], Duration::from_secs(30)).await;
    // A mesh TLS instance, registered through the API (as an inbound sidecar would).
    let mesh_ca = ca("mesh");
    let mesh = mesh_server("users-mesh", &identity(&mesh_ca, &mesh_ca, "users", false)).await;
    let body =
        serde_json::json!({"address": "127.0.0.1", "port": mesh.addr.port(), "ttl": "60s", "mesh_tls": true});
    let put = reqwest::Client::new()
        .put(format!("{url}/v1/services/users/instances/mesh-1"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(put.status(), 200);

    let watch = strings(&["--upstream-service", "users"]);
    let strict_args = [watch.clone(), strings(&["--require-mtls"])].concat();
    let strict = SidecarProc::start("strict", &url, &strict_args, Duration::from_secs(30)).await;
    let mixed = SidecarProc::start("mixed", &url, &watch, Duration::from_secs(30)).await;
    let ids = |list: Vec<serde_json::Value>| {
        let mut ids: Vec<String> = list.iter().filter_map(|e| e["id"].as_str().map(String::from)).collect();
        ids.sort();
        ids
    };
    wait_for("the mixed sidecar to see both instances", Duration::from_secs(20), || async {
        (ids(endpoint_list(mixed.admin, "users").await).len() == 2).then_some(())
    })
    .await;
    wait_for("the strict sidecar to see the mesh instance", Duration::from_secs(20), || async {
        (!endpoint_list(strict.admin, "users").await.is_empty()).then_some(())
    })
    .await;
    assert_eq!(ids(endpoint_list(strict.admin, "users").await), ["mesh-1"], "the plain instance was dropped");
    let metrics = scrape(strict.admin).await;
    assert_eq!(value(&metrics, "trellis_sidecar_endpoints_refused_total{reason=\"plain_text\"}"), 1);

    // The strict sidecar has no identity (no --mtls): the mesh endpoint fails
    // clearly, and the plain one is never used instead.
    let strict_answers = statuses(strict.outbound, "users", 10).await;
    let metrics = scrape(strict.admin).await;
    let no_identity =
        value(&metrics, "trellis_sidecar_mtls_failures_total{service=\"users\",reason=\"no_identity\"}");
    println!("--require-mtls without an identity: {strict_answers:?}, no_identity failures {no_identity}");
    assert!(strict_answers.iter().all(|s| *s == 502), "{strict_answers:?}");
    assert!(no_identity >= 1);
    assert_eq!(mesh.seen.handshakes.load(Ordering::SeqCst), 0);

    // Without the flag: the plain instance serves every request; the mesh one
    // (unreachable without an identity) fails over to it and is ejected.
    let mixed_answers = statuses(mixed.outbound, "users", 20).await;
    println!("mixed mesh without an identity: {mixed_answers:?}");
    assert!(mixed_answers.iter().all(|s| *s == 200), "{mixed_answers:?}");
}
