//! Consul clients nobody here wrote, against a real registry with real
//! sidecars registering demo apps: Prometheus (Debian bullseye's, the last
//! Debian build with Consul SD) with `consul_sd_configs`, and py-consul (PyPI). `scripts/ci-deps.sh` installs
//! both; without them the tests print SKIPPED and pass, unless `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use trellis_tests::instance::AppInstance;
use trellis_tests::ports::{foreign_binary_addr, ATTEMPTS};
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::wait::wait_for;
use trellis_tests::{strings, Proc, RegistryProc};

const READY: Duration = Duration::from_secs(30);

/// Whether a test may run: prints SKIPPED and returns false when `missing`
/// names something absent, unless CI demands everything.
fn present(test: &str, missing: Option<String>) -> bool {
    match missing {
        None => true,
        Some(what) if std::env::var("CI").as_deref() != Ok("true") => {
            println!("SKIPPED: {test}: {what} (scripts/ci-deps.sh installs it)");
            false
        }
        Some(what) => panic!("{test}: {what}; CI must have it (scripts/ci-deps.sh)"),
    }
}

/// Where `scripts/install-consul-clients.sh` puts the Prometheus it tests with.
const INSTALLED_PROMETHEUS: &str = "/opt/trellis/prometheus/prometheus";

/// `TRELLIS_PROMETHEUS`, else the one the install script put in place.
fn prometheus_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRELLIS_PROMETHEUS") {
        return Some(PathBuf::from(p));
    }
    Some(PathBuf::from(INSTALLED_PROMETHEUS)).filter(|p| p.is_file())
}

/// Whether a Prometheus binary was built with Consul service discovery: Go
/// keeps the package path of every function it links. Debian dropped it after
/// 2.33 ("Disable Consul SD until its Debian package is back in shape"), so
/// bookworm's `/usr/bin/prometheus` refuses `consul_sd_configs`; the install
/// script fetches bullseye's 2.24.1, the last Debian build with it.
fn has_consul_sd(bin: &Path) -> bool {
    const PACKAGE: &[u8] = b"prometheus/discovery/consul";
    let bytes = std::fs::read(bin).unwrap_or_default();
    bytes.windows(PACKAGE.len()).any(|w| w == PACKAGE)
}

/// Prometheus scraping nothing but what Trellis's Consul API lists, on a
/// port it must be given (it cannot report one it chose).
struct Prometheus {
    _proc: Proc,
    url: String,
}

impl Prometheus {
    async fn start(bin: &Path, registry: &str) -> Prometheus {
        let dir = unique_path(&log_dir(), "prometheus", "d");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        // refresh_interval is the pause between two rounds of blocking
        // queries; the queries themselves return as soon as a service changes.
        let yaml = [
            "global:",
            "  scrape_interval: 1s",
            "scrape_configs:",
            "  - job_name: trellis",
            "    consul_sd_configs:",
            &format!("      - server: {registry}"),
            "        refresh_interval: 1s",
            "    relabel_configs:",
            "      - source_labels: [__meta_consul_service]",
            "        target_label: service",
            "      - source_labels: [__meta_consul_service_id]",
            "        target_label: instance_id",
        ];
        std::fs::write(&config, yaml.join("\n") + "\n").unwrap();
        for attempt in 1..=ATTEMPTS {
            let addr = foreign_binary_addr().expect("a loopback port");
            let args = strings(&[
                &format!("--config.file={}", config.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={addr}"),
                "--log.level=info",
            ]);
            let mut proc = Proc::spawn_path("prometheus", bin, &args, &[]);
            let url = format!("http://{addr}");
            let ready = format!("{url}/-/ready");
            let up = wait_for("prometheus to start or exit", READY, || {
                let (ready, exited) = (ready.clone(), proc.exit_status().is_some());
                async move {
                    if exited {
                        return Some(false);
                    }
                    let ok = reqwest::get(&ready).await.is_ok_and(|r| r.status().is_success());
                    ok.then_some(true)
                }
            })
            .await;
            if up {
                return Prometheus { _proc: proc, url };
            }
            assert!(proc.lost_port_race() && attempt < ATTEMPTS, "prometheus exited:\n{}", proc.log_tail());
        }
        unreachable!("the loop returns or panics")
    }

    /// The active targets' labels: (discovered, final) per target.
    async fn targets(&self) -> Vec<(Value, Value)> {
        let url = format!("{}/api/v1/targets?state=active", self.url);
        let Ok(resp) = reqwest::get(&url).await else { return Vec::new() };
        let body: Value = resp.json().await.unwrap_or_default();
        body["data"]["activeTargets"]
            .as_array()
            .map(|ts| ts.iter().map(|t| (t["discoveredLabels"].clone(), t["labels"].clone())).collect())
            .unwrap_or_default()
    }
}

fn label<'a>(labels: &'a Value, name: &str) -> &'a str {
    labels[name].as_str().unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_finds_every_instance_through_consul_sd_and_drops_a_killed_one() {
    let test = "prometheus_finds_every_instance_through_consul_sd_and_drops_a_killed_one";
    let bin = prometheus_bin();
    if !present(test, bin.is_none().then(|| format!("{INSTALLED_PROMETHEUS} is not installed"))) {
        return;
    }
    let bin = bin.unwrap();
    let without_sd = format!("{} is built without Consul service discovery", bin.display());
    if !present(test, (!has_consul_sd(&bin)).then_some(without_sd)) {
        return;
    }
    let registry = RegistryProc::start("consul-prom-registry", &[]).await;
    let url = registry.url();
    let users1 = AppInstance::start(
        &url,
        "users",
        "u1",
        &[],
        &["--tag", "v1", "--metadata", "metrics_port=15000"],
        READY,
    )
    .await;
    let mut users2 = AppInstance::start(&url, "users", "u2", &[], &["--tag", "v2"], READY).await;
    let billing = AppInstance::start(&url, "billing", "b1", &[], &[], READY).await;
    let prometheus = Prometheus::start(&bin, &registry.addr.to_string()).await;

    let expected = [
        ("users", "u1", users1.app.addr),
        ("users", "u2", users2.app.addr),
        ("billing", "b1", billing.app.addr),
    ];
    let started = Instant::now();
    let targets = wait_for("prometheus to list all three instances", Duration::from_secs(60), || {
        let p = &prometheus;
        async move {
            let t = p.targets().await;
            (t.len() == 3).then_some(t)
        }
    })
    .await;
    println!("prometheus listed 3 targets {:?} after it was ready", started.elapsed());
    for (service, id, addr) in expected {
        let (found, labels) = targets
            .iter()
            .find(|(d, _)| label(d, "__meta_consul_service_id") == id)
            .unwrap_or_else(|| panic!("{id} not among {targets:?}"));
        assert_eq!(label(found, "__address__"), addr.to_string(), "{id}: ServiceAddress:ServicePort");
        assert_eq!(label(found, "__meta_consul_service"), service);
        assert_eq!(label(found, "__meta_consul_service_address"), addr.ip().to_string());
        assert_eq!(label(found, "__meta_consul_service_port"), addr.port().to_string());
        assert_eq!(label(found, "__meta_consul_node"), addr.ip().to_string());
        assert_eq!(label(found, "__meta_consul_dc"), "dc1");
        assert_eq!(label(found, "__meta_consul_health"), "passing");
        assert_eq!(label(labels, "service"), service, "relabelled");
        assert_eq!(label(labels, "instance_id"), id, "relabelled");
        assert_eq!(label(labels, "instance"), addr.to_string());
    }
    let u1 = &targets.iter().find(|(d, _)| label(d, "__meta_consul_service_id") == "u1").unwrap().0;
    assert_eq!(label(u1, "__meta_consul_tags"), ",v1,", "Prometheus's tag list");
    assert_eq!(label(u1, "__meta_consul_service_metadata_metrics_port"), "15000", "ServiceMeta");

    // A killed instance (app and sidecar, no deregistration) leaves once its
    // 3s lease runs out and Prometheus's watch of `users` wakes.
    users2.sidecar.proc.kill9();
    users2.app.proc.kill9();
    let killed = Instant::now();
    wait_for("prometheus to drop the killed u2", Duration::from_secs(60), || {
        let p = &prometheus;
        async move {
            let t = p.targets().await;
            let ids: Vec<&str> = t.iter().map(|(d, _)| label(d, "__meta_consul_service_id")).collect();
            (t.len() == 2 && !ids.contains(&"u2")).then_some(())
        }
    })
    .await;
    let gone = killed.elapsed();
    println!("prometheus dropped the killed instance {gone:?} after the kill (lease 3s, refresh 1s)");
    assert!(gone >= Duration::from_secs(2), "{gone:?}: gone before its lease could run out?");
    assert!(gone <= Duration::from_secs(20), "{gone:?}: lease 3s + Prometheus's 5s target update, with room");
}

/// The script's next step, as JSON.
async fn next(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> Value {
    let line = tokio::time::timeout(Duration::from_secs(90), lines.next_line())
        .await
        .expect("py-consul answers")
        .expect("its stdout")
        .expect("a line (py-consul failed: see its stderr above)");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

fn py_consul_missing() -> Option<String> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import consul"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    (!ok).then(|| "python3 with py-consul is not installed".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn py_consul_lists_filters_and_blocks_until_an_instance_registers() {
    let test = "py_consul_lists_filters_and_blocks_until_an_instance_registers";
    if !present(test, py_consul_missing()) {
        return;
    }
    let registry = RegistryProc::start("consul-py-registry", &[]).await;
    let url = registry.url();
    let _u1 = AppInstance::start(&url, "users", "u1", &[], &["--tag", "v1"], READY).await;
    let _u2 = AppInstance::start(&url, "users", "u2", &[], &["--tag", "v2", "--tag", "canary"], READY).await;

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consul_support/py_consul_client.py");
    let mut child = tokio::process::Command::new("python3")
        .arg(&script)
        .args(["127.0.0.1", &registry.addr.port().to_string()])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();

    let catalog = next(&mut lines).await;
    assert_eq!(catalog["services"], serde_json::json!({"users": ["canary", "v1", "v2"]}), "{catalog}");
    let passing = next(&mut lines).await;
    assert_eq!(passing["ids"], serde_json::json!(["u1", "u2"]), "{passing}");
    assert_eq!(passing["checks"], serde_json::json!(["passing", "passing"]), "{passing}");
    let tagged = next(&mut lines).await;
    assert_eq!(tagged["ids"], serde_json::json!(["u2"]), "{tagged}");
    let states = next(&mut lines).await;
    assert_eq!(states["any"], serde_json::json!(["service:u1", "service:u2"]), "{states}");
    assert_eq!(states["statuses"], serde_json::json!(["passing", "passing"]), "{states}");
    assert_eq!(states["critical"], serde_json::json!([]), "{states}");

    let holding = next(&mut lines).await;
    assert_eq!(holding["ids"], serde_json::json!([]), "{holding}");
    // The blocking query is held once the registry counts it open.
    let metrics = format!("{url}/metrics");
    wait_for("py-consul's blocking query to be held", Duration::from_secs(30), || {
        let metrics = metrics.clone();
        async move {
            let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            let open = text
                .lines()
                .find_map(|l| l.strip_prefix("trellis_registry_open_watches ")?.trim().parse::<u64>().ok());
            (open == Some(1)).then_some(())
        }
    })
    .await;
    let registered = Instant::now();
    let resp = reqwest::Client::new()
        .put(format!("{url}/v1/services/orders/instances/o1"))
        .json(&serde_json::json!({"address": "127.0.0.1", "port": 9, "ttl": "60s"}))
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let changed = next(&mut lines).await;
    let answered = registered.elapsed();
    println!(
        "py-consul's blocking query returned {answered:?} after the registration (held {} ms)",
        changed["held_ms"]
    );
    assert_eq!(changed["ids"], serde_json::json!(["o1"]), "{changed}");
    assert_eq!(changed["ports"], serde_json::json!([9]), "{changed}");
    // py-consul hands the index back as the header's text.
    let index = |v: &Value| v["index"].as_str().and_then(|i| i.parse::<u64>().ok());
    assert!(index(&changed) > index(&holding), "{changed} after {holding}");
    assert!(
        answered < Duration::from_secs(5),
        "{answered:?}: a blocking query answers on the change, not at its wait"
    );
    assert!(child.wait().await.unwrap().success());
}
