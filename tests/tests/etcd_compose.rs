//! The `ha` compose file (docker-compose.ha.yml) starts, serves
//! the demo, and survives `docker kill` of one registry replica and one etcd
//! member with zero failed client requests (the demo client's own cumulative
//! `failed=` count, which never retries).
//!
//! etcd runs there with TLS and auth on, alone on its `store` network: the
//! credentials are generated at test start in the layout of `registry init
//! --etcd-member` (`trellis_tests::etcd_secrets`), given to uid 65532 (the
//! containers' user) when the test runs as root.
//!
//! Images: `scripts/images.sh` and `scripts/etcd-image.sh`, tag `test`, from the
//! binaries beside the test executable. Without a Docker engine the test prints
//! SKIPPED and passes, unless `CI=true`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use trellis_tests::bin_dir;
use trellis_tests::etcd_secrets::EtcdSecrets;
use trellis_tests::ports::foreign_binary_addr;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs a command to completion; `Err` carries its output.
fn run(program: &str, args: &[&str], envs: &[(&str, String)]) -> Result<String, String> {
    let mut cmd = Command::new(program);
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().map_err(|e| format!("{program}: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("{program} {}: {}\n{text}", args.join(" "), out.status))
    }
}

fn compose_command() -> Option<Vec<String>> {
    if run("docker-compose", &["version"], &[]).is_ok() {
        return Some(vec!["docker-compose".into()]);
    }
    if run("docker", &["compose", "version"], &[]).is_ok() {
        return Some(vec!["docker".into(), "compose".into()]);
    }
    None
}

/// The compose project; torn down when dropped, also when the test fails.
struct Stack {
    compose: Vec<String>,
    project: String,
    envs: Vec<(&'static str, String)>,
}

impl Stack {
    fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let file = root().join("docker-compose.ha.yml").display().to_string();
        let mut all: Vec<&str> = self.compose[1..].iter().map(String::as_str).collect();
        all.extend(["-f", &file, "-p", &self.project]);
        all.extend_from_slice(args);
        run(&self.compose[0], &all, &self.envs)
    }

    /// The last `stats` line of the client: (sent, ok, failed, served instances).
    fn client_stats(&self) -> Option<(u64, u64, u64, usize)> {
        let logs = self.cmd(&["logs", "--no-color", "client"]).ok()?;
        let line = logs.lines().rev().find_map(|l| l.find("stats t=").map(|i| &l[i..]))?;
        let field = |k: &str| -> Option<u64> {
            line.split_whitespace().find_map(|w| w.strip_prefix(k)).and_then(|v| v.parse().ok())
        };
        let served = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("served="))
            .map(|v| if v == "-" { 0 } else { v.split(',').count() })
            .unwrap_or(0);
        Some((field("sent=")?, field("ok=")?, field("failed=")?, served))
    }

    fn container(&self, service: &str) -> Result<String, String> {
        Ok(self.cmd(&["ps", "-q", service])?.trim().to_string())
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = self.cmd(&["logs", "--no-color", "--tail", "30"]) {
                eprintln!("{logs}");
            }
        }
        let _ = self.cmd(&["down", "-v", "--timeout", "5"]);
    }
}

fn wait<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `GET path` on a loopback port with a plain HTTP/1.0 request: the body of a 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_string())
}

fn healthy_demo_instances(port: u16) -> Option<usize> {
    let v: serde_json::Value = serde_json::from_str(&http_get(port, "/v1/services/demo")?).ok()?;
    v["instances"].as_array().map(|a| a.len())
}

/// How many instances the replica on `port` owns with their key on its lease
/// (`/v1/status`: those it answers for, less those whose move is queued).
fn owned(port: u16) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(&http_get(port, "/v1/status")?).ok()?;
    v["owned"].as_u64()?.checked_sub(v["adopting"].as_u64()?)
}

#[test]
fn compose_ha_survives_killing_a_registry_and_an_etcd_member() {
    let test = "compose_ha_survives_killing_a_registry_and_an_etcd_member";
    let engine = run("docker", &["info", "--format", "{{.ServerVersion}}"], &[]);
    let compose = compose_command();
    let (Ok(_), Some(compose)) = (engine, compose) else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{test}: CI=true and no Docker engine or compose command");
        }
        println!("SKIPPED: {test}: no Docker engine or compose command");
        return;
    };
    let envs = [("TRELLIS_TAG", "test".to_string()), ("TRELLIS_BIN_DIR", bin_dir().display().to_string())];
    let out = run(&root().join("scripts/images.sh").display().to_string(), &[], &envs).expect("images.sh");
    print!("{out}");
    let out =
        run(&root().join("scripts/etcd-image.sh").display().to_string(), &[], &envs).expect("etcd-image.sh");
    print!("{out}");

    // Docker publishes the ports, and a container restart must find the same
    // ones: they are chosen here (see `trellis_tests::ports`).
    let port = || foreign_binary_addr().expect("a loopback port").port();
    let (port1, port2) = (port(), port());
    let secrets_dir = std::env::temp_dir().join(format!("trellis-ha-secrets-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&secrets_dir);
    // SAFETY: geteuid(2) reads our own credentials; no memory is touched.
    let owner = (unsafe { libc::geteuid() } == 0).then_some(65532);
    let secrets =
        EtcdSecrets::generate(&secrets_dir, &["etcd1", "etcd2", "etcd3"], owner).expect("etcd credentials");
    let stack = Stack {
        compose,
        project: format!("trha{}", std::process::id()),
        envs: vec![
            ("TRELLIS_TAG", "test".into()),
            ("TRELLIS_REGISTRY1_PORT", port1.to_string()),
            ("TRELLIS_REGISTRY2_PORT", port2.to_string()),
            ("TRELLIS_SECRETS", secrets.dir.display().to_string()),
        ],
    };
    let started = Instant::now();
    stack.cmd(&["up", "-d"]).expect("compose up");
    for port in [port1, port2] {
        wait("three demo instances on both replicas", Duration::from_secs(180), || {
            (healthy_demo_instances(port) == Some(3)).then_some(())
        });
    }
    let before = wait("the client to be served by all three replicas", Duration::from_secs(120), || {
        stack.client_stats().filter(|s| s.3 == 3 && s.1 > 0)
    });
    println!("ha stack up and serving in {:.1}s", started.elapsed().as_secs_f64());

    // Only the registries share etcd's network; the apps (and the sidecars in
    // their network namespaces) are on `mesh` alone.
    let networks = |service: &str| {
        let id = stack.container(service).expect("container");
        run(
            "docker",
            &["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &id],
            &[],
        )
        .expect("docker inspect")
    };
    for app in ["app1", "client"] {
        let nets = networks(app);
        assert!(!nets.contains("_store"), "{app} must not reach etcd's network: {nets}");
    }
    assert!(networks("registry1").contains("_store"), "registries reach etcd");
    let setup_logs = stack.cmd(&["logs", "--no-color", "etcd-setup"]).unwrap_or_default();
    assert!(setup_logs.contains("authentication enabled"), "etcd-setup turned auth on: {setup_logs}");
    for user in ["root", "trellis"] {
        let all = stack.cmd(&["logs", "--no-color"]).unwrap_or_default();
        assert!(!all.contains(&secrets.password(user)), "no etcd password in any container's log");
    }

    println!("before the kills: registry1 owns {:?} instances, registry2 {:?}", owned(port1), owned(port2));
    let registry1 = stack.container("registry1").expect("registry1 container");
    let etcd1 = stack.container("etcd1").expect("etcd1 container");
    run("docker", &["kill", &registry1], &[]).expect("docker kill registry1");
    run("docker", &["kill", &etcd1], &[]).expect("docker kill etcd1");
    let killed = Instant::now();
    // The sidecars that heartbeated through registry1 move to registry2,
    // which adopts their instances (heartbeats stay in the owner's memory).
    let rehomed = wait("registry2 to own the three replicas' instances", Duration::from_secs(30), || {
        (owned(port2)? == 3).then(|| killed.elapsed())
    });
    println!("registry2 owned all three instances {:.1}s after the kill", rehomed.as_secs_f64());

    // Past several TTLs (5s): heartbeats must go on through registry2 and the
    // two remaining etcd members, or instances would expire.
    std::thread::sleep(Duration::from_secs(15));
    assert_eq!(healthy_demo_instances(port2), Some(3), "registry2 still lists the three replicas");
    let after = wait("a newer stats line", Duration::from_secs(30), || {
        stack.client_stats().filter(|s| s.0 > before.0 + 100)
    });
    let (sent, ok, failed) = (after.0 - before.0, after.1 - before.1, after.2 - before.2);
    println!(
        "killed registry1 and etcd1; over the next {:.0}s the client sent {sent}, ok {ok}, failed {failed}",
        killed.elapsed().as_secs_f64()
    );
    assert_eq!(failed, 0, "client requests failed after the kills");
    assert!(ok >= 100);
    drop(stack);
    let _ = std::fs::remove_dir_all(&secrets_dir);
}
