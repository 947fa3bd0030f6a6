//! One service instance as the end-to-end tests start it: a `demo-app` and the
//! sidecar that registers it, both on port 0.

use std::time::Duration;

use crate::{strings, AppProc, SidecarProc};

/// A `demo-app` and its sidecar. The sidecar is declared first so it drops
/// first: the registry never holds an instance whose app is gone for long.
pub struct AppInstance {
    pub sidecar: SidecarProc,
    pub app: AppProc,
}

impl AppInstance {
    /// Starts `demo-app --name NAME APP_ARGS` and a sidecar registering it as
    /// instance NAME of `service` with `registry`, with short health, heartbeat
    /// and TTL settings so it shows up (and goes) fast, plus `sidecar_args`;
    /// returns once the sidecar is ready (the app registered), within `within`.
    pub async fn start(
        registry: &str,
        service: &str,
        name: &str,
        app_args: &[&str],
        sidecar_args: &[&str],
        within: Duration,
    ) -> AppInstance {
        let app = AppProc::start(&format!("{name}-app"), name, &strings(app_args)).await;
        let addr = app.addr.to_string();
        let mut args = registering_args(service, &addr, name);
        args.extend(strings(sidecar_args));
        let sidecar = SidecarProc::start(&format!("{name}-sidecar"), registry, &args, within).await;
        AppInstance { sidecar, app }
    }
}

/// The flags of a sidecar registering the app at `app` as instance `id` of
/// `service`: the app listens on loopback (by default the sidecar would
/// advertise this host's first non-loopback address), and health, heartbeat
/// and TTL are short so the instance shows up (and goes) fast.
pub fn registering_args(service: &str, app: &str, id: &str) -> Vec<String> {
    strings(&[
        "--service",
        service,
        "--app",
        app,
        "--advertise",
        app,
        "--instance-id",
        id,
        "--health-interval",
        "200ms",
        "--health-timeout",
        "150ms",
        "--heartbeat-interval",
        "500ms",
        "--ttl",
        "3s",
    ])
}
