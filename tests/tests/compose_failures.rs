//! Failure tests across containers, and the `metrics` profile: the docker-compose demo (docker-compose.yml)
//! started for real, faults injected with the Docker CLI, and the demo client's
//! own counts asserted on (it never retries, so `failed=` is what the mesh let
//! through).
//!
//! Each test takes a process-wide lock (they run one after another), starts its
//! own compose project (`trt<pid><test>`, registry published on a free loopback
//! port), waits until the registry shows three healthy replicas and the client
//! has been answered by all three, injects its fault, stops the client (which
//! prints its summary after its in-flight requests end), and asserts. A `Stack`
//! guard tears the project down when the test ends, also when it fails.
//!
//! The demo runs with tokens and TLS: each stack gets credentials of its own,
//! written at its start by the built registry's `registry init` into a
//! temporary folder (`TRELLIS_SECRETS`), and the tests read the registry over
//! HTTPS, trusting that CA, with the `observer` token.
//!
//! Without a Docker engine the tests print `SKIPPED: <reason>` and pass, except
//! with `CI=true`, where a missing engine fails them. Images are built once per
//! run from the binaries beside the test executable (`scripts/images.sh`, tag
//! `test`). `TRELLIS_COMPOSE` overrides the compose command (default:
//! `docker-compose`, else `docker compose`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use trellis_tests::ports::foreign_binary_addr;
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{bin, bin_dir};

/// The service the demo replicas register as.
const SERVICE: &str = "demo";
/// Sidecar defaults the demo runs with (docker-compose.yml does not change them).
const TTL: Duration = Duration::from_secs(5);
const HEARTBEAT: Duration = Duration::from_secs(1);
/// The client's rate in these tests (requests per second).
const RATE: u32 = 50;

static SERIAL: Mutex<()> = Mutex::new(());
static IMAGES: OnceLock<Result<(), String>> = OnceLock::new();

fn unix_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command to completion with a time limit; `Err` carries its output.
fn run(program: &str, args: &[&str], envs: &[(&str, String)], limit: Duration) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let what = format!("{program} {}", args.join(" "));
    let mut child = cmd.spawn().map_err(|e| format!("{what}: {e}"))?;
    // Drain both pipes on threads so a chatty command cannot block on a full pipe.
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(o) = out.as_mut() {
            let _ = o.read_to_string(&mut s);
        }
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(e) = err.as_mut() {
            let _ = e.read_to_string(&mut s);
        }
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let stdout = out_t.join().unwrap_or_default();
    let stderr = err_t.join().unwrap_or_default();
    match status {
        Some(st) if st.success() => Ok(stdout),
        Some(st) => Err(format!("{what}: {st}\n{stdout}{stderr}")),
        None => Err(format!("{what}: still running after {limit:?}, killed\n{stdout}{stderr}")),
    }
}

/// The compose command: `docker-compose` (1.29 here) or the `docker compose` plugin.
fn compose_command() -> Result<Vec<String>, String> {
    if let Ok(c) = std::env::var("TRELLIS_COMPOSE") {
        return Ok(c.split_whitespace().map(String::from).collect());
    }
    if run("docker-compose", &["version"], &[], Duration::from_secs(30)).is_ok() {
        return Ok(vec!["docker-compose".into()]);
    }
    if run("docker", &["compose", "version"], &[], Duration::from_secs(30)).is_ok() {
        return Ok(vec!["docker".into(), "compose".into()]);
    }
    Err("neither docker-compose nor the docker compose plugin is installed".into())
}

/// Takes the serial lock and checks for an engine; `None` means skipped.
fn setup(test: &str) -> Option<(MutexGuard<'static, ()>, Vec<String>)> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let available = run("docker", &["info", "--format", "{{.ServerVersion}}"], &[], Duration::from_secs(30))
        .map_err(|e| format!("no Docker engine answers ({})", e.lines().next().unwrap_or("")))
        .and_then(|_| compose_command());
    let compose = match available {
        Ok(c) => c,
        Err(reason) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{test}: CI=true and {reason}");
            }
            println!("SKIPPED: {test}: {reason}");
            return None;
        }
    };
    let images = IMAGES.get_or_init(|| {
        let started = Instant::now();
        let script = root().join("scripts/images.sh");
        let envs =
            [("TRELLIS_TAG", "test".to_string()), ("TRELLIS_BIN_DIR", bin_dir().display().to_string())];
        let out = run(&script.display().to_string(), &[], &envs, Duration::from_secs(600))?;
        print!("{out}");
        println!("images built in {:.1}s", started.elapsed().as_secs_f64());
        Ok(())
    });
    if let Err(e) = images {
        panic!("building the images failed: {e}");
    }
    Some((guard, compose))
}

/// The images' user, which `registry init --owner` hands the files to when the tests run as root.
const IMAGE_USER: &str = "65532:65532";

/// Credentials for one stack, written by the built registry's `init` into a
/// folder of their own, and the user the registry and sidecars run as to read them.
struct Secrets {
    dir: PathBuf,
    uid: String,
    gid: String,
}

impl Secrets {
    fn generate(test: &str) -> Secrets {
        let dir = unique_path(&log_dir(), &format!("{test}-secrets"), "d");
        let euid = uid_of("/proc/self");
        let mut args = vec!["init".to_string(), dir.display().to_string()];
        for a in ["--service", "demo", "--service", "client"] {
            args.push(a.into());
        }
        for n in ["registry", "localhost", "127.0.0.1"] {
            args.extend(["--name".to_string(), n.to_string()]);
        }
        let (uid, gid) = if euid == 0 {
            // Root hands the 0600 files to the images' user, as scripts/demo.sh does.
            args.extend(["--owner".to_string(), IMAGE_USER.to_string()]);
            ("65532".to_string(), "65532".to_string())
        } else {
            // Otherwise the containers run as the caller, who owns them.
            (euid.to_string(), gid_of("/proc/self").to_string())
        };
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        run(&bin("registry").display().to_string(), &refs, &[], Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("[{test}] registry init: {e}"));
        Secrets { dir, uid, gid }
    }

    fn token(&self, name: &str) -> String {
        let p = self.dir.join("tokens").join(format!("{name}.token"));
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).trim().to_string()
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uid_of(path: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.uid()).unwrap_or(u32::MAX)
}

fn gid_of(path: &str) -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.gid()).unwrap_or(u32::MAX)
}

/// The registry as the tests read it: HTTPS on its published loopback port,
/// trusting the stack's own CA, with the observer token (read everything).
#[derive(Clone)]
struct RegistryReader {
    runtime: Arc<tokio::runtime::Runtime>,
    client: reqwest::Client,
    base: String,
    token: String,
}

impl RegistryReader {
    fn new(port: u16, secrets: &Secrets) -> RegistryReader {
        let ca = std::fs::read(secrets.dir.join("ca.pem")).expect("ca.pem");
        let ca = reqwest::Certificate::from_pem(&ca).expect("ca.pem parses");
        let client = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(Duration::from_secs(2))
            .build()
            .expect("a TLS client");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the registry reads");
        RegistryReader {
            runtime: Arc::new(runtime),
            client,
            base: format!("https://127.0.0.1:{port}"),
            token: secrets.token("observer"),
        }
    }

    /// The body of a GET, or `None` unless it answers 200.
    fn get(&self, path: &str) -> Option<String> {
        let req = self.client.get(format!("{}{path}", self.base)).bearer_auth(&self.token);
        self.runtime.block_on(async {
            let resp = req.send().await.ok()?;
            if resp.status() != reqwest::StatusCode::OK {
                return None;
            }
            resp.text().await.ok()
        })
    }
}

/// One `stats` or `summary` record of the client.
#[derive(Debug, Clone, Default)]
struct Counts {
    sent: u64,
    ok: u64,
    failed: u64,
    served: BTreeMap<String, u64>,
    errors: String,
}

impl Counts {
    fn parse(line: &str) -> Option<Counts> {
        let mut words = line.split_whitespace();
        if !matches!(words.next(), Some("stats") | Some("summary")) {
            return None;
        }
        let mut c = Counts::default();
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "sent" => c.sent = v.parse().ok()?,
                "ok" => c.ok = v.parse().ok()?,
                "failed" => c.failed = v.parse().ok()?,
                "served" if v != "-" => {
                    for pair in v.split(',') {
                        let (name, n) = pair.split_once(':')?;
                        c.served.insert(name.to_string(), n.parse().ok()?);
                    }
                }
                "errors" => c.errors = v.to_string(),
                _ => {}
            }
        }
        Some(c)
    }

    fn served(&self, instance: &str) -> u64 {
        self.served.get(instance).copied().unwrap_or(0)
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &Counts) -> Counts {
        let mut served = BTreeMap::new();
        for (k, v) in &self.served {
            served.insert(k.clone(), v.saturating_sub(earlier.served(k)));
        }
        Counts {
            sent: self.sent.saturating_sub(earlier.sent),
            ok: self.ok.saturating_sub(earlier.ok),
            failed: self.failed.saturating_sub(earlier.failed),
            served,
            errors: self.errors.clone(),
        }
    }
}

/// A line of the client's output and when the test read it.
#[derive(Clone)]
struct Line {
    at: Instant,
    text: String,
}

/// A compose project; torn down on drop.
struct Stack {
    test: String,
    project: String,
    compose: Vec<String>,
    envs: Vec<(&'static str, String)>,
    registry: RegistryReader,
    // Dropped after the project is down (fields drop in order, after `Drop::drop`).
    _secrets: Secrets,
    client_logs: Option<Child>,
    lines: Arc<Mutex<Vec<Line>>>,
    started: Instant,
}

impl Stack {
    /// Starts the demo and waits until the registry shows the three replicas healthy and
    /// the client has been answered by each.
    fn up(test: &str, compose: Vec<String>) -> Stack {
        // Docker publishes the port, and a container restart must find the
        // same one: it is chosen here (see `trellis_tests::ports`).
        let registry_port = foreign_binary_addr().expect("a loopback port").port();
        let secrets = Secrets::generate(test);
        let mut stack = Stack {
            test: test.to_string(),
            project: format!("trt{}{}", std::process::id(), test.replace('_', "")),
            compose,
            envs: vec![
                ("TRELLIS_TAG", "test".to_string()),
                ("TRELLIS_REGISTRY_PORT", registry_port.to_string()),
                ("TRELLIS_CLIENT_RATE", RATE.to_string()),
                ("TRELLIS_SECRETS", secrets.dir.display().to_string()),
                ("TRELLIS_UID", secrets.uid.clone()),
                ("TRELLIS_GID", secrets.gid.clone()),
            ],
            registry: RegistryReader::new(registry_port, &secrets),
            _secrets: secrets,
            client_logs: None,
            lines: Arc::new(Mutex::new(Vec::new())),
            started: Instant::now(),
        };
        stack.compose_ok(&["up", "-d"], Duration::from_secs(180));
        stack.wait_healthy(&["app1", "app2", "app3"], Duration::from_secs(90));
        let ready = stack.started.elapsed();
        stack.follow_client();
        for app in ["app1", "app2", "app3"] {
            stack.wait_seen(app, 0, Duration::from_secs(30));
        }
        println!(
            "[{test}] stack {} up: 3 replicas healthy after {:.1}s, client answered by all after {:.1}s",
            stack.project,
            ready.as_secs_f64(),
            stack.started.elapsed().as_secs_f64()
        );
        stack
    }

    fn compose_args<'a>(&'a self, args: &[&'a str]) -> (String, Vec<String>) {
        let file = root().join("docker-compose.yml").display().to_string();
        let mut all: Vec<String> = self.compose[1..].to_vec();
        all.extend(["-p".to_string(), self.project.clone(), "-f".to_string(), file]);
        all.extend(args.iter().map(|s| s.to_string()));
        (self.compose[0].clone(), all)
    }

    fn compose(&self, args: &[&str], limit: Duration) -> Result<String, String> {
        let (prog, all) = self.compose_args(args);
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        run(&prog, &refs, &self.envs, limit)
    }

    fn compose_ok(&self, args: &[&str], limit: Duration) -> String {
        self.compose(args, limit).unwrap_or_else(|e| panic!("[{}] {e}", self.test))
    }

    /// The container id of a service (found with `ps -q`, never by name).
    fn container(&self, service: &str) -> String {
        let id = self.compose_ok(&["ps", "-q", service], Duration::from_secs(60)).trim().to_string();
        assert!(!id.is_empty(), "[{}] no container for {service}", self.test);
        id
    }

    fn docker(&self, args: &[&str]) -> String {
        run("docker", args, &[], Duration::from_secs(120)).unwrap_or_else(|e| panic!("[{}] {e}", self.test))
    }

    /// Healthy instance ids of the demo service, or `None` when the registry does not answer.
    fn healthy(&self) -> Option<Vec<String>> {
        healthy_ids(&self.registry)
    }

    /// Polls the registry until `pred` holds of the healthy ids; returns how long it took.
    fn wait_registry(&self, what: &str, limit: Duration, pred: impl Fn(&[String]) -> bool) -> Duration {
        let start = Instant::now();
        let mut last = None;
        loop {
            let ids = self.healthy();
            if let Some(ids) = &ids {
                if pred(ids) {
                    return start.elapsed();
                }
            }
            last = ids.or(last);
            if start.elapsed() > limit {
                panic!(
                    "[{}] timed out after {limit:?} waiting for {what}; registry last showed {last:?}",
                    self.test
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_healthy(&self, apps: &[&str], limit: Duration) -> Duration {
        self.wait_registry(&format!("{apps:?} healthy"), limit, |ids| {
            apps.iter().all(|a| ids.iter().any(|i| i == a))
        })
    }

    /// Streams the client's stdout (`docker logs -f`) into `lines`.
    fn follow_client(&mut self) {
        let id = self.container("client");
        let mut child = Command::new("docker")
            .args(["logs", "-f", &id])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("[{}] docker logs: {e}", self.test));
        let stdout = child.stdout.take();
        let lines = self.lines.clone();
        std::thread::spawn(move || {
            let Some(stdout) = stdout else { return };
            for line in BufReader::new(stdout).lines() {
                let Ok(text) = line else { break };
                if let Ok(mut l) = lines.lock() {
                    l.push(Line { at: Instant::now(), text });
                }
            }
        });
        self.client_logs = Some(child);
    }

    fn lines(&self) -> Vec<Line> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for a client line matching `pred`, among those read after `after` lines.
    fn wait_line(&self, what: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> Line {
        let start = Instant::now();
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| pred(&l.text)) {
                return l;
            }
            if start.elapsed() > limit {
                let tail: Vec<String> = self.lines().iter().rev().take(5).map(|l| l.text.clone()).collect();
                panic!(
                    "[{}] timed out after {limit:?} waiting for the client to print {what}; last: {tail:?}",
                    self.test
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the client reports `instance` answering at or after `since_ms` (Unix ms);
    /// returns when it did (Unix ms).
    fn wait_seen(&self, instance: &str, since_ms: u128, limit: Duration) -> u128 {
        let prefix = format!("seen instance={instance} ");
        let line = self.wait_line(&format!("{instance} answering"), limit, |t| {
            t.starts_with(&prefix) && seen_at(t).is_some_and(|at| at >= since_ms)
        });
        seen_at(&line.text).unwrap_or(0)
    }

    /// The client's latest cumulative counts.
    fn counts(&self) -> Counts {
        self.lines().iter().rev().find_map(|l| Counts::parse(&l.text)).unwrap_or_default()
    }

    /// Waits until the client has completed `n` more requests than `base`.
    fn wait_traffic(&self, base: &Counts, n: u64) -> Counts {
        let limit = Duration::from_secs(n / u64::from(RATE) * 4 + 30);
        let line = self.wait_line(&format!("{n} more requests"), limit, |t| {
            Counts::parse(t).is_some_and(|c| c.sent >= base.sent + n)
        });
        Counts::parse(&line.text).unwrap_or_default()
    }

    /// Stops the client (SIGTERM: it finishes its in-flight requests and prints its summary)
    /// and returns the summary.
    fn stop_client(&self) -> Counts {
        let id = self.container("client");
        self.docker(&["stop", "-t", "20", &id]);
        let line = self.wait_line("its summary", Duration::from_secs(30), |t| t.starts_with("summary "));
        println!("[{}] client: {}", self.test, line.text);
        Counts::parse(&line.text).unwrap_or_default()
    }

    /// When the client's cumulative count for `instance` last grew (per-second resolution):
    /// a rough view of when traffic moved off it.
    fn last_served_line(&self, instance: &str) -> Option<Instant> {
        let lines = self.lines();
        let mut last_change = None;
        let mut prev = 0;
        for l in &lines {
            if let Some(c) = Counts::parse(&l.text) {
                if c.served(instance) != prev {
                    prev = c.served(instance);
                    last_change = Some(l.at);
                }
            }
        }
        last_change
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = self.compose(&["logs", "--no-color", "--tail=25"], Duration::from_secs(60)) {
                eprintln!("----- [{}] compose logs (tail) -----\n{logs}", self.test);
            }
        }
        if let Some(mut c) = self.client_logs.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Err(e) = self.compose(
            &["--profile", "scale", "--profile", "metrics", "down", "-v", "--remove-orphans", "-t", "3"],
            Duration::from_secs(180),
        ) {
            eprintln!("[{}] teardown failed: {e}", self.test);
        }
    }
}

/// Healthy (passing) instance ids of the demo service, or `None` when the registry does not answer.
fn healthy_ids(registry: &RegistryReader) -> Option<Vec<String>> {
    let body = registry.get(&format!("/v1/services/{SERVICE}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let mut ids: Vec<String> = v["instances"]
        .as_array()?
        .iter()
        .filter(|i| i["status"] == "passing")
        .filter_map(|i| i["id"].as_str().map(String::from))
        .collect();
    ids.sort();
    Some(ids)
}

fn seen_at(line: &str) -> Option<u128> {
    line.split_whitespace().find_map(|w| w.strip_prefix("at_ms=")).and_then(|v| v.parse().ok())
}

fn assert_no_failures(test: &str, window: &Counts) {
    assert_eq!(
        window.failed, 0,
        "[{test}] the client saw {} failed requests out of {} (errors: {})",
        window.failed, window.sent, window.errors
    );
    assert!(window.sent > 0, "[{test}] the client sent nothing");
}

/// Test 1: All three replicas serve a share of the traffic.
#[test]
fn compose_spread() {
    let test = "compose_spread";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    stack.wait_traffic(&base, 20 * u64::from(RATE) / 4);
    let window = stack.stop_client().since(&base);
    println!("[{test}] window: sent={} failed={} served={:?}", window.sent, window.failed, window.served);
    assert_no_failures(test, &window);
    for app in ["app1", "app2", "app3"] {
        let share = window.served(app) as f64 / window.ok as f64;
        println!("[{test}] {app} served {:.0}%", share * 100.0);
        assert!(share >= 0.15, "[{test}] {app} served only {:.1}% of {}", share * 100.0, window.ok);
    }
}

/// Test 2: `docker kill` one replica: zero failed requests; it leaves discovery within its TTL.
#[test]
fn compose_kill_replica() {
    let test = "compose_kill_replica";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    let app2 = stack.container("app2");
    let killed = Instant::now();
    stack.docker(&["kill", &app2]);
    let gone =
        stack.wait_registry("app2 to leave discovery", TTL * 4, |ids| !ids.iter().any(|i| i == "app2"));
    let after = stack.counts();
    stack.wait_traffic(&after, 3 * u64::from(RATE));
    let last_app2 = stack.last_served_line("app2");
    let total = stack.stop_client();
    let window = total.since(&base);
    println!(
        "[{test}] app2 left discovery {:.2}s after the kill (TTL {TTL:?}); client: sent={} failed={} after the kill; \
         the client last reported a new answer from app2 {:?} after the kill (1s resolution)",
        gone.as_secs_f64(),
        window.sent,
        window.failed,
        last_app2.map(|t| t.saturating_duration_since(killed))
    );
    assert_no_failures(test, &window);
    // Generous: TTL plus a heartbeat interval plus scheduling slack on a loaded machine.
    assert!(gone <= TTL + HEARTBEAT + Duration::from_secs(4), "[{test}] app2 stayed in discovery {gone:?}");
    let after_window = total.since(&after);
    assert_eq!(after_window.served("app2"), 0, "[{test}] a dead replica answered");
}

/// Test 3: `docker pause` one replica: its sidecar's timed-out checks hide it; traffic moves off
/// it with zero failures (per-try timeouts and retries); unpause brings it back.
#[test]
fn compose_pause_replica() {
    let test = "compose_pause_replica";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    let app2 = stack.container("app2");
    stack.docker(&["pause", &app2]);
    let hidden = stack
        .wait_registry("app2 to be hidden", Duration::from_secs(30), |ids| !ids.iter().any(|i| i == "app2"));
    // Traffic has moved off once the client completes a second of requests with none from app2.
    let mark = stack.counts();
    let moved = stack.wait_traffic(&mark, u64::from(RATE));
    let unpaused_ms = unix_ms();
    stack.docker(&["unpause", &app2]);
    let back = stack
        .wait_registry("app2 to come back", Duration::from_secs(30), |ids| ids.iter().any(|i| i == "app2"));
    let seen_ms = stack.wait_seen("app2", unpaused_ms, Duration::from_secs(30));
    let window = stack.stop_client().since(&base);
    println!(
        "[{test}] app2 hidden {:.2}s after the pause; healthy again {:.2}s after unpause, serving {}ms after; \
         client sent={} failed={}",
        hidden.as_secs_f64(),
        back.as_secs_f64(),
        seen_ms.saturating_sub(unpaused_ms),
        window.sent,
        window.failed
    );
    assert_no_failures(test, &window);
    // Check interval 1s, timeout 500ms, 2 failures to flip, then a heartbeat and the watch:
    // about 3.5s; allow several times that.
    assert!(hidden <= Duration::from_secs(15), "[{test}] a frozen replica stayed visible {hidden:?}");
    assert_eq!(moved.since(&mark).served("app2"), 0, "[{test}] a paused replica answered");
}

/// Test 4: A partition: one replica disconnected from the network the client uses. Zero failed
/// requests; it returns when reconnected.
#[test]
fn compose_partition_replica() {
    let test = "compose_partition_replica";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    let app2 = stack.container("app2");
    let client = stack.container("client");
    let nets = stack.docker(&[
        "inspect",
        "-f",
        "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
        &client,
    ]);
    let network = nets.split_whitespace().next().unwrap_or_default().to_string();
    assert!(!network.is_empty(), "[{test}] the client has no network");
    stack.docker(&["network", "disconnect", &network, &app2]);
    let gone =
        stack.wait_registry("app2 to leave discovery", TTL * 4, |ids| !ids.iter().any(|i| i == "app2"));
    let mark = stack.counts();
    let cut_off = stack.wait_traffic(&mark, u64::from(RATE));
    let reconnected_ms = unix_ms();
    stack.docker(&["network", "connect", &network, &app2]);
    let back = stack
        .wait_registry("app2 to come back", Duration::from_secs(30), |ids| ids.iter().any(|i| i == "app2"));
    let seen_ms = stack.wait_seen("app2", reconnected_ms, Duration::from_secs(30));
    let window = stack.stop_client().since(&base);
    println!(
        "[{test}] app2 left discovery {:.2}s after the disconnect; back {:.2}s after reconnecting, serving {}ms \
         after; client sent={} failed={}",
        gone.as_secs_f64(),
        back.as_secs_f64(),
        seen_ms.saturating_sub(reconnected_ms),
        window.sent,
        window.failed
    );
    assert_no_failures(test, &window);
    assert_eq!(cut_off.since(&mark).served("app2"), 0, "[{test}] a cut-off replica answered");
}

/// Test 5: Stop the registry: traffic continues with zero failures; start it: every replica is
/// registered again within one heartbeat plus TTL.
#[test]
fn compose_registry_restart() {
    let test = "compose_registry_restart";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    let registry = stack.container("registry");
    stack.docker(&["stop", "-t", "5", &registry]);
    // Longer than a TTL without the registry: sidecars must keep their last known endpoints.
    let mark = stack.counts();
    let during = stack.wait_traffic(&mark, (TTL.as_secs() + 2) * u64::from(RATE));
    stack.docker(&["start", &registry]);
    let answering = stack.wait_registry("the registry to answer", Duration::from_secs(60), |_| true);
    let all_back = stack.wait_registry("every replica to re-register", TTL * 4, |ids| ids.len() == 3);
    let mark2 = stack.counts();
    stack.wait_traffic(&mark2, u64::from(RATE));
    let window = stack.stop_client().since(&base);
    let during = during.since(&mark);
    println!(
        "[{test}] without a registry: sent={} failed={} served={:?}; restarted registry answered after {:.2}s, \
         all 3 replicas back {:.2}s later; whole run sent={} failed={}",
        during.sent,
        during.failed,
        during.served,
        answering.as_secs_f64(),
        all_back.as_secs_f64(),
        window.sent,
        window.failed
    );
    assert_no_failures(test, &window);
    for app in ["app1", "app2", "app3"] {
        assert!(during.served(app) > 0, "[{test}] {app} got no traffic while the registry was down");
    }
    assert!(
        all_back <= HEARTBEAT + TTL + Duration::from_secs(4),
        "[{test}] replicas took {all_back:?} to re-register"
    );
}

/// Test 6: Rolling restart of the three replicas, one at a time, in deploy order: stop the
/// sidecar (it deregisters and drains), restart the app (the namespace owner), start the
/// sidecar, wait until the client is served by the replica again. Zero failed requests.
#[test]
fn compose_rolling_restart() {
    let test = "compose_rolling_restart";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    for n in 1..=3 {
        let (app, sidecar) = (format!("app{n}"), format!("sidecar{n}"));
        let (app_id, sidecar_id) = (stack.container(&app), stack.container(&sidecar));
        let step = Instant::now();
        stack.docker(&["stop", "-t", "15", &sidecar_id]);
        let drained = step.elapsed();
        stack.docker(&["restart", "-t", "5", &app_id]);
        let restarted_ms = unix_ms();
        stack.docker(&["start", &sidecar_id]);
        stack.wait_healthy(&["app1", "app2", "app3"], Duration::from_secs(60));
        let seen_ms = stack.wait_seen(&app, restarted_ms, Duration::from_secs(30));
        println!(
            "[{test}] {app}: sidecar drained and stopped in {:.2}s; serving again {:.2}s after the step began \
             ({}ms after the app restarted)",
            drained.as_secs_f64(),
            step.elapsed().as_secs_f64(),
            seen_ms.saturating_sub(restarted_ms)
        );
    }
    let window = stack.stop_client().since(&base);
    println!("[{test}] client during the rolling restart: sent={} failed={}", window.sent, window.failed);
    assert_no_failures(test, &window);
}

/// Test 7: Start the fourth pair while traffic runs: it is served within a second of turning
/// healthy in the registry.
#[test]
fn compose_scale_up() {
    let test = "compose_scale_up";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let base = stack.counts();
    // `up` may return after the new sidecar registered: watch the registry meanwhile.
    let registry = stack.registry.clone();
    let watcher = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if healthy_ids(&registry).is_some_and(|ids| ids.iter().any(|i| i == "app4")) {
                return Some(unix_ms());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    });
    stack.compose_ok(
        &["--profile", "scale", "up", "-d", "--no-deps", "app4", "sidecar4"],
        Duration::from_secs(120),
    );
    let healthy_ms = watcher.join().ok().flatten();
    let healthy_ms = healthy_ms.unwrap_or_else(|| panic!("[{test}] app4 never turned healthy"));
    let seen_ms = stack.wait_seen("app4", 0, Duration::from_secs(30));
    let mark = stack.counts();
    stack.wait_traffic(&mark, 2 * u64::from(RATE));
    let window = stack.stop_client().since(&base);
    let delay = seen_ms.saturating_sub(healthy_ms);
    println!(
        "[{test}] app4 first served {}ms after the registry showed it healthy (polled every 10ms); \
         client sent={} failed={} served={:?}",
        seen_ms as i128 - healthy_ms as i128,
        window.sent,
        window.failed,
        window.served
    );
    assert_no_failures(test, &window);
    assert!(window.served("app4") > 0, "[{test}] app4 got no traffic");
    // The client sidecar's slow start (10 s by default) hands a new instance
    // about a tenth of its share at first: at this rate that is a request
    // every half second or so, so the first one comes within a few seconds,
    // not at once. Propagation itself is timed by the registry and e2e tests.
    assert!(delay <= 5000, "[{test}] app4 was first served {delay}ms after turning healthy");
}

/// The user a container's processes run as, from `docker top` (the host's ps):
/// every process's uid.
fn process_uids(stack: &Stack, id: &str) -> Vec<u32> {
    let top = stack.docker(&["top", id, "-eo", "uid,pid,args"]);
    top.lines().skip(1).filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect()
}

/// A `Name:` line of /proc/PID/status, when the engine runs on this host.
fn proc_status(pid: &str, name: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string())
}

/// Test 8: Every image runs as a non-root user by itself, and in the running
/// demo every container's processes run as a non-zero uid, on a read-only root
/// filesystem, with every capability dropped and no privilege gain; the zones
/// override keeps all of it.
#[test]
fn compose_hardened() {
    let test = "compose_hardened";
    let Some((_serial, compose)) = setup(test) else { return };
    for image in ["registry", "sidecar", "demo-app", "demo-client", "mesh-intruder"] {
        let image = format!("trellis/{image}:test");
        let user = run(
            "docker",
            &["image", "inspect", "-f", "{{.Config.User}}", &image],
            &[],
            Duration::from_secs(60),
        )
        .unwrap_or_else(|e| panic!("[{test}] {e}"));
        let user = user.trim();
        println!("[{test}] {image}: Config.User={user:?}");
        let uid = user.split(':').next().unwrap_or("");
        assert!(!uid.is_empty() && uid != "0" && uid != "root", "[{test}] {image} runs as root ({user:?})");
    }

    let stack = Stack::up(test, compose);
    // The zones override adds only environment: the merged file keeps every service hardened.
    let zones = root().join("docker-compose.zones.yml").display().to_string();
    let merged = stack.compose_ok(&["-f", &zones, "--profile", "scale", "config"], Duration::from_secs(60));
    let services =
        merged.lines().filter(|l| l.starts_with("  ") && !l.starts_with("   ") && l.ends_with(':')).count();
    for key in ["read_only: true", "- no-new-privileges:true"] {
        let n = merged.lines().filter(|l| l.trim() == key).count();
        assert!(
            n >= services && services >= 11,
            "[{test}] the zones config has {key:?} {n} times for {services} services"
        );
    }

    let ids: Vec<String> = stack
        .compose_ok(&["ps", "-q"], Duration::from_secs(60))
        .lines()
        .map(|l| l.trim().to_string())
        .collect();
    assert_eq!(ids.len(), 9, "[{test}] registry, 3 apps, 3 sidecars, client and its sidecar: {ids:?}");
    for id in &ids {
        let info = stack.docker(&[
            "inspect",
            "-f",
            "{{.Name}} {{.State.Pid}} {{.HostConfig.ReadonlyRootfs}} {{json .HostConfig.CapDrop}} {{json .HostConfig.SecurityOpt}}",
            id,
        ]);
        let f: Vec<&str> = info.split_whitespace().collect();
        let (name, pid, read_only, cap_drop, security) =
            (f[0], f[1], f[2], f[3], f.get(4).copied().unwrap_or(""));
        let uids = process_uids(&stack, id);
        let (caps, nnp) = (proc_status(pid, "CapEff:"), proc_status(pid, "NoNewPrivs:"));
        println!(
            "[{test}] {name}: uids {uids:?}, read-only rootfs {read_only}, CapDrop {cap_drop}, SecurityOpt {security}, \
             /proc CapEff {caps:?} NoNewPrivs {nnp:?}"
        );
        assert!(
            !uids.is_empty() && uids.iter().all(|u| *u != 0),
            "[{test}] {name} runs a process as root: {uids:?}"
        );
        assert_eq!(read_only, "true", "[{test}] {name}: the root filesystem is writable");
        assert_eq!(cap_drop, r#"["ALL"]"#, "[{test}] {name}");
        assert!(security.contains("no-new-privileges:true"), "[{test}] {name}: {security}");
        // Where the engine runs on this host, the kernel's view agrees.
        if let Some(caps) = caps {
            assert_eq!(caps, "0000000000000000", "[{test}] {name} holds capabilities");
        }
        if let Some(nnp) = nnp {
            assert_eq!(nnp, "1", "[{test}] {name} may gain privileges");
        }
    }

    // Nothing can be written into the image, not even by the registry binary itself.
    let registry = stack.container("registry");
    let write = run(
        "docker",
        &["exec", &registry, "/usr/local/bin/registry", "init", "/usr/local/bin/creds"],
        &[],
        Duration::from_secs(60),
    );
    println!("[{test}] writing inside the registry container: {write:?}");
    let err = write.expect_err("the registry container's root filesystem took a write");
    assert!(err.contains("Read-only file system"), "[{test}] {err}");
}

static PROMETHEUS_IMAGE: OnceLock<Result<(), String>> = OnceLock::new();

/// Test: the `metrics` profile's Prometheus finds every replica's sidecar
/// through the registry's Consul-compatible API (over TLS, with the observer
/// token) and scrapes its admin `/metrics`: three sidecar targets up, plus the
/// client's sidecar, named statically because it registers nothing.
#[test]
fn compose_metrics_profile() {
    let test = "compose_metrics_profile";
    let Some((_serial, compose)) = setup(test) else { return };
    // The image carries bullseye's Prometheus 2.24 (the last Debian build with
    // Consul service discovery), which the image script installs when missing.
    let built = PROMETHEUS_IMAGE.get_or_init(|| {
        let script = root().join("scripts/prometheus-image.sh");
        let out = run(
            &script.display().to_string(),
            &[],
            &[("TRELLIS_TAG", "test".to_string())],
            Duration::from_secs(600),
        )?;
        print!("{out}");
        Ok(())
    });
    if let Err(e) = built {
        panic!("[{test}] building trellis/prometheus:test failed: {e}");
    }
    let mut stack = Stack::up(test, compose);
    // As scripts/demo.sh does: Prometheus's configuration with this run's observer token.
    let script = root().join("scripts/prometheus-config.sh");
    let dir = stack._secrets.dir.display().to_string();
    if let Err(e) = run(&script.display().to_string(), &[&dir], &[], Duration::from_secs(30)) {
        panic!("[{test}] prometheus-config.sh failed: {e}");
    }
    let port = foreign_binary_addr().expect("a loopback port").port();
    stack.envs.push(("TRELLIS_PROMETHEUS_PORT", port.to_string()));
    let started = Instant::now();
    stack.compose_ok(
        &["--profile", "metrics", "up", "-d", "--no-deps", "prometheus"],
        Duration::from_secs(120),
    );
    let url = format!("http://127.0.0.1:{port}/api/v1/targets?state=active");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("a client");
    let mut last = String::new();
    let up = loop {
        let body = stack
            .registry
            .runtime
            .block_on(async { client.get(&url).send().await.ok()?.json::<serde_json::Value>().await.ok() });
        if let Some(body) = body {
            let targets = body["data"]["activeTargets"].as_array().cloned().unwrap_or_default();
            let up: Vec<String> = targets
                .iter()
                .filter(|t| t["health"] == "up")
                .map(|t| t["labels"]["instance_id"].as_str().unwrap_or("").to_string())
                .collect();
            last = targets
                .iter()
                .map(|t| format!("{}={} {}", t["labels"]["instance_id"], t["health"], t["lastError"]))
                .collect::<Vec<_>>()
                .join(", ");
            let mut sorted = up.clone();
            sorted.sort();
            if sorted == ["app1", "app2", "app3", "client"] {
                break started.elapsed();
            }
        }
        assert!(started.elapsed() < Duration::from_secs(120), "[{test}] targets never all up: {last}");
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("[{test}] prometheus had the 3 sidecars (found through the Consul API) and the client up after {up:?}: {last}");
}

/// One line of `mesh-intruder`'s output: a try and what it got.
#[derive(Debug)]
struct IntruderTry {
    target: String,
    name: String,
    connected: bool,
    handshake: String,
    answered: bool,
    detail: String,
}

impl IntruderTry {
    fn parse(line: &str) -> Option<IntruderTry> {
        let rest = line.strip_prefix("attempt ")?;
        // `detail` is last and may hold spaces.
        let (fields, detail) = rest.split_once(" detail=")?;
        let field = |k: &str| {
            fields.split_whitespace().find_map(|w| w.strip_prefix(k)?.strip_prefix('=')).map(String::from)
        };
        Some(IntruderTry {
            target: field("target")?,
            name: field("try")?,
            connected: field("connected")? == "true",
            handshake: field("handshake")?,
            answered: field("answered")? == "true",
            detail: detail.to_string(),
        })
    }
}

/// Test 9: mutual TLS in the running demo. The replicas are registered with
/// their sidecars' inbound port and the mesh TLS mark. An intruder container
/// on the mesh network (`mesh-intruder`, the compose profile `intruder`)
/// reaches every replica's inbound port over TCP (the network lets it
/// through), but gets no answer from any app: the app's own port refuses it
/// (the app listens on its namespace's loopback), and the inbound port gives
/// it nothing in plain text, nothing over TLS without a certificate, and
/// nothing with a certificate for the client's identity from a CA of its own.
/// The demo client, meanwhile, loses no request.
#[test]
fn compose_intruder() {
    let test = "compose_intruder";
    let Some((_serial, compose)) = setup(test) else { return };
    let stack = Stack::up(test, compose);
    let body = stack.registry.get(&format!("/v1/services/{SERVICE}")).expect("the registry answers");
    let view: serde_json::Value = serde_json::from_str(&body).expect("a JSON service view");
    let instances = view["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 3, "[{test}] {body}");
    for i in instances {
        println!(
            "[{test}] registered: {} at {}:{} mesh_tls={}",
            i["id"], i["address"], i["port"], i["mesh_tls"]
        );
        assert_eq!(
            i["port"], 15006,
            "[{test}] a replica is advertised on another port than its inbound: {i}"
        );
        assert_eq!(i["mesh_tls"], true, "[{test}] a replica is not marked mesh TLS: {i}");
    }
    let base = stack.counts();
    let started = Instant::now();
    let out = stack.compose_ok(
        &["--profile", "intruder", "run", "--rm", "--no-deps", "-T", "intruder"],
        Duration::from_secs(120),
    );
    println!("[{test}] the intruder ran for {:.1}s:\n{out}", started.elapsed().as_secs_f64());
    let tries: Vec<IntruderTry> = out.lines().filter_map(IntruderTry::parse).collect();
    assert_eq!(tries.len(), 15, "[{test}] five tries for each of three replicas:\n{out}");
    for t in &tries {
        let what = format!("[{test}] {} {}: {t:?}", t.target, t.name);
        assert!(!t.answered, "{what}: an app answered an intruder");
        match t.name.as_str() {
            // Nothing listens on the app port outside the namespace's loopback.
            "app" => assert!(!t.connected && t.detail.contains("refused"), "{what}"),
            // The control: the network itself lets the intruder reach the inbound port.
            "inbound-tcp" => assert!(t.connected, "{what}"),
            // Plain text at a TLS port: the sidecar closes it without an HTTP answer.
            "inbound-plain" => assert!(t.connected, "{what}"),
            // The sidecar's refusal, not a timeout: its alert or a reset ends the try.
            "inbound-no-cert" | "inbound-forged" => {
                assert!(t.connected, "{what}");
                assert!(!t.detail.starts_with("no outcome within"), "{what}: neither refused nor answered");
                assert!(
                    t.handshake == "failed" || t.detail.contains("alert") || t.detail.contains("reset"),
                    "{what}: the sidecar did not refuse the handshake"
                );
            }
            other => panic!("[{test}] unknown try {other}"),
        }
    }
    assert!(out.lines().any(|l| l == "summary attempts=15 answered=0"), "[{test}] {out}");
    // The client's own calls go on through the same inbound ports meanwhile.
    let mark = stack.counts();
    let after = stack.wait_traffic(&mark, 2 * u64::from(RATE));
    let window = stack.stop_client().since(&base);
    println!("[{test}] client: sent={} failed={} served={:?}", window.sent, window.failed, window.served);
    assert_no_failures(test, &window);
    for app in ["app1", "app2", "app3"] {
        assert!(
            after.since(&mark).served(app) > 0,
            "[{test}] {app} served the client nothing after the intrusion"
        );
    }
}
