//! The two-hop targets of the mTLS case: a client-side proxy, which the load
//! generator calls in plain HTTP/1.1 as an app calls its sidecar, and a
//! server-side proxy in front of the one app, with the link between them in
//! plain text or mutual TLS. For each of Trellis, HAProxy and nginx, both
//! hops are that proxy, each with one worker, both pinned to the proxy core.
//!
//! - Trellis, mTLS: the client sidecar (`--mtls --identity bench-client`)
//!   discovers the server sidecar's inbound port (`--inbound`, registering
//!   the app as `bench-backend` with the mesh TLS mark) and connects to it
//!   with its own certificate; both get their leaves from the registry's CA.
//! - Trellis, plain: Trellis has no plain-text inbound side, so the second hop
//!   is a second sidecar's outbound side: a dedicated port
//!   (`--upstream bench-app=ADDR`) routing to the app registered as
//!   `bench-app`, itself registered as `bench-backend`. The same two proxies'
//!   worth of parsing and forwarding, without TLS.
//! - HAProxy and nginx, mTLS: the client side presents a client certificate
//!   and verifies the server's chain and name (`verify required verifyhost`,
//!   `proxy_ssl_verify on` with `proxy_ssl_name`); the server side requires a
//!   client certificate from the same CA (`verify required`,
//!   `ssl_verify_client on`). Neither checks a SPIFFE URI, so their leaves
//!   also carry the DNS name of the identity. Connections between the hops
//!   are kept alive and TLS sessions resumed, as Trellis does.
//!
//! Certificates are made at run time (rcgen, through `trellis_registry::pki`):
//! one CA for HAProxy and nginx; Trellis's come from its registry, started
//! with a CA that `registry init` wrote.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use trellis_registry::pki::{Authority, Usage};

use crate::peers::{self, Backends, Env, ANY_PORT, SERVICE};
use crate::procs::{foreign_binary_addr, wait_http_ok, wait_until, Proc, ATTEMPTS};

/// The caller's service name in the mesh.
pub const CLIENT_SERVICE: &str = "bench-client";
/// In the plain Trellis chain, the name the app itself is registered under.
const APP_SERVICE: &str = "bench-app";
/// The mesh's trust domain (the sidecar's and registry's default).
const TRUST_DOMAIN: &str = "trellis.local";
/// How long the run's certificates are valid: far longer than any run.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// The TLS server name of `service` in the mesh (what Trellis's client
/// sidecar sends; HAProxy and nginx check it as a DNS name).
pub fn mesh_name(service: &str) -> String {
    format!("{service}.svc.{TRUST_DOMAIN}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    Trellis,
    Haproxy,
    Nginx,
}

impl Proxy {
    pub const ALL: [Proxy; 3] = [Proxy::Trellis, Proxy::Haproxy, Proxy::Nginx];

    pub fn name(self) -> &'static str {
        match self {
            Proxy::Trellis => "trellis",
            Proxy::Haproxy => "haproxy",
            Proxy::Nginx => "nginx",
        }
    }
}

/// What travels between the two hops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Plain,
    Mtls,
}

impl Link {
    pub fn name(self) -> &'static str {
        match self {
            Link::Plain => "plain",
            Link::Mtls => "mTLS",
        }
    }
}

/// The HAProxy and nginx certificates of the run, in `<work>/case7/`.
#[derive(Debug, Clone)]
pub struct PeerCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Certificate and key in one file, as HAProxy's `crt` takes them.
    pub server_bundle: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_bundle: PathBuf,
}

impl PeerCerts {
    /// Where [`PeerCerts::generate`] writes them, for configurations shown
    /// before any exist.
    pub fn paths(dir: &Path) -> PeerCerts {
        PeerCerts {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            server_bundle: dir.join("server-bundle.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
            client_bundle: dir.join("client-bundle.pem"),
        }
    }

    /// A CA and one leaf for each side, ECDSA P-256, each leaf for both
    /// server and client use as a mesh leaf is, with its identity's URI SAN
    /// and DNS name.
    pub fn generate(dir: &Path) -> Result<PeerCerts, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let p = PeerCerts::paths(dir);
        let ca = Authority::generate("trellis-bench mesh CA", CERT_VALIDITY).map_err(|e| e.to_string())?;
        write(&p.ca, ca.cert_pem())?;
        for (service, cert, key, bundle) in [
            (SERVICE, &p.server_cert, &p.server_key, &p.server_bundle),
            (CLIENT_SERVICE, &p.client_cert, &p.client_key, &p.client_bundle),
        ] {
            let leaf =
                ca.issue(&[mesh_name(service)], Usage::Both, CERT_VALIDITY).map_err(|e| e.to_string())?;
            write(cert, &leaf.cert_pem)?;
            write_private(key, &leaf.key_pem)?;
            write_private(bundle, &format!("{}{}", leaf.cert_pem, leaf.key_pem))?;
        }
        Ok(p)
    }
}

fn write(path: &Path, contents: &str) -> Result<(), String> {
    std::fs::write(path, contents).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// The client-side HAProxy: plain HTTP in, to the server side over `link`.
pub fn haproxy_client_config(listen: SocketAddr, server: SocketAddr, link: Link, c: &PeerCerts) -> String {
    let tls = match link {
        Link::Plain => String::new(),
        Link::Mtls => format!(
            " ssl crt {} ca-file {} verify required verifyhost {name} sni str({name}) alpn http/1.1",
            c.client_bundle.display(),
            c.ca.display(),
            name = mesh_name(SERVICE)
        ),
    };
    format!(
        "{}
frontend outbound
    bind {listen}
    default_backend mesh

backend mesh
    server server-side {server}{tls}
",
        haproxy_common()
    )
}

/// The server-side HAProxy: `link` in, plain HTTP to the app.
pub fn haproxy_server_config(listen: SocketAddr, app: SocketAddr, link: Link, c: &PeerCerts) -> String {
    let tls = match link {
        Link::Plain => String::new(),
        Link::Mtls => format!(
            " ssl crt {} ca-file {} verify required alpn http/1.1",
            c.server_bundle.display(),
            c.ca.display()
        ),
    };
    format!(
        "{}
frontend inbound
    bind {listen}{tls}
    default_backend app

backend app
    server app {app}
",
        haproxy_common()
    )
}

// `http-reuse always`: HAProxy's default (`safe`) sends the first request of
// every new client connection over a server connection of its own, which
// across mutual TLS is a handshake at the start of each measured window (the
// generator opens new connections every window). nginx's upstream keepalive
// and Trellis's pool reuse an idle connection for any request, and so does
// `always`; the link between two hops never drops connections it just idled.
fn haproxy_common() -> &'static str {
    "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
    option http-keep-alive
    http-reuse always
"
}

/// The client-side nginx: plain HTTP in, to the server side over `link`.
pub fn nginx_client_config(
    listen: SocketAddr,
    server: SocketAddr,
    link: Link,
    c: &PeerCerts,
    dir: &Path,
) -> String {
    let (scheme, tls) = match link {
        Link::Plain => ("http", String::new()),
        Link::Mtls => (
            "https",
            format!(
                "            proxy_ssl_certificate {};
            proxy_ssl_certificate_key {};
            proxy_ssl_trusted_certificate {};
            proxy_ssl_verify on;
            proxy_ssl_name {};
            proxy_ssl_server_name on;
            proxy_ssl_session_reuse on;
",
                c.client_cert.display(),
                c.client_key.display(),
                c.ca.display(),
                mesh_name(SERVICE)
            ),
        ),
    };
    let server_block = format!(
        "    server {{
        listen {listen};
        location / {{
            proxy_pass {scheme}://next;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
{tls}        }}
    }}
"
    );
    nginx_common(dir, server, &server_block)
}

/// The server-side nginx: `link` in, plain HTTP to the app.
pub fn nginx_server_config(
    listen: SocketAddr,
    app: SocketAddr,
    link: Link,
    c: &PeerCerts,
    dir: &Path,
) -> String {
    let (ssl, tls) = match link {
        Link::Plain => ("", String::new()),
        Link::Mtls => (
            " ssl",
            format!(
                "        ssl_certificate {};
        ssl_certificate_key {};
        ssl_client_certificate {};
        ssl_verify_client on;
",
                c.server_cert.display(),
                c.server_key.display(),
                c.ca.display()
            ),
        ),
    };
    let server_block = format!(
        "    server {{
        listen {listen}{ssl};
{tls}        location / {{
            proxy_pass http://next;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }}
    }}
"
    );
    nginx_common(dir, app, &server_block)
}

/// One worker, no access log, keep-alive towards `next` (the next hop).
fn nginx_common(dir: &Path, next: SocketAddr, server_block: &str) -> String {
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

    upstream next {{
        server {next};
        keepalive 128;
        keepalive_requests 1000000;
    }}

{server_block}}}
"
    )
}

/// The Trellis registry of the mTLS chain: a CA from `registry init` in
/// `dir`, which it signs the sidecars' leaves with.
pub fn trellis_registry_args(link: Link, dir: &Path) -> Vec<String> {
    let mut args = vec!["--listen".into(), ANY_PORT.into()];
    if link == Link::Mtls {
        args.extend([
            "--ca-cert".into(),
            dir.join("ca.pem").display().to_string(),
            "--ca-key".into(),
            dir.join("ca-key.pem").display().to_string(),
        ]);
    }
    args
}

/// The server-side sidecar of the mTLS chain: registers the app as
/// `bench-backend`, advertising its inbound port. The port is chosen here:
/// left to itself, a sidecar whose app is on loopback advertises the host's
/// interface address, not loopback.
pub fn trellis_server_args(registry: SocketAddr, app: SocketAddr, inbound: SocketAddr) -> Vec<String> {
    [
        "--registry",
        &format!("http://{registry}"),
        "--service",
        SERVICE,
        "--app",
        &app.to_string(),
        "--inbound",
        &inbound.to_string(),
        "--advertise",
        &inbound.to_string(),
        "--outbound",
        ANY_PORT,
        "--admin",
        ANY_PORT,
        "--workers",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// The client-side sidecar of the mTLS chain: registers nothing, holds the
/// identity `bench-client`.
pub fn trellis_client_args(registry: SocketAddr) -> Vec<String> {
    [
        "--registry",
        &format!("http://{registry}"),
        "--mtls",
        "--identity",
        CLIENT_SERVICE,
        "--outbound",
        ANY_PORT,
        "--admin",
        ANY_PORT,
        "--workers",
        "1",
    ]
    .map(String::from)
    .to_vec()
}

/// A running chain: both hops (measured) and what supports them.
pub struct Chain {
    pub client: Proc,
    pub server: Proc,
    /// The registry and the registering sidecars (load core), held so they
    /// live as long as the chain.
    _support: Vec<Proc>,
    /// Where the load goes: the client-side proxy.
    pub addr: SocketAddr,
}

/// Starts `proxy`'s two hops in front of `app` and waits until a request
/// gets through both. HAProxy and nginx must be told their ports: a chain
/// that lost one to another process is started again on fresh ones.
pub fn start(
    proxy: Proxy,
    link: Link,
    env: &Env,
    app: &Backends,
    certs: &PeerCerts,
    tag: &str,
) -> Result<Chain, String> {
    let app_addr = *app.traffic.first().ok_or("no app")?;
    let mut attempt = 1;
    loop {
        let mut chain = match proxy {
            Proxy::Trellis => start_trellis(link, env, app, tag)?,
            Proxy::Haproxy | Proxy::Nginx => start_foreign(proxy, link, env, app_addr, certs, tag)?,
        };
        match wait_http_ok(
            &format!("{} {}", proxy.name(), link.name()),
            chain.addr,
            SERVICE,
            "/",
            READY_WITHIN,
        ) {
            Ok(()) => return Ok(chain),
            Err(_)
                if attempt < ATTEMPTS && (chain.client.lost_port_race() || chain.server.lost_port_race()) =>
            {
                attempt += 1;
            }
            Err(e) => {
                return Err(format!(
                    "{e}; client side's log:\n{}\nserver side's log:\n{}",
                    chain.client.log_tail(),
                    chain.server.log_tail()
                ))
            }
        }
    }
}

/// How long a chain may take to proxy its first request: the Trellis mTLS
/// chain registers, signs two leaves and discovers before it can.
const READY_WITHIN: Duration = Duration::from_secs(30);

fn start_foreign(
    proxy: Proxy,
    link: Link,
    env: &Env,
    app: SocketAddr,
    certs: &PeerCerts,
    tag: &str,
) -> Result<Chain, String> {
    let io = |e: std::io::Error| e.to_string();
    let (client_addr, server_addr) = (foreign_binary_addr().map_err(io)?, foreign_binary_addr().map_err(io)?);
    let spawn = |side: &str, config: &dyn Fn(&Path) -> String| -> Result<Proc, String> {
        let name = format!("{tag}-{}-{}-{side}", proxy.name(), link.name().to_lowercase());
        let dir = env.work.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let (program, file, args) = match proxy {
            Proxy::Haproxy => {
                let cfg = dir.join("haproxy.cfg");
                let args = vec!["-db".into(), "-f".into(), cfg.display().to_string()];
                ("haproxy", cfg, args)
            }
            _ => {
                let cfg = dir.join("nginx.conf");
                let args =
                    vec!["-p".into(), dir.display().to_string(), "-c".into(), cfg.display().to_string()];
                ("nginx", cfg, args)
            }
        };
        write(&file, &config(&dir))?;
        Proc::spawn(&name, Path::new(program), &args, env.proxy_core, &env.work).map_err(io)
    };
    let server = spawn("server", &|dir| match proxy {
        Proxy::Haproxy => haproxy_server_config(server_addr, app, link, certs),
        _ => nginx_server_config(server_addr, app, link, certs, dir),
    })?;
    let client = spawn("client", &|dir| match proxy {
        Proxy::Haproxy => haproxy_client_config(client_addr, server_addr, link, certs),
        _ => nginx_client_config(client_addr, server_addr, link, certs, dir),
    })?;
    Ok(Chain { client, server, _support: Vec::new(), addr: client_addr })
}

fn registered(registry: SocketAddr, service: &str) -> bool {
    let path = format!("/v1/services/{service}");
    match crate::procs::http_get(registry, "registry", &path, Duration::from_millis(500)) {
        Ok((200, body)) => serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("instances").and_then(|i| i.as_array()).map(|a| !a.is_empty()))
            .unwrap_or(false),
        _ => false,
    }
}

fn start_trellis(link: Link, env: &Env, app: &Backends, tag: &str) -> Result<Chain, String> {
    let io = |e: std::io::Error| e.to_string();
    let slug = link.name().to_lowercase();
    let app_addr = *app.traffic.first().ok_or("no app")?;
    let health = *app.health.first().ok_or("no app")?;
    let ca_dir = env.work.join(format!("{tag}-trellis-ca"));
    if link == Link::Mtls && !ca_dir.join("ca.pem").exists() {
        // The registry's own `init` writes the CA, as an operator's would.
        let out = std::process::Command::new(env.bin("registry"))
            .arg("init")
            .arg(&ca_dir)
            .output()
            .map_err(|e| format!("registry init: {e}"))?;
        if !out.status.success() {
            return Err(format!("registry init: {}", String::from_utf8_lossy(&out.stderr)));
        }
    }
    let (registry, ready) = Proc::spawn_ready(
        &format!("{tag}-trellis-{slug}-registry"),
        &env.bin("registry"),
        &trellis_registry_args(link, &ca_dir),
        env.load_core,
        &env.work,
    )
    .map_err(io)?;
    let reg = ready.addr("listen");
    let mut support = vec![registry];
    let sidecar = env.bin("sidecar");
    let (server, client) = match link {
        Link::Mtls => {
            let inbound = foreign_binary_addr().map_err(io)?;
            let server = Proc::spawn(
                &format!("{tag}-trellis-mtls-server"),
                &sidecar,
                &trellis_server_args(reg, app_addr, inbound),
                env.proxy_core,
                &env.work,
            )
            .map_err(io)?;
            wait_until("the server sidecar registered", READY_WITHIN, || registered(reg, SERVICE))
                .map_err(io)?;
            let (client, ready) = Proc::spawn_ready(
                &format!("{tag}-trellis-mtls-client"),
                &sidecar,
                &trellis_client_args(reg),
                env.proxy_core,
                &env.work,
            )
            .map_err(io)?;
            (server, (client, ready.addr("outbound")))
        }
        Link::Plain => {
            // The app registered as `bench-app` by a sidecar of its own.
            let mut args = peers::sidecar_backend_args(reg, app_addr, health);
            rename_service(&mut args, APP_SERVICE);
            support.push(
                Proc::spawn(
                    &format!("{tag}-trellis-plain-app-sidecar"),
                    &sidecar,
                    &args,
                    env.load_core,
                    &env.work,
                )
                .map_err(io)?,
            );
            let server_args: Vec<String> = [
                "--registry",
                &format!("http://{reg}"),
                "--upstream",
                &format!("{APP_SERVICE}={ANY_PORT}"),
                "--outbound",
                ANY_PORT,
                "--admin",
                ANY_PORT,
                "--workers",
                "1",
            ]
            .map(String::from)
            .to_vec();
            let (server, ready) = Proc::spawn_ready(
                &format!("{tag}-trellis-plain-server"),
                &sidecar,
                &server_args,
                env.proxy_core,
                &env.work,
            )
            .map_err(io)?;
            let dedicated =
                *ready.upstreams().get(APP_SERVICE).ok_or("the server sidecar has no dedicated port")?;
            // The server sidecar's dedicated port registered as the service
            // the client calls.
            let mut args = peers::sidecar_backend_args(reg, dedicated, dedicated);
            let at = args.iter().position(|a| a == "--health").ok_or("no --health")?;
            args[at + 1] = "tcp".into();
            support.push(
                Proc::spawn(
                    &format!("{tag}-trellis-plain-server-registrar"),
                    &sidecar,
                    &args,
                    env.load_core,
                    &env.work,
                )
                .map_err(io)?,
            );
            wait_until("both hops registered", READY_WITHIN, || {
                registered(reg, SERVICE) && registered(reg, APP_SERVICE)
            })
            .map_err(io)?;
            let any: SocketAddr = ([127, 0, 0, 1], 0).into();
            let client_args = peers::sidecar_client_args(reg, any, any, peers::Tuning::default());
            let (client, ready) = Proc::spawn_ready(
                &format!("{tag}-trellis-plain-client"),
                &sidecar,
                &client_args,
                env.proxy_core,
                &env.work,
            )
            .map_err(io)?;
            (server, (client, ready.addr("outbound")))
        }
    };
    let (client, addr) = client;
    Ok(Chain { client, server, _support: support, addr })
}

/// Replaces `--service`'s value in a sidecar's arguments.
fn rename_service(args: &mut [String], service: &str) {
    if let Some(at) = args.iter().position(|a| a == "--service") {
        if let Some(v) = args.get_mut(at + 1) {
            *v = service.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(p: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], p))
    }

    #[test]
    fn mtls_configs_require_and_present_certificates() {
        let c = PeerCerts::paths(Path::new("/tmp/c"));
        let dir = Path::new("/tmp/n");
        let hc = haproxy_client_config(a(1), a(2), Link::Mtls, &c);
        assert!(hc.contains("server server-side 127.0.0.1:2 ssl crt /tmp/c/client-bundle.pem"), "{hc}");
        assert!(hc.contains("verify required verifyhost bench-backend.svc.trellis.local"), "{hc}");
        let hs = haproxy_server_config(a(2), a(3), Link::Mtls, &c);
        assert!(hs.contains(
            "bind 127.0.0.1:2 ssl crt /tmp/c/server-bundle.pem ca-file /tmp/c/ca.pem verify required"
        ));
        let nc = nginx_client_config(a(1), a(2), Link::Mtls, &c, dir);
        assert!(nc.contains("proxy_pass https://next;") && nc.contains("proxy_ssl_verify on;"), "{nc}");
        assert!(nc.contains("proxy_ssl_certificate /tmp/c/client.pem;"), "{nc}");
        let ns = nginx_server_config(a(2), a(3), Link::Mtls, &c, dir);
        assert!(ns.contains("listen 127.0.0.1:2 ssl;") && ns.contains("ssl_verify_client on;"), "{ns}");
        assert!(ns.contains("server 127.0.0.1:3;"), "{ns}");
    }

    #[test]
    fn plain_configs_have_no_tls() {
        let c = PeerCerts::paths(Path::new("/tmp/c"));
        let dir = Path::new("/tmp/n");
        for cfg in [
            haproxy_client_config(a(1), a(2), Link::Plain, &c),
            haproxy_server_config(a(2), a(3), Link::Plain, &c),
            nginx_client_config(a(1), a(2), Link::Plain, &c, dir),
            nginx_server_config(a(2), a(3), Link::Plain, &c, dir),
        ] {
            assert!(!cfg.contains("ssl") && !cfg.contains("/tmp/c"), "{cfg}");
        }
    }

    #[test]
    fn peer_certificates_are_written_keys_private() {
        let dir = std::env::temp_dir().join(format!("trellis-bench-mesh-certs-{}", std::process::id()));
        let c = PeerCerts::generate(&dir).expect("certificates");
        let bundle = std::fs::read_to_string(&c.server_bundle).expect("bundle");
        assert!(bundle.contains("BEGIN CERTIFICATE") && bundle.contains("PRIVATE KEY"));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&c.client_key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
