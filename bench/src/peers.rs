//! The targets under test and their full configurations: direct to the
//! backends (the ceiling), the Trellis sidecar, HAProxy and nginx. Each proxy
//! runs alone on the proxy core with one worker; the backends, their sidecars,
//! the registry and the load generator share the other core.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::procs::{foreign_binary_addr, wait_http_ok, wait_listening, wait_until, Proc, ATTEMPTS};

/// Port 0 on loopback: our own processes bind whatever is free and report it.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// The service name the backends register under and clients put in Host.
pub const SERVICE: &str = "bench-backend";

/// Where the harness runs things.
#[derive(Debug, Clone)]
pub struct Env {
    /// Scratch directory for configurations, logs and data.
    pub work: PathBuf,
    /// Directory holding `registry` and `sidecar`.
    pub bin_dir: PathBuf,
    /// This executable (it is also the backend).
    pub self_exe: PathBuf,
    /// Core for the proxy or registry under test; `None` when not pinning.
    pub proxy_core: Option<usize>,
    /// Core for backends, their sidecars and the load generator.
    pub load_core: Option<usize>,
}

impl Env {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// The backend instances (three, but for the mTLS case's one app).
pub struct Backends {
    pub procs: Vec<Proc>,
    /// Where requests go.
    pub traffic: Vec<SocketAddr>,
    /// Where health checks go: a second port of the same process, so the
    /// failover case can tell requests from checks by port.
    pub health: Vec<SocketAddr>,
}

pub fn start_backends(env: &Env, tag: &str) -> std::io::Result<Backends> {
    start_backends_with(env, tag, &[Duration::ZERO; 3])
}

/// One backend per entry of `delays`, backend `i` answering requests after
/// `delays[i]` (its health port still answers at once).
pub fn start_backends_with(env: &Env, tag: &str, delays: &[Duration]) -> std::io::Result<Backends> {
    let mut b = Backends { procs: Vec::new(), traffic: Vec::new(), health: Vec::new() };
    for (i, delay) in delays.iter().enumerate() {
        let name = format!("b{}", i + 1);
        let args = vec![
            "backend".into(),
            "--listen".into(),
            ANY_PORT.into(),
            "--listen".into(),
            ANY_PORT.into(),
            "--name".into(),
            name.clone(),
            "--delay".into(),
            format!("{}ms", delay.as_millis()),
        ];
        let (p, ready) = Proc::spawn_ready(
            &format!("{tag}-backend-{name}"),
            &env.self_exe,
            &args,
            env.load_core,
            &env.work,
        )?;
        let &[t, h] = ready.addrs("listen").as_slice() else {
            return Err(std::io::Error::other(format!("backend {name} did not report two ports")));
        };
        b.procs.push(p);
        b.traffic.push(t);
        b.health.push(h);
    }
    // The health port: the traffic port of a slow backend answers too late.
    for (i, h) in b.health.iter().enumerate() {
        wait_http_ok(&format!("backend {}", i + 1), *h, SERVICE, "/", Duration::from_secs(10))?;
    }
    Ok(b)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Direct,
    Trellis,
    Haproxy,
    Nginx,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Trellis => "trellis",
            Kind::Haproxy => "haproxy",
            Kind::Nginx => "nginx",
        }
    }

    pub const PROXIES: [Kind; 3] = [Kind::Trellis, Kind::Haproxy, Kind::Nginx];
    pub const ALL: [Kind; 4] = [Kind::Direct, Kind::Trellis, Kind::Haproxy, Kind::Nginx];
}

/// A running target.
pub struct Target {
    /// The measured process (`None` for direct).
    pub main: Option<Proc>,
    /// Supporting processes (registry, the backends' sidecars), held so they
    /// live as long as the target.
    pub _support: Vec<Proc>,
    /// Where the load goes.
    pub addrs: Vec<SocketAddr>,
}

impl Target {
    pub fn pid(&self) -> Option<i32> {
        self.main.as_ref().map(|p| p.pid())
    }

    pub fn load_target(&self) -> crate::load::Target {
        crate::load::Target { addrs: self.addrs.clone(), host: SERVICE.into(), path: "/".into() }
    }
}

/// Settings a case changes from every proxy's defaults, the same for all.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tuning {
    /// How long one attempt waits for response headers before the proxy gives
    /// up on that backend and retries another: Trellis `--try-timeout`,
    /// HAProxy `timeout server`, nginx `proxy_read_timeout`. `None`: each
    /// proxy's own setting (Trellis 10 s, HAProxy 30 s as configured, nginx 60 s).
    pub try_timeout: Option<Duration>,
    /// Trellis only: `--hedge SERVICE=DELAY` on the client sidecar, so a late
    /// request is also sent to another endpoint. HAProxy and nginx have no
    /// request hedging; they ignore it. `None`: no hedging (the default).
    pub hedge: Option<Duration>,
}

/// What the proxy's listener speaks to the load generator. Upstreams are
/// HTTP/1.1 with keep-alive either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (what h2load sends).
    H2c,
}

pub fn haproxy_config(listen: SocketAddr, b: &Backends, front: Front, tuning: Tuning) -> String {
    let proto = match front {
        Front::Http1 => "",
        Front::H2c => " proto h2",
    };
    let mut servers = String::new();
    for (i, (t, h)) in b.traffic.iter().zip(&b.health).enumerate() {
        servers.push_str(&format!(
            "    server b{} {t} check port {} inter 1s fall 2 rise 2\n",
            i + 1,
            h.port()
        ));
    }
    let server_timeout = tuning.try_timeout.map_or("30s".to_string(), |t| format!("{}ms", t.as_millis()));
    format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server {server_timeout}
    timeout http-keep-alive 30s
    option http-keep-alive
    http-reuse safe
    retries 3
    option redispatch 1
    retry-on all-retryable-errors

frontend fe
    bind {listen}{proto}
    default_backend be

backend be
    balance leastconn
    option httpchk GET /health
{servers}"
    )
}

pub fn nginx_config(listen: SocketAddr, b: &Backends, dir: &Path, front: Front, tuning: Tuning) -> String {
    // `http2` on a cleartext listener: HTTP/2 with prior knowledge only.
    let proto = match front {
        Front::Http1 => "",
        Front::H2c => " http2",
    };
    let mut servers = String::new();
    for t in &b.traffic {
        servers.push_str(&format!("        server {t} max_fails=1 fail_timeout=10s;\n"));
    }
    let read_timeout = match tuning.try_timeout {
        Some(t) => format!("            proxy_read_timeout {}ms;\n", t.as_millis()),
        None => String::new(),
    };
    let d = dir.display();
    format!(
        "worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;

events {{
    worker_connections 20000;
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 60s;

    upstream be {{
        least_conn;
{servers}        keepalive 128;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen}{proto};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_connect_timeout 1s;
            proxy_next_upstream error timeout http_502 http_503 http_504;
            proxy_next_upstream_tries 3;
{read_timeout}        }}
    }}
}}
"
    )
}

/// The client sidecar's command line: its defaults, one worker, and `tuning`.
pub fn sidecar_client_args(
    registry: SocketAddr,
    outbound: SocketAddr,
    admin: SocketAddr,
    tuning: Tuning,
) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--registry".into(),
        format!("http://{registry}"),
        "--outbound".into(),
        outbound.to_string(),
        "--admin".into(),
        admin.to_string(),
        "--workers".into(),
        "1".into(),
    ];
    if let Some(t) = tuning.try_timeout {
        args.extend(["--try-timeout".into(), format!("{}ms", t.as_millis())]);
    }
    if let Some(d) = tuning.hedge {
        args.extend(["--hedge".into(), format!("{SERVICE}={}ms", d.as_millis())]);
    }
    args
}

/// A backend's sidecar: registers the backend's traffic port, checks its health
/// port with `GET /health` as HAProxy does (`option httpchk`). A TCP check,
/// the sidecar's default, would keep passing on a frozen backend, whose kernel
/// still completes handshakes.
pub fn sidecar_backend_args(registry: SocketAddr, traffic: SocketAddr, health: SocketAddr) -> Vec<String> {
    vec![
        "--registry".into(),
        format!("http://{registry}"),
        "--service".into(),
        SERVICE.into(),
        "--app".into(),
        health.to_string(),
        "--health".into(),
        "http:/health".into(),
        "--advertise".into(),
        traffic.to_string(),
        "--instance-id".into(),
        format!("backend-{}", traffic.port()),
        "--outbound".into(),
        ANY_PORT.into(),
        "--admin".into(),
        ANY_PORT.into(),
        "--workers".into(),
        "1".into(),
    ]
}

fn registered_count(registry: SocketAddr) -> usize {
    let path = format!("/v1/services/{SERVICE}");
    match crate::procs::http_get(registry, "registry", &path, Duration::from_millis(500)) {
        Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("instances").and_then(|i| i.as_array()).map(Vec::len))
            .unwrap_or(0),
        _ => 0,
    }
}

/// Starts a target in front of the backends and waits until it proxies.
pub fn start(kind: Kind, env: &Env, b: &Backends, tag: &str) -> std::io::Result<Target> {
    start_tuned(kind, env, b, tag, Front::Http1, Tuning::default())
}

/// [`start`] with the listener speaking `front`. The Trellis sidecar takes
/// HTTP/1.1 and HTTP/2 on the same port, so it needs no switch; an HTTP/2
/// target is only waited for until it listens (the caller checks it proxies).
///
/// HAProxy and nginx must be told their port (see `trellis_tests::ports`):
/// when one loses it to another process, it is started again on a fresh one.
pub fn start_front(kind: Kind, env: &Env, b: &Backends, tag: &str, front: Front) -> std::io::Result<Target> {
    start_tuned(kind, env, b, tag, front, Tuning::default())
}

/// [`start_front`] with `tuning` applied to the proxy's configuration.
pub fn start_tuned(
    kind: Kind,
    env: &Env,
    b: &Backends,
    tag: &str,
    front: Front,
    tuning: Tuning,
) -> std::io::Result<Target> {
    let mut attempt = 1;
    loop {
        let mut target = start_once(kind, env, b, tag, front, tuning)?;
        match wait_proxying(kind, &target, front) {
            Err(_) if attempt < ATTEMPTS && target.main.as_mut().is_some_and(|p| p.lost_port_race()) => {
                attempt += 1;
            }
            Err(e) => {
                let tail = target.main.as_ref().map(|p| p.log_tail()).unwrap_or_default();
                return Err(std::io::Error::new(e.kind(), format!("{e}; log:\n{tail}")));
            }
            Ok(()) => return Ok(target),
        }
    }
}

/// Waits until every address of `target` proxies (or listens, for HTTP/2).
fn wait_proxying(kind: Kind, target: &Target, front: Front) -> std::io::Result<()> {
    let ready = Duration::from_secs(30);
    for a in &target.addrs {
        match front {
            Front::Http1 => wait_http_ok(kind.name(), *a, SERVICE, "/", ready)?,
            Front::H2c => wait_listening(kind.name(), *a, ready)?,
        }
    }
    Ok(())
}

fn start_once(
    kind: Kind,
    env: &Env,
    b: &Backends,
    tag: &str,
    front: Front,
    tuning: Tuning,
) -> std::io::Result<Target> {
    let ready = Duration::from_secs(30);
    let target = match kind {
        Kind::Direct => Target { main: None, _support: Vec::new(), addrs: b.traffic.clone() },
        Kind::Haproxy => {
            let listen = foreign_binary_addr()?;
            let cfg = env.work.join(format!("{tag}-haproxy.cfg"));
            std::fs::write(&cfg, haproxy_config(listen, b, front, tuning))?;
            let args = vec!["-db".into(), "-f".into(), cfg.display().to_string()];
            let p = Proc::spawn(
                &format!("{tag}-haproxy"),
                Path::new("haproxy"),
                &args,
                env.proxy_core,
                &env.work,
            )?;
            Target { main: Some(p), _support: Vec::new(), addrs: vec![listen] }
        }
        Kind::Nginx => {
            let listen = foreign_binary_addr()?;
            let dir = env.work.join(format!("{tag}-nginx"));
            std::fs::create_dir_all(&dir)?;
            let cfg = dir.join("nginx.conf");
            std::fs::write(&cfg, nginx_config(listen, b, &dir, front, tuning))?;
            let args = vec!["-p".into(), dir.display().to_string(), "-c".into(), cfg.display().to_string()];
            let p =
                Proc::spawn(&format!("{tag}-nginx"), Path::new("nginx"), &args, env.proxy_core, &env.work)?;
            Target { main: Some(p), _support: Vec::new(), addrs: vec![listen] }
        }
        Kind::Trellis => {
            let mut support = Vec::new();
            let args = vec!["--listen".into(), ANY_PORT.into()];
            let (registry, ready_file) = Proc::spawn_ready(
                &format!("{tag}-registry"),
                &env.bin("registry"),
                &args,
                env.load_core,
                &env.work,
            )?;
            let reg = ready_file.addr("listen");
            support.push(registry);
            for (i, (t, h)) in b.traffic.iter().zip(&b.health).enumerate() {
                let args = sidecar_backend_args(reg, *t, *h);
                let name = format!("{tag}-sidecar-b{}", i + 1);
                support.push(Proc::spawn(&name, &env.bin("sidecar"), &args, env.load_core, &env.work)?);
            }
            wait_until("three backends registered", ready, || registered_count(reg) == 3)?;
            let any: SocketAddr = ([127, 0, 0, 1], 0).into();
            let args = sidecar_client_args(reg, any, any, tuning);
            let (p, ready_file) = Proc::spawn_ready(
                &format!("{tag}-sidecar"),
                &env.bin("sidecar"),
                &args,
                env.proxy_core,
                &env.work,
            )?;
            Target { main: Some(p), _support: support, addrs: vec![ready_file.addr("outbound")] }
        }
    };
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_try_timeout_reaches_every_proxy_config() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let b =
            Backends { procs: Vec::new(), traffic: vec![a(1), a(2), a(3)], health: vec![a(4), a(5), a(6)] };
        let dir = Path::new("/tmp/x");
        let tuned = Tuning { try_timeout: Some(Duration::from_millis(500)), hedge: None };
        assert!(haproxy_config(a(9), &b, Front::Http1, tuned).contains("timeout server 500ms\n"));
        assert!(haproxy_config(a(9), &b, Front::Http1, Tuning::default()).contains("timeout server 30s\n"));
        assert!(nginx_config(a(9), &b, dir, Front::Http1, tuned).contains("proxy_read_timeout 500ms;"));
        assert!(!nginx_config(a(9), &b, dir, Front::Http1, Tuning::default()).contains("proxy_read_timeout"));
        let args = sidecar_client_args(a(7), a(8), a(9), tuned).join(" ");
        assert!(args.ends_with("--try-timeout 500ms"), "{args}");
        assert!(!sidecar_client_args(a(7), a(8), a(9), Tuning::default())
            .join(" ")
            .contains("--try-timeout"));
    }

    #[test]
    fn a_hedge_reaches_only_the_trellis_client() {
        let a = |p: u16| SocketAddr::from(([127, 0, 0, 1], p));
        let b =
            Backends { procs: Vec::new(), traffic: vec![a(1), a(2), a(3)], health: vec![a(4), a(5), a(6)] };
        let hedged = Tuning { try_timeout: None, hedge: Some(Duration::from_millis(50)) };
        let args = sidecar_client_args(a(7), a(8), a(9), hedged).join(" ");
        assert!(args.ends_with("--hedge bench-backend=50ms"), "{args}");
        assert!(!sidecar_client_args(a(7), a(8), a(9), Tuning::default()).join(" ").contains("--hedge"));
        assert_eq!(
            haproxy_config(a(9), &b, Front::Http1, hedged),
            haproxy_config(a(9), &b, Front::Http1, Tuning::default())
        );
        let dir = Path::new("/tmp/x");
        assert_eq!(
            nginx_config(a(9), &b, dir, Front::Http1, hedged),
            nginx_config(a(9), &b, dir, Front::Http1, Tuning::default())
        );
    }
}
