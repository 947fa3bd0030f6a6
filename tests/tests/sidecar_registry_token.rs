//! The sidecar's registry token: rotated through its `--token-file` with zero
//! failed requests and the instance kept registered, and a refused token at
//! registration keeps `/ready` at 503 with an error naming the service (and
//! the registry's message) but never the secret.
//!
//! Real binaries: a registry with `--acl-file` (secrets generated at run
//! time), a backend `demo-app` with its sidecar, and a client sidecar the load
//! goes through.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use trellis_tests::instance::AppInstance;
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{registering_args, strings, wait_for, AppProc, RegistryProc, SidecarProc};

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SERVICE: &str = "users";
const WITHIN: Duration = Duration::from_secs(30);

fn secret() -> String {
    let bytes: [u8; 24] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `text` to `path` in one step (a rename), as an operator's tooling should.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn new_file(name: &str, ext: &str, text: &str) -> PathBuf {
    let path = unique_path(&log_dir(), name, ext);
    replace(&path, text);
    path
}

struct Secrets {
    old: String,
    new: String,
    reader: String,
    ops: String,
}

/// The ACL with the service's write tokens `writers` (name, secret).
fn acl(s: &Secrets, writers: &[(&str, &str)]) -> String {
    let mut out = String::from("default = \"deny\"\n");
    for (name, secret) in writers {
        out += &format!("[[tokens]]\nname = \"{name}\"\nsecret = \"{secret}\"\nwrite = [\"{SERVICE}\"]\n");
    }
    out += &format!("[[tokens]]\nname = \"reader\"\nsecret = \"{}\"\nread = [\"*\"]\n", s.reader);
    out += &format!("[[tokens]]\nname = \"ops\"\nsecret = \"{}\"\nadmin = true\n", s.ops);
    out
}

/// `GET path` on the registry with `token`; the status.
async fn registry_status(registry: &RegistryProc, path: &str, token: &str) -> u16 {
    let resp =
        reqwest::Client::new().get(format!("{}{path}", registry.url())).bearer_auth(token).send().await;
    resp.map_or(0, |r| r.status().as_u16())
}

/// The registry's view of the service (all instances), read with `token`.
async fn instances(registry: &RegistryProc, token: &str) -> Vec<serde_json::Value> {
    let url = format!("{}/v1/services/{SERVICE}?all=true", registry.url());
    let resp = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap();
    let v: serde_json::Value = resp.json().await.unwrap_or_default();
    v["instances"].as_array().cloned().unwrap_or_default()
}

async fn registry_metric(registry: &RegistryProc, name: &str, token: &str) -> f64 {
    let url = format!("{}/metrics", registry.url());
    let text = reqwest::Client::new().get(url).bearer_auth(token).send().await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn sidecar_metric(admin: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.unwrap().text().await.unwrap();
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Waits until `n` more heartbeats than now were accepted by the registry.
async fn heartbeats_pass(registry: &RegistryProc, ops: &str, n: f64) {
    let start = registry_metric(registry, "trellis_registry_heartbeats_total", ops).await;
    wait_for("heartbeats to be accepted", WITHIN, || async {
        (registry_metric(registry, "trellis_registry_heartbeats_total", ops).await >= start + n).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_rotated_through_the_file_costs_no_request() {
    let _serial = SERIAL.lock().await;
    let s = Secrets { old: secret(), new: secret(), reader: secret(), ops: secret() };
    let acl_file = new_file("acl", "toml", &acl(&s, &[("users-old", &s.old)]));
    let registry =
        RegistryProc::start("registry", &strings(&["--acl-file", &acl_file.display().to_string()])).await;
    let token_file = new_file("users-token", "txt", &format!("{}\n", s.old));
    let reader_file = new_file("reader-token", "txt", &s.reader);
    let backend = AppInstance::start(
        &registry.url(),
        SERVICE,
        "users-1",
        &[],
        &["--token-file", &token_file.display().to_string()],
        WITHIN,
    )
    .await;
    let client = SidecarProc::start(
        "client-sidecar",
        &registry.url(),
        &strings(&["--upstream-service", SERVICE, "--token-file", &reader_file.display().to_string()]),
        WITHIN,
    )
    .await;

    // Load through the client sidecar for the whole rotation.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        let http = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}", client.outbound)).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match http.get(format!("http://{SERVICE}/")).send().await {
                    Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    wait_for("load to flow", WITHIN, || async { (ok.load(Ordering::Relaxed) >= 20).then_some(()) }).await;

    // 1. The registry learns the new secret beside the old one.
    replace(&acl_file, &acl(&s, &[("users-old", &s.old), ("users-new", &s.new)]));
    wait_for("the registry to accept the new secret", WITHIN, || async {
        (registry_status(&registry, &format!("/v1/services/{SERVICE}"), &s.new).await == 200).then_some(())
    })
    .await;
    // 2. The sidecar's file gets the new secret; it is picked up without a restart.
    replace(&token_file, &format!("  {}\n", s.new));
    wait_for("the sidecar to reload its token", WITHIN, || async {
        backend.sidecar.proc.log_text().contains("registry token reloaded").then_some(())
    })
    .await;
    heartbeats_pass(&registry, &s.ops, 2.0).await;
    // 3. The old secret is revoked.
    replace(&acl_file, &acl(&s, &[("users-new", &s.new)]));
    wait_for("the registry to refuse the old secret", WITHIN, || async {
        (registry_status(&registry, &format!("/v1/services/{SERVICE}"), &s.old).await == 401).then_some(())
    })
    .await;
    // Heartbeats keep being accepted with the new secret (TTL 3s, heartbeat every 500ms).
    heartbeats_pass(&registry, &s.ops, 8.0).await;

    stop.store(true, Ordering::Relaxed);
    load.await.unwrap();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let auth_failures =
        sidecar_metric(backend.sidecar.admin, "trellis_sidecar_registry_auth_failures_total").await;
    println!(
        "rotation: {ok} requests succeeded, {failed} failed; backend sidecar auth failures: {auth_failures}"
    );
    assert_eq!(failed, 0, "requests failed during the rotation");
    let listed = instances(&registry, &s.reader).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["status"], "passing", "{listed:?}");
    assert_eq!(auth_failures, 0.0, "a registry call was refused during the rotation");
    for proc in [&backend.sidecar.proc, &client.proc, &registry.proc] {
        let log = proc.log_text();
        for secret in [&s.old, &s.new, &s.reader, &s.ops] {
            assert!(!log.contains(secret.as_str()), "{} logged a secret", proc.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_token_keeps_the_sidecar_unready_and_says_why() {
    let _serial = SERIAL.lock().await;
    let s = Secrets { old: secret(), new: secret(), reader: secret(), ops: secret() };
    let mut rules = acl(&s, &[("users-writer", &s.old)]);
    let billing = secret();
    rules +=
        &format!("[[tokens]]\nname = \"billing-writer\"\nsecret = \"{billing}\"\nwrite = [\"billing\"]\n");
    let acl_file = new_file("acl", "toml", &rules);
    let registry =
        RegistryProc::start("registry", &strings(&["--acl-file", &acl_file.display().to_string()])).await;

    // An unknown token (401), then another service's token (403, whose name the registry gives).
    for (token, expect) in [(secret(), "not known"), (billing.clone(), "billing-writer")] {
        let app = AppProc::start("app", "users-1", &[]).await;
        let addr = app.addr.to_string();
        let token_file = new_file("token", "txt", &token);
        let mut args = registering_args(SERVICE, &addr, "users-1");
        args.extend(strings(&["--token-file", &token_file.display().to_string()]));
        let sidecar = SidecarProc::spawn("refused-sidecar", &registry.url(), &args).await;
        wait_for("two refused registrations", WITHIN, || async {
            (sidecar_metric(sidecar.admin, "trellis_sidecar_registry_auth_failures_total").await >= 2.0)
                .then_some(())
        })
        .await;
        let ready = reqwest::get(format!("http://{}/ready", sidecar.admin)).await.unwrap().status();
        assert_eq!(ready.as_u16(), 503);
        let log = sidecar.proc.log_text();
        let line = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains("refused by the registry"))
            .unwrap_or_else(|| panic!("no error line:\n{log}"));
        println!("{line}");
        assert!(line.contains(SERVICE) && line.contains(expect), "{line}");
        assert!(!log.contains(&token), "the sidecar logged its token");
        assert!(instances(&registry, &s.reader).await.is_empty());
    }
}
