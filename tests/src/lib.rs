//! Support for Trellis's end-to-end tests: start the real binaries on loopback
//! ports, wait for readiness, signal and kill them.
//!
//! The binaries come from the same cargo profile and target directory as the
//! test executable (the test command builds them first, see README), or from
//! `TRELLIS_BIN_DIR`.

use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Directory holding `registry`, `sidecar`, `demo-app`, ...
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRELLIS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // The test executable lives in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current_exe");
    exe.parent().and_then(|p| p.parent()).expect("test binary in <profile>/deps").to_path_buf()
}

/// Path of a workspace binary; panics with the fix when it was not built.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the binaries first (see the README's test command), or set TRELLIS_BIN_DIR",
        p.display()
    );
    p
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

fn log_dir() -> PathBuf {
    let d = bin_dir().join("test-logs");
    let _ = std::fs::create_dir_all(&d);
    d
}

/// A child process that is killed when dropped. Its stdout and stderr go to a
/// log file whose tail is printed if the test is failing.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, bin_name: &str, args: &[String], env: &[(&str, String)]) -> Proc {
        Proc::spawn_path(name, &bin(bin_name), args, env)
    }

    /// Like [`Proc::spawn`], for a binary outside the workspace (etcd).
    pub fn spawn_path(name: &str, path: &std::path::Path, args: &[String], env: &[(&str, String)]) -> Proc {
        let bin_name = path.display().to_string();
        let log = log_dir().join(format!("{}-{}-{}.log", name, std::process::id(), free_port()));
        let out = File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let mut cmd = Command::new(path);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.env("RUST_LOG", std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {bin_name}: {e}"));
        Proc { name: name.to_string(), child, log, exited: None }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is touched.
        unsafe {
            libc::kill(self.pid(), sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        self.exited = self.child.wait().ok();
    }

    pub fn sigterm(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Waits up to `timeout` for the process to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.exited = Some(st);
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            eprintln!("----- last lines of {} ({}) -----", self.name, self.log.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

/// Polls `check` every 20ms until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `GET url` answers 2xx.
pub async fn wait_http_ok(url: &str, timeout: Duration) {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().expect("client");
    wait_for(&format!("{url} to answer 2xx"), timeout, || {
        let client = client.clone();
        async move {
            match client.get(url).send().await {
                Ok(r) if r.status().is_success() => Some(()),
                _ => None,
            }
        }
    })
    .await
}

/// `args` as owned strings, for [`Proc::spawn`].
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// A sidecar process on fresh admin and outbound ports.
pub struct SidecarProc {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub outbound: SocketAddr,
}

impl SidecarProc {
    /// Starts `sidecar --registry REGISTRIES --admin A --outbound O EXTRA...`
    /// and returns once its `/ready` answers 2xx (within `ready_within`).
    pub async fn start(
        name: &str,
        registries: &str,
        extra: &[String],
        ready_within: Duration,
    ) -> SidecarProc {
        let (admin, outbound) = (free_addr(), free_addr());
        let mut args = strings(&[
            "--registry",
            registries,
            "--admin",
            &admin.to_string(),
            "--outbound",
            &outbound.to_string(),
        ]);
        args.extend_from_slice(extra);
        let proc = Proc::spawn(name, "sidecar", &args, &[]);
        wait_http_ok(&format!("http://{admin}/ready"), ready_within).await;
        SidecarProc { proc, admin, outbound }
    }
}

/// Resolves on SIGTERM or SIGINT, for the demo binaries: as PID 1 in a
/// container nothing else would stop them.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
