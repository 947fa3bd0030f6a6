//! The limits on upgraded (WebSocket) connections through the sidecar's proxy
//! (the real `proxy::serve`, in process, with the settings the
//! `--upgrade-idle-timeout` and `--max-connections` flags set): a silent
//! upgraded connection is closed on both sides after the idle timeout while a
//! talking one stays open, and upgraded connections hold connection slots.

mod proxy_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use trellis_sidecar::endpoints::ServiceEndpoints;
use trellis_sidecar::metrics::Metrics;
use trellis_tests::wait_for;
use trellis_tests::ws::echo_server;

use proxy_support::{service, start_proxy, FixedResolver, Proxy};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound on anything that should take well under a second.
const PROMPTLY: Duration = Duration::from_secs(10);

fn in_flight(svc: &ServiceEndpoints) -> usize {
    svc.load().endpoints.iter().map(|e| e.state.in_flight()).sum()
}

/// The proxy's `open_connections` gauge.
fn open_connections(metrics: &Metrics) -> i64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|l| l.strip_prefix("trellis_sidecar_open_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no open_connections gauge in:\n{text}"))
}

/// A WebSocket to the `chat` service through the proxy's outbound port.
async fn connect(proxy: &Proxy) -> Result<Ws, WsError> {
    let req = "ws://chat/echo".into_client_request()?;
    let tcp = TcpStream::connect(proxy.addr).await?;
    let (ws, resp) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp)).await?;
    assert_eq!(resp.status(), 101);
    Ok(ws)
}

/// Sends `text` and returns the echo.
async fn echo(ws: &mut Ws, text: &str) -> String {
    ws.send(Message::text(text)).await.expect("send");
    let got = tokio::time::timeout(PROMPTLY, ws.next()).await.expect("an echo in time");
    let got = got.expect("the connection is open").expect("a message");
    got.into_text().expect("a text echo").to_string()
}

/// Closes `ws` with the handshake and reads until it ends.
async fn close(mut ws: Ws) {
    ws.close(None).await.expect("close");
    while let Ok(Some(Ok(_))) = tokio::time::timeout(PROMPTLY, ws.next()).await {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_upgraded_connection_is_closed_after_the_idle_timeout() {
    let idle = Duration::from_secs(1);
    let backend = echo_server("a").await;
    let svc = service("chat", &[backend.addr]);
    let mut config = proxy_support::config();
    config.upgrade_idle_timeout = idle;
    let proxy = start_proxy(FixedResolver::default().with(Arc::clone(&svc)), config).await;

    let mut silent = connect(&proxy).await.expect("the silent WebSocket upgraded");
    let mut talking = connect(&proxy).await.expect("the talking WebSocket upgraded");
    assert_eq!(echo(&mut silent, "hello").await, "a:hello");
    assert_eq!(echo(&mut talking, "hello").await, "a:hello");
    assert_eq!(backend.open(), 2);
    assert_eq!(open_connections(&proxy.metrics), 2);

    // The silent one: the client sees its connection end, without a close
    // handshake, about one idle timeout after the last byte.
    let quiet_since = Instant::now();
    let watch_silent = async {
        let ended = tokio::time::timeout(PROMPTLY, silent.next()).await.expect("the silent WebSocket closed");
        let took = quiet_since.elapsed();
        match ended {
            None | Some(Err(_)) => {}
            Some(Ok(m)) => panic!("the silent WebSocket got {m:?} instead of its end"),
        }
        took
    };
    // The talking one: a message every 300 ms for 3 s, three idle timeouts.
    let keep_talking = async {
        for i in 0..10 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(echo(&mut talking, &format!("m{i}")).await, format!("a:m{i}"), "talking after {i}");
        }
        quiet_since.elapsed()
    };
    let (closed_after, talked_for) = tokio::join!(watch_silent, keep_talking);
    println!(
        "silent WebSocket closed after {closed_after:?}; the talking one still open after {talked_for:?}"
    );
    assert!(
        closed_after >= idle - Duration::from_millis(100),
        "closed before the idle timeout: {closed_after:?}"
    );
    assert!(closed_after < Duration::from_secs(5), "closed too late: {closed_after:?}");
    assert!(talked_for >= Duration::from_secs(3), "talked for {talked_for:?}");

    // The endpoint's side was closed too, and the slot, gauge and in-flight
    // count of the silent one were given back.
    wait_for("the endpoint's side of the silent WebSocket to close", PROMPTLY, || async {
        (backend.open() == 1).then_some(())
    })
    .await;
    wait_for("one upgraded connection left in the proxy", PROMPTLY, || async {
        (open_connections(&proxy.metrics) == 1 && in_flight(&svc) == 1).then_some(())
    })
    .await;
    assert_eq!(echo(&mut talking, "still there").await, "a:still there");

    // Once the talking one falls silent it goes the same way.
    let quiet_since = Instant::now();
    let ended = tokio::time::timeout(PROMPTLY, talking.next()).await.expect("the talking WebSocket closed");
    assert!(!matches!(ended, Some(Ok(_))), "got {ended:?} instead of the end");
    println!("the talking WebSocket closed {:?} after it fell silent", quiet_since.elapsed());
    wait_for("nothing open after both went idle", PROMPTLY, || async {
        (backend.open() == 0 && open_connections(&proxy.metrics) == 0 && in_flight(&svc) == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_connections_count_against_max_connections() {
    const CAP: usize = 3;
    let backend = echo_server("a").await;
    let svc = service("chat", &[backend.addr]);
    let mut config = proxy_support::config();
    config.max_connections = CAP;
    let proxy = start_proxy(FixedResolver::default().with(Arc::clone(&svc)), config).await;

    let mut held = Vec::new();
    for i in 0..CAP {
        let mut ws = connect(&proxy).await.unwrap_or_else(|e| panic!("WebSocket {i} of {CAP}: {e}"));
        assert_eq!(echo(&mut ws, &format!("ws{i}")).await, format!("a:ws{i}"));
        held.push(ws);
    }
    // Each upgraded connection holds exactly one slot, not its original connection's and its own.
    wait_for("the cap's worth of connections open", PROMPTLY, || async {
        (open_connections(&proxy.metrics) == CAP as i64).then_some(())
    })
    .await;
    assert_eq!(backend.open(), CAP);

    // One more upgrade is refused with `503 overloaded`, and so is a plain request.
    match connect(&proxy).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).expect("a JSON error");
            assert_eq!(body["error"], "overloaded", "{body}");
        }
        Ok(_) => panic!("a WebSocket past the cap of {CAP} was upgraded"),
        Err(e) => panic!("a WebSocket past the cap failed otherwise: {e}"),
    }
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = client.get(format!("http://{}/echo", proxy.addr)).header("host", "chat").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "overloaded", "{body}");
    assert_eq!(backend.open(), CAP, "nothing past the cap reached the endpoint");

    // Closing one frees its slot for a new WebSocket.
    close(held.pop().unwrap()).await;
    let freed = Instant::now();
    let mut ws =
        wait_for("a new WebSocket once one closed", PROMPTLY, || async { connect(&proxy).await.ok() }).await;
    println!("a new WebSocket upgraded {:?} after one of {CAP} closed", freed.elapsed());
    assert_eq!(echo(&mut ws, "again").await, "a:again");
    assert_eq!(backend.open(), CAP);
    for ws in held {
        close(ws).await;
    }
    close(ws).await;
    wait_for("every slot given back", PROMPTLY, || async {
        (open_connections(&proxy.metrics) == 0 && in_flight(&svc) == 0).then_some(())
    })
    .await;
}
