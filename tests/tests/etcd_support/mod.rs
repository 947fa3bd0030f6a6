//! Support for the etcd store's end-to-end tests: a real etcd cluster (Debian's
//! etcd-server) on loopback ports, registry replicas on it, backends with
//! sidecars, and a load loop through a client sidecar.
//!
//! etcd comes from `scripts/install-etcd.sh` when missing. When it cannot be had
//! the tests print SKIPPED with the reason and pass, unless `CI=true`.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use trellis_tests::etcd_secrets::EtcdSecrets;
use trellis_tests::ports::{foreign_binary_addr, ATTEMPTS};
use trellis_tests::{wait_for, wait_http_ok, AppProc, Proc, RegistryProc, SidecarProc};

pub use trellis_tests::strings;

/// The etcd binary, installing it if needed; `Err(reason)` when there is none.
pub fn etcd_binary() -> Result<PathBuf, String> {
    let find = || {
        ["/usr/bin/etcd", "/usr/local/bin/etcd"].iter().map(PathBuf::from).find(|p| p.exists()).or_else(
            || {
                std::env::var_os("PATH").and_then(|paths| {
                    std::env::split_paths(&paths).map(|d| d.join("etcd")).find(|p| p.exists())
                })
            },
        )
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/install-etcd.sh");
    let status = std::process::Command::new("bash").arg(&script).status();
    match (status, find()) {
        (_, Some(p)) => Ok(p),
        (Ok(s), None) => Err(format!("etcd is not installed and {} exited with {s}", script.display())),
        (Err(e), None) => Err(format!("etcd is not installed and {} could not run: {e}", script.display())),
    }
}

/// The etcd binary, or `None` after printing SKIPPED (panics under `CI=true`).
pub fn etcd_or_skip(test: &str) -> Option<PathBuf> {
    match etcd_binary() {
        Ok(p) => Some(p),
        Err(reason) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("{test}: etcd is required in CI: {reason}");
            }
            println!("SKIPPED {test}: {reason}");
            None
        }
    }
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    proc: Option<Proc>,
}

/// A cluster of etcd members on loopback, data in a temporary directory.
pub struct Etcd {
    bin: PathBuf,
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    /// With TLS: the credentials (client and peer URLs are https, client
    /// certificates required); `extra` flags for every member.
    tls: Option<EtcdSecrets>,
    extra: Vec<String>,
}

/// Member names of a cluster: `m0`, `m1`, ...
pub fn member_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("m{i}")).collect()
}

impl Etcd {
    /// `n` members, healthy. etcd must be told its ports, and each member its
    /// peers' (see `trellis_tests::ports`): a member that loses a port to
    /// another process makes the whole cluster start again on fresh ports.
    pub async fn start(bin: PathBuf, n: usize) -> Etcd {
        Etcd::start_with(bin, n, None, &[]).await
    }

    /// `n` members serving TLS to clients and peers and requiring client
    /// certificates (issued for [`member_names`] in `secrets`), with `extra` flags.
    pub async fn start_tls(bin: PathBuf, n: usize, secrets: &EtcdSecrets, extra: &[&str]) -> Etcd {
        Etcd::start_with(bin, n, Some(secrets.clone()), extra).await
    }

    async fn start_with(bin: PathBuf, n: usize, tls: Option<EtcdSecrets>, extra: &[&str]) -> Etcd {
        for attempt in 1..=ATTEMPTS {
            let mut etcd = Etcd::spawn_all(bin.clone(), n, tls.clone(), strings(extra));
            match etcd.wait_started(Duration::from_secs(60)).await {
                Ok(()) => return etcd,
                Err(member) => println!("etcd {member} lost a port race (attempt {attempt}); fresh ports"),
            }
        }
        panic!("etcd lost a port race {ATTEMPTS} times");
    }

    fn spawn_all(bin: PathBuf, n: usize, tls: Option<EtcdSecrets>, extra: Vec<String>) -> Etcd {
        static CLUSTERS: AtomicU64 = AtomicU64::new(0);
        let base = if std::path::Path::new("/dev/shm").is_dir() { "/dev/shm" } else { "/tmp" };
        let token =
            format!("trellis-test-{}-{}", std::process::id(), CLUSTERS.fetch_add(1, Ordering::Relaxed));
        let dir = PathBuf::from(base).join(&token);
        let addr = || foreign_binary_addr().expect("a loopback port");
        let members = member_names(n)
            .into_iter()
            .map(|name| Member { name, client: addr(), peer: addr(), proc: None })
            .collect();
        let mut etcd = Etcd { bin, dir, token, members, tls, extra };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd
    }

    /// Waits until every member reports a leader; `Err(member)` as soon as
    /// one exited because its port was taken.
    async fn wait_started(&mut self, timeout: Duration) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for m in &mut self.members {
                if m.proc.as_mut().is_some_and(Proc::lost_port_race) {
                    return Err(m.name.clone());
                }
            }
            if self.healthy().await {
                return Ok(());
            }
            assert!(tokio::time::Instant::now() < deadline, "etcd not healthy within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// A client that can talk to the members (with TLS: trusting the CA and
    /// presenting the registry's client certificate).
    pub fn http(&self) -> reqwest::Client {
        self.tls.as_ref().map_or_else(http, EtcdSecrets::http_client)
    }

    async fn healthy(&self) -> bool {
        let http = self.http();
        for m in self.members.iter().filter(|m| m.proc.is_some()) {
            let url = format!("{}://{}/health", self.scheme(), m.client);
            let Ok(r) = http.get(&url).send().await else { return false };
            if r.json::<Value>().await.ok().is_none_or(|v| v["health"] != "true") {
                return false;
            }
        }
        true
    }

    fn spawn(&mut self, i: usize) {
        let scheme = self.scheme();
        let cluster: Vec<String> =
            self.members.iter().map(|m| format!("{}={scheme}://{}", m.name, m.peer)).collect();
        let m = &self.members[i];
        let data = self.dir.join(&m.name);
        let mut args = vec![
            "--name".into(),
            m.name.clone(),
            "--data-dir".into(),
            data.display().to_string(),
            "--listen-client-urls".into(),
            format!("{scheme}://{}", m.client),
            "--advertise-client-urls".into(),
            format!("{scheme}://{}", m.client),
            "--listen-peer-urls".into(),
            format!("{scheme}://{}", m.peer),
            "--initial-advertise-peer-urls".into(),
            format!("{scheme}://{}", m.peer),
            "--initial-cluster".into(),
            cluster.join(","),
            "--initial-cluster-token".into(),
            self.token.clone(),
            "--logger".into(),
            "zap".into(),
            "--log-level".into(),
            "warn".into(),
        ];
        if let Some(secrets) = &self.tls {
            let p = |p: PathBuf| p.display().to_string();
            let (cert, key, ca) =
                (p(secrets.member_cert(&m.name)), p(secrets.member_key(&m.name)), p(secrets.ca()));
            args.extend(strings(&["--cert-file", &cert, "--key-file", &key, "--trusted-ca-file", &ca]));
            args.extend(strings(&["--peer-cert-file", &cert, "--peer-key-file", &key]));
            args.extend(strings(&[
                "--peer-trusted-ca-file",
                &ca,
                "--client-cert-auth",
                "--peer-client-cert-auth",
            ]));
        }
        args.extend(self.extra.iter().cloned());
        let proc = Proc::spawn_path(&format!("etcd-{}", m.name), &self.bin, &args, &[]);
        self.members[i].proc = Some(proc);
    }

    /// `etcd://a,b,c/prefix` for `--store`.
    pub fn store_flag(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}{prefix}", hosts.join(","))
    }

    pub fn client_url(&self, i: usize) -> String {
        format!("{}://{}", self.scheme(), self.members[i].client)
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.members[i].proc.take() {
            p.kill9();
        }
    }

    /// Starts a killed member again on its data directory, on its old ports:
    /// the other members and the registries know it by them.
    pub fn restart(&mut self, i: usize) {
        if self.members[i].proc.is_none() {
            self.spawn(i);
        }
    }

    /// Waits until every running member reports a leader.
    pub async fn wait_healthy(&self, timeout: Duration) {
        wait_for("etcd to be healthy", timeout, || async { self.healthy().await.then_some(()) }).await
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.proc.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A registry replica on the etcd store.
pub struct Replica {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl Replica {
    pub async fn start(name: &str, store: &str) -> Replica {
        Replica::start_with(name, store, &[]).await
    }

    pub async fn start_with(name: &str, store: &str, extra: &[&str]) -> Replica {
        let mut args = strings(&["--store", store, "--min-ttl", "1s"]);
        args.extend(strings(extra));
        let RegistryProc { proc, addr } = RegistryProc::start(name, &args).await;
        // Listening comes before the store answers: wait until it serves.
        wait_http_ok(&format!("http://{addr}/health"), Duration::from_secs(60)).await;
        Replica { proc, addr }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(Duration::from_secs(5)).no_proxy().build().unwrap()
}

/// `GET /v1/services/{service}` on a replica: the view and whether it was flagged stale.
pub async fn discover(http: &reqwest::Client, base: &str, service: &str) -> Option<(Value, bool)> {
    let r = http.get(format!("{base}/v1/services/{service}")).send().await.ok()?;
    if !r.status().is_success() {
        return None;
    }
    let stale = r.headers().get("x-trellis-stale").is_some_and(|v| v == "true");
    Some((r.json().await.ok()?, stale))
}

pub fn ids(view: &Value) -> Vec<String> {
    let mut ids: Vec<String> = view["instances"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["id"].as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Registers an instance directly; returns the status and the error code.
pub async fn register(
    http: &reqwest::Client,
    base: &str,
    service: &str,
    id: &str,
    port: u16,
    ttl: &str,
) -> (u16, String) {
    let body = serde_json::json!({"address": "127.0.0.1", "port": port, "ttl": ttl});
    match http.put(format!("{base}/v1/services/{service}/instances/{id}")).json(&body).send().await {
        Ok(r) => {
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v["error"].as_str().unwrap_or("").to_string())
        }
        Err(e) => (0, e.to_string()),
    }
}

/// A sidecar: a backend's (with `--service`) or a client's.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub outbound: SocketAddr,
}

impl Sidecar {
    pub async fn start(name: &str, registries: &str, extra: &[String]) -> Sidecar {
        let SidecarProc { proc, admin, outbound, .. } =
            SidecarProc::start(name, registries, extra, Duration::from_secs(60)).await;
        Sidecar { proc, admin, outbound }
    }

    /// Ids of the endpoints of `service` this sidecar routes to.
    pub async fn endpoints(&self, service: &str) -> Vec<String> {
        let Ok(r) = http().get(format!("http://{}/endpoints", self.admin)).send().await else {
            return vec![];
        };
        let v: Value = r.json().await.unwrap_or(Value::Null);
        let mut ids: Vec<String> = v["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["service"] == service)
            .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
            .filter_map(|e| e["id"].as_str().map(str::to_string))
            .collect();
        ids.sort();
        ids
    }

    pub async fn wait_endpoints(&self, service: &str, want: &[&str], timeout: Duration) {
        let want: Vec<String> = want.iter().map(|s| s.to_string()).collect();
        wait_for(&format!("{} to route to {want:?}", self.proc.name), timeout, || async {
            (self.endpoints(service).await == want).then_some(())
        })
        .await
    }
}

/// A demo-app with its sidecar, registered as `service`.
pub struct Backend {
    pub app: Proc,
    pub sidecar: Sidecar,
}

impl Backend {
    pub async fn start(name: &str, service: &str, registries: &str) -> Backend {
        let AppProc { proc: app, addr: app_addr } = AppProc::start(&format!("{name}-app"), name, &[]).await;
        let extra = strings(&[
            "--service",
            service,
            "--app",
            &app_addr.to_string(),
            "--advertise",
            &app_addr.to_string(),
            "--instance-id",
            name,
        ]);
        let sidecar = Sidecar::start(&format!("{name}-sidecar"), registries, &extra).await;
        Backend { app, sidecar }
    }
}

/// Steady requests through a client sidecar; every non-2xx or error counts as
/// a failure. A fresh connection per request, so nothing retries behind the
/// test's back.
pub struct Load {
    pub ok: Arc<AtomicU64>,
    pub failures: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    pub fn start(outbound: SocketAddr, service: &str) -> Load {
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let url = format!("http://{outbound}/work");
        let service = service.to_string();
        let task = {
            let (ok, failures, stop) = (ok.clone(), failures.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    match client.get(&url).header("host", &service).send().await {
                        Ok(r) if r.status().is_success() => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => failures.lock().unwrap().push(format!("status {}", r.status())),
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        };
        Load { ok, failures, stop, task }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    /// Waits until `n` more requests succeeded.
    pub async fn wait_more(&self, n: u64, timeout: Duration) {
        let target = self.ok() + n;
        wait_for(&format!("{n} more successful requests"), timeout, || async {
            (self.ok() >= target).then_some(())
        })
        .await
    }

    pub async fn stop(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        (self.ok.load(Ordering::Relaxed), self.failures.lock().unwrap().clone())
    }
}
