//! The operator commands (`registry services`, `show`, `watch`, `deregister`)
//! run as the real binary against a real registry on a loopback port of its
//! own: tables and `--json`, a watch that prints changes as they happen (read
//! line by line, with a deadline), a restart ridden out, errors as one line
//! with a non-zero exit, and TLS with tokens as `registry init` sets them up.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use trellis_registry::acl::rules::digest_of;
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{bin, strings, RegistryProc};

/// Bound on one command or one awaited watch line on a loaded machine.
const WITHIN: Duration = Duration::from_secs(30);

/// Variables of the operator commands, removed so the test's environment cannot leak in.
const CLI_ENV: [&str; 7] = [
    "TRELLIS_REGISTRY",
    "TRELLIS_TOKEN",
    "TRELLIS_TOKEN_FILE",
    "TRELLIS_REGISTRY_CA",
    "TRELLIS_REGISTRY_CERT",
    "TRELLIS_REGISTRY_KEY",
    "TRELLIS_CLI_TIMEOUT",
];

fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(bin("registry"));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for key in CLI_ENV {
        cmd.env_remove(key);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

/// Runs `registry ARGS...` to completion; prints what it did.
async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let started = Instant::now();
    let out = tokio::time::timeout(WITHIN, command(args, env).output())
        .await
        .unwrap_or_else(|_| panic!("registry {args:?} did not finish within {WITHIN:?}"))
        .unwrap_or_else(|e| panic!("running registry {args:?}: {e}"));
    println!(
        "registry {args:?}: {} in {:?}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        started.elapsed(),
        stdout(&out),
        stderr(&out)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A successful run's stdout.
async fn ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run(args, env).await;
    assert!(out.status.success(), "registry {args:?} failed: {}", stderr(&out));
    assert!(out.stderr.is_empty(), "nothing on stderr: {}", stderr(&out));
    stdout(&out)
}

/// A failed run's one stderr line, checked to come with `code` and nothing on stdout.
async fn fails(args: &[&str], env: &[(&str, &str)], code: i32) -> String {
    let out = run(args, env).await;
    assert_eq!(out.status.code(), Some(code), "registry {args:?}: {}", stderr(&out));
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(out.stdout.is_empty(), "nothing on stdout: {}", stdout(&out));
    err.trim_end().to_string()
}

/// Splits a table into rows of cells (cells hold no spaces in these tests).
fn table(text: &str) -> Vec<Vec<String>> {
    text.lines().map(|l| l.split_whitespace().map(String::from).collect()).collect()
}

/// Registers an instance with a lease long enough for any test, through a plain client.
async fn register(http: &reqwest::Client, base: &str, service: &str, id: &str, body: Value) {
    let mut body = body;
    body["ttl"] = json!("120s");
    let url = format!("{base}/v1/services/{service}/instances/{id}");
    let resp = http.put(&url).json(&body).send().await.expect("register");
    assert!(resp.status().is_success(), "register {service}/{id}: {}", resp.text().await.unwrap_or_default());
}

async fn heartbeat(http: &reqwest::Client, base: &str, service: &str, id: &str, status: &str) {
    let url = format!("{base}/v1/services/{service}/instances/{id}/heartbeat");
    let resp =
        http.put(&url).json(&json!({"status": status, "output": "probe said so"})).send().await.unwrap();
    assert!(resp.status().is_success(), "heartbeat: {}", resp.status());
}

async fn delete(http: &reqwest::Client, base: &str, service: &str, id: &str) {
    let url = format!("{base}/v1/services/{service}/instances/{id}");
    let resp = http.delete(&url).send().await.unwrap();
    assert!(resp.status().is_success(), "deregister: {}", resp.status());
}

/// A running `registry watch`, its stdout read line by line.
struct Watcher {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    name: String,
}

impl Watcher {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Watcher {
        let log = unique_path(&log_dir(), "registry-watch", "stderr");
        let stderr = std::fs::File::create(&log).expect("stderr file");
        let mut child =
            command(args, env).stdout(Stdio::piped()).stderr(stderr).spawn().expect("spawn watch");
        let stdout = child.stdout.take().expect("piped stdout");
        Watcher { child, lines: BufReader::new(stdout).lines(), name: log.display().to_string() }
    }

    /// The next line holding every one of `words`, skipping others, within
    /// [`WITHIN`]; returns it and how long it took.
    async fn line_with(&mut self, words: &[&str]) -> (String, Duration) {
        let started = Instant::now();
        let mut seen = Vec::new();
        loop {
            let left = WITHIN.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    println!("watch> {line}");
                    if words.iter().all(|w| line.contains(w)) {
                        return (line, started.elapsed());
                    }
                    seen.push(line);
                }
                Ok(Ok(None)) => panic!(
                    "the watch exited before a line with {words:?}; it printed {seen:?}; stderr {}: {}",
                    self.name,
                    std::fs::read_to_string(&self.name).unwrap_or_default()
                ),
                Ok(Err(e)) => panic!("reading the watch: {e}"),
                Err(_) => panic!("no line with {words:?} within {WITHIN:?}; it printed {seen:?}"),
            }
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.name).unwrap_or_default()
    }

    /// Still running: a watch only ends on a signal or a refusal.
    fn assert_running(&mut self) {
        assert!(matches!(self.child.try_wait(), Ok(None)), "the watch exited: {}", self.stderr());
    }
}

#[tokio::test]
async fn services_and_show_print_aligned_tables_and_json() {
    let reg = RegistryProc::start("registry-cli-tables", &[]).await;
    let url = reg.url();
    let http = reqwest::Client::new();
    register(
        &http,
        &url,
        "users",
        "users-1",
        json!({"address": "127.0.0.1", "port": 9001, "zone": "eu-1a", "weight": 50,
               "tags": ["v2", "canary"], "metadata": {"admin": "127.0.0.1:15000"}}),
    )
    .await;
    register(&http, &url, "users", "users-2", json!({"address": "127.0.0.2", "port": 9002})).await;
    heartbeat(&http, &url, "users", "users-2", "critical").await;
    register(
        &http,
        &url,
        "billing",
        "billing-1",
        json!({"address": "10.1.2.3", "port": 80, "status": "critical"}),
    )
    .await;

    let text = ok(&["services", "--registry", &url], &[]).await;
    assert_eq!(
        table(&text),
        [
            vec!["SERVICE", "INSTANCES", "HEALTHY", "CRITICAL", "NOTE"],
            vec!["billing", "1", "0", "1", "no", "healthy", "instance"],
            vec!["users", "2", "1", "1"],
        ]
    );
    // Aligned: every column starts at the same offset on every line.
    let lines: Vec<&str> = text.lines().collect();
    for header in ["INSTANCES", "HEALTHY", "CRITICAL"] {
        let end = lines[0].find(header).unwrap() + header.len();
        for line in &lines[1..] {
            assert!(line.as_bytes()[end - 1].is_ascii_digit(), "{header} right-aligned in {line:?}");
        }
    }
    // The variable does what the flag does.
    let json: Value = serde_json::from_str(&ok(&["services", "--json"], &[("TRELLIS_REGISTRY", &url)]).await)
        .expect("--json is JSON");
    assert_eq!(
        json["services"],
        json!([{"name": "billing", "instances": 1, "healthy": 0}, {"name": "users", "instances": 2, "healthy": 1}])
    );

    let text = ok(&["show", "users", "--registry", &url], &[]).await;
    assert_eq!(
        table(&text),
        [
            vec!["ID", "ADDRESS", "PORT", "ZONE", "WEIGHT", "STATUS", "TAGS", "METADATA", "OUTPUT"],
            vec![
                "users-1",
                "127.0.0.1",
                "9001",
                "eu-1a",
                "50",
                "passing",
                "v2,canary",
                "admin=127.0.0.1:15000"
            ],
            vec!["users-2", "127.0.0.2", "9002", "-", "100", "critical", "-", "-", "probe", "said", "so"],
        ]
    );
    let lines: Vec<&str> = text.lines().collect();
    for header in ["ADDRESS", "ZONE", "STATUS", "OUTPUT"] {
        let at = lines[0].find(header).unwrap();
        assert!(lines[2][at..].starts_with(|c: char| c != ' '), "{header} column lines up: {text}");
    }
    let view: Value = serde_json::from_str(&ok(&["show", "users", "--json", "--registry", &url], &[]).await)
        .expect("--json is JSON");
    assert_eq!(view["service"], "users");
    assert!(view["index"].as_u64().unwrap() > 0);
    let instances = view["instances"].as_array().unwrap();
    assert_eq!(instances.len(), 2, "critical instances too");
    assert_eq!(instances[0]["tags"], json!(["v2", "canary"]));
    assert_eq!(instances[1]["status"], "critical");
    assert_eq!(instances[1]["output"], "probe said so");
}

#[tokio::test]
async fn watch_prints_each_change_as_it_happens() {
    let reg = RegistryProc::start("registry-cli-watch", &[]).await;
    let url = reg.url();
    let http = reqwest::Client::new();
    let mut people = Watcher::start(&["watch", "users", "--registry", &url], &[]);
    let mut scripts = Watcher::start(&["watch", "users", "--json", "--registry", &url], &[]);
    people.line_with(&["TIME", "INDEX", "EVENT", "ID", "STATUS"]).await;
    people.line_with(&["empty", "no instance registered yet"]).await;
    let (first, _) = scripts.line_with(&["\"changes\":[]"]).await;
    let first: Value = serde_json::from_str(&first).unwrap();
    assert_eq!((first["index"].as_u64(), first["instances"].as_array().map(Vec::len)), (Some(0), Some(0)));

    let mut delays = Vec::new();
    let at = Instant::now();
    register(&http, &url, "users", "users-1", json!({"address": "127.0.0.1", "port": 9001, "zone": "a"}))
        .await;
    let (line, took) = people.line_with(&["added", "users-1"]).await;
    delays.push(("added", at.elapsed(), took));
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert!(fields[1].parse::<u64>().is_ok_and(|i| i > 0), "the index: {line}");
    assert_eq!(fields[2..], ["added", "users-1", "127.0.0.1", "9001", "a", "100", "passing"]);
    let (line, _) = scripts.line_with(&["\"event\":\"added\""]).await;
    let added: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(added["changes"], json!([{"event": "added", "id": "users-1"}]));
    assert_eq!(added["instances"][0]["zone"], "a");

    let at = Instant::now();
    heartbeat(&http, &url, "users", "users-1", "critical").await;
    let (line, took) = people.line_with(&["changed", "users-1"]).await;
    delays.push(("changed", at.elapsed(), took));
    assert!(line.contains("critical") && line.ends_with("status passing -> critical"), "{line}");
    let (line, _) = scripts.line_with(&["\"event\":\"changed\""]).await;
    let changed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(changed["changes"], json!([{"event": "changed", "id": "users-1", "fields": ["status"]}]));

    let at = Instant::now();
    delete(&http, &url, "users", "users-1").await;
    let (line, took) = people.line_with(&["removed", "users-1"]).await;
    delays.push(("removed", at.elapsed(), took));
    assert!(line.contains("127.0.0.1"), "{line}");
    let (line, _) = scripts.line_with(&["\"event\":\"removed\""]).await;
    let removed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(removed["instances"], json!([]));
    assert!(removed["index"].as_u64() > changed["index"].as_u64());

    for (event, since_write, since_read) in &delays {
        println!("watch printed {event} {since_write:?} after the write ({since_read:?} of reading)");
        // A held query answers at the change: far inside the 30 s it is held for.
        assert!(*since_write < Duration::from_secs(10), "{event} took {since_write:?}");
    }
    people.assert_running();
    scripts.assert_running();
    assert_eq!(people.stderr(), "", "no complaint on stderr");
}

#[tokio::test]
async fn watch_rides_out_a_registry_restart_and_reports_it() {
    let reg = RegistryProc::start("registry-cli-restart", &[]).await;
    let url = reg.url();
    let http = reqwest::Client::new();
    register(&http, &url, "users", "users-1", json!({"address": "127.0.0.1", "port": 9001})).await;
    let mut watch = Watcher::start(&["watch", "users", "--registry", &url], &[]);
    watch.line_with(&["present", "users-1"]).await;

    let addr = reg.addr;
    drop(reg);
    let reg = RegistryProc::start_on("registry-cli-restart-2", addr, &[]).await;
    register(&http, &url, "users", "users-2", json!({"address": "127.0.0.1", "port": 9002})).await;
    // The new registry's first answer carries a new epoch: reported, then compared with the last view.
    watch.line_with(&["restart", "the registry restarted"]).await;
    // users-1 did not come back (nothing re-registers it here); users-2 is new. Both in the one view, either order.
    let rest = [watch.line_with(&["users-"]).await.0, watch.line_with(&["users-"]).await.0];
    let has = |event: &str, id: &str| rest.iter().any(|l| l.contains(event) && l.contains(id));
    assert!(has("removed", "users-1") && has("added", "users-2"), "{rest:?}");
    watch.assert_running();
    let err = watch.stderr();
    println!("watch stderr:\n{err}");
    if !err.is_empty() {
        // Whether a round failed depends on timing; if one did, it was said once, then the recovery.
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 2, "{err}");
        assert!(lines[0].starts_with("registry watch: ") && lines[0].ends_with("; retrying"), "{err}");
        assert_eq!(lines[1], "registry watch: the registry answers again; resuming");
    }
    drop(reg);
}

#[tokio::test]
async fn deregister_removes_the_instance() {
    let reg = RegistryProc::start("registry-cli-deregister", &[]).await;
    let url = reg.url();
    let http = reqwest::Client::new();
    register(&http, &url, "users", "users-1", json!({"address": "127.0.0.1", "port": 9001})).await;
    register(&http, &url, "users", "users-2", json!({"address": "127.0.0.1", "port": 9002})).await;

    assert_eq!(
        ok(&["deregister", "users", "users-1", "--registry", &url], &[]).await,
        "deregistered users/users-1\n"
    );
    let view: Value =
        http.get(format!("{url}/v1/services/users?all=true")).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> =
        view["instances"].as_array().unwrap().iter().filter_map(|i| i["id"].as_str()).collect();
    assert_eq!(ids, ["users-2"]);

    let err = fails(&["deregister", "users", "users-1", "--registry", &url], &[], 1).await;
    assert_eq!(err, "registry deregister: users/users-1 is not registered");

    let done: Value = serde_json::from_str(
        &ok(&["deregister", "users", "users-2", "--json", "--registry", &url], &[]).await,
    )
    .unwrap();
    assert_eq!(done, json!({"service": "users", "id": "users-2", "deregistered": true}));
    let err = fails(&["show", "users", "--registry", &url], &[], 1).await;
    assert_eq!(err, "registry show: no service \"users\": no instance of it is registered");
    let text = ok(&["services", "--registry", &url], &[]).await;
    assert_eq!(table(&text).len(), 1, "only the header: {text}");
}

/// A 256-bit secret as hex, generated for this run.
fn secret() -> String {
    rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test]
async fn errors_are_one_line_with_a_non_zero_exit() {
    // Unreachable: a port nothing listens on any more.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let dead_url = format!("http://{dead}");
    for args in [
        vec!["services", "--registry", &dead_url],
        vec!["show", "users", "--registry", &dead_url],
        vec!["watch", "users", "--registry", &dead_url],
        vec!["deregister", "users", "u1", "--registry", &dead_url],
    ] {
        let err = fails(&args, &[], 1).await;
        let want = format!("registry {}: cannot reach the registry at {dead_url}: ", args[0]);
        assert!(err.starts_with(&want), "{err}");
        assert!(err.to_ascii_lowercase().contains("refused"), "the cause is named: {err}");
    }
    // Command lines that cannot work: exit 2, before any request.
    let err = fails(&["services", "--registry", "ftp://registry"], &[], 2).await;
    assert!(err.contains("scheme must be http or https"), "{err}");
    let err = fails(&["services", "--token-file", "/nonexistent/token"], &[], 2).await;
    assert!(err.contains("/nonexistent/token"), "{err}");
    let out = run(&["show", "Not_A_Service"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "clap refuses an invalid name");

    // A registry with tokens: default deny, a writer of `users` who reads all, a reader of `users`.
    let writer = secret();
    let reader = secret();
    let hex = |s: &str| digest_of(s.as_bytes()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let acl = unique_path(&log_dir(), "registry-cli", "acl.toml");
    std::fs::write(
        &acl,
        format!(
            "default = \"deny\"\n\
             [[tokens]]\nname = \"users-writer\"\nsecret_sha256 = \"{}\"\nwrite = [\"users\"]\nread = [\"*\"]\n\
             [[tokens]]\nname = \"users-reader\"\nsecret_sha256 = \"{}\"\nread = [\"users\"]\n",
            hex(&writer),
            hex(&reader)
        ),
    )
    .unwrap();
    let reg =
        RegistryProc::start("registry-cli-acl", &strings(&["--acl-file", &acl.display().to_string()])).await;
    let url = reg.url();
    let writes = reqwest::Client::builder()
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {writer}").parse().unwrap())]
                .into_iter()
                .collect(),
        )
        .build()
        .unwrap();
    register(&writes, &url, "users", "users-1", json!({"address": "127.0.0.1", "port": 9001})).await;

    for args in [vec!["show", "users", "--registry", &url], vec!["watch", "users", "--registry", &url]] {
        let err = fails(&args, &[], 1).await;
        assert!(
            err.contains(&format!("the registry at {url} refused the request: 401 unauthenticated: ")),
            "{err}"
        );
        assert!(err.ends_with("(give a token: --token-file or TRELLIS_TOKEN)"), "{err}");
    }
    let err =
        fails(&["show", "users", "--registry", &url], &[("TRELLIS_TOKEN", "not-a-known-token")], 1).await;
    assert!(err.contains("401 unauthenticated") && !err.contains("give a token"), "{err}");
    assert!(!err.contains("not-a-known-token"), "the token is never printed");
    // The reader may look but not deregister: the registry's message is quoted.
    let text = ok(&["show", "users", "--registry", &url], &[("TRELLIS_TOKEN", &reader)]).await;
    assert!(text.contains("users-1"), "{text}");
    let err =
        fails(&["deregister", "users", "users-1", "--registry", &url], &[("TRELLIS_TOKEN", &reader)], 1)
            .await;
    assert!(
        err.contains("403 permission_denied: token \"users-reader\" may not write service \"users\""),
        "{err}"
    );
    assert!(!err.contains(&reader));
    // Unknown service, with a token that may read it.
    let err = fails(&["show", "nosuch", "--registry", &url], &[("TRELLIS_TOKEN", &writer)], 1).await;
    assert_eq!(err, "registry show: no service \"nosuch\": no instance of it is registered");
    let token_file = unique_path(&log_dir(), "registry-cli", "token");
    std::fs::write(&token_file, format!("{writer}\n")).unwrap();
    let err = fails(
        &["services", "--registry", &url, "--token-file", &token_file.display().to_string()],
        &[("TRELLIS_TOKEN", &writer)],
        2,
    )
    .await;
    assert_eq!(err, "registry services: --token-file and TRELLIS_TOKEN are both set; pick one");
    drop(reg);
}

fn scratch(name: &str) -> PathBuf {
    let d = unique_path(&log_dir(), name, "init");
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn path(dir: &Path, file: &str) -> String {
    dir.join(file).display().to_string()
}

#[tokio::test]
async fn tls_and_tokens_as_registry_init_sets_them_up() {
    let dir = scratch("registry-cli-tls");
    let init =
        run(&["init", &dir.display().to_string(), "--name", "127.0.0.1", "--service", "users"], &[]).await;
    assert!(init.status.success());
    let reg = RegistryProc::start(
        "registry-cli-tls",
        &strings(&[
            "--acl-file",
            &path(&dir, "acl.toml"),
            "--tls-cert",
            &path(&dir, "registry.pem"),
            "--tls-key",
            &path(&dir, "registry-key.pem"),
        ]),
    )
    .await;
    let url = format!("https://127.0.0.1:{}", reg.addr.port());
    let ca = path(&dir, "ca.pem");
    let users_token = path(&dir, "tokens/users.token");
    let observer = path(&dir, "tokens/observer.token");
    let secrets: Vec<String> = ["users", "observer", "admin"]
        .iter()
        .map(|t| std::fs::read_to_string(dir.join(format!("tokens/{t}.token"))).unwrap())
        .collect();
    let no_secret = |text: &str| {
        for s in &secrets {
            assert!(!text.contains(s.trim()), "a token was printed");
        }
    };

    let pem = std::fs::read(&ca).unwrap();
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .default_headers(
            [(reqwest::header::AUTHORIZATION, format!("Bearer {}", secrets[0].trim()).parse().unwrap())]
                .into_iter()
                .collect(),
        )
        .build()
        .unwrap();
    register(&http, &url, "users", "users-1", json!({"address": "127.0.0.1", "port": 9001})).await;

    let as_observer = ["--registry", &url, "--registry-ca", &ca, "--token-file", &observer];
    let text = ok(&[&["services"][..], &as_observer].concat(), &[]).await;
    assert_eq!(table(&text)[1], ["users", "1", "1", "0"]);
    no_secret(&text);
    let text = ok(&[&["show", "users"][..], &as_observer].concat(), &[]).await;
    assert_eq!(table(&text)[1][..3], ["users-1", "127.0.0.1", "9001"]);

    // The variables do what the flags do; a watch over TLS sees a change.
    let env = [
        ("TRELLIS_REGISTRY", url.as_str()),
        ("TRELLIS_REGISTRY_CA", ca.as_str()),
        ("TRELLIS_TOKEN_FILE", observer.as_str()),
    ];
    let mut watch = Watcher::start(&["watch", "users"], &env);
    watch.line_with(&["present", "users-1"]).await;
    register(&http, &url, "users", "users-2", json!({"address": "127.0.0.1", "port": 9002})).await;
    watch.line_with(&["added", "users-2"]).await;

    // The observer may not deregister; the service's own token may.
    let err = fails(&[&["deregister", "users", "users-2"][..], &as_observer].concat(), &[], 1).await;
    assert!(err.contains("403 permission_denied"), "{err}");
    no_secret(&err);
    let as_users = ["--registry", &url, "--registry-ca", &ca, "--token-file", &users_token];
    assert_eq!(
        ok(&[&["deregister", "users", "users-2"][..], &as_users].concat(), &[]).await,
        "deregistered users/users-2\n"
    );
    watch.line_with(&["removed", "users-2"]).await;
    watch.assert_running();

    // Without the CA the certificate does not verify; plain http to a TLS port is refused too.
    let err = fails(&["services", "--registry", &url, "--token-file", &observer], &[], 1).await;
    assert!(err.contains("TLS certificate") && err.contains("--registry-ca"), "{err}");
    let other = scratch("registry-cli-tls-other");
    assert!(run(&["init", &other.display().to_string()], &[]).await.status.success());
    let err =
        fails(&["services", "--registry", &url, "--registry-ca", &path(&other, "ca.pem")], &[], 1).await;
    assert!(err.contains("does not verify against --registry-ca"), "{err}");
    let err = fails(
        &["services", "--registry", &format!("http://127.0.0.1:{}", reg.addr.port()), "--registry-ca", &ca],
        &[],
        2,
    )
    .await;
    assert!(err.contains("not https://"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&other);
}
