//! Keeping the mesh identity current: one task, the identity's only writer.
//!
//! Each round makes a fresh ECDSA P-256 key in memory (never written, never
//! sent), wraps its public half in a certificate request, has the registry
//! sign it (`POST /v1/identity/sign`) and installs the leaf, the roots and the
//! key into [`MeshIdentity`], which the TLS configurations read on their next
//! handshake.
//!
//! When: at 70 % of the leaf's remaining lifetime, give or take 10 % of that
//! delay ([`renew_after`]), so sidecars started together drift apart instead
//! of renewing in step. A failed round keeps the current leaf (serving goes on
//! until it expires), is logged and counted, and is retried after a full-jitter
//! backoff whose ceiling is a tenth of the last leaf's lifetime, within
//! [`RenewConfig::backoff_base`] and [`RenewConfig::backoff_cap`]: a 24 h leaf
//! does not hammer a registry that is down, a 10 s leaf retries often enough to
//! renew before it expires.

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use trellis_shared::backoff::Backoff;
use trellis_shared::identity::{SignRequest, SignResponse};
use trellis_shared::{ClientError, RegistryClient};

use super::{IdentityError, MeshIdentity};

/// Where in a leaf's remaining lifetime it is renewed.
pub const RENEW_AT: f64 = 0.7;
/// The renewal delay varies by this share of itself either way.
pub const JITTER: f64 = 0.1;

/// The renewal task's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RenewConfig {
    /// Smallest retry ceiling after a failed round. Default 200ms.
    pub backoff_base: Duration,
    /// Largest retry ceiling after a failed round. Default 5s.
    pub backoff_cap: Duration,
}

impl Default for RenewConfig {
    fn default() -> Self {
        RenewConfig { backoff_base: Duration::from_millis(200), backoff_cap: Duration::from_secs(5) }
    }
}

/// When to renew a leaf with `remaining` lifetime: [`RENEW_AT`] of it, moved
/// by up to [`JITTER`] of that either way; `unit` is uniform in `[0, 1)`.
pub fn renew_after(remaining: Duration, unit: f64) -> Duration {
    let share = RENEW_AT * (1.0 - JITTER + 2.0 * JITTER * unit.clamp(0.0, 1.0));
    remaining.mul_f64(share)
}

/// The retry ceiling while a leaf of `lifetime` is held.
fn retry_cap(lifetime: Duration, config: &RenewConfig) -> Duration {
    (lifetime / 10).clamp(config.backoff_base, config.backoff_cap.max(config.backoff_base))
}

/// The registry call renewal makes: [`RegistryClient`] in production, a
/// scripted fake in tests.
pub trait Signer: Send + Sync + 'static {
    fn sign(&self, req: &SignRequest) -> impl Future<Output = Result<SignResponse, ClientError>> + Send;
}

impl Signer for RegistryClient {
    async fn sign(&self, req: &SignRequest) -> Result<SignResponse, ClientError> {
        RegistryClient::sign(self, req).await
    }
}

/// Why a round failed.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot make a key or a certificate request: {0}")]
    Request(#[from] rcgen::Error),
    #[error(transparent)]
    Registry(#[from] ClientError),
    #[error("the registry certified {got:?}, not {wanted:?}")]
    WrongIdentity { got: String, wanted: String },
    #[error("the registry's not_after {0:?} is not an RFC 3339 time in the future")]
    NotAfter(String),
    #[error("cannot install the certificate: {0}")]
    Install(#[from] IdentityError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The identity's metrics; clones share the values with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct IdentityMetrics {
    renewals: Family<ResultLabels, Counter>,
    expiry: Gauge<f64, AtomicU64>,
}

impl IdentityMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "identity_renewals",
            "Rounds of getting the mesh certificate signed, by result (ok, failed)",
            self.renewals.clone(),
        );
        registry.register(
            "identity_expiry_seconds",
            "Seconds until the mesh certificate expires (negative once expired, 0 before the first)",
            self.expiry.clone(),
        );
    }

    fn renewed(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.renewals.get_or_create(&ResultLabels { result }).inc();
    }

    /// Sets the expiry gauge from the current leaf's `not_after` (at scrape time).
    pub fn set_expiry(&self, not_after: Option<SystemTime>) {
        let now = SystemTime::now();
        let seconds = match not_after {
            None => 0.0,
            Some(t) => match t.duration_since(now) {
                Ok(left) => left.as_secs_f64(),
                Err(past) => -past.duration().as_secs_f64(),
            },
        };
        self.expiry.set(seconds);
    }

    /// Rounds counted with `result` (`ok` or `failed`).
    pub fn renewals(&self, ok: bool) -> u64 {
        let result = if ok { "ok" } else { "failed" };
        self.renewals.get_or_create(&ResultLabels { result }).get()
    }
}

/// The renewal task.
pub struct Renewer<S> {
    signer: S,
    identity: MeshIdentity,
    metrics: IdentityMetrics,
    config: RenewConfig,
}

impl<S: Signer> Renewer<S> {
    pub fn new(signer: S, identity: MeshIdentity, metrics: IdentityMetrics, config: RenewConfig) -> Self {
        Renewer { signer, identity, metrics, config }
    }

    /// Renews until `stop`; the first round runs at once.
    pub async fn run(self, stop: CancellationToken) {
        let mut backoff = Backoff::new(self.config.backoff_base, self.config.backoff_cap);
        loop {
            let delay = match self.round().await {
                Ok(lifetime) => {
                    self.metrics.renewed(true);
                    backoff = Backoff::new(self.config.backoff_base, retry_cap(lifetime, &self.config));
                    let next = renew_after(lifetime, rand::random::<f64>());
                    info!(
                        identity = %self.spiffe_id(),
                        valid_for_s = lifetime.as_secs(),
                        renew_in_s = next.as_secs(),
                        "mesh certificate installed"
                    );
                    next
                }
                Err(e) => {
                    self.metrics.renewed(false);
                    let next = backoff.next_delay();
                    let left = self.identity.not_after().map(|t| match t.duration_since(SystemTime::now()) {
                        Ok(left) => left.as_secs() as i64,
                        Err(past) => -(past.duration().as_secs() as i64),
                    });
                    match left {
                        Some(left) => warn!(
                            identity = %self.spiffe_id(),
                            error = %e,
                            expires_in_s = left,
                            retry_in_ms = next.as_millis() as u64,
                            "mesh certificate renewal failed; keeping the current one"
                        ),
                        None => warn!(
                            identity = %self.spiffe_id(),
                            error = %e,
                            retry_in_ms = next.as_millis() as u64,
                            "cannot get a mesh certificate yet"
                        ),
                    }
                    next
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    fn spiffe_id(&self) -> &str {
        self.identity.spiffe_id()
    }

    /// One round: key, request, signature, installation. Returns the new
    /// leaf's remaining lifetime.
    async fn round(&self) -> Result<Duration, RenewError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        // The registry reads only the key; a request carries no names.
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key)?.pem()?;
        let req = SignRequest { service: self.identity.service().clone(), csr };
        let signed = self.signer.sign(&req).await?;
        let wanted = self.spiffe_id();
        if signed.spiffe_id != wanted {
            return Err(RenewError::WrongIdentity { got: signed.spiffe_id, wanted: wanted.to_string() });
        }
        let lifetime = signed
            .expires()
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| RenewError::NotAfter(signed.not_after.clone()))?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        self.identity.install(&signed.ca_bundle, &signed.certificate, key)?;
        Ok(lifetime)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use rcgen::{
        BasicConstraints, CertificateSigningRequestParams, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyUsagePurpose, SanType,
    };
    use tokio::time::Instant;
    use trellis_shared::{ErrorBody, ErrorCode, ServiceName};

    use super::*;
    use crate::identity::TrustDomain;

    #[test]
    fn renews_at_seventy_percent_within_the_jitter() {
        let day = Duration::from_secs(86_400);
        assert_eq!(renew_after(day, 0.5), day.mul_f64(0.7));
        assert_eq!(renew_after(day, 0.0), day.mul_f64(0.63));
        assert!((renew_after(day, 1.0).as_secs_f64() - day.as_secs_f64() * 0.77).abs() < 1e-6);
        for _ in 0..1000 {
            let d = renew_after(Duration::from_secs(10), rand::random());
            assert!(d >= Duration::from_millis(6300) && d <= Duration::from_millis(7700), "{d:?}");
        }
        let c = RenewConfig::default();
        assert_eq!(retry_cap(day, &c), Duration::from_secs(5));
        assert_eq!(retry_cap(Duration::from_secs(10), &c), Duration::from_secs(1));
        assert_eq!(retry_cap(Duration::from_secs(1), &c), Duration::from_millis(200));
    }

    /// A CA that signs the way the registry does, for a fake registry.
    struct TestCa {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    impl TestCa {
        fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
            let pem = params.self_signed(&key).unwrap().pem();
            TestCa { issuer: Issuer::new(params, key), pem }
        }

        fn sign(&self, req: &SignRequest, ttl: Duration) -> SignResponse {
            let csr = CertificateSigningRequestParams::from_pem(&req.csr).unwrap();
            assert!(csr.params.subject_alt_names.is_empty(), "the request carries no names");
            let id = trellis_shared::identity::spiffe_id("trellis.local", &req.service);
            let mut params = CertificateParams::default();
            params.distinguished_name = DistinguishedName::new();
            params.subject_alt_names = vec![SanType::URI(id.clone().try_into().unwrap())];
            params.extended_key_usages =
                vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
            let now = SystemTime::now();
            params.not_before = (now - Duration::from_secs(60)).into();
            params.not_after = (now + ttl).into();
            let leaf = params.signed_by(&csr.public_key, &self.issuer).unwrap();
            SignResponse {
                spiffe_id: id,
                certificate: leaf.pem(),
                ca_bundle: self.pem.clone(),
                not_after: trellis_shared::identity::rfc3339(now + ttl),
            }
        }
    }

    /// What the fake registry does with each call, in order; past the script, sign.
    #[derive(Clone, Copy, Debug)]
    enum Answer {
        Sign,
        Fail,
    }

    #[derive(Clone)]
    struct Fake {
        ca: Arc<TestCa>,
        ttl: Duration,
        script: Arc<Mutex<VecDeque<Answer>>>,
        calls: Arc<Mutex<Vec<(Instant, bool)>>>,
    }

    impl Signer for Fake {
        async fn sign(&self, req: &SignRequest) -> Result<SignResponse, ClientError> {
            let answer = self.script.lock().unwrap().pop_front().unwrap_or(Answer::Sign);
            let ok = matches!(answer, Answer::Sign);
            let signed_before = {
                let mut calls = self.calls.lock().unwrap();
                let n = calls.iter().filter(|(_, ok)| *ok).count() as u32;
                calls.push((Instant::now(), ok));
                n
            };
            if ok {
                // The wall clock hardly moves under a paused tokio clock: each
                // leaf lives a second longer than the last, so leaves differ.
                return Ok(self.ca.sign(req, self.ttl + Duration::from_secs(signed_before.into())));
            }
            Err(ClientError::Api {
                url: "http://registry".parse().unwrap(),
                status: reqwest::StatusCode::SERVICE_UNAVAILABLE,
                body: ErrorBody::new(ErrorCode::Unavailable, "down"),
            })
        }
    }

    struct Harness {
        fake: Fake,
        identity: MeshIdentity,
        metrics: IdentityMetrics,
        stop: CancellationToken,
        start: Instant,
    }

    fn start(ttl: Duration, script: Vec<Answer>) -> Harness {
        let fake = Fake {
            ca: Arc::new(TestCa::new()),
            ttl,
            script: Arc::new(Mutex::new(script.into())),
            calls: Arc::default(),
        };
        let identity = MeshIdentity::new(TrustDomain::default(), ServiceName::new("users").unwrap());
        let metrics = IdentityMetrics::default();
        let stop = CancellationToken::new();
        let renewer = Renewer::new(fake.clone(), identity.clone(), metrics.clone(), RenewConfig::default());
        let start = Instant::now();
        tokio::spawn(renewer.run(stop.clone()));
        Harness { fake, identity, metrics, stop, start }
    }

    impl Harness {
        /// Each call's time since the start (ms) and whether it was signed.
        fn calls(&self) -> Vec<(u128, bool)> {
            self.fake
                .calls
                .lock()
                .unwrap()
                .iter()
                .map(|(t, ok)| ((*t - self.start).as_millis(), *ok))
                .collect()
        }
    }

    // The renewal delays are measured on tokio's paused clock; the leaf's
    // lifetime comes from the wall clock (what the registry signs), which
    // moves by microseconds during a test, hence bounds of a few ms.

    #[tokio::test(start_paused = true)]
    async fn renews_every_leaf_at_about_seventy_percent_of_its_lifetime() {
        let h = start(Duration::from_secs(100), vec![]);
        tokio::time::sleep(Duration::from_secs(300)).await;
        let calls = h.calls();
        assert!(calls.len() >= 4, "{calls:?}");
        assert_eq!(calls[0], (0, true), "the first round runs at once");
        for (i, pair) in calls.windows(2).enumerate() {
            // Leaf i lives 100 + i s, less up to 1 s: not_after has whole seconds.
            let lifetime = 100_000 + 1000 * i as u128;
            let (low, high) = ((lifetime - 1000) * 63 / 100, lifetime * 77 / 100);
            let gap = pair[1].0 - pair[0].0;
            assert!((low..=high).contains(&gap), "renewed after {gap} ms of a {lifetime} ms leaf: {calls:?}");
        }
        assert!(h.identity.not_after().is_some());
        assert_eq!(h.metrics.renewals(true), calls.len() as u64);
        assert_eq!(h.metrics.renewals(false), 0);
        h.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_renewal_keeps_the_leaf_and_retries_with_capped_backoff() {
        let fails = vec![Answer::Fail; 6];
        let mut script = vec![Answer::Sign];
        script.extend(fails);
        let h = start(Duration::from_secs(20), script);
        // First leaf at once; renewal due at 12.6..15.4 s.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let first = h.identity.not_after().expect("a leaf at once");
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(h.calls().len(), 1);
        // Six failures: each retry within the ceiling, which doubles from
        // 200 ms to a tenth of the 20 s lifetime (2 s).
        tokio::time::sleep(Duration::from_secs(20)).await;
        let calls = h.calls();
        assert!(calls.len() >= 8, "{calls:?}");
        assert!(calls[1..7].iter().all(|(_, ok)| !ok), "{calls:?}");
        let ceilings = [200, 400, 800, 1600, 2000, 2000];
        for (i, ceiling) in ceilings.iter().enumerate() {
            let gap = calls[i + 2].0 - calls[i + 1].0;
            assert!(
                gap <= ceiling + 1,
                "retry {i} after {gap} ms, above its {ceiling} ms ceiling: {calls:?}"
            );
        }
        assert!(calls[7].1, "signed again once the registry answers: {calls:?}");
        assert_eq!(h.metrics.renewals(false), 6);
        let renewed = h.identity.not_after().unwrap();
        assert!(renewed > first, "the new leaf replaced the old one");
        h.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn failures_never_drop_the_current_leaf() {
        let mut script = vec![Answer::Sign];
        script.extend(vec![Answer::Fail; 1000]);
        let h = start(Duration::from_secs(10), script);
        tokio::time::sleep(Duration::from_millis(1)).await;
        let first = h.identity.not_after().unwrap();
        for _ in 0..30 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            assert_eq!(h.identity.not_after(), Some(first), "the leaf stays while renewals fail");
        }
        let failed = h.metrics.renewals(false);
        // From 7 s to 31 s with a 1 s ceiling: at least one retry a second.
        assert!(failed >= 20, "{failed} failures counted");
        h.stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_registry_the_first_leaf_is_retried_until_it_comes() {
        let h = start(Duration::from_secs(10), vec![Answer::Fail; 5]);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let calls = h.calls();
        assert_eq!(calls.iter().filter(|(_, ok)| !ok).count(), 5);
        assert!(calls[5].1);
        assert!(calls[5].0 <= 200 + 400 + 800 + 1600 + 3200 + 5, "{calls:?}");
        assert!(h.identity.not_after().is_some());
        h.stop.cancel();
    }

    #[test]
    fn the_expiry_gauge_counts_down_and_below_zero() {
        let m = IdentityMetrics::default();
        m.set_expiry(None);
        assert_eq!(m.expiry.get(), 0.0);
        m.set_expiry(Some(SystemTime::now() + Duration::from_secs(100)));
        assert!((99.0..=100.0).contains(&m.expiry.get()));
        m.set_expiry(Some(SystemTime::now() - Duration::from_secs(5)));
        assert!((-6.0..=-5.0).contains(&m.expiry.get()));
    }
}
