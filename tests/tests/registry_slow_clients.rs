//! Slow, silent and greedy clients against the real registry binary over
//! loopback sockets: the header timeout, the body timeout, the idle timeout
//! and the per-address connection cap. Needs
//! `cargo build --release --workspace --bins`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use trellis_tests::{strings, wait_for, RegistryProc};

/// Reads until `done` holds for what arrived, EOF, or `within`; returns what arrived and whether EOF came.
async fn read_until(stream: &mut TcpStream, within: Duration, done: impl Fn(&str) -> bool) -> (String, bool) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(Ok(n)) => {
                got.extend_from_slice(&buf[..n]);
                if done(&String::from_utf8_lossy(&got)) {
                    return (String::from_utf8_lossy(&got).into_owned(), false);
                }
            }
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

const HEALTH: &[u8] = b"GET /health HTTP/1.1\r\nHost: registry\r\n\r\n";

/// Sends `GET /health` on a kept-alive connection and returns the answer.
async fn get_health(stream: &mut TcpStream) -> String {
    stream.write_all(HEALTH).await.unwrap();
    read_until(stream, Duration::from_secs(10), |s| s.ends_with('}')).await.0
}

#[tokio::test]
async fn silent_and_trickling_sockets_do_not_keep_a_registration_out() {
    let args = strings(&["--max-connections", "200", "--header-timeout", "2s"]);
    let reg = RegistryProc::start("registry-slow", &args).await;
    // 190 sockets that never send a byte, 10 that trickle a head one byte at a time.
    let mut silent = Vec::new();
    for _ in 0..190 {
        silent.push(TcpStream::connect(reg.addr).await.unwrap());
    }
    let mut trickling = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(reg.addr).await.unwrap();
        trickling.push(tokio::spawn(async move {
            let opened = Instant::now();
            for b in HEALTH.iter().cycle() {
                if s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
                if opened.elapsed() > Duration::from_secs(30) {
                    break;
                }
            }
            opened.elapsed()
        }));
    }
    let opened = Instant::now();

    // A real registration gets through within a few seconds: refused (503)
    // while the cap is full, served once the header timeout clears the sockets.
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let url = format!("{}/v1/services/users/instances/u1", reg.url());
    let refused = AtomicUsize::new(0);
    let registered = wait_for("the registration to succeed", Duration::from_secs(15), || {
        let (client, url, refused) = (client.clone(), url.clone(), &refused);
        async move {
            let r = client.put(url).json(&json!({"address":"10.0.0.1","port":80})).send().await;
            match r {
                Ok(r) if r.status() == 200 => Some(opened.elapsed()),
                _ => {
                    refused.fetch_add(1, Ordering::Relaxed);
                    None
                }
            }
        }
    })
    .await;
    let refused = refused.load(Ordering::Relaxed);
    println!("registered {registered:?} after 200 idle sockets opened ({refused} attempts refused first)");
    assert!(registered < Duration::from_secs(6), "{registered:?}");

    // Every silent socket was closed by the registry (EOF), after about the header timeout.
    for (i, s) in silent.iter_mut().enumerate() {
        let (got, eof) = read_until(s, Duration::from_secs(10), |_| false).await;
        assert!(eof && got.is_empty(), "silent socket {i}: eof {eof}, got {got:?}");
    }
    let closed = opened.elapsed();
    println!("all 190 silent sockets saw EOF within {closed:?}");
    assert!(closed >= Duration::from_millis(1500), "not before the header timeout: {closed:?}");
    for t in trickling {
        let lasted = t.await.unwrap();
        println!("a trickling head was cut after {lasted:?}");
        assert!(lasted < Duration::from_secs(10), "{lasted:?}");
    }
    let metrics = client.get(format!("{}/metrics", reg.url())).send().await.unwrap().text().await.unwrap();
    let timeouts = metrics.lines().find(|l| l.starts_with("trellis_registry_header_timeouts_total")).unwrap();
    println!("{timeouts}");
    let n: f64 = timeouts.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 200.0, "{timeouts}");
}

#[tokio::test]
async fn a_trickling_body_is_answered_408_within_the_body_timeout() {
    let reg = RegistryProc::start("registry-body", &strings(&["--body-timeout", "2s"])).await;
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{}/v1/services/users/instances/u1", reg.url()))
        .json(&json!({"address":"10.0.0.1","port":80,"ttl":"1m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Through the router (a registration) and through the heartbeat fast path.
    for path in ["/v1/services/users/instances/u2", "/v1/services/users/instances/u1/heartbeat"] {
        let mut s = TcpStream::connect(reg.addr).await.unwrap();
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: registry\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let (mut rd, mut wr) = s.into_split();
        let sent = Instant::now();
        let writer = tokio::spawn(async move {
            while wr.write_all(b" ").await.is_ok() && sent.elapsed() < Duration::from_secs(30) {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(15), rd.read_to_end(&mut got)).await;
        let took = sent.elapsed();
        let answer = String::from_utf8_lossy(&got);
        println!("{path}: after {took:?}: {answer:?}");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        assert!(answer.contains(r#""error":"request_timeout""#), "{answer}");
        assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(6), "{took:?}");
        writer.abort();
    }
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let args = strings(&["--max-wait", "1s", "--header-timeout", "1s", "--idle-timeout", "2s"]);
    let reg = RegistryProc::start("registry-idle", &args).await;
    let mut s = TcpStream::connect(reg.addr).await.unwrap();
    assert!(get_health(&mut s).await.starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    // A second request on the same connection within the idle timeout is served.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(get_health(&mut s).await.starts_with("HTTP/1.1 200"));
    let answered_again = Instant::now();
    let (_, eof) = read_until(&mut s, Duration::from_secs(10), |_| false).await;
    let idle = answered_again.elapsed();
    println!("closed {idle:?} after its last answer ({:?} after the first)", answered.elapsed());
    assert!(eof);
    assert!(idle >= Duration::from_millis(1500) && idle < Duration::from_secs(6), "{idle:?}");
}

#[tokio::test]
async fn the_sixth_connection_from_one_address_is_refused_and_another_address_is_not() {
    let reg = RegistryProc::start("registry-per-ip", &strings(&["--max-connections-per-ip", "5"])).await;
    let mut five = Vec::new();
    for _ in 0..5 {
        let mut s = connect_from([127, 0, 0, 1], reg.addr).await;
        // Answered, so accepted and counted before the next one.
        assert!(get_health(&mut s).await.starts_with("HTTP/1.1 200"));
        five.push(s);
    }
    let mut sixth = connect_from([127, 0, 0, 1], reg.addr).await;
    sixth.write_all(HEALTH).await.unwrap();
    let (answer, _) = read_until(&mut sixth, Duration::from_secs(10), |s| s.ends_with('}')).await;
    println!("sixth from 127.0.0.1: {answer:?}");
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains(r#""error":"overloaded""#), "{answer}");

    let mut other = connect_from([127, 0, 0, 2], reg.addr).await;
    let answer = get_health(&mut other).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "from 127.0.0.2: {answer}");
    let client =
        reqwest::Client::builder().local_address(std::net::IpAddr::from([127, 0, 0, 3])).build().unwrap();
    let metrics = client.get(format!("{}/metrics", reg.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("trellis_registry_connections_refused_per_ip_total 1\n"), "{metrics}");

    // A closed connection frees its slot.
    drop(five.pop());
    let addr = reg.addr;
    wait_for("a slot for 127.0.0.1 again", Duration::from_secs(10), move || async move {
        let mut s = connect_from([127, 0, 0, 1], addr).await;
        get_health(&mut s).await.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
}
