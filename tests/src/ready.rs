//! Starting our own binaries on port 0 and learning the ports they bound from
//! their ready file (`--ready-file`, written once every listener is bound).
//!
//! Waiting for the file is waiting for an event: it is polled while the child
//! is checked to be alive, so a child that dies fails the start at once with
//! its log, and the deadline only bounds a hung start.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::process::{Launch, Proc};
use crate::wait::{wait_http_ok, wait_until};

/// How long a start-up may take on a loaded machine before it counts as hung.
pub const START_WITHIN: Duration = Duration::from_secs(60);

/// What a child wrote to its ready file.
#[derive(Debug, Clone)]
pub struct Ready(Value);

impl Ready {
    /// The address under `key`, e.g. `listen`, `admin`, `outbound`.
    pub fn addr(&self, key: &str) -> SocketAddr {
        self.0[key].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no {key} in {}", self.0))
    }

    /// The address under `key`, if the child reported one (the sidecar's `inbound`).
    pub fn addr_if(&self, key: &str) -> Option<SocketAddr> {
        self.0[key].as_str().and_then(|s| s.parse().ok())
    }

    /// The addresses of a list under `key` (the bench backend's `listen`).
    pub fn addrs(&self, key: &str) -> Vec<SocketAddr> {
        let list = self.0[key].as_array().unwrap_or_else(|| panic!("no {key} list in {}", self.0));
        list.iter().filter_map(|a| a.as_str()?.parse().ok()).collect()
    }

    /// The sidecar's dedicated listeners, by service.
    pub fn upstreams(&self) -> BTreeMap<String, SocketAddr> {
        let Some(map) = self.0["upstreams"].as_object() else { return BTreeMap::new() };
        map.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.parse().ok()?))).collect()
    }
}

impl Launch {
    /// Adds `--ready-file PATH` (beside the log; or the variable of
    /// [`Launch::ready_file_env`]) and returns once the child
    /// wrote it. Fails with the log's tail when the child exits first or
    /// nothing is written within `within`.
    pub fn spawn_ready(self, within: Duration) -> std::io::Result<(Proc, Ready)> {
        let log = self.log_path();
        let file = log.with_extension("ready.json");
        let _ = std::fs::remove_file(&file);
        let path = file.display().to_string();
        let launch = match self.ready_env.clone() {
            Some(key) => self.env(&key, path),
            None => self.arg("--ready-file").arg(path),
        };
        let mut proc = launch.log_to(log).spawn()?;
        let mut exited = None;
        let waited = wait_until(&format!("{} to write {}", proc.name, file.display()), within, || {
            exited = proc.exit_status();
            exited.is_some() || file.exists()
        });
        let fail = |why: String| std::io::Error::other(format!("{why}; log:\n{}", proc.log_tail()));
        if let Some(status) = exited {
            return Err(fail(format!("{} exited with {status} before it was ready", proc.name)));
        }
        if let Err(e) = waited {
            return Err(fail(e.to_string()));
        }
        match read(&file) {
            Ok(v) => Ok((proc, Ready(v))),
            Err(e) => Err(fail(format!("{}: {e}", file.display()))),
        }
    }
}

fn read(path: &Path) -> std::io::Result<Value> {
    serde_json::from_slice(&std::fs::read(path)?).map_err(std::io::Error::other)
}

/// [`Launch::spawn_ready`] from async code: the polling runs on a blocking
/// thread, so the caller's runtime keeps serving. Panics with the log.
pub async fn start_ready(launch: Launch) -> (Proc, Ready) {
    match tokio::task::spawn_blocking(move || launch.spawn_ready(START_WITHIN)).await {
        Ok(Ok(started)) => started,
        Ok(Err(e)) => panic!("{e}"),
        Err(e) => panic!("the start-up thread failed: {e}"),
    }
}

/// A workspace binary with `args`, for [`start_ready`].
fn launch(name: &str, bin_name: &str, args: &[String]) -> Launch {
    Launch::new(name, &crate::bin(bin_name)).args(args)
}

/// A registry process on a loopback port of its own choosing.
pub struct RegistryProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl RegistryProc {
    /// `registry --listen 127.0.0.1:0 EXTRA...`, returned once listening.
    pub async fn start(name: &str, extra: &[String]) -> RegistryProc {
        RegistryProc::start_on(name, SocketAddr::from(([127, 0, 0, 1], 0)), extra).await
    }

    /// Like [`RegistryProc::start`] on a given address: only for a restart on
    /// the port an earlier registry bound, which its clients already know.
    pub async fn start_on(name: &str, listen: SocketAddr, extra: &[String]) -> RegistryProc {
        let args = crate::strings(&["--listen", &listen.to_string()]);
        let (proc, ready) = start_ready(launch(name, "registry", &args).args(extra)).await;
        RegistryProc { proc, addr: ready.addr("listen") }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A sidecar process on loopback ports of its own choosing.
pub struct SidecarProc {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub outbound: SocketAddr,
    /// The `--upstream` listeners, by service.
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// The `--inbound` listener, when on.
    pub inbound: Option<SocketAddr>,
}

impl SidecarProc {
    /// Starts `sidecar --registry REGISTRIES --admin 127.0.0.1:0 --outbound
    /// 127.0.0.1:0 EXTRA...` and returns once its `/ready` answers 2xx (within
    /// `ready_within`).
    pub async fn start(
        name: &str,
        registries: &str,
        extra: &[String],
        ready_within: Duration,
    ) -> SidecarProc {
        let sidecar = SidecarProc::spawn(name, registries, extra).await;
        wait_http_ok(&format!("http://{}/ready", sidecar.admin), ready_within).await;
        sidecar
    }

    /// Like [`SidecarProc::start`], returning once the listeners are bound,
    /// whether or not the sidecar is ready.
    pub async fn spawn(name: &str, registries: &str, extra: &[String]) -> SidecarProc {
        let args = crate::strings(&[
            "--registry",
            registries,
            "--admin",
            "127.0.0.1:0",
            "--outbound",
            "127.0.0.1:0",
        ]);
        let (proc, ready) = start_ready(launch(name, "sidecar", &args).args(extra)).await;
        SidecarProc {
            proc,
            admin: ready.addr("admin"),
            outbound: ready.addr("outbound"),
            upstreams: ready.upstreams(),
            inbound: ready.addr_if("inbound"),
        }
    }
}

/// A `demo-app` on a loopback port of its own choosing.
pub struct AppProc {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl AppProc {
    /// `demo-app --listen 127.0.0.1:0 --name NAME EXTRA...`, returned once listening.
    pub async fn start(name: &str, instance: &str, extra: &[String]) -> AppProc {
        let args = crate::strings(&["--listen", "127.0.0.1:0", "--name", instance]);
        let (proc, ready) = start_ready(launch(name, "demo-app", &args).args(extra)).await;
        AppProc { proc, addr: ready.addr("listen") }
    }
}
