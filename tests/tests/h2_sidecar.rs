//! The real binaries: a registry, a demo-app with its sidecar registering it
//! as `users`, and a client sidecar with `--upstream users=127.0.0.1:PORT`.
//! `curl --http2-prior-knowledge` and `curl` through `http_proxy` against the
//! documented ports; server-sent events arriving one by one; a 200 MB
//! download read slowly while the client sidecar's RSS stays flat.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_tests::{strings, wait_for, AppProc, Proc, RegistryProc, SidecarProc};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Cluster {
    _registry: RegistryProc,
    _app: Proc,
    _app_sidecar: Proc,
    client: Proc,
    outbound: SocketAddr,
    dedicated: SocketAddr,
}

impl Cluster {
    /// `metadata`: the backend instance's `--metadata` (e.g. `protocol=h2c`).
    async fn start(metadata: Option<&str>) -> Cluster {
        let registry = RegistryProc::start("registry", &[]).await;
        let registry_url = registry.url();
        let AppProc { proc: app, addr: app_addr } = AppProc::start("users-app", "u1", &[]).await;
        let mut args = strings(&[
            "--service",
            "users",
            "--app",
            &app_addr.to_string(),
            "--advertise",
            &app_addr.to_string(),
            "--instance-id",
            "u1",
        ]);
        if let Some(m) = metadata {
            args.extend(strings(&["--metadata", m]));
        }
        let ready = Duration::from_secs(30);
        let app_sidecar = SidecarProc::start("users-sidecar", &registry_url, &args, ready).await.proc;

        let upstream = strings(&["--upstream", "users=127.0.0.1:0"]);
        let SidecarProc { proc: client, admin, outbound, upstreams, .. } =
            SidecarProc::start("client-sidecar", &registry_url, &upstream, ready).await;
        let dedicated = upstreams["users"];
        wait_for("the client sidecar to see users", Duration::from_secs(30), || async move {
            let v: Value = reqwest::get(format!("http://{admin}/endpoints")).await.ok()?.json().await.ok()?;
            let services = v["services"].as_array()?;
            let users = services.iter().find(|s| s["service"] == "users")?;
            (users["endpoints"].as_array()?.len() == 1).then_some(())
        })
        .await;
        Cluster { _registry: registry, _app: app, _app_sidecar: app_sidecar, client, outbound, dedicated }
    }

    fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.client.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

/// Runs curl with `args` (and `env`), without any proxy setting of the test's
/// own environment; returns (HTTP version, status, body).
async fn curl(args: &[String], env: &[(&str, String)]) -> (String, String, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--max-time", "20", "-w", "\n%{http_version} %{http_code}"]).args(args);
    for k in [
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
        "no_proxy",
        "NO_PROXY",
    ] {
        cmd.env_remove(k);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.expect("curl runs (install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "curl {args:?} failed: {} {text}", String::from_utf8_lossy(&out.stderr));
    let (body, tail) = text.rsplit_once('\n').unwrap_or(("", &text));
    let (version, status) = tail.split_once(' ').unwrap_or((tail, ""));
    (version.to_string(), status.to_string(), body.to_string())
}

fn instance(body: &str) -> String {
    serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v["instance"].as_str().map(String::from))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http2_prior_knowledge_and_http_proxy_against_the_documented_ports() {
    let _serial = SERIAL.lock().await;
    // The backend is reached over HTTP/2 because its metadata says so; demo-app speaks both.
    let c = Cluster::start(Some("protocol=h2c")).await;
    let (o, d) = (c.outbound.to_string(), c.dedicated.to_string());
    // (what, curl arguments, environment, expected HTTP version)
    type Case<'a> = (&'a str, Vec<String>, Vec<(&'a str, String)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            "h2c prior knowledge, outbound port, Host",
            strings(&["--http2-prior-knowledge", "-H", "Host: users", &format!("http://{o}/hello")]),
            vec![],
            "2",
        ),
        (
            "h2c prior knowledge, dedicated port",
            strings(&["--http2-prior-knowledge", &format!("http://{d}/hello")]),
            vec![],
            "2",
        ),
        ("HTTP/1.1, dedicated port", strings(&[&format!("http://{d}/hello")]), vec![], "1.1"),
        (
            "http_proxy, outbound port",
            strings(&["http://users/hello"]),
            vec![("http_proxy", format!("http://{o}")), ("HTTP_PROXY", format!("http://{o}"))],
            "1.1",
        ),
        (
            "HTTP/1.1, outbound port, Host",
            strings(&["-H", "Host: users", &format!("http://{o}/hello")]),
            vec![],
            "1.1",
        ),
    ];
    for (what, args, env, want_version) in cases {
        let (version, status, body) = curl(&args, &env).await;
        println!("{what}: HTTP/{version} {status} {body}");
        assert_eq!(status, "200", "{what}: {body}");
        assert_eq!(version, want_version, "{what}");
        assert_eq!(instance(&body), "u1", "{what}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_arrive_one_by_one() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(None).await;
    let interval = Duration::from_millis(300);
    for (how, addr, host) in [("outbound port", c.outbound, "users"), ("dedicated port", c.dedicated, "x")] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET /sse?n=5&interval=300ms HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let started = Instant::now();
        let mut buf = Vec::new();
        let mut arrivals: Vec<Duration> = Vec::new();
        let mut chunk = [0u8; 4096];
        while arrivals.len() < 5 {
            let n = tokio::time::timeout(Duration::from_secs(20), s.read(&mut chunk)).await.unwrap().unwrap();
            assert!(n > 0, "{how}: the stream ended early: {}", String::from_utf8_lossy(&buf));
            buf.extend_from_slice(&chunk[..n]);
            let events = String::from_utf8_lossy(&buf).matches("\ndata: ").count();
            while arrivals.len() < events {
                arrivals.push(started.elapsed());
            }
        }
        let text = String::from_utf8_lossy(&buf);
        assert!(text.starts_with("HTTP/1.1 200"), "{how}: {text}");
        assert!(text.to_ascii_lowercase().contains("content-type: text/event-stream"), "{how}: {text}");
        println!("{how}: events arrived at {arrivals:?} (produced every {interval:?})");
        // Each event arrives on its own, about one interval after the previous:
        // a buffering proxy would deliver several at once.
        for w in arrivals.windows(2) {
            let gap = w[1] - w[0];
            assert!(gap >= interval / 2, "{how}: two events arrived together ({arrivals:?})");
        }
        assert!(arrivals[0] < interval * 3, "{how}: the first event came at once: {arrivals:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_mb_download_read_slowly_keeps_the_sidecar_rss_flat() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::start(None).await;
    const TOTAL: u64 = 200 * 1024 * 1024;
    let mut s = TcpStream::connect(c.dedicated).await.unwrap();
    s.write_all(format!("GET /download?bytes={TOTAL} HTTP/1.1\r\nHost: users\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let started = Instant::now();
    let mut read: u64 = 0;
    let mut head_len: Option<u64> = None;
    let mut buf = vec![0u8; 64 * 1024];
    let mut since_pause: u64 = 0;
    let mut baseline: Option<u64> = None;
    let mut peak: u64 = 0;
    let mut next_sample = Instant::now();
    let mut head = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf))
            .await
            .expect("data keeps coming")
            .unwrap();
        if n == 0 {
            break;
        }
        match head_len {
            None => {
                head.extend_from_slice(&buf[..n]);
                if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                    let text = String::from_utf8_lossy(&head[..end]).to_string();
                    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
                    head_len = Some(end as u64 + 4);
                    read = head.len() as u64 - (end as u64 + 4);
                }
            }
            Some(_) => read += n as u64,
        }
        if read >= TOTAL {
            break;
        }
        // The slow reader: about 25 MB/s, far below what the app produces.
        since_pause += n as u64;
        if since_pause >= 256 * 1024 {
            since_pause = 0;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Instant::now() >= next_sample {
            next_sample = Instant::now() + Duration::from_millis(200);
            let rss = c.rss_kib();
            if read >= 8 * 1024 * 1024 {
                let base = *baseline.get_or_insert(rss);
                peak = peak.max(rss);
                assert!(
                    rss <= base + 24 * 1024,
                    "sidecar RSS grew from {base} KiB to {rss} KiB after {} MiB",
                    read / (1024 * 1024)
                );
            }
        }
    }
    let took = started.elapsed();
    let base = baseline.expect("sampled");
    println!(
        "read {} MiB in {took:?} ({:.1} MB/s); sidecar RSS baseline {base} KiB, peak {peak} KiB (+{} KiB)",
        read / (1024 * 1024),
        read as f64 / took.as_secs_f64() / 1e6,
        peak.saturating_sub(base)
    );
    assert_eq!(read, TOTAL, "every byte arrived");
}
