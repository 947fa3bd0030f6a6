//! The etcd store against a real etcd with TLS (client and peer certificates
//! required) and etcd's auth on, credentials made at run time
//! (`trellis_tests::etcd_secrets`, the layout of `registry init --etcd-member`):
//!
//! - `registry etcd-setup` turns auth on, and running it again exits 0;
//! - a replica with the right CA, certificate, user and password serves
//!   registrations; wrong credentials stop it at start with a message naming
//!   the problem (and never the password), instead of retrying forever;
//! - the etcd token is renewed when etcd forgets it (a member restart), with
//!   every heartbeat answered 204.
//!
//! Build first: `cargo build --release --workspace --bins`.

mod etcd_support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use etcd_support::*;
use trellis_tests::etcd_secrets::{EtcdSecrets, ETCD_USER};
use trellis_tests::{bin, wait_for, Proc};

/// A fresh folder for one test's credentials.
fn secrets_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("trellis-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn secrets(test: &str, members: usize) -> EtcdSecrets {
    let names = member_names(members);
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    EtcdSecrets::generate(&secrets_dir(test), &names, None).expect("credentials")
}

/// `registry etcd-setup` on `etcd`: exit status and output.
fn etcd_setup(etcd: &Etcd, secrets: &EtcdSecrets, prefix: &str) -> (bool, String) {
    let p = |p: PathBuf| p.display().to_string();
    let out = Command::new(bin("registry"))
        .arg("etcd-setup")
        .args(["--store", &etcd.store_flag(prefix)])
        .args(secrets.registry_tls_args())
        .args(["--root-password-file", &p(secrets.password_file("root"))])
        .args(["--user", ETCD_USER, "--password-file", &p(secrets.password_file(ETCD_USER))])
        .args(["--wait", "30s"])
        .env_clear()
        .output()
        .expect("run registry etcd-setup");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// curl's answer to an unauthenticated range on etcd's gateway (TLS with the
/// registry's client certificate, no token).
fn curl_range_without_token(etcd: &Etcd, secrets: &EtcdSecrets) -> String {
    let p = |p: PathBuf| p.display().to_string();
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "--cacert", &p(secrets.ca())])
        .args(["--cert", &p(secrets.client_cert()), "--key", &p(secrets.client_key())])
        .args(["-d", r#"{"key":"L3RyZWxsaXMv"}"#])
        .arg(format!("{}/v3/kv/range", etcd.client_url(0)))
        .output()
        .expect("curl");
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A TLS etcd of one member with auth set up by `registry etcd-setup`.
async fn secured_etcd(test: &str, extra: &[&str]) -> Option<(Etcd, EtcdSecrets)> {
    let bin = etcd_or_skip(test)?;
    let secrets = secrets(test, 1);
    let etcd = Etcd::start_tls(bin, 1, &secrets, extra).await;
    let (ok, out) = etcd_setup(&etcd, &secrets, "/trellis");
    assert!(ok, "etcd-setup failed: {out}");
    Some((etcd, secrets))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_setup_enables_auth_and_a_replica_serves_through_tls_and_auth() {
    let test = "etcd_setup_enables_auth_and_a_replica_serves_through_tls_and_auth";
    let Some(bin) = etcd_or_skip(test) else { return };
    let secrets = secrets(test, 1);
    let etcd = Etcd::start_tls(bin, 1, &secrets, &[]).await;

    let before = curl_range_without_token(&etcd, &secrets);
    assert!(before.contains("\"header\""), "auth is off at first: {before}");
    let (ok, out) = etcd_setup(&etcd, &secrets, "/trellis");
    println!("first etcd-setup: {out}");
    assert!(ok && out.contains("authentication enabled"), "{out}");
    let after = curl_range_without_token(&etcd, &secrets);
    assert!(
        after.contains("user name is empty"),
        "auth is on: a request without a token is refused: {after}"
    );
    let (ok, out) = etcd_setup(&etcd, &secrets, "/trellis");
    println!("second etcd-setup: {out}");
    assert!(ok && out.contains("already enabled"), "running it again exits 0: {out}");
    for user in ["root", ETCD_USER] {
        assert!(!out.contains(&secrets.password(user)), "no password in the output");
    }

    let mut args = secrets.registry_args();
    args.extend(strings(&["--log-level", "debug"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let replica = Replica::start_with("registry-tls", &etcd.store_flag("/trellis"), &args).await;
    let http = http();
    let (status, code) = register(&http, &replica.url(), "secure", "a", 9000, "10s").await;
    assert_eq!(status, 200, "registration through the TLS+auth store: {code}");
    let (view, stale) = discover(&http, &replica.url(), "secure").await.expect("discovery");
    assert_eq!(ids(&view), ["a"]);
    assert!(!stale);
    // etcd has it under the prefix the user may write, as etcd itself says.
    let body = serde_json::json!({"key": "L3RyZWxsaXMvaW5zdGFuY2VzL3NlY3VyZS9h"}); // /trellis/instances/secure/a
    let token = etcd
        .http()
        .post(format!("{}/v3/auth/authenticate", etcd.client_url(0)))
        .json(&serde_json::json!({"name": ETCD_USER, "password": secrets.password(ETCD_USER)}))
        .send()
        .await
        .expect("authenticate")
        .json::<serde_json::Value>()
        .await
        .expect("token")["token"]
        .as_str()
        .expect("a token")
        .to_string();
    let kv: serde_json::Value = etcd
        .http()
        .post(format!("{}/v3/kv/range", etcd.client_url(0)))
        .header("authorization", token)
        .json(&body)
        .send()
        .await
        .expect("range")
        .json()
        .await
        .expect("range answer");
    assert_eq!(kv["count"], "1", "{kv}");
    let log = replica.proc.log_text();
    for user in ["root", ETCD_USER] {
        assert!(!log.contains(&secrets.password(user)), "no password in the registry's log");
    }
}

/// Starts a replica that must not start; returns its output once it exited,
/// with how long that took.
fn must_fail(name: &str, store: &str, args: &[String]) -> (String, Duration) {
    let mut all = strings(&["--listen", "127.0.0.1:0", "--store", store]);
    all.extend(args.iter().cloned());
    let mut proc = Proc::spawn(name, "registry", &all, &[]);
    let started = Instant::now();
    let status = proc.wait_exit(Duration::from_secs(20));
    let took = started.elapsed();
    let out = proc.log_text();
    let status = status.unwrap_or_else(|| panic!("{name} is still running after 20s:\n{out}"));
    assert!(!status.success(), "{name} exited 0:\n{out}");
    println!("{name}: exit {status} after {:.2}s: {}", took.as_secs_f64(), out.lines().last().unwrap_or(""));
    (out, took)
}

fn replace(args: &[String], flag: &str, value: &Path) -> Vec<String> {
    let mut out = args.to_vec();
    let i = out.iter().position(|a| a == flag).expect("flag present");
    out[i + 1] = value.display().to_string();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_stop_the_registry_at_start_naming_the_problem() {
    let test = "wrong_credentials_stop_the_registry_at_start_naming_the_problem";
    let Some((etcd, secrets)) = secured_etcd(test, &[]).await else { return };
    let store = etcd.store_flag("/trellis");
    let good = secrets.registry_args();
    let wrong_pw_file = secrets.dir.join("wrong.password");
    let wrong_pw = trellis_tests::etcd_secrets::password();
    std::fs::write(&wrong_pw_file, &wrong_pw).unwrap();

    let (out, took) =
        must_fail("registry-bad-password", &store, &replace(&good, "--etcd-password-file", &wrong_pw_file));
    assert!(
        out.contains(r#"etcd rejected user "trellis": authentication failed, invalid user ID or password"#),
        "{out}"
    );
    assert!(
        !out.contains(&wrong_pw) && !out.contains(&secrets.password(ETCD_USER)),
        "no password in the output"
    );
    assert!(took < Duration::from_secs(10), "stopped within seconds, not retrying: {took:?}");

    let mut unknown = good.clone();
    let i = unknown.iter().position(|a| a == "--etcd-user").unwrap();
    unknown[i + 1] = "nobody".into();
    let (out, _) = must_fail("registry-unknown-user", &store, &unknown);
    assert!(out.contains(r#"etcd rejected user "nobody""#), "{out}");

    let other_ca = EtcdSecrets::generate(&secrets_dir(&format!("{test}-other")), &[], None).unwrap();
    let (out, took) = must_fail("registry-wrong-ca", &store, &replace(&good, "--etcd-ca", &other_ca.ca()));
    assert!(out.contains("etcd's certificate did not verify against --etcd-ca"), "{out}");
    assert!(took < Duration::from_secs(10), "{took:?}");

    let mut no_client_cert = strings(&["--etcd-ca", &secrets.ca().display().to_string()]);
    no_client_cert.extend(good[6..].iter().cloned()); // user and password, no certificate
    let (out, _) = must_fail("registry-no-client-cert", &store, &no_client_cert);
    assert!(out.contains("etcd refused our client certificate"), "{out}");

    let unreadable = secrets.dir.join("missing.password");
    let (out, _) =
        must_fail("registry-missing-file", &store, &replace(&good, "--etcd-password-file", &unreadable));
    assert!(out.contains("cannot read --etcd-password-file"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_working_when_etcd_forgets_the_token() {
    let test = "heartbeats_keep_working_when_etcd_forgets_the_token";
    // Short-lived tokens, and no proactive renewal: only renewal on etcd's
    // "invalid auth token" can keep the replica working after the restart.
    let Some((mut etcd, secrets)) = secured_etcd(test, &["--auth-token-ttl", "2"]).await else { return };
    let mut args = secrets.registry_args();
    args.extend(strings(&["--etcd-token-refresh", "1h"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let replica = Replica::start_with("registry-token", &etcd.store_flag("/trellis"), &args).await;
    let http = http();
    let (status, code) = register(&http, &replica.url(), "renewed", "a", 9000, "10s").await;
    assert_eq!(status, 200, "{code}");

    // A restarted member has forgotten every token it handed out.
    etcd.kill(0);
    etcd.restart(0);
    etcd.wait_healthy(Duration::from_secs(60)).await;
    let url = format!("{}/v1/services/renewed/instances/a/heartbeat", replica.url());
    let heartbeat = || async { http.put(&url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) };
    // The replica saw etcd go away (stale, writes refused): wait for the first
    // heartbeat it takes again, then every one must pass.
    wait_for("the replica to take heartbeats again", Duration::from_secs(30), || async {
        (heartbeat().await == 204).then_some(())
    })
    .await;
    let started = Instant::now();
    let mut statuses = Vec::new();
    while started.elapsed() < Duration::from_secs(5) {
        statuses.push(heartbeat().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed: Vec<&u16> = statuses.iter().filter(|s| **s != 204).collect();
    println!(
        "{} heartbeats over 5s after the etcd restart (token TTL 2s), {} not 204",
        statuses.len(),
        failed.len()
    );
    assert!(statuses.len() >= 20);
    assert!(failed.is_empty(), "heartbeats failed: {failed:?}");
    // A registration written after the restart lands too (a write, not only keep-alives).
    let (status, code) = register(&http, &replica.url(), "renewed", "b", 9001, "10s").await;
    assert_eq!(status, 200, "{code}");
    let (view, _) = discover(&http, &replica.url(), "renewed").await.expect("discovery");
    assert_eq!(ids(&view), ["a", "b"]);
    let log = replica.proc.log_text();
    assert!(log.contains("renewed"), "the replica renewed its etcd token after the restart");
    assert!(!log.contains(&secrets.password(ETCD_USER)), "no password in the log");
}
