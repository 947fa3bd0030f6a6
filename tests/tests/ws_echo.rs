//! WebSocket through the sidecar's proxy (the real `proxy::serve_all`, in
//! process): an echo by Host header and by a dedicated upstream port, the
//! upgraded connection counted in flight on its endpoint until it closes.

mod proxy_support;

use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use trellis_sidecar::endpoints::ServiceEndpoints;
use trellis_sidecar::metrics::Metrics;
use trellis_sidecar::proxy::{self, Listener};
use trellis_tests::wait_for;
use trellis_tests::ws::echo_server;

use proxy_support::{service, FixedResolver};

fn in_flight(svc: &ServiceEndpoints) -> usize {
    svc.load().endpoints.iter().map(|e| e.state.in_flight()).sum()
}

/// Talks to the echo server over an open WebSocket, checks the in-flight
/// count while it is open, closes it and waits for the count to fall.
async fn converse<S>(mut ws: tokio_tungstenite::WebSocketStream<S>, svc: &ServiceEndpoints, how: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut instance = None;
    for i in 0..5 {
        ws.send(Message::text(format!("hello {i}"))).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
        let text = got.into_text().unwrap().to_string();
        let (name, rest) = text.split_once(':').unwrap();
        assert_eq!(rest, format!("hello {i}"), "{how}");
        // One chosen endpoint for the whole connection.
        assert_eq!(*instance.get_or_insert(name.to_string()), name, "{how}");
    }
    ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), ws.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(got.into_data().as_ref(), &[1u8, 2, 3], "{how}");
    assert_eq!(in_flight(svc), 1, "{how}: the upgraded connection counts as in flight");
    ws.close(None).await.unwrap();
    // Read until the close handshake ends.
    while let Ok(Some(Ok(_))) = tokio::time::timeout(Duration::from_secs(10), ws.next()).await {}
    wait_for(&format!("{how}: in flight back to 0"), Duration::from_secs(10), || async {
        (in_flight(svc) == 0).then_some(())
    })
    .await;
    println!("{how}: echoed by {instance:?}, in-flight count back to 0 after close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_by_host_and_by_dedicated_port() {
    let (a, b) = (echo_server("a").await, echo_server("b").await);
    let svc = service("chat", &[a.addr, b.addr]);
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dedicated = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (o, d) = (outbound.local_addr().unwrap(), dedicated.local_addr().unwrap());
    let shutdown = tokio_util::sync::CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(proxy::serve_all(
        vec![
            Listener { listener: outbound, service: None },
            Listener { listener: dedicated, service: Some("chat".parse().unwrap()) },
        ],
        Arc::new(FixedResolver::default().with(Arc::clone(&svc))),
        proxy_support::config(),
        Arc::new(Metrics::new()),
        shutdown,
    ));

    // By Host: the URL names the service; the socket goes to the outbound port.
    let req = "ws://chat/echo".into_client_request().unwrap();
    let tcp = TcpStream::connect(o).await.unwrap();
    let (ws, resp) = tokio_tungstenite::client_async(req, tcp).await.expect("upgrade by Host");
    assert_eq!(resp.status(), 101);
    converse(ws, &svc, "by Host").await;

    // By dedicated port: a client that knows only a local address.
    let (ws, resp) =
        tokio_tungstenite::connect_async(format!("ws://{d}/echo")).await.expect("upgrade by port");
    assert_eq!(resp.status(), 101);
    converse(ws, &svc, "by dedicated port").await;

    // Several at once spread over both endpoints, each kept on its own.
    let mut socks = Vec::new();
    for _ in 0..4 {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{d}/echo")).await.unwrap();
        socks.push(ws);
    }
    let per_endpoint: Vec<usize> = svc.load().endpoints.iter().map(|e| e.state.in_flight()).collect();
    println!("4 open WebSockets per endpoint: {per_endpoint:?}");
    assert_eq!(per_endpoint, [2, 2], "least-connections counts open WebSockets");
    drop(socks);
    wait_for("every WebSocket closed", Duration::from_secs(10), || async {
        (in_flight(&svc) == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_refusing_endpoint_is_retried_on_another() {
    let a = echo_server("a").await;
    let svc = service("chat", &[proxy_support::refused_addr(), a.addr]);
    let proxy =
        proxy_support::start_proxy(FixedResolver::default().with(Arc::clone(&svc)), proxy_support::config())
            .await;
    for i in 0..4 {
        let req = "ws://chat/echo".into_client_request().unwrap();
        let tcp = TcpStream::connect(proxy.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await.expect("upgraded");
        ws.send(Message::text(format!("m{i}"))).await.unwrap();
        let got = ws.next().await.unwrap().unwrap().into_text().unwrap().to_string();
        assert_eq!(got, format!("a:m{i}"));
    }
}
