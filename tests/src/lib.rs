//! Support for Trellis's end-to-end tests and benchmark harness: start the
//! real binaries on loopback ports of their own choosing, wait for them to be
//! ready, signal and kill them.
//!
//! - `process.rs`: a child process, its log, killing it with its descendants.
//! - `ready.rs`: starting our binaries on port 0 and reading back the ports
//!   from their ready file (registry, sidecar, demo-app).
//! - `ports.rs`: ports for binaries that cannot report theirs (etcd, HAProxy, nginx).
//! - `wait.rs`: waiting for a condition with a generous deadline.
//! - `ws.rs`: a WebSocket echo server for the proxy's upgrade tests.
//! - `mesh.rs`: the CA, ACL file and tokens of a mesh (`registry init`'s code),
//!   and the flags of a registry that signs identities and a sidecar holding one.
//! - `mesh_pki.rs`: mesh certificates (SPIFFE URI SAN leaves, an expired one, another CA)
//!   for the mTLS tests.
//! - `browser.rs`: headless Chromium driven over the DevTools protocol (the dashboard's tests).
//! - `etcd_secrets.rs`: CA, certificates and passwords for a TLS etcd with auth,
//!   in the layout of `registry init --etcd-member`.
//!
//! The binaries come from the same cargo profile and target directory as the
//! test executable (the test command builds them first, see README), or from
//! `TRELLIS_BIN_DIR`.

pub mod admin;
pub mod browser;
pub mod etcd_secrets;
pub mod instance;
pub mod mesh;
pub mod mesh_pki;
pub mod ports;
pub mod process;
pub mod ready;
pub mod wait;
pub mod ws;

use std::path::PathBuf;

pub use instance::{registering_args, AppInstance};
pub use process::{Launch, Proc};
pub use ready::{start_ready, AppProc, Ready, RegistryProc, SidecarProc};
pub use wait::{wait_for, wait_http_ok, wait_until};

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

/// `args` as owned strings, for [`Proc::spawn`].
pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
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
