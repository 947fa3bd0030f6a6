//! The `registry` binary itself: signals, the probe subcommand, environment
//! variables, bad configuration. Needs `cargo build -p trellis-registry --bins`.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_tests::{bin, start_ready, wait_for, Launch, Proc};

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().unwrap()
}

/// The registry configured through its environment only (port 0 included);
/// the ready file says where it listens.
async fn start(extra_env: &[(&str, String)]) -> (Proc, String) {
    let launch = Launch::new("registry", &bin("registry")).env("TRELLIS_LISTEN", "127.0.0.1:0");
    let launch = extra_env.iter().fold(launch, |l, (k, v)| l.env(k, v.clone()));
    let (proc, ready) = start_ready(launch).await;
    (proc, format!("http://{}", ready.addr("listen")))
}

async fn open_watches(client: &reqwest::Client, url: &str) -> Option<f64> {
    let text = client.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|l| l.strip_prefix("trellis_registry_open_watches ")?.trim().parse().ok())
}

#[tokio::test]
async fn sigterm_answers_open_watches_and_exits_zero() {
    let (mut proc, url) = start(&[]).await;
    let client = http();
    let r = client
        .put(format!("{url}/v1/services/users/instances/u1"))
        .json(&json!({"address":"10.0.0.5","port":1,"ttl":"1m"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let index: u64 = r.headers()["x-trellis-index"].to_str().unwrap().parse().unwrap();
    let held = {
        let client = client.clone();
        let url = format!("{url}/v1/services/users?index={index}&wait=60s");
        tokio::spawn(async move {
            let resp = client.get(url).send().await.unwrap();
            let status = resp.status();
            (Instant::now(), status, resp.json::<Value>().await.unwrap())
        })
    };
    wait_for("the watch to be held", Duration::from_secs(10), || {
        let (client, url) = (client.clone(), url.clone());
        async move { (open_watches(&client, &url).await == Some(1.0)).then_some(()) }
    })
    .await;

    let signalled = Instant::now();
    proc.sigterm();
    let (answered, status, body) =
        tokio::time::timeout(Duration::from_secs(10), held).await.unwrap().unwrap();
    let status_code = proc.wait_exit(Duration::from_secs(15)).expect("registry exited after SIGTERM");
    let exited = signalled.elapsed();
    let answered = answered.duration_since(signalled);
    println!("after SIGTERM: open watch answered in {answered:?}, process exited in {exited:?}");
    assert_eq!(status, 200);
    assert_eq!(body["index"].as_u64(), Some(index), "answered with the current state");
    assert_eq!(body["instances"][0]["id"], "u1");
    assert!(answered < Duration::from_secs(3), "{answered:?}");
    assert!(status_code.success(), "exit status {status_code:?}");
    // The default grace is 5s; allow for a loaded machine.
    assert!(exited < Duration::from_secs(12), "{exited:?}");
    assert!(proc.log_text().contains("registry stopped"));
    assert!(client.get(format!("{url}/health")).send().await.is_err(), "no longer accepting");
}

#[tokio::test]
async fn sigint_also_stops_it_cleanly() {
    let (mut proc, _url) = start(&[]).await;
    proc.signal(libc::SIGINT);
    let status = proc.wait_exit(Duration::from_secs(15)).expect("exited after SIGINT");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn probe_exits_zero_only_while_the_registry_answers() {
    let (mut proc, url) = start(&[]).await;
    let addr = url.trim_start_matches("http://").to_string();
    let probe = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = Command::new(bin("registry"));
        cmd.arg("probe").args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().expect("run registry probe")
    };
    assert!(probe(&["--addr", &addr], &[]).status.success());
    // Without --addr it probes loopback at the port of TRELLIS_LISTEN, as in a container.
    let port = addr.rsplit(':').next().unwrap();
    let wildcard = format!("0.0.0.0:{port}");
    assert!(probe(&[], &[("TRELLIS_LISTEN", &wildcard)]).status.success());
    proc.sigterm();
    proc.wait_exit(Duration::from_secs(15)).expect("exited");
    let out = probe(&["--addr", &addr, "--timeout", "1s"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("registry probe"));
}

#[tokio::test]
async fn environment_variables_configure_it() {
    let (_proc, url) = start(&[
        ("TRELLIS_DEFAULT_TTL", "7s".into()),
        ("TRELLIS_MAX_TTL", "10s".into()),
        ("TRELLIS_MAX_BODY", "2048".into()),
    ])
    .await;
    let client = http();
    let put = |body: Value| client.put(format!("{url}/v1/services/users/instances/u1")).json(&body).send();
    let r = put(json!({"address":"10.0.0.5","port":1})).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["ttl"], "7s");
    let r = put(json!({"address":"10.0.0.5","port":1,"ttl":"20s"})).await.unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "invalid_field");
    let r = put(json!({"address":"10.0.0.5","port":1,"metadata":{"k":"v".repeat(3000)}})).await.unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(r.json::<Value>().await.unwrap()["error"], "payload_too_large");
}

#[tokio::test]
async fn an_impossible_configuration_exits_2_with_a_message() {
    let out = Command::new(bin("registry"))
        .args(["--listen", "127.0.0.1:0", "--min-ttl", "10s", "--max-ttl", "1s"])
        .output()
        .expect("run registry");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--min-ttl"), "{stderr}");
}
