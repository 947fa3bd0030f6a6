//! The mesh end to end, on the real binaries: a registry that signs identities, server sidecars with an
//! inbound side in front of their apps, and a client sidecar calling them, with mutual TLS between the
//! sidecars. HTTP/1.1, gRPC and WebSocket cross both sidecars; `--allow-from` refuses a caller; a forged
//! endpoint gets nothing; leaves rotate under load without a failed request.

mod grpc_support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tonic::transport::{Channel, Endpoint};
use trellis_tests::mesh::MeshSecrets;
use trellis_tests::ws::echo_server;
use trellis_tests::{strings, AppProc, RegistryProc, SidecarProc};

use grpc_support::{grpc_server, stream, unary};

const WITHIN: Duration = Duration::from_secs(30);

struct Mesh {
    secrets: MeshSecrets,
    registry: RegistryProc,
}

impl Mesh {
    /// A registry with tokens and the mesh CA, for `services`.
    async fn start(name: &str, services: &[&str], registry_extra: &[&str]) -> Mesh {
        let secrets = MeshSecrets::generate(name, services);
        let mut args = secrets.registry_args();
        args.extend(strings(registry_extra));
        let registry = RegistryProc::start(&format!("{name}-registry"), &args).await;
        Mesh { secrets, registry }
    }

    /// The sidecar registering instance `id` of `service` (the app at `app`), reachable only through
    /// its inbound side on loopback; ready once registered with its certificate.
    async fn server(&self, service: &str, id: &str, app: SocketAddr, extra: &[&str]) -> SidecarProc {
        let mut args = strings(&[
            "--service",
            service,
            "--app",
            &app.to_string(),
            "--instance-id",
            id,
            "--inbound",
            "127.0.0.1:0",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "150ms",
            "--heartbeat-interval",
            "500ms",
            "--ttl",
            "3s",
        ]);
        args.extend(self.secrets.sidecar_args(service));
        args.extend(strings(extra));
        SidecarProc::start(&format!("{id}-sidecar"), &self.registry.url(), &args, WITHIN).await
    }

    /// A sidecar that registers nothing and calls as `service`.
    async fn client(&self, service: &str, extra: &[&str]) -> SidecarProc {
        let mut args = strings(&["--identity", service]);
        args.extend(self.secrets.sidecar_args(service));
        args.extend(strings(extra));
        SidecarProc::start(&format!("{service}-client"), &self.registry.url(), &args, WITHIN).await
    }
}

/// `GET path` with `Host: host` on a connection to `outbound`: status and body.
async fn get(outbound: SocketAddr, host: &str, path: &str) -> Result<(StatusCode, String), String> {
    let tcp = tokio::net::TcpStream::connect(outbound).await.map_err(|e| format!("connect: {e}"))?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    let req =
        Request::get(path).header("host", host).body(Empty::<Bytes>::new()).map_err(|e| e.to_string())?;
    let resp = tx.send_request(req).await.map_err(|e| format!("send: {e}"))?;
    let status = resp.status();
    let body = resp.into_body().collect().await.map_err(|e| format!("body: {e}"))?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

async fn scrape(admin: SocketAddr) -> String {
    reqwest::get(format!("http://{admin}/metrics")).await.expect("scrape").text().await.expect("metrics text")
}

/// The sum of every sample whose line starts with `prefix`.
fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The number of requests a demo-app served (its `/control/stats`).
async fn served(app: &AppProc) -> u64 {
    let v: serde_json::Value = reqwest::get(format!("http://{}/control/stats", app.addr))
        .await
        .expect("stats")
        .json()
        .await
        .expect("stats JSON");
    v["requests"].as_u64().unwrap_or_else(|| panic!("no request count in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_grpc_and_websocket_cross_two_sidecars_over_mtls() {
    let mesh = Mesh::start("mesh-protocols", &["users", "greeter", "chat", "web"], &[]).await;
    let app = AppProc::start("mesh-users-app", "users-1", &[]).await;
    let users = mesh.server("users", "users-1", app.addr, &[]).await;
    let grpc = grpc_server("g1").await;
    let _greeter = mesh.server("greeter", "greeter-1", grpc.addr, &[]).await;
    let ws = echo_server("chat-1").await;
    let _chat = mesh.server("chat", "chat-1", ws.addr, &[]).await;
    let client = mesh.client("web", &[]).await;

    // HTTP/1.1: the app answers, and it is told who called.
    let (status, body) = get(client.outbound, "users", "/hello").await.expect("HTTP/1.1 through the mesh");
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("users-1"), "{body}");
    let inbound = scrape(users.admin).await;
    println!(
        "users' inbound decisions:\n{}",
        inbound.lines().filter(|l| l.contains("inbound_requests")).collect::<Vec<_>>().join("\n")
    );
    assert!(
        sum(&inbound, "trellis_sidecar_inbound_requests_total{caller=\"web\",decision=\"allowed\"") >= 1.0
    );
    let outbound = scrape(client.admin).await;
    assert!(sum(&outbound, "trellis_sidecar_mtls_handshakes_total") >= 1.0, "the client spoke TLS");

    // gRPC, unary and server streaming, over h2 end to end.
    let ch: Channel = Endpoint::from_shared(format!("http://{}", client.outbound))
        .unwrap()
        .origin("http://greeter".parse().unwrap())
        .connect()
        .await
        .expect("connect to the client sidecar");
    assert_eq!(unary(&ch, "1", None).await.expect("unary"), "g1");
    let got = stream(&ch, 3).await.expect("stream");
    assert_eq!(got, vec!["g1:0", "g1:1", "g1:2"]);
    assert!(grpc.calls.load(Ordering::SeqCst) >= 2);

    // WebSocket: the upgrade crosses both sidecars and frames flow both ways.
    let tcp = tokio::net::TcpStream::connect(client.outbound).await.unwrap();
    let mut req = format!("ws://{}/echo", client.outbound).into_client_request().unwrap();
    req.headers_mut().insert("host", "chat".parse().unwrap());
    let (mut socket, resp) =
        tokio_tungstenite::client_async(req, tcp).await.expect("upgrade through the mesh");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    for i in 0..3 {
        socket.send(Message::text(format!("m{i}"))).await.unwrap();
        let reply =
            tokio::time::timeout(WITHIN, socket.next()).await.expect("a reply in time").unwrap().unwrap();
        assert_eq!(reply.into_text().unwrap().as_str(), format!("chat-1:m{i}"));
    }
    assert_eq!(ws.open(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_outside_allow_from_is_refused_403_and_an_allowed_one_passes() {
    let mesh = Mesh::start("mesh-allow", &["users", "web", "billing"], &[]).await;
    let app = AppProc::start("allow-users-app", "users-1", &[]).await;
    let users = mesh.server("users", "users-1", app.addr, &["--allow-from", "billing"]).await;
    let web = mesh.client("web", &[]).await;
    let billing = mesh.client("billing", &[]).await;

    let (status, body) = get(web.outbound, "users", "/x").await.expect("an answer");
    println!("web -> users: {status} {body}");
    assert_eq!(status, StatusCode::FORBIDDEN);
    let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON error body");
    assert_eq!(v["error"], "not_allowed", "{v}");
    let (status, _) = get(billing.outbound, "users", "/x").await.expect("an answer");
    assert_eq!(status, StatusCode::OK);
    let m = scrape(users.admin).await;
    assert_eq!(
        sum(&m, "trellis_sidecar_inbound_requests_total{caller=\"web\",decision=\"not_allowed\""),
        1.0
    );
    assert_eq!(
        sum(&m, "trellis_sidecar_inbound_requests_total{caller=\"billing\",decision=\"allowed\""),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_endpoint_gets_no_request_and_the_client_sees_no_failure() {
    let mesh = Mesh::start("mesh-forged", &["users", "web", "billing"], &[]).await;
    let real_app = AppProc::start("forged-real-app", "users-1", &[]).await;
    let _real = mesh.server("users", "users-1", real_app.addr, &[]).await;
    // `billing` is a genuine mesh service; its inbound side is then registered under `users` by a
    // holder of users' token: an endpoint that cannot present users' identity.
    let forger_app = AppProc::start("forged-billing-app", "billing-1", &[]).await;
    let forger = mesh.server("billing", "billing-1", forger_app.addr, &[]).await;
    let forger_inbound = forger.inbound.expect("the forger's inbound side");
    let register = serde_json::json!({"address": "127.0.0.1", "port": forger_inbound.port(), "mesh_tls": true, "ttl": "60s"});
    let resp = reqwest::Client::new()
        .put(format!("{}/v1/services/users/instances/forged", mesh.registry.url()))
        .bearer_auth(mesh.secrets.token("users"))
        .json(&register)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.text().await.unwrap_or_default());
    let client = mesh.client("web", &[]).await;
    let before = served(&forger_app).await;

    let mut failed = 0;
    for _ in 0..100 {
        match get(client.outbound, "users", "/work").await {
            Ok((StatusCode::OK, _)) => {}
            other => {
                failed += 1;
                println!("failed: {other:?}");
            }
        }
    }
    let m = scrape(client.admin).await;
    let wrong = sum(&m, "trellis_sidecar_mtls_failures_total{service=\"users\",reason=\"wrong_identity\"");
    println!("100 requests: {failed} failed; wrong_identity handshakes {wrong}");
    assert_eq!(failed, 0, "the client never sees the forger");
    assert_eq!(served(&forger_app).await, before, "the forger's app got no request");
    assert!(wrong >= 1.0, "the forger was tried and refused at the handshake");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_rotations_under_load_fail_no_request() {
    let mesh = Mesh::start("mesh-rotation", &["users", "web"], &["--cert-ttl", "10s"]).await;
    let app = AppProc::start("rotation-users-app", "users-1", &[]).await;
    let users = mesh.server("users", "users-1", app.addr, &[]).await;
    let client = mesh.client("web", &[]).await;

    let renewed = |text: &str| sum(text, "trellis_sidecar_identity_renewals_total{result=\"ok\"");
    let start_users = renewed(&scrape(users.admin).await);
    let start_client = renewed(&scrape(client.admin).await);

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed, outbound) = (stop.clone(), ok.clone(), failed.clone(), client.outbound);
        workers.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match get(outbound, "users", "/work").await {
                    Ok((StatusCode::OK, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        println!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        }));
    }
    // Leaves of 10 s renew at about 7 s: three rotations on each side take about 21 s.
    let began = Instant::now();
    let deadline = began + Duration::from_secs(90);
    loop {
        let u = renewed(&scrape(users.admin).await) - start_users;
        let c = renewed(&scrape(client.admin).await) - start_client;
        if u >= 3.0 && c >= 3.0 {
            println!("three rotations on both sides after {:?}", began.elapsed());
            break;
        }
        assert!(Instant::now() < deadline, "only {u} and {c} rotations in {:?}", began.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("under rotation: {ok} requests succeeded, {failed} failed");
    assert!(ok > 100, "the load ran: {ok}");
    assert_eq!(failed, 0);
    let expiry = sum(&scrape(client.admin).await, "trellis_sidecar_identity_expiry_seconds");
    assert!(expiry > 0.0, "the client's leaf is current: {expiry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_outlives_a_registry_outage_longer_than_a_renewal_and_renewal_resumes() {
    // 30 s leaves renew at about 21 s; the registry is away from the start until both sidecars have
    // failed a renewal, so the current leaves carry the traffic meanwhile, with several seconds to spare.
    let mut mesh = Mesh::start("mesh-outage", &["users", "web"], &["--cert-ttl", "30s"]).await;
    let app = AppProc::start("outage-users-app", "users-1", &[]).await;
    let users = mesh.server("users", "users-1", app.addr, &[]).await;
    let client = mesh.client("web", &[]).await;
    let renewals = |text: &str, result: &str| {
        sum(text, &format!("trellis_sidecar_identity_renewals_total{{result=\"{result}\""))
    };
    let ok_before = renewals(&scrape(client.admin).await, "ok");
    // The client learns `users`' endpoints while the registry is up: a discovery watch starts on first use,
    // and what survives an outage is the last known endpoints.
    let (status, body) = get(client.outbound, "users", "/work").await.expect("an answer");
    assert_eq!(status, StatusCode::OK, "{body}");

    let registry_addr = mesh.registry.addr;
    mesh.registry.proc.kill9();
    let down = Instant::now();
    let (mut ok, mut failed) = (0u64, 0u64);
    // Traffic while the registry is gone, until the client has failed to renew at least once.
    loop {
        match get(client.outbound, "users", "/work").await {
            Ok((StatusCode::OK, _)) => ok += 1,
            other => {
                failed += 1;
                println!("failed: {other:?}");
            }
        }
        let m = scrape(client.admin).await;
        if renewals(&m, "failed") >= 1.0 && renewals(&scrape(users.admin).await, "failed") >= 1.0 {
            break;
        }
        assert!(
            down.elapsed() < Duration::from_secs(60),
            "no renewal attempt failed in {:?}",
            down.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let outage = down.elapsed();
    let left = sum(&scrape(client.admin).await, "trellis_sidecar_identity_expiry_seconds");
    println!("registry down {outage:?}: {ok} requests served, {failed} failed; the client's leaf has {left:.1} s left");
    assert_eq!(failed, 0, "the mesh keeps serving on the current leaves");
    assert!(ok > 50, "traffic ran: {ok}");
    assert!(left > 0.0, "the leaf is still valid: {left}");

    // Back on the same port: renewal resumes, and traffic never stopped.
    let args = {
        let mut a = mesh.secrets.registry_args();
        a.extend(strings(&["--cert-ttl", "30s"]));
        a
    };
    mesh.registry = RegistryProc::start_on("mesh-outage-registry-2", registry_addr, &args).await;
    let back = Instant::now();
    loop {
        let (status, _) = get(client.outbound, "users", "/work").await.expect("an answer");
        assert_eq!(status, StatusCode::OK);
        if renewals(&scrape(client.admin).await, "ok") > ok_before {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(30),
            "no renewal within {:?} of the registry's return",
            back.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("renewed {:?} after the registry came back", back.elapsed());
}
