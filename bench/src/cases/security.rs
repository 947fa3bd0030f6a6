//! Case 6: what tokens and TLS cost the registry per heartbeat.
//!
//! The registry (memory store, `--workers 1`, alone on the proxy core as in
//! case 4) under case 4's heartbeat workload, in four configurations one after
//! another in the same run: plain (the reference); tokens (`--acl-file`, one
//! token per service, every request carrying its service's); TLS
//! (`--tls-cert/--tls-key`, keep-alive connections, so one handshake per
//! connection, not per heartbeat); and both.
//!
//! The secrets, the CA and the registry's certificate are made at run time in
//! the work directory. The ACL file holds only the secrets' SHA-256, as
//! `registry init` writes it; the secrets themselves live in the generator's
//! memory and are never printed.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use ring::rand::SecureRandom;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use trellis_registry::pki::{Authority, Usage};

use super::heartbeat_load::{
    heartbeats, register_all, service, Fleet, Secret, HEARTBEAT_CONNS, HEARTBEAT_INTERVAL,
};
use super::{ratio, us, Sizes};
use crate::http1::{get_request, request_with_token, Dial};
use crate::peers::{Env, ANY_PORT};
use crate::procs::Proc;
use crate::procstat;
use crate::report::Section;

/// Tokens may cost at most this much more CPU per heartbeat than plain.
const TOKEN_BUDGET: f64 = 1.10;
/// How long the run's certificates are valid: far longer than any run.
const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Plain,
    Tokens,
    Tls,
    TokensTls,
}

impl Setup {
    const ALL: [Setup; 4] = [Setup::Plain, Setup::Tokens, Setup::Tls, Setup::TokensTls];

    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "plain",
            Setup::Tokens => "tokens",
            Setup::Tls => "TLS",
            Setup::TokensTls => "tokens + TLS",
        }
    }

    /// For process and log names.
    fn slug(self) -> &'static str {
        match self {
            Setup::Plain => "plain",
            Setup::Tokens => "tokens",
            Setup::Tls => "tls",
            Setup::TokensTls => "tokens-tls",
        }
    }

    fn tokens(self) -> bool {
        matches!(self, Setup::Tokens | Setup::TokensTls)
    }

    fn tls(self) -> bool {
        matches!(self, Setup::Tls | Setup::TokensTls)
    }
}

/// What every configuration of the run uses, made once.
struct Credentials {
    acl_file: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Trusts only the run's CA.
    client: Arc<rustls::ClientConfig>,
    /// One per service, in service order.
    secrets: Vec<Secret>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Writes a file only its owner may read.
fn write_private(path: &Path, contents: &str) -> Result<(), String> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.write_all(contents.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// A random 256-bit secret as hex, and the ACL file entry granting it write
/// on `svc` (its SHA-256 only).
fn token_for(rng: &ring::rand::SystemRandom, svc: &str) -> Result<(Secret, String), String> {
    let mut raw = [0u8; 32];
    rng.fill(&mut raw).map_err(|_| "no randomness for a token".to_string())?;
    let secret = hex(&raw);
    let digest = hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref());
    let entry = format!(
        "[[tokens]]\nname = \"{svc}\"\nsecret_sha256 = \"{digest}\"\nwrite = [\"{svc}\"]\nread = [\"*\"]\n\n"
    );
    Ok((Secret::new(secret), entry))
}

/// The ACL file, the CA, the registry's certificate and a client trusting
/// the CA, in `<work>/case6/`.
fn credentials(env: &Env, services: usize) -> Result<Credentials, String> {
    let dir = env.work.join("case6");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let rng = ring::rand::SystemRandom::new();
    let mut acl = String::from("default = \"deny\"\n\n");
    let mut secrets = Vec::with_capacity(services);
    for s in 0..services {
        let (secret, entry) = token_for(&rng, &service(s, services))?;
        secrets.push(secret);
        acl.push_str(&entry);
    }
    let acl_file = dir.join("acl.toml");
    write_private(&acl_file, &acl)?;

    let ca = Authority::generate("trellis-bench CA", CERT_VALIDITY).map_err(|e| e.to_string())?;
    let names = ["127.0.0.1".to_string(), "localhost".to_string()];
    let leaf = ca.issue(&names, Usage::Server, CERT_VALIDITY).map_err(|e| e.to_string())?;
    let (cert, key) = (dir.join("registry.pem"), dir.join("registry-key.pem"));
    std::fs::write(&cert, &leaf.cert_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
    write_private(&key, &leaf.key_pem)?;
    std::fs::write(dir.join("ca.pem"), ca.cert_pem()).map_err(|e| e.to_string())?;

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.cert_pem().as_bytes()) {
        roots.add(c.map_err(|e| format!("the run's CA: {e}"))?).map_err(|e| format!("the run's CA: {e}"))?;
    }
    let mut client =
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
    // The generator speaks HTTP/1.1 only; ALPN tells the registry so.
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Credentials { acl_file, cert, key, client: Arc::new(client), secrets })
}

struct Row {
    setup: Setup,
    instances: usize,
    services: usize,
    due_rate: f64,
    done_rate: f64,
    failed: u64,
    hist: Histogram<u64>,
    cpu_per_1k_ms: f64,
    cpu_share: f64,
    idle_kib: u64,
    loaded_kib: u64,
    /// Connections the heartbeat generator opened (TLS: handshakes).
    connects: u64,
    busy: Vec<f64>,
}

fn registry_args(setup: Setup, creds: &Credentials) -> Vec<String> {
    let mut args =
        vec!["--listen".to_string(), ANY_PORT.to_string(), "--workers".to_string(), "1".to_string()];
    if setup.tokens() {
        args.extend(["--acl-file".to_string(), creds.acl_file.display().to_string()]);
    }
    if setup.tls() {
        args.extend([
            "--tls-cert".to_string(),
            creds.cert.display().to_string(),
            "--tls-key".to_string(),
            creds.key.display().to_string(),
        ]);
    }
    args
}

/// Waits until `GET /health` answers 200 over `dial` (over TLS, this is also
/// where a certificate that does not verify shows).
async fn wait_health(dial: &Dial, addr: SocketAddr) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let req = get_request("bench", "/health");
    loop {
        let last = match dial.connect(addr).await {
            Ok(mut c) => match c.roundtrip(&req).await {
                Ok(200) => return Ok(()),
                Ok(s) => format!("/health answered {s}"),
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            return Err(format!("the registry never answered /health: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A token row means something only if the registry checks tokens: one
/// heartbeat without a token must be refused with 401.
async fn refuses_without_token(dial: &Dial, addr: SocketAddr) -> Result<(), String> {
    let req = request_with_token("PUT", "/v1/services/svc-0000/instances/i-0/heartbeat", None, "{}");
    let mut conn = dial.connect(addr).await.map_err(|e| e.to_string())?;
    match conn.roundtrip(&req).await.map_err(|e| e.to_string())? {
        401 => Ok(()),
        s => Err(format!("a heartbeat without a token was answered {s}, not 401: the ACL is not in force")),
    }
}

fn measure(setup: Setup, env: &Env, sizes: &Sizes, creds: &Credentials) -> Result<Row, String> {
    let (n, services) = (sizes.security_instances, sizes.security_services);
    let (proc, ready) = Proc::spawn_ready(
        &format!("sec-{}", setup.slug()),
        &env.bin("registry"),
        &registry_args(setup, creds),
        env.proxy_core,
        &env.work,
    )
    .map_err(|e| e.to_string())?;
    let addr = ready.addr("listen");
    let pid = proc.pid();
    let dial =
        if setup.tls() { Dial::Tls(creds.client.clone(), ServerName::from(addr.ip())) } else { Dial::Plain };
    let mut fleet = Fleet::new(n, services);
    if setup.tokens() {
        fleet = fleet.with_tokens(creds.secrets.clone());
    }
    let fleet = Arc::new(fleet);
    let warmup = if sizes.quick { Duration::from_secs(1) } else { Duration::from_secs(2) };
    let window = sizes.security_duration;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    let log_tail = |e: String| format!("{e}; log:\n{}", proc.log_tail());
    rt.block_on(async move {
        wait_health(&dial, addr).await?;
        if setup.tokens() {
            refuses_without_token(&dial, addr).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle_kib = procstat::rss_kib(pid);
        register_all(&dial, addr, fleet.clone()).await.map_err(|e| format!("registering: {e}"))?;
        let reqs = Arc::new(fleet.heartbeat_requests());
        // The generator's connections (and TLS handshakes) open at once, in
        // the warm-up; the window counts heartbeats only.
        let from = Instant::now() + warmup;
        let to = from + window;
        let hb = tokio::spawn(heartbeats(dial.clone(), vec![addr], reqs, (from, to, to)));
        tokio::time::sleep_until(from.into()).await;
        let (cpu0, j0) = (procstat::cpu_time(pid), procstat::cpu_jiffies());
        tokio::time::sleep_until(to.into()).await;
        let (cpu1, j1) = (procstat::cpu_time(pid), procstat::cpu_jiffies());
        let loaded_kib = procstat::rss_kib(pid);
        let hb = hb.await.map_err(|e| e.to_string())?;
        let cpu = cpu1.saturating_sub(cpu0);
        Ok(Row {
            setup,
            instances: n,
            services,
            due_rate: n as f64 / HEARTBEAT_INTERVAL.as_secs_f64(),
            done_rate: hb.ok as f64 / window.as_secs_f64(),
            failed: hb.failed,
            hist: hb.hist,
            cpu_per_1k_ms: cpu.as_secs_f64() * 1000.0 / (hb.ok.max(1) as f64 / 1000.0),
            cpu_share: 100.0 * cpu.as_secs_f64() / window.as_secs_f64(),
            idle_kib,
            loaded_kib,
            connects: hb.connects,
            busy: procstat::busy_percent(&j0, &j1),
        })
    })
    .map_err(log_tail)
}

fn pct_over(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:+.1} %", (a / b - 1.0) * 100.0)
    } else {
        "n/a".into()
    }
}

pub fn run(env: &Env, sizes: &Sizes) -> Section {
    let title = "Case 6: registry heartbeats with tokens and TLS";
    let creds = match credentials(env, sizes.security_services) {
        Ok(c) => c,
        Err(e) => return Section::error(title, &format!("cannot make the run's credentials: {e}")),
    };
    let mut b = String::new();
    let mut rows = Vec::new();
    for setup in Setup::ALL {
        eprintln!("  case 6: {}", setup.name());
        match measure(setup, env, sizes, &creds) {
            Ok(r) => rows.push(r),
            Err(e) => {
                let _ = writeln!(b, "- **{}** did not run: {e}\n", setup.name());
            }
        }
    }
    let _ = writeln!(
        b,
        "The registry (memory store, `--workers 1`) runs alone on core 0, as in case 4, once per configuration, \
         one after another in this run; one generator process on core 1 drives it. {} instances in {} services \
         are registered, then each heartbeats once per {} s on a fixed schedule over {HEARTBEAT_CONNS} keep-alive \
         connections (case 4's workload); latency runs from when each heartbeat was due. CPU is the registry's \
         user + system time over a {:.0} s window of heartbeats only, after the connections are open. \
         **plain**: no ACL, no TLS, the reference. **tokens**: `--acl-file` with `default = \"deny\"` and one \
         token per service (`write = [that service]`, stored as its SHA-256, as `registry init` writes it); every \
         registration and heartbeat carries `authorization: Bearer <its service's secret>` (64 hex characters). \
         **TLS**: `--tls-cert/--tls-key`, an ECDSA P-256 certificate from a CA made for the run \
         (`trellis_registry::pki`); the generator uses tokio-rustls (ring) trusting only that CA, ALPN \
         `http/1.1`, and keeps its connections open, so there is one handshake per connection, not per \
         heartbeat. **tokens + TLS**: both. The secrets, the CA and the certificate are made at run time in the \
         run's work directory and never printed.\n",
        sizes.security_instances,
        sizes.security_services,
        HEARTBEAT_INTERVAL.as_secs(),
        sizes.security_duration.as_secs_f64(),
    );
    let plain = rows.iter().find(|r| r.setup == Setup::Plain).map(|r| r.cpu_per_1k_ms);
    let _ = writeln!(
        b,
        "| configuration | instances / services | heartbeats/s due → done | failed | p50 / p99 heartbeat | registry CPU per 1k heartbeats | vs plain | registry CPU (% of a core) | RSS idle → loaded | heartbeat connections (TLS handshakes) | core 0 / core 1 busy |"
    );
    let _ = writeln!(b, "|---|---|---:|---:|---|---:|---:|---:|---|---:|---|");
    for r in &rows {
        let mib = |k: u64| k as f64 / 1024.0;
        let conns = if r.setup.tls() {
            format!("{} ({} handshakes)", HEARTBEAT_CONNS.min(r.instances), r.connects)
        } else {
            format!("{}", HEARTBEAT_CONNS.min(r.instances))
        };
        let _ = writeln!(
            b,
            "| {} | {} / {} | {:.0} → {:.0} | {} | {} / {} | {:.2} ms | {} | {:.0}% | {:.1} → {:.1} MiB | {conns} | {} |",
            r.setup.name(),
            r.instances,
            r.services,
            r.due_rate,
            r.done_rate,
            r.failed,
            us(r.hist.value_at_percentile(50.0) as f64 / 1000.0),
            us(r.hist.value_at_percentile(99.0) as f64 / 1000.0),
            r.cpu_per_1k_ms,
            plain.map_or_else(|| "n/a".into(), |p| ratio(r.cpu_per_1k_ms, p)),
            r.cpu_share,
            mib(r.idle_kib),
            mib(r.loaded_kib),
            r.busy.iter().map(|v| format!("{v:.0}%")).collect::<Vec<_>>().join(" / "),
        );
    }
    for r in rows.iter().filter(|r| r.done_rate < 0.97 * r.due_rate) {
        let reg_core = r.busy.first().copied().unwrap_or(0.0);
        let gen_core = r.busy.get(1).copied().unwrap_or(0.0);
        let limit = if reg_core > 90.0 && r.cpu_share < 70.0 {
            "core 0 was busy, but mostly with other work on the machine, not the registry"
        } else if reg_core > 90.0 {
            "the registry's core was saturated"
        } else if gen_core > 90.0 {
            "the generator's core was saturated"
        } else {
            "neither core was saturated"
        };
        let _ = writeln!(
            b,
            "\n**{}: {:.0} of {:.0} heartbeats/s due were completed: {limit}** (the registry used {:.0}% of a core; \
             cores busy {}). CPU per heartbeat is measured at the rate reached, and falls as the rate rises (one \
             wake-up serves more requests), so rows that reached different rates compare less well.",
            r.setup.name(),
            r.done_rate,
            r.due_rate,
            r.cpu_share,
            r.busy.iter().map(|v| format!("{v:.0}%")).collect::<Vec<_>>().join(" / "),
        );
    }
    let find = |s: Setup| rows.iter().find(|r| r.setup == s);
    let _ = writeln!(b, "\nTargets:\n");
    if sizes.quick {
        let _ = writeln!(
            b,
            "(Quick mode: a few seconds of CPU time in 10 ms ticks, too coarse to judge these.)\n"
        );
    }
    match (find(Setup::Plain), find(Setup::Tokens)) {
        (Some(p), Some(t)) => {
            let met = t.cpu_per_1k_ms <= TOKEN_BUDGET * p.cpu_per_1k_ms;
            let _ = writeln!(
                b,
                "- {} tokens cost at most 10 % more CPU per heartbeat than plain ({:.2} vs {:.2} ms per 1k \
                 heartbeats: {})",
                if met { "✅ met:" } else { "❌ not met:" },
                t.cpu_per_1k_ms,
                p.cpu_per_1k_ms,
                pct_over(t.cpu_per_1k_ms, p.cpu_per_1k_ms),
            );
        }
        _ => {
            let _ = writeln!(b, "- not measured: tokens cost at most 10 % more CPU per heartbeat than plain");
        }
    }
    match (find(Setup::Plain), find(Setup::Tls)) {
        (Some(p), Some(t)) => {
            let _ = write!(
                b,
                "- TLS, as measured: {:.2} ms per 1k heartbeats, {} vs plain, with {} handshakes for {} \
                 connections kept open, each carrying about {:.0} heartbeats/s",
                t.cpu_per_1k_ms,
                pct_over(t.cpu_per_1k_ms, p.cpu_per_1k_ms),
                t.connects,
                HEARTBEAT_CONNS.min(t.instances),
                t.done_rate / HEARTBEAT_CONNS.min(t.instances).max(1) as f64,
            );
            match find(Setup::TokensTls) {
                Some(tt) => {
                    let _ = writeln!(
                        b,
                        "; tokens on top of TLS: {:.2} ms, {} vs TLS alone",
                        tt.cpu_per_1k_ms,
                        pct_over(tt.cpu_per_1k_ms, t.cpu_per_1k_ms)
                    );
                }
                None => {
                    let _ = writeln!(b);
                }
            }
        }
        _ => {
            let _ = writeln!(b, "- TLS: not measured");
        }
    }
    Section { title: title.into(), body: b }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_entry_holds_the_digest_not_the_secret() {
        let rng = ring::rand::SystemRandom::new();
        let (secret, entry) = token_for(&rng, "svc-0001").unwrap();
        assert_eq!(secret.expose().len(), 64);
        assert!(!entry.contains(secret.expose()));
        assert!(entry.contains("write = [\"svc-0001\"]"));
        let digest = hex(ring::digest::digest(&ring::digest::SHA256, secret.expose().as_bytes()).as_ref());
        assert!(entry.contains(&format!("secret_sha256 = \"{digest}\"")));
        assert!(!format!("{secret:?}").contains(secret.expose()));
    }

    #[test]
    fn hex_is_lowercase_and_padded() {
        assert_eq!(hex(&[0x00, 0x0f, 0xab]), "000fab");
    }
}
