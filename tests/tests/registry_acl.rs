//! Registry tokens and size caps over real sockets: the registry binary with
//! `--acl-file` pointing at a file whose secrets are generated here.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use trellis_registry::acl::rules::digest_of;
use trellis_tests::process::{log_dir, unique_path, Launch};
use trellis_tests::{strings, wait_for, RegistryProc};

/// A fresh 256-bit secret, as hex (what `registry init` writes).
fn secret() -> String {
    hex(&rand::random::<[u8; 32]>())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(secret: &str) -> String {
    hex(&digest_of(secret.as_bytes()))
}

/// The tokens of most tests: `users` and `billing` write their own service,
/// `reader` reads only `users`, `ops` is admin.
struct Tokens {
    users: String,
    billing: String,
    reader: String,
    ops: String,
}

impl Tokens {
    fn new() -> Self {
        Tokens { users: secret(), billing: secret(), reader: secret(), ops: secret() }
    }

    /// The file, with `default` and every token but those `without`.
    fn file(&self, default: &str, without: &[&str]) -> String {
        let mut text = format!("default = \"{default}\"\n");
        let tokens = [
            ("users", &self.users, "write = [\"users\"]"),
            ("billing", &self.billing, "write = [\"billing\", \"billing-*\"]"),
            ("reader", &self.reader, "read = [\"users\"]"),
            ("ops", &self.ops, "admin = true"),
        ];
        for (name, secret, rights) in tokens {
            if !without.contains(&name) {
                let hash = sha256_hex(secret);
                text += &format!("[[tokens]]\nname = \"{name}\"\nsecret_sha256 = \"{hash}\"\n{rights}\n");
            }
        }
        text
    }
}

/// A file path of this test run's own.
fn acl_path(name: &str) -> PathBuf {
    unique_path(&log_dir(), name, "acl.toml")
}

async fn start(name: &str, acl: &Path, extra: &[&str]) -> RegistryProc {
    let mut args = strings(&["--acl-file", &acl.display().to_string()]);
    args.extend(strings(extra));
    RegistryProc::start(name, &args).await
}

struct Answer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body.get("error").and_then(Value::as_str).unwrap_or("<no error code>")
    }

    fn index(&self) -> Option<u64> {
        self.headers.get("x-trellis-index")?.to_str().ok()?.parse().ok()
    }
}

/// Which header a request carries its token in.
#[derive(Clone, Copy)]
enum Via {
    Bearer,
    Trellis,
    Consul,
}

async fn call(
    http: &reqwest::Client,
    method: Method,
    url: &str,
    token: Option<(&str, Via)>,
    body: Option<Value>,
) -> Answer {
    let mut req = http.request(method, url);
    match token {
        Some((t, Via::Bearer)) => req = req.bearer_auth(t),
        Some((t, Via::Trellis)) => req = req.header("x-trellis-token", t),
        Some((t, Via::Consul)) => req = req.header("x-consul-token", t),
        None => {}
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.expect("request");
    let (status, headers) = (resp.status(), resp.headers().clone());
    let text = resp.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Answer { status, headers, body }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(60)).build().expect("client")
}

fn instance_url(reg: &RegistryProc, service: &str, id: &str) -> String {
    format!("{}/v1/services/{service}/instances/{id}", reg.url())
}

fn registration(address: &str) -> Value {
    json!({"address": address, "port": 8080, "ttl": "60s"})
}

async fn register(reg: &RegistryProc, service: &str, id: &str, token: &str) -> Answer {
    let a = call(
        &http(),
        Method::PUT,
        &instance_url(reg, service, id),
        Some((token, Via::Bearer)),
        Some(registration("10.0.0.1")),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.body);
    a
}

fn metric(text: &str, line_start: &str) -> Option<f64> {
    text.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn metrics_text(reg: &RegistryProc, token: &str) -> String {
    let a =
        call(&http(), Method::GET, &format!("{}/metrics", reg.url()), Some((token, Via::Bearer)), None).await;
    assert_eq!(a.status, StatusCode::OK);
    a.body.as_str().unwrap_or_default().to_string()
}

#[tokio::test]
async fn another_services_token_cannot_hijack_an_instance() {
    let tokens = Tokens::new();
    let path = acl_path("hijack");
    std::fs::write(&path, tokens.file("deny", &[])).unwrap();
    let reg = start("acl-hijack", &path, &[]).await;
    let url = instance_url(&reg, "users", "u1");
    let before = register(&reg, "users", "u1", &tokens.users).await.index();
    let view_url = format!("{}/v1/services/users", reg.url());
    let hijack = Some(registration("203.0.113.9"));

    let a = call(&http(), Method::PUT, &url, Some((&tokens.billing, Via::Bearer)), hijack.clone()).await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "permission_denied"), "{:?}", a.body);
    let message = a.body["message"].as_str().unwrap_or_default();
    assert_eq!(message, "token \"billing\" may not write service \"users\"");
    assert!(!message.contains(&tokens.billing));

    let a = call(&http(), Method::PUT, &url, None, hijack).await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "unauthenticated"), "{:?}", a.body);
    assert_eq!(
        a.headers.get("www-authenticate").and_then(|v| v.to_str().ok()),
        Some("Bearer realm=\"trellis\"")
    );

    let view = call(&http(), Method::GET, &view_url, Some((&tokens.users, Via::Bearer)), None).await;
    assert_eq!(view.status, StatusCode::OK);
    assert_eq!(view.index(), before, "the index did not move");
    let instances = view.body["instances"].as_array().cloned().unwrap_or_default();
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0]["address"], "10.0.0.1", "the instance is unchanged: {instances:?}");

    // A real client sees the same: curl, without a token.
    let out = Command::new("curl")
        .args(["-sS", "-i", "-X", "PUT", "-H", "content-type: application/json"])
        .args(["-d", r#"{"address":"203.0.113.9","port":1}"#, &url])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(text.contains("www-authenticate: bearer realm=\"trellis\""), "{text}");
    assert!(text.contains(r#""error":"unauthenticated""#), "{text}");
}

#[tokio::test]
async fn every_write_route_needs_write_on_its_service() {
    let tokens = Tokens::new();
    let path = acl_path("writes");
    std::fs::write(&path, tokens.file("read", &[])).unwrap();
    let reg = start("acl-writes", &path, &[]).await;
    register(&reg, "users", "u1", &tokens.users).await;
    let url = instance_url(&reg, "users", "u1");
    let routes = [
        (Method::PUT, url.clone(), Some(registration("10.0.0.1")), StatusCode::OK),
        (Method::PUT, format!("{url}/heartbeat"), Some(json!({"status":"passing"})), StatusCode::NO_CONTENT),
        (Method::DELETE, url.clone(), None, StatusCode::NO_CONTENT),
    ];
    let h = http();
    for (i, (method, url, body, ok)) in routes.into_iter().enumerate() {
        let a = call(&h, method.clone(), &url, None, body.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "{method} {url} no token"
        );
        let wrong = secret();
        let a = call(&h, method.clone(), &url, Some((&wrong, Via::Trellis)), body.clone()).await;
        assert_eq!(
            (a.status, a.code()),
            (StatusCode::UNAUTHORIZED, "unauthenticated"),
            "{method} {url} unknown"
        );
        for via in [Via::Bearer, Via::Trellis, Via::Consul] {
            let a = call(&h, method.clone(), &url, Some((&tokens.billing, via)), body.clone()).await;
            assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "permission_denied"), "{method} {url}");
            let a = call(&h, method.clone(), &url, Some((&tokens.reader, via)), body.clone()).await;
            assert_eq!(a.status, StatusCode::FORBIDDEN, "{method} {url}: a reader may not write");
        }
        // The owner may, through any of the three headers.
        let via = [Via::Bearer, Via::Trellis, Via::Consul][i];
        let a = call(&h, method.clone(), &url, Some((&tokens.users, via)), body).await;
        assert_eq!(a.status, ok, "{method} {url}: {:?}", a.body);
    }
    let m = metrics_text(&reg, &tokens.ops).await;
    let count =
        |reason: &str| metric(&m, &format!("trellis_registry_auth_failures_total{{reason=\"{reason}\"}}"));
    println!(
        "failures: missing {:?} unknown {:?} denied {:?}",
        count("missing"),
        count("unknown"),
        count("denied")
    );
    assert_eq!(
        (count("missing"), count("unknown"), count("denied")),
        (Some(3.0), Some(3.0), Some(18.0)),
        "{m}"
    );
    assert!(reg.proc.log_text().contains("token check failed"), "a warning names the client and reason");
}

#[tokio::test]
async fn admin_may_do_everything_including_metrics_when_default_denies() {
    let tokens = Tokens::new();
    let path = acl_path("admin");
    std::fs::write(&path, tokens.file("deny", &[])).unwrap();
    let reg = start("acl-admin", &path, &[]).await;
    let h = http();
    let ops = Some((tokens.ops.as_str(), Via::Bearer));
    for service in ["users", "billing", "other"] {
        register(&reg, service, "a", &tokens.ops).await;
        let url = instance_url(&reg, service, "a");
        let a = call(&h, Method::PUT, &format!("{url}/heartbeat"), ops, None).await;
        assert_eq!(a.status, StatusCode::NO_CONTENT);
        let a = call(&h, Method::GET, &format!("{}/v1/services/{service}", reg.url()), ops, None).await;
        assert_eq!(a.status, StatusCode::OK);
    }
    let list = call(&h, Method::GET, &format!("{}/v1/services", reg.url()), ops, None).await;
    assert_eq!(list.body["services"].as_array().map(Vec::len), Some(3), "{:?}", list.body);
    let a = call(&h, Method::DELETE, &instance_url(&reg, "other", "a"), ops, None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let metrics = format!("{}/metrics", reg.url());
    assert!(metrics_text(&reg, &tokens.ops).await.contains("trellis_registry_heartbeats_total 3"));
    let a = call(&h, Method::GET, &metrics, Some((&tokens.users, Via::Bearer)), None).await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "permission_denied"));
    let a = call(&h, Method::GET, &metrics, None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(&h, Method::GET, &format!("{}/health", reg.url()), None, None).await;
    assert_eq!(a.status, StatusCode::OK, "/health stays open");
}

#[tokio::test]
async fn read_rules_limit_discovery_and_the_list() {
    let tokens = Tokens::new();
    let path = acl_path("reads");
    std::fs::write(&path, tokens.file("deny", &[])).unwrap();
    let reg = start("acl-reads", &path, &[]).await;
    register(&reg, "users", "u1", &tokens.users).await;
    register(&reg, "billing", "b1", &tokens.billing).await;
    let h = http();
    let reader = Some((tokens.reader.as_str(), Via::Bearer));
    let get = |s: &str| format!("{}/v1/services/{s}", reg.url());
    let a = call(&h, Method::GET, &get("users"), reader, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a = call(&h, Method::GET, &get("billing"), reader, None).await;
    assert_eq!((a.status, a.code()), (StatusCode::FORBIDDEN, "permission_denied"));
    assert_eq!(a.body["message"], "token \"reader\" may not read service \"billing\"");
    let a = call(&h, Method::GET, &format!("{}?index=1&wait=10s", get("billing")), reader, None).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "a blocking query is a read too");
    let list = call(&h, Method::GET, &format!("{}/v1/services", reg.url()), reader, None).await;
    let names: Vec<&str> =
        list.body["services"].as_array().into_iter().flatten().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["users"]);
    let a = call(&h, Method::GET, &get("users"), None, None).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "default deny: no anonymous reads");

    // default = "read": anonymous discovery and metrics, never writes.
    let open_path = acl_path("reads-open");
    std::fs::write(&open_path, tokens.file("read", &[])).unwrap();
    let open = start("acl-reads-open", &open_path, &[]).await;
    register(&open, "billing", "b1", &tokens.billing).await;
    let a = call(&h, Method::GET, &format!("{}/v1/services/billing", open.url()), None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let list = call(&h, Method::GET, &format!("{}/v1/services", open.url()), None, None).await;
    assert_eq!(list.body["services"].as_array().map(Vec::len), Some(1));
    let a = call(&h, Method::GET, &format!("{}/metrics", open.url()), None, None).await;
    assert_eq!(a.status, StatusCode::OK);
    let a =
        call(&h, Method::PUT, &instance_url(&open, "billing", "b2"), None, Some(registration("10.0.0.2")))
            .await;
    assert_eq!((a.status, a.code()), (StatusCode::UNAUTHORIZED, "unauthenticated"));
}

/// Waits until a heartbeat with `token` gets `status`; returns how long it took.
async fn until_heartbeat(reg: &RegistryProc, service: &str, token: &str, status: StatusCode) -> Duration {
    let (h, url) = (http(), format!("{}/heartbeat", instance_url(reg, service, "a")));
    let t = Instant::now();
    wait_for(&format!("a heartbeat answering {status}"), Duration::from_secs(10), || {
        let (h, url) = (h.clone(), url.clone());
        async move {
            (call(&h, Method::PUT, &url, Some((token, Via::Bearer)), None).await.status == status)
                .then_some(())
        }
    })
    .await;
    t.elapsed()
}

#[tokio::test]
async fn a_revoked_token_is_refused_within_a_second_and_an_invalid_file_keeps_the_rules() {
    let tokens = Tokens::new();
    let path = acl_path("reload");
    std::fs::write(&path, tokens.file("deny", &[])).unwrap();
    let reg = start("acl-reload", &path, &[]).await;
    register(&reg, "users", "a", &tokens.users).await;
    register(&reg, "billing", "a", &tokens.billing).await;

    std::fs::write(&path, tokens.file("deny", &["billing"])).unwrap();
    let took = until_heartbeat(&reg, "billing", &tokens.billing, StatusCode::UNAUTHORIZED).await;
    println!("revoked token refused after {took:?}");
    // The file is read twice a second; the bound is generous for a loaded machine.
    assert!(took < Duration::from_secs(2), "revocation took {took:?}");

    // An invalid file is refused, logged once, and the rules in force stay.
    std::fs::write(&path, format!("{}\nunknown_key = 1\n", tokens.file("deny", &[]))).unwrap();
    wait_for("the refusal in the log", Duration::from_secs(10), || async {
        reg.proc.log_text().contains("ACL file refused").then_some(())
    })
    .await;
    assert!(reg.proc.log_text().contains("unknown field"), "the reason is logged");
    let a = call(
        &http(),
        Method::PUT,
        &format!("{}/heartbeat", instance_url(&reg, "billing", "a")),
        Some((&tokens.billing, Via::Bearer)),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "billing stays revoked");
    let a = call(
        &http(),
        Method::PUT,
        &format!("{}/heartbeat", instance_url(&reg, "users", "a")),
        Some((&tokens.users, Via::Bearer)),
        None,
    )
    .await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "users keeps its rights");
    let m = metrics_text(&reg, &tokens.ops).await;
    assert_eq!(metric(&m, "trellis_registry_acl_reloads_total{result=\"ok\"}"), Some(1.0), "{m}");
    assert_eq!(metric(&m, "trellis_registry_acl_reloads_total{result=\"failed\"}"), Some(1.0), "{m}");
    assert_eq!(reg.proc.log_text().matches("ACL file refused").count(), 1, "reported once, not every second");
}

#[tokio::test]
async fn sighup_reloads_the_file() {
    let tokens = Tokens::new();
    let path = acl_path("sighup");
    std::fs::write(&path, tokens.file("deny", &[])).unwrap();
    let mut reg = start("acl-sighup", &path, &[]).await;
    register(&reg, "users", "a", &tokens.users).await;
    reg.proc.signal(libc::SIGHUP);
    wait_for("the SIGHUP reload in the log", Duration::from_secs(10), || async {
        reg.proc.log_text().lines().any(|l| l.contains("ACL reloaded") && l.contains("SIGHUP")).then_some(())
    })
    .await;
    std::fs::write(&path, tokens.file("deny", &["users"])).unwrap();
    reg.proc.signal(libc::SIGHUP);
    let took = until_heartbeat(&reg, "users", &tokens.users, StatusCode::UNAUTHORIZED).await;
    println!("token revoked by SIGHUP refused after {took:?}");
    assert!(reg.proc.exit_status().is_none(), "SIGHUP does not stop the registry");
}

#[tokio::test]
async fn no_secret_or_its_hash_appears_in_any_log_line() {
    let tokens = Tokens::new();
    let clear = secret();
    let path = acl_path("nolog");
    let text = format!(
        "{}[[tokens]]\nname = \"clear\"\nsecret = \"{clear}\"\nwrite = [\"users\"]\n",
        tokens.file("deny", &[])
    );
    std::fs::write(&path, &text).unwrap();
    let args = strings(&["--acl-file", &path.display().to_string()]);
    let launch = Launch::new("acl-nolog", &trellis_tests::bin("registry"))
        .args(&strings(&["--listen", "127.0.0.1:0"]))
        .args(&args)
        .env("RUST_LOG", "debug");
    let (proc, ready) = trellis_tests::start_ready(launch).await;
    let reg = RegistryProc { proc, addr: ready.addr("listen") };
    let wrong = secret();
    let h = http();
    register(&reg, "users", "a", &tokens.users).await;
    register(&reg, "users", "b", &clear).await;
    let hb = format!("{}/heartbeat", instance_url(&reg, "users", "a"));
    for token in [&tokens.users, &tokens.billing, &tokens.reader, &wrong, &clear] {
        for via in [Via::Bearer, Via::Trellis, Via::Consul] {
            call(&h, Method::PUT, &hb, Some((token, via)), None).await;
            call(&h, Method::GET, &format!("{}/v1/services/billing", reg.url()), Some((token, via)), None)
                .await;
        }
    }
    call(&h, Method::GET, &format!("{}/metrics", reg.url()), Some((&wrong, Via::Bearer)), None).await;
    // A refused file with a secret in it, then a good one again.
    std::fs::write(&path, format!("{text}\nsecrett = \"{wrong}\"\n")).unwrap();
    wait_for("the refusal", Duration::from_secs(10), || async {
        reg.proc.log_text().contains("ACL file refused").then_some(())
    })
    .await;
    std::fs::write(&path, &text).unwrap();
    wait_for("the reload", Duration::from_secs(10), || async {
        reg.proc.log_text().contains("ACL reloaded").then_some(())
    })
    .await;
    let log = reg.proc.log_text();
    assert!(log.contains("DEBUG"), "the registry logged at debug");
    assert!(log.contains("token check failed"), "refusals were logged");
    for s in [&tokens.users, &tokens.billing, &tokens.reader, &tokens.ops, &clear, &wrong] {
        assert!(!log.contains(s.as_str()), "a secret is in the log");
        assert!(!log.contains(&sha256_hex(s)), "a secret's hash is in the log");
    }
    println!("{} log lines checked for 6 secrets and their hashes", log.lines().count());
}

#[tokio::test]
async fn an_invalid_acl_file_stops_the_registry_at_start() {
    let path = acl_path("invalid");
    let leaked = secret();
    std::fs::write(
        &path,
        format!("default = \"deny\"\n[[tokens]]\nname = \"a\"\nsecret_sha256 = \"{leaked}x\"\n"),
    )
    .unwrap();
    let mut proc = Launch::new("acl-invalid", &trellis_tests::bin("registry"))
        .args(&strings(&["--listen", "127.0.0.1:0", "--acl-file", &path.display().to_string()]))
        .spawn()
        .expect("spawn");
    let status = proc.wait_exit(Duration::from_secs(30)).expect("the registry exits");
    assert!(!status.success());
    let log = proc.log_text();
    assert!(log.contains("secret_sha256 must be 64 hex digits") && log.contains("token #1"), "{log}");
    assert!(!log.contains(&leaked), "{log}");
}

#[tokio::test]
async fn without_an_acl_file_a_registry_beyond_loopback_warns() {
    let reg = RegistryProc::start_on("acl-none", "0.0.0.0:0".parse().unwrap(), &[]).await;
    let log = reg.proc.log_text();
    assert!(log.contains("no --acl-file"), "{log}");
    let url = format!("http://127.0.0.1:{}/v1/services/users/instances/a", reg.addr.port());
    let a = call(&http(), Method::PUT, &url, None, Some(registration("10.0.0.1"))).await;
    assert_eq!(a.status, StatusCode::OK, "everything allowed, as before");
}

#[tokio::test]
async fn size_caps_answer_429_and_re_registration_still_works() {
    let reg =
        RegistryProc::start("caps", &strings(&["--max-services", "3", "--max-instances-per-service", "2"]))
            .await;
    let h = http();
    let put = |service: &str, id: &str| {
        let (h, url) = (h.clone(), instance_url(&reg, service, id));
        async move { call(&h, Method::PUT, &url, None, Some(registration("10.0.0.1"))).await }
    };
    assert_eq!(put("s1", "a").await.status, StatusCode::OK);
    assert_eq!(put("s1", "b").await.status, StatusCode::OK);
    let a = put("s1", "c").await;
    assert_eq!((a.status, a.code()), (StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"), "{:?}", a.body);
    assert!(a.body["message"].as_str().unwrap_or_default().contains("--max-instances-per-service"));
    assert_eq!(put("s1", "a").await.status, StatusCode::OK, "re-registration works at the cap");
    assert_eq!(put("s2", "a").await.status, StatusCode::OK);
    assert_eq!(put("s3", "a").await.status, StatusCode::OK);
    let a = put("s4", "a").await;
    assert_eq!((a.status, a.code()), (StatusCode::TOO_MANY_REQUESTS, "limit_exceeded"), "{:?}", a.body);
    assert!(a.body["message"].as_str().unwrap_or_default().contains("--max-services"));
    assert_eq!(put("s3", "a").await.status, StatusCode::OK);
    let a = call(&h, Method::PUT, &format!("{}/heartbeat", instance_url(&reg, "s3", "a")), None, None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "heartbeats at the cap");
    let a = call(&h, Method::DELETE, &instance_url(&reg, "s3", "a"), None, None).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    assert_eq!(put("s4", "a").await.status, StatusCode::OK, "room again once a service emptied");
}

#[tokio::test]
async fn a_client_past_its_watch_cap_is_answered_at_once_and_others_still_wait() {
    let reg = RegistryProc::start("watch-cap", &strings(&["--max-watches-per-client", "2"])).await;
    let h = http();
    let reg_answer =
        call(&h, Method::PUT, &instance_url(&reg, "users", "a"), None, Some(registration("10.0.0.1"))).await;
    let index = reg_answer.index().expect("an index");
    let watch = format!("{}/v1/services/users?index={index}&wait=20s", reg.url());
    let client_from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(IpAddr::from(ip))
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let mut held = Vec::new();
    for _ in 0..2 {
        let (h, w) = (h.clone(), watch.clone());
        held.push(tokio::spawn(async move { call(&h, Method::GET, &w, None, None).await }));
    }
    let metrics = format!("{}/metrics", reg.url());
    let open = |h: reqwest::Client, m: String| async move {
        let a = call(&h, Method::GET, &m, None, None).await;
        metric(a.body.as_str().unwrap_or_default(), "trellis_registry_open_watches")
    };
    wait_for("two held watches", Duration::from_secs(10), || {
        let (h, m) = (h.clone(), metrics.clone());
        async move { (open(h, m).await == Some(2.0)).then_some(()) }
    })
    .await;
    let t = Instant::now();
    let a = call(&h, Method::GET, &watch, None, None).await;
    let third = t.elapsed();
    println!("the third watch of one client answered in {third:?}");
    assert_eq!((a.status, a.index()), (StatusCode::OK, Some(index)));
    assert!(third < Duration::from_secs(5), "{third:?}");
    // Another address (127.0.0.2 reaches the loopback listener too) still waits.
    let other = client_from([127, 0, 0, 2]);
    let w = watch.clone();
    let waiting = tokio::spawn(async move { call(&other, Method::GET, &w, None, None).await });
    wait_for("the other client's watch held", Duration::from_secs(10), || {
        let (h, m) = (h.clone(), metrics.clone());
        async move { (open(h, m).await == Some(3.0)).then_some(()) }
    })
    .await;
    // A change answers all of them.
    let a =
        call(&h, Method::PUT, &instance_url(&reg, "users", "b"), None, Some(registration("10.0.0.2"))).await;
    assert_eq!(a.status, StatusCode::OK);
    for w in held.into_iter().chain([waiting]) {
        let a = w.await.unwrap();
        assert!(a.index() > Some(index), "woken by the change");
    }
}
