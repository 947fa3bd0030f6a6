//! The sidecar's mesh identity against the real registry: the first
//! certificate gates `/ready`, short-lived leaves (`--cert-ttl`) are renewed
//! again and again, and a registry that is away longer than a renewal
//! attempt costs failed rounds, counted, but not the certificate, which is
//! renewed once the registry is back on the same port.
//!
//! Build first: `cargo build --release --workspace --bins`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use trellis_tests::mesh::MeshSecrets;
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{strings, wait_for, RegistryProc, SidecarProc};

/// Tests start several processes each; one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WITHIN: Duration = Duration::from_secs(60);

/// The value of the sidecar's metric line starting `line_start` (name and labels).
async fn metric(admin: SocketAddr, line_start: &str) -> Option<f64> {
    let text = reqwest::get(format!("http://{admin}/metrics")).await.ok()?.text().await.ok()?;
    text.lines().find(|l| l.starts_with(line_start))?.rsplit_once(' ')?.1.parse().ok()
}

async fn renewals(admin: SocketAddr, result: &str) -> f64 {
    let line = format!("trellis_sidecar_identity_renewals_total{{result=\"{result}\"}}");
    metric(admin, &line).await.unwrap_or(0.0)
}

async fn expiry(admin: SocketAddr) -> f64 {
    metric(admin, "trellis_sidecar_identity_expiry_seconds").await.expect("the expiry gauge")
}

async fn registry(mesh: &MeshSecrets, name: &str, ttl: &str, on: Option<SocketAddr>) -> RegistryProc {
    let mut args = mesh.registry_args();
    args.extend(strings(&["--cert-ttl", ttl]));
    match on {
        None => RegistryProc::start(name, &args).await,
        Some(addr) => RegistryProc::start_on(name, addr, &args).await,
    }
}

/// A pure client sidecar holding the `web` identity.
async fn sidecar(mesh: &MeshSecrets, name: &str, reg: &RegistryProc) -> SidecarProc {
    let mut args = mesh.sidecar_args("web");
    args.extend(strings(&["--identity", "web"]));
    SidecarProc::start(name, &reg.url(), &args, WITHIN).await
}

#[tokio::test]
async fn short_lived_leaves_are_renewed_before_they_expire() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshSecrets::generate("sidecar-identity-renew", &["web"]);
    let reg = registry(&mesh, "sidecar-identity-renew-registry", "10s", None).await;
    let started = Instant::now();
    let sc = sidecar(&mesh, "sidecar-identity-renew", &reg).await;
    println!("ready with its first certificate after {:?}", started.elapsed());
    assert_eq!(renewals(sc.admin, "ok").await, 1.0);
    let first = expiry(sc.admin).await;
    assert!(first > 5.0 && first <= 10.0, "a fresh 10 s leaf has {first} s left");

    // Two renewals more, each at about 7 s of a 10 s leaf: the gauge never
    // reaches zero.
    let lowest = std::cell::Cell::new(first);
    let admin = sc.admin;
    wait_for("two renewals", WITHIN, || {
        let lowest = &lowest;
        async move {
            lowest.set(lowest.get().min(expiry(admin).await));
            (renewals(admin, "ok").await >= 3.0).then_some(())
        }
    })
    .await;
    let lowest = lowest.get();
    let took = started.elapsed();
    println!("3 certificates in {took:?}; least time left seen {lowest:.2} s");
    assert!(lowest > 0.0, "the certificate expired before its renewal ({lowest} s left)");
    assert!(took >= Duration::from_secs(12), "two renewals at ~70 % of 10 s take over 12 s, took {took:?}");
    assert_eq!(renewals(sc.admin, "failed").await, 0.0);
    assert!(!sc.proc.log_text().contains("PRIVATE KEY"), "the key never shows in the log");
}

#[tokio::test]
async fn a_registry_outage_keeps_the_certificate_and_renewal_resumes() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshSecrets::generate("sidecar-identity-outage", &["web"]);
    // 30 s leaves: renewal at 19-23 s, retries at most 3 s apart.
    let reg = registry(&mesh, "sidecar-identity-outage-registry", "30s", None).await;
    let addr = reg.addr;
    let sc = sidecar(&mesh, "sidecar-identity-outage", &reg).await;
    let issued = Instant::now();
    drop(reg);

    // Renewal comes due with the registry gone: failed rounds, counted.
    let failed_at = wait_for("two failed renewals", WITHIN, || async {
        (renewals(sc.admin, "failed").await >= 2.0).then_some(Instant::now())
    })
    .await;
    let left = expiry(sc.admin).await;
    println!("2 failures {:?} after issue; {left:.1} s left on the certificate", failed_at - issued);
    assert!(left > 0.0, "the certificate is kept until it expires ({left} s left)");
    assert_eq!(renewals(sc.admin, "ok").await, 1.0);
    let ready = reqwest::get(format!("http://{}/ready", sc.admin)).await.unwrap();
    assert!(ready.status().is_success(), "still ready with the current certificate");

    // The registry back on its port: the next retry renews.
    let back = registry(&mesh, "sidecar-identity-outage-registry-2", "30s", Some(addr)).await;
    let restarted = Instant::now();
    wait_for("a renewal once the registry is back", WITHIN, || async {
        (renewals(sc.admin, "ok").await >= 2.0).then_some(())
    })
    .await;
    let fresh = expiry(sc.admin).await;
    let failures = renewals(sc.admin, "failed").await;
    println!(
        "renewed {:?} after the restart, after {failures} failures; {fresh:.1} s left",
        restarted.elapsed()
    );
    assert!(fresh > 20.0, "a fresh 30 s leaf ({fresh} s left)");
    assert!(sc.proc.log_text().contains("keeping the current one"), "failures are logged");
    drop(back);
}

#[tokio::test]
async fn ready_waits_for_the_first_certificate() {
    let _serial = SERIAL.lock().await;
    let mesh = MeshSecrets::generate("sidecar-identity-ready", &["web", "users"]);
    let reg = registry(&mesh, "sidecar-identity-ready-registry", "1h", None).await;
    // The sidecar starts with a token that may not write `web`: every round is
    // refused (403) until the token file holds web's token, which the client
    // re-reads within a second.
    let token = unique_path(&log_dir(), "sidecar-identity-ready", "token");
    std::fs::write(&token, mesh.token("users")).unwrap();
    let args = strings(&["--token-file", &token.display().to_string(), "--mtls", "--identity", "web"]);
    let sc = SidecarProc::spawn("sidecar-identity-ready", &reg.url(), &args).await;
    wait_for("refused signing rounds", WITHIN, || async {
        (renewals(sc.admin, "failed").await >= 2.0).then_some(())
    })
    .await;
    let ready = reqwest::get(format!("http://{}/ready", sc.admin)).await.unwrap();
    assert_eq!(ready.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert!(ready.text().await.unwrap().contains("no mesh certificate"));
    assert_eq!(expiry(sc.admin).await, 0.0, "no certificate: the gauge is 0");
    assert!(sc.proc.log_text().contains("cannot get a mesh certificate yet"));

    std::fs::write(&token, mesh.token("web")).unwrap();
    let granted = Instant::now();
    trellis_tests::wait_http_ok(&format!("http://{}/ready", sc.admin), WITHIN).await;
    println!("ready {:?} after the token was fixed", granted.elapsed());
    assert!(expiry(sc.admin).await > 3500.0, "a one-hour leaf");
    assert!(!sc.proc.log_text().contains(&mesh.token("web")), "no token in the log");
}
