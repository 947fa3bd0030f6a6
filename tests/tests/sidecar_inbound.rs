//! The sidecar's inbound side (the real `inbound::serve`, in process, on
//! loopback port 0) in front of test apps, with mesh certificates made at run
//! time: HTTP/1.1, HTTP/2, gRPC (unary, streaming, trailers), WebSocket and
//! SSE reach the app with `x-trellis-caller` set and a forged one removed; a
//! caller outside `--allow-from` gets `403 not_allowed`; plain text, no
//! certificate, another CA's certificate and an expired one fail at the
//! handshake and never reach the app; past `max_concurrency` the answer is
//! `503 overloaded` at once; the decisions are counted per caller; shutdown
//! lets a request in flight finish. And the real binaries: a sidecar with
//! `--inbound` on port 0 registers the inbound port with `mesh_tls`.

mod grpc_support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::Code;
use trellis_shared::{ErrorBody, ServiceName};
use trellis_sidecar::identity::{MeshIdentity, TrustDomain};
use trellis_sidecar::inbound::{self, AllowFrom, InboundConfig};
use trellis_sidecar::metrics::Metrics;
use trellis_tests::mesh_pki::{Leaf, MeshCa};
use trellis_tests::{wait_for, AppProc, RegistryProc, SidecarProc};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type AppBody = UnsyncBoxBody<Bytes, BoxError>;

const WITHIN: Duration = Duration::from_secs(20);

fn name(s: &str) -> ServiceName {
    ServiceName::new(s).unwrap()
}

fn identity(ca: &MeshCa, service: &str, leaf: &Leaf) -> MeshIdentity {
    MeshIdentity::from_pem(
        TrustDomain::default(),
        name(service),
        &ca.cert_pem,
        &leaf.chain_pem,
        &leaf.key_pem,
    )
    .expect("an identity from test certificates")
}

// ---- The app behind the inbound side.

/// What the test app saw.
struct AppState {
    /// Every request that reached it.
    hits: AtomicUsize,
    /// `/hold` requests waiting for a permit.
    held: AtomicUsize,
    release: Semaphore,
}

fn full(s: impl Into<Bytes>) -> AppBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed_unsync()
}

async fn app_answer(state: Arc<AppState>, req: Request<Incoming>) -> Response<AppBody> {
    state.hits.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    if path.starts_with("/test.Echo/") {
        return grpc_support::dispatch(Arc::from("app"), req)
            .await
            .map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
    }
    match path.as_str() {
        // Who called, as the app sees it, and over which protocol.
        "/caller" => {
            let callers: Vec<&str> =
                req.headers().get_all("x-trellis-caller").iter().map(|v| v.to_str().unwrap_or("?")).collect();
            Response::new(full(format!("{};{:?}", callers.join(","), req.version())))
        }
        "/echo" => {
            let body = req.into_body().collect().await.map(|c| c.to_bytes()).unwrap_or_default();
            Response::new(full(body))
        }
        "/hold" => {
            state.held.fetch_add(1, Ordering::SeqCst);
            let permit = state.release.acquire().await;
            drop(permit);
            Response::new(full("released"))
        }
        // Three events 200 ms apart.
        "/sse" => {
            let events = futures_util::stream::unfold(0u32, |i| async move {
                if i == 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event {i}\n\n")));
                Some((Ok::<_, BoxError>(frame), i + 1))
            });
            let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
            resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            resp
        }
        _ => {
            let mut resp = Response::new(full("no such path"));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

/// The app: HTTP/1.1 and h2c on one loopback port.
async fn app() -> (SocketAddr, Arc<AppState>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = Arc::new(AppState {
        hits: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
        release: Semaphore::new(0),
    });
    let s = Arc::clone(&state);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let s = Arc::clone(&s);
                    async move { Ok::<_, Infallible>(app_answer(s, req).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, state)
}

// ---- The inbound side.

/// The mesh of a test: its CA, another CA, and the inbound side of `users`.
struct Mesh {
    ca: MeshCa,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    served: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// `users`'s inbound side in front of `app`.
async fn mesh(app: SocketAddr, allow_from: AllowFrom, max_concurrency: usize) -> Mesh {
    let ca = MeshCa::new("mesh CA");
    let server = identity(&ca, "users", &ca.leaf("users"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let metrics = Arc::new(Metrics::new());
    let shutdown = CancellationToken::new();
    let config =
        InboundConfig { app: app.to_string(), allow_from, max_concurrency, ..InboundConfig::DEFAULT };
    let served =
        tokio::spawn(inbound::serve(listener, server, config, Arc::clone(&metrics), shutdown.clone()));
    Mesh { ca, addr, metrics, shutdown, served }
}

impl Mesh {
    /// A caller's identity from this mesh's CA.
    fn caller(&self, service: &str) -> MeshIdentity {
        identity(&self.ca, service, &self.ca.leaf(service))
    }

    /// A TLS connection to the inbound side as `caller` (ALPN h2 or http/1.1).
    async fn connect(&self, caller: &MeshIdentity, h2: bool) -> std::io::Result<TlsStream<TcpStream>> {
        tls(self.addr, caller, h2).await
    }

    /// The value of the metric line starting with `prefix` (0 when absent).
    fn metric(&self, prefix: &str) -> u64 {
        let text = self.metrics.encode();
        text.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    }

    fn decisions(&self, caller: &str, decision: &str) -> u64 {
        self.metric(&format!(
            r#"trellis_sidecar_inbound_requests_total{{caller="{caller}",decision="{decision}"}}"#
        ))
    }

    fn closed(&self, reason: &str) -> u64 {
        self.metric(&format!(r#"trellis_sidecar_inbound_connections_closed_total{{reason="{reason}"}}"#))
    }
}

async fn tls(addr: SocketAddr, caller: &MeshIdentity, h2: bool) -> std::io::Result<TlsStream<TcpStream>> {
    let connector = TlsConnector::from(caller.client_config(h2));
    let tcp = TcpStream::connect(addr).await?;
    connector.connect(caller.server_name(&name("users")), tcp).await
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;
type H2 = hyper::client::conn::http2::SendRequest<Full<Bytes>>;

async fn h1(stream: TlsStream<TcpStream>) -> H1 {
    let (tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("http/1.1");
    tokio::spawn(conn.with_upgrades());
    tx
}

async fn h2(stream: TlsStream<TcpStream>) -> H2 {
    let (tx, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.expect("h2");
    tokio::spawn(conn);
    tx
}

/// Sends on an HTTP/1.1 connection once it is ready for another request.
async fn send(c: &mut H1, req: Request<Full<Bytes>>) -> Response<Incoming> {
    c.ready().await.expect("the connection is ready");
    c.send_request(req).await.expect("an answer")
}

fn get(path: &str) -> Request<Full<Bytes>> {
    Request::get(path).header("host", "users").body(Full::default()).unwrap()
}

async fn text(resp: Response<Incoming>) -> (StatusCode, String) {
    let status = resp.status();
    let body = resp.into_body().collect().await.expect("the body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

// ---- Tests.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_and_http2_reach_the_app_with_the_caller_named_and_a_forged_one_removed() {
    let (app_addr, app) = app().await;
    let m = mesh(app_addr, AllowFrom::Any, 64).await;
    let web = m.caller("web");

    let stream = m.connect(&web, false).await.expect("handshake as web");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let mut c1 = h1(stream).await;
    let forged = Request::get("/caller")
        .header("host", "users")
        .header("x-trellis-caller", "admin")
        .header("x-trellis-caller", "billing")
        .body(Full::default())
        .unwrap();
    let (status, body) = text(send(&mut c1, forged).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web;HTTP/1.1"), "the forged callers are gone");
    let post = Request::post("/echo").header("host", "users").body(Full::new(Bytes::from("ping"))).unwrap();
    let (status, body) = text(send(&mut c1, post).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ping"));

    let stream = m.connect(&web, true).await.expect("handshake as web, h2");
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut c2 = h2(stream).await;
    let forged = Request::get("http://users/caller")
        .header("x-trellis-caller", "admin")
        .body(Full::default())
        .unwrap();
    let (status, body) = text(c2.send_request(forged).await.unwrap()).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "web;HTTP/2.0"), "h2 in, h2c to the app");

    println!("allowed web: {}", m.decisions("web", "allowed"));
    assert_eq!(m.decisions("web", "allowed"), 3);
    assert_eq!(m.decisions("web", "not_allowed"), 0);
    assert_eq!(app.hits.load(Ordering::SeqCst), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_streaming_and_trailers_only_errors_pass_through() {
    let (app_addr, app) = app().await;
    let m = mesh(app_addr, AllowFrom::Any, 64).await;
    let ch = grpc_channel(m.addr, m.caller("web")).await;

    assert_eq!(grpc_support::unary(&ch, "5", None).await.expect("unary"), "app");
    let streamed = grpc_support::stream(&ch, 5).await.expect("server streaming");
    assert_eq!(streamed, (0..5).map(|i| format!("app:{i}")).collect::<Vec<_>>());
    let e = grpc_support::call_path(&ch, "/test.Echo/Nope").await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented, "a trailers-only status passes: {e:?}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 3);
    assert_eq!(m.decisions("web", "allowed"), 3);
}

/// A tonic channel whose connections are TLS connections as `caller`.
async fn grpc_channel(addr: SocketAddr, caller: MeshIdentity) -> Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let caller = caller.clone();
        async move { tls(addr, &caller, true).await.map(TokioIo::new) }
    });
    Endpoint::from_static("http://users").connect_with_connector(connector).await.expect("a gRPC channel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_are_relayed_to_the_app() {
    let echo = trellis_tests::ws::echo_server("ws").await;
    let m = mesh(echo.addr, AllowFrom::Any, 64).await;
    let stream = m.connect(&m.caller("web"), false).await.expect("handshake");
    let (mut ws, resp) = tokio_tungstenite::client_async("ws://users/chat", stream).await.expect("upgrade");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let reply = ws.next().await.expect("a reply").expect("a message");
        assert_eq!(reply, Message::text(format!("ws:hello {i}")));
    }
    assert_eq!(echo.open(), 1);
    assert_eq!(m.metric("trellis_sidecar_inbound_open_connections"), 1, "the upgraded connection counts");
    ws.close(None).await.unwrap();
    wait_for("the app's side to close", WITHIN, || async { (echo.open() == 0).then_some(()) }).await;
    wait_for("the upgraded connection to be counted closed", WITHIN, || async {
        (m.metric("trellis_sidecar_inbound_open_connections") == 0).then_some(())
    })
    .await;
    // The permit came back: another upgrade fits.
    let stream = m.connect(&m.caller("web"), false).await.expect("handshake");
    let (mut ws, _) = tokio_tungstenite::client_async("ws://users/chat", stream).await.expect("upgrade");
    ws.send(Message::text("again")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ws:again"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_stream_event_by_event() {
    let (app_addr, _app) = app().await;
    let m = mesh(app_addr, AllowFrom::Any, 64).await;
    let mut c = h1(m.connect(&m.caller("web"), false).await.unwrap()).await;
    let started = Instant::now();
    let resp = send(&mut c, get("/sse")).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    let mut got = String::new();
    let mut first_at = None;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            first_at.get_or_insert_with(|| started.elapsed());
            got.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let total = started.elapsed();
    let first_at = first_at.expect("an event");
    println!("first event after {first_at:?}, stream ended after {total:?}");
    assert_eq!(got, "data: event 0\n\ndata: event 1\n\ndata: event 2\n\n");
    // The app spaces the events 400 ms in all: the first cannot have waited for the last.
    assert!(total >= Duration::from_millis(400), "{total:?}");
    assert!(
        total - first_at >= Duration::from_millis(300),
        "the first event was held back: {first_at:?} of {total:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_outside_allow_from_gets_403_not_allowed() {
    let (app_addr, app) = app().await;
    let m = mesh(app_addr, AllowFrom::from_list(vec![name("admin")]), 64).await;

    let mut web = h1(m.connect(&m.caller("web"), false).await.expect("the handshake succeeds")).await;
    for _ in 0..2 {
        let resp = send(&mut web, get("/caller")).await;
        assert_eq!(resp.headers()["x-trellis-error"], "not_allowed");
        let (status, body) = text(resp).await;
        assert_eq!(status, StatusCode::FORBIDDEN);
        let err: ErrorBody = serde_json::from_str(&body).expect("a JSON error body");
        assert_eq!(err.error.as_str(), "not_allowed");
        assert!(err.message.contains("web") && err.message.contains("users"), "{}", err.message);
    }
    let ch = grpc_channel(m.addr, m.caller("web")).await;
    let e = grpc_support::unary(&ch, "0", None).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 0, "nothing reached the app");

    let mut admin = h1(m.connect(&m.caller("admin"), false).await.unwrap()).await;
    let (status, body) = text(send(&mut admin, get("/caller")).await).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "admin;HTTP/1.1"));

    println!(
        "web not_allowed {}, admin allowed {}",
        m.decisions("web", "not_allowed"),
        m.decisions("admin", "allowed")
    );
    assert_eq!(m.decisions("web", "not_allowed"), 3);
    assert_eq!(m.decisions("web", "allowed"), 0);
    assert_eq!(m.decisions("admin", "allowed"), 1);
    assert_eq!(m.metric(r#"trellis_sidecar_proxy_errors_total{code="not_allowed"}"#), 3);
}

/// Accepts any server certificate: these clients test the server's checks only.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(m, c, d, &algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(m, c, d, &algs)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider().signature_verification_algorithms.supported_schemes()
    }
}

/// A client presenting `leaf` (or nothing), trusting any server.
fn client(leaf: Option<&Leaf>) -> TlsConnector {
    let builder =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer));
    let mut config = match leaf {
        None => builder.with_no_client_auth(),
        Some(l) => {
            let chain: Vec<CertificateDer<'static>> =
                CertificateDer::pem_slice_iter(l.chain_pem.as_bytes()).map(|c| c.unwrap()).collect();
            let key = PrivateKeyDer::from_pem_slice(l.key_pem.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

/// Tries one request as a client presenting `leaf`; what the client saw.
async fn try_request(addr: SocketAddr, leaf: Option<&Leaf>) -> Result<StatusCode, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let server = ServerName::try_from("users.svc.trellis.local").unwrap();
    // In TLS 1.3 the server checks the client's certificate after the
    // client's side of the handshake is done: the refusal may arrive at
    // the first read instead.
    let stream = client(leaf).connect(server, tcp).await.map_err(|e| format!("handshake: {e}"))?;
    let (mut tx, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = tx.send_request(get("/caller")).await.map_err(|e| format!("request: {e}"))?;
    Ok(resp.status())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_valid_certificate_fail_at_the_handshake() {
    let (app_addr, app) = app().await;
    let m = mesh(app_addr, AllowFrom::Any, 64).await;

    // Plain text: no HTTP answer at all.
    let mut plain = TcpStream::connect(m.addr).await.unwrap();
    plain.write_all(b"GET /caller HTTP/1.1\r\nhost: users\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(WITHIN, plain.read_to_end(&mut answer)).await.expect("the server closes");
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain text got an HTTP answer: {:?}",
        String::from_utf8_lossy(&answer)
    );

    let other_ca = MeshCa::new("another CA");
    let cases: [(&str, Option<Leaf>, &str); 3] = [
        ("no certificate", None, "no_certificate"),
        ("another CA's certificate", Some(other_ca.leaf("web")), "bad_certificate"),
        ("an expired certificate", Some(m.ca.expired_leaf("web")), "bad_certificate"),
    ];
    for (what, leaf, _) in &cases {
        let r = try_request(m.addr, leaf.as_ref()).await;
        println!("{what}: {r:?}");
        assert!(r.is_err(), "{what} got an answer: {r:?}");
    }
    // The control: this mesh's valid certificate through the same client.
    let valid = m.ca.leaf("web");
    assert_eq!(try_request(m.addr, Some(&valid)).await, Ok(StatusCode::OK));

    wait_for("the refusals to be counted", WITHIN, || async {
        (m.closed("not_tls") == 1 && m.closed("no_certificate") == 1 && m.closed("bad_certificate") == 2)
            .then_some(())
    })
    .await;
    assert_eq!(app.hits.load(Ordering::SeqCst), 1, "only the valid caller reached the app");
    assert_eq!(m.decisions("web", "allowed"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_concurrency_the_answer_is_503_overloaded_at_once() {
    let (app_addr, app) = app().await;
    let m = mesh(app_addr, AllowFrom::Any, 2).await;
    let web = m.caller("web");
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = h1(m.connect(&web, false).await.unwrap()).await;
        held.push(tokio::spawn(async move { text(send(&mut c, get("/hold")).await).await }));
    }
    wait_for("two requests held by the app", WITHIN, || async {
        (app.held.load(Ordering::SeqCst) == 2).then_some(())
    })
    .await;

    let mut c = h1(m.connect(&web, false).await.unwrap()).await;
    let asked = Instant::now();
    let resp = send(&mut c, get("/caller")).await;
    let took = asked.elapsed();
    assert_eq!(resp.headers()["x-trellis-error"], "overloaded");
    let (status, body) = text(resp).await;
    println!("third request answered {status} in {took:?}: {body}");
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("overloaded"), "{body}");
    assert!(took < Duration::from_secs(2), "shed at once, not queued: {took:?}");
    assert_eq!(app.hits.load(Ordering::SeqCst), 2, "the app never saw the third");

    app.release.add_permits(2);
    for h in held {
        assert_eq!(h.await.unwrap(), (StatusCode::OK, "released".to_string()));
    }
    // The slots came back when the answers ended.
    let (status, _) = text(send(&mut c, get("/caller")).await).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(m.decisions("web", "overloaded"), 1);
    assert_eq!(m.decisions("web", "allowed"), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_accepting_and_lets_a_request_in_flight_finish() {
    let (app_addr, app) = app().await;
    let mut m = mesh(app_addr, AllowFrom::Any, 64).await;
    let mut c = h1(m.connect(&m.caller("web"), false).await.unwrap()).await;
    let in_flight = tokio::spawn(async move { text(send(&mut c, get("/hold")).await).await });
    wait_for("the request to reach the app", WITHIN, || async {
        (app.held.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    m.shutdown.cancel();
    wait_for("the listener to close", WITHIN, || async {
        TcpStream::connect(m.addr).await.is_err().then_some(())
    })
    .await;
    assert!(!m.served.is_finished(), "it waits for the request in flight");
    app.release.add_permits(1);
    assert_eq!(in_flight.await.unwrap(), (StatusCode::OK, "released".to_string()));
    let served = tokio::time::timeout(WITHIN, &mut m.served).await.expect("serve returns once drained");
    served.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_with_inbound_registers_the_inbound_port_with_mesh_tls() {
    // `--inbound` implies a mesh identity: the registry must hold the CA (no tokens needed here).
    let mesh = trellis_tests::mesh::MeshSecrets::generate("inbound-registry", &["users"]);
    let ca = [
        "--ca-cert".to_string(),
        mesh.ca().display().to_string(),
        "--ca-key".to_string(),
        mesh.ca_key().display().to_string(),
    ];
    let registry = RegistryProc::start("inbound-registry", &ca).await;
    let app = AppProc::start("inbound-app", "users-1", &[]).await;
    let args: Vec<String> = [
        "--service",
        "users",
        "--app",
        &app.addr.to_string(),
        "--instance-id",
        "users-1",
        "--inbound",
        "127.0.0.1:0",
        "--health-interval",
        "200ms",
        "--health-timeout",
        "150ms",
        "--heartbeat-interval",
        "500ms",
    ]
    .map(String::from)
    .into();
    let sidecar = SidecarProc::start("inbound-sidecar", &registry.url(), &args, WITHIN).await;
    let inbound = sidecar.inbound.expect("the ready file reports the inbound listener");
    assert_ne!(inbound.port(), 0);
    let client = trellis_shared::RegistryClient::new(
        vec![registry.url().parse().unwrap()],
        trellis_shared::ClientConfig::default(),
    )
    .unwrap();
    let view = client.get(&name("users"), true).await.expect("the service");
    let instance = view.instances.iter().find(|i| i.id.as_str() == "users-1").expect("the instance");
    println!(
        "registered {}:{} mesh_tls={} (inbound {inbound}, app {})",
        instance.address, instance.port, instance.mesh_tls, app.addr
    );
    assert_eq!(instance.port, inbound.port(), "the inbound port is advertised, not the app's");
    assert_eq!(instance.address.as_str(), "127.0.0.1", "at the one address the inbound side binds");
    assert!(instance.mesh_tls);
}
