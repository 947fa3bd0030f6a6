//! Registers the local app once it is healthy, heartbeats its status, and
//! deregisters it on shutdown.
//!
//! The registry being unreachable never stops the sidecar: every failed call is
//! retried with full-jitter backoff whose ceiling is the heartbeat interval, so
//! a restarted registry hears from every sidecar within one interval. A
//! heartbeat answered `404 unknown_instance` (the registry lost its state)
//! re-registers at once. A `401`/`403` (the token is missing, unknown or
//! lacks the right to this service) is logged as an error each time, quoting
//! the registry's message (which names the token, never its secret), and
//! retried with the same backoff: a rotated token file is picked up by the
//! client, and `/ready` stays 503 until the registration goes through.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};
use trellis_shared::backoff::Backoff;
use trellis_shared::{
    ClientError, HealthStatus, HeartbeatRequest, InstanceId, RegisterRequest, RegistryClient, ServiceName,
};

use crate::discovery::ConnectivitySink;
use crate::health::{AppHealth, HealthReport};

/// The registry calls registration makes; [`RegistryClient`] in production,
/// a scripted fake in tests.
pub trait RegistryApi: Send + Sync + 'static {
    fn register(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &RegisterRequest,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &HeartbeatRequest,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
    fn deregister(
        &self,
        service: &ServiceName,
        id: &InstanceId,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

impl RegistryApi for RegistryClient {
    async fn register(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &RegisterRequest,
    ) -> Result<(), ClientError> {
        RegistryClient::register(self, service, id, req).await.map(|_| ())
    }
    async fn heartbeat(
        &self,
        service: &ServiceName,
        id: &InstanceId,
        req: &HeartbeatRequest,
    ) -> Result<(), ClientError> {
        RegistryClient::heartbeat(self, service, id, req).await
    }
    async fn deregister(&self, service: &ServiceName, id: &InstanceId) -> Result<(), ClientError> {
        RegistryClient::deregister(self, service, id).await
    }
}

/// Registration settings.
#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub service: ServiceName,
    pub id: InstanceId,
    /// What is registered (address, port, TTL, zone, weight, metadata); its
    /// status is set from the app's health at each registration.
    pub request: RegisterRequest,
    /// Time between heartbeats, and the ceiling of every retry delay. Default 1s.
    pub heartbeat_interval: Duration,
    /// First retry delay ceiling after a failed call. Default 100ms.
    pub backoff_base: Duration,
}

fn status_of(health: AppHealth) -> HealthStatus {
    match health {
        AppHealth::Healthy => HealthStatus::Passing,
        AppHealth::Unhealthy | AppHealth::Unknown => HealthStatus::Critical,
    }
}

/// Truncates the check's output to what the registry accepts.
fn bounded_output(s: &str) -> String {
    let max = trellis_shared::types::MAX_OUTPUT_LEN;
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// The registration loop. `registered` is true while the registry holds the
/// instance as far as this sidecar knows (the admin `/ready` reads it).
pub struct Registration<R> {
    api: R,
    config: RegistrationConfig,
    health: watch::Receiver<HealthReport>,
    registered: watch::Sender<bool>,
    sink: Arc<dyn ConnectivitySink>,
    backoff: Backoff,
    /// Whether the last call failed, so only the first failure and the recovery are logged.
    failing: bool,
}

impl<R: RegistryApi> Registration<R> {
    pub fn new(
        api: R,
        config: RegistrationConfig,
        health: watch::Receiver<HealthReport>,
        registered: watch::Sender<bool>,
        sink: Arc<dyn ConnectivitySink>,
    ) -> Self {
        let backoff = Backoff::new(config.backoff_base, config.heartbeat_interval);
        Registration { api, config, health, registered, sink, backoff, failing: false }
    }

    fn succeeded(&mut self) {
        self.sink.report(true);
        self.backoff.reset();
        if std::mem::take(&mut self.failing) {
            info!(service = %self.config.service, instance = %self.config.id, "registry reachable again");
        }
    }

    fn failed(&mut self, what: &str, e: &ClientError) -> Duration {
        self.sink.report(false);
        let refused = matches!(e, ClientError::Api { status, .. } if status.is_client_error());
        let auth = match e {
            ClientError::Api { status, body, .. } if e.is_auth() => Some((status, body)),
            _ => None,
        };
        if let Some((status, body)) = auth {
            self.sink.auth_refused();
            error!(
                service = %self.config.service,
                instance = %self.config.id,
                status = status.as_u16(),
                registry_message = %body.message,
                "{what} refused by the registry: the token is missing, unknown or has no write right on this service; check --token-file or TRELLIS_TOKEN"
            );
        } else if refused {
            // The registry answered but refused what we sent (a TTL outside its
            // bounds, say): retrying will not help until someone fixes the flags,
            // so say it loudly every time, at the capped retry pace.
            error!(service = %self.config.service, instance = %self.config.id, error = %e, "{what} refused by the registry; check the sidecar's flags");
        } else if !std::mem::replace(&mut self.failing, true) {
            warn!(service = %self.config.service, instance = %self.config.id, error = %e, "{what} failed; retrying");
        } else {
            debug!(service = %self.config.service, instance = %self.config.id, error = %e, "{what} failed again");
        }
        self.backoff.next_delay()
    }

    async fn register(&mut self) -> Result<(), ClientError> {
        let report = self.health.borrow().clone();
        let mut req = self.config.request.clone();
        req.status = Some(status_of(report.health));
        let r = self.api.register(&self.config.service, &self.config.id, &req).await;
        if r.is_ok() {
            self.succeeded();
            self.registered.send_replace(true);
            info!(
                service = %self.config.service,
                instance = %self.config.id,
                status = status_of(report.health).as_str(),
                "registered"
            );
        }
        r
    }

    /// Runs until `shutdown`, then deregisters (if registered) and returns.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Phase 1: wait for a healthy app, then register, retrying until it works.
        loop {
            let healthy = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = self.health.wait_for(|r| r.health == AppHealth::Healthy) => r.is_ok(),
            };
            if !healthy {
                // The health task is gone; nothing more will ever change.
                shutdown.cancelled().await;
                return;
            }
            match self.register().await {
                Ok(()) => break,
                Err(e) => {
                    let delay = self.failed("registration", &e);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // Phase 2: heartbeat every interval, and at once when health flips.
        self.health.mark_unchanged();
        let mut next = Instant::now() + self.config.heartbeat_interval;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(next) => {}
                r = self.health.changed() => {
                    if r.is_err() {
                        // Health task gone: keep heartbeating the last verdict on the timer.
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = tokio::time::sleep_until(next) => {}
                        }
                    }
                }
            }
            let report = self.health.borrow_and_update().clone();
            let req = HeartbeatRequest {
                status: Some(status_of(report.health)),
                output: Some(bounded_output(&report.output)),
            };
            // A heartbeat stuck on a hung registry must not delay deregistration.
            let r = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.api.heartbeat(&self.config.service, &self.config.id, &req) => r,
            };
            next = match r {
                Ok(()) => {
                    self.succeeded();
                    Instant::now() + self.config.heartbeat_interval
                }
                Err(e) if e.is_unknown_instance() => {
                    // The registry lost us (restart, or our lease expired): re-register at once.
                    self.succeeded();
                    info!(service = %self.config.service, instance = %self.config.id, "registry does not know this instance; re-registering");
                    self.registered.send_replace(false);
                    match self.register().await {
                        Ok(()) => Instant::now() + self.config.heartbeat_interval,
                        Err(e) => Instant::now() + self.failed("re-registration", &e),
                    }
                }
                Err(e) => Instant::now() + self.failed("heartbeat", &e),
            };
        }
        self.deregister().await;
    }

    async fn deregister(&mut self) {
        if !*self.registered.borrow() {
            return;
        }
        match self.api.deregister(&self.config.service, &self.config.id).await {
            Ok(()) => info!(service = %self.config.service, instance = %self.config.id, "deregistered"),
            Err(e) if e.is_unknown_instance() => {
                info!(service = %self.config.service, instance = %self.config.id, "already gone from the registry")
            }
            Err(e) => {
                warn!(service = %self.config.service, instance = %self.config.id, error = %e, "deregistration failed; the lease will expire")
            }
        }
        self.registered.send_replace(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::Mutex;
    use trellis_shared::{Address, ErrorBody, ErrorCode};

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Register(HealthStatus),
        Heartbeat(HealthStatus),
        Deregister,
    }

    #[derive(Clone, Copy)]
    enum Outcome {
        Ok,
        Down,
        Unknown,
    }

    /// Records each call with its (paused-clock) time and answers from a script;
    /// an empty script answers Ok.
    #[derive(Clone, Default)]
    struct Fake {
        calls: Arc<Mutex<Vec<(Call, Duration)>>>,
        script: Arc<Mutex<VecDeque<Outcome>>>,
        start: Arc<Mutex<Option<Instant>>>,
    }

    impl Fake {
        // The shared client's error type is what the trait returns; its size is not ours to change.
        #[allow(clippy::result_large_err)]
        fn answer(&self, call: Call) -> Result<(), ClientError> {
            let start = *self.start.lock().unwrap().get_or_insert_with(Instant::now);
            self.calls.lock().unwrap().push((call, start.elapsed()));
            let url = reqwest::Url::parse("http://registry:7600").unwrap();
            match self.script.lock().unwrap().pop_front().unwrap_or(Outcome::Ok) {
                Outcome::Ok => Ok(()),
                Outcome::Down => Err(ClientError::Protocol { url, reason: "connection refused".into() }),
                Outcome::Unknown => Err(ClientError::Api {
                    url,
                    status: reqwest::StatusCode::NOT_FOUND,
                    body: ErrorBody::new(ErrorCode::UnknownInstance, "no such instance"),
                }),
            }
        }
        fn calls(&self) -> Vec<(Call, Duration)> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl RegistryApi for Fake {
        async fn register(
            &self,
            _: &ServiceName,
            _: &InstanceId,
            req: &RegisterRequest,
        ) -> Result<(), ClientError> {
            self.answer(Call::Register(req.status.unwrap_or_default()))
        }
        async fn heartbeat(
            &self,
            _: &ServiceName,
            _: &InstanceId,
            req: &HeartbeatRequest,
        ) -> Result<(), ClientError> {
            self.answer(Call::Heartbeat(req.status.unwrap_or_default()))
        }
        async fn deregister(&self, _: &ServiceName, _: &InstanceId) -> Result<(), ClientError> {
            self.answer(Call::Deregister)
        }
    }

    struct NoSink;
    impl ConnectivitySink for NoSink {
        fn report(&self, _: bool) {}
    }

    struct Harness {
        fake: Fake,
        health: watch::Sender<HealthReport>,
        registered: watch::Receiver<bool>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    fn start(script: Vec<Outcome>, initial: AppHealth) -> Harness {
        let fake = Fake::default();
        *fake.script.lock().unwrap() = script.into();
        *fake.start.lock().unwrap() = Some(Instant::now());
        let (health, health_rx) = watch::channel(HealthReport { health: initial, output: String::new() });
        let (registered_tx, registered) = watch::channel(false);
        let config = RegistrationConfig {
            service: ServiceName::new("users").unwrap(),
            id: InstanceId::new("host-8080").unwrap(),
            request: RegisterRequest::new(Address::new("127.0.0.1").unwrap(), 8080),
            heartbeat_interval: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
        };
        let reg = Registration::new(fake.clone(), config, health_rx, registered_tx, Arc::new(NoSink));
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(reg.run(shutdown.clone()));
        Harness { fake, health, registered, shutdown, task }
    }

    fn set(h: &Harness, health: AppHealth) {
        h.health.send_replace(HealthReport { health, output: String::new() });
    }

    #[tokio::test(start_paused = true)]
    async fn registers_only_once_healthy_then_heartbeats_every_interval() {
        let h = start(vec![], AppHealth::Unknown);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(h.fake.calls().is_empty(), "registered before the app was healthy");
        set(&h, AppHealth::Healthy);
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let calls = h.fake.calls();
        assert_eq!(calls[0], (Call::Register(HealthStatus::Passing), Duration::from_secs(3)));
        let beats: Vec<_> = calls[1..].iter().map(|(_, t)| t.as_secs()).collect();
        assert_eq!(beats, vec![4, 5, 6]);
        assert!(*h.registered.borrow());
        h.shutdown.cancel();
        h.task.await.unwrap();
        assert_eq!(h.fake.calls().last().unwrap().0, Call::Deregister);
        assert!(!*h.registered.borrow());
    }

    #[tokio::test(start_paused = true)]
    async fn health_flips_are_heartbeated_at_once() {
        let h = start(vec![], AppHealth::Healthy);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        set(&h, AppHealth::Unhealthy);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            h.fake.calls().last().unwrap(),
            &(Call::Heartbeat(HealthStatus::Critical), Duration::from_millis(1500))
        );
        set(&h, AppHealth::Healthy);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(h.fake.calls().last().unwrap().0, Call::Heartbeat(HealthStatus::Passing));
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn retries_with_backoff_capped_at_the_heartbeat_interval() {
        // Registry down for 12 attempts, then up.
        let h = start(vec![Outcome::Down; 12], AppHealth::Healthy);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let calls = h.fake.calls();
        let registers: Vec<Duration> =
            calls.iter().filter(|(c, _)| matches!(c, Call::Register(_))).map(|(_, t)| *t).collect();
        assert_eq!(registers.len(), 13, "{calls:?}");
        for w in registers.windows(2) {
            assert!(
                w[1] - w[0] <= Duration::from_secs(1),
                "retry gap {:?} exceeds the heartbeat interval",
                w[1] - w[0]
            );
        }
        assert!(*h.registered.borrow());
        // Then heartbeats resume on the interval.
        assert!(calls.iter().any(|(c, _)| matches!(c, Call::Heartbeat(_))));
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn heartbeat_failures_retry_within_the_interval() {
        // register ok, hb ok, then 5 failed heartbeats, then ok.
        let mut script = vec![Outcome::Ok, Outcome::Ok];
        script.extend([Outcome::Down; 5]);
        let h = start(script, AppHealth::Healthy);
        tokio::time::sleep(Duration::from_secs(12)).await;
        let beats: Vec<Duration> =
            h.fake.calls().iter().filter(|(c, _)| matches!(c, Call::Heartbeat(_))).map(|(_, t)| *t).collect();
        for w in beats.windows(2) {
            assert!(w[1] - w[0] <= Duration::from_secs(1), "gap {:?}", w[1] - w[0]);
        }
        assert!(*h.registered.borrow(), "a failing registry must not unregister us locally");
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_instance_re_registers_at_once() {
        // register ok, then the heartbeat at 1s answers unknown_instance.
        let h = start(vec![Outcome::Ok, Outcome::Unknown], AppHealth::Healthy);
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let calls = h.fake.calls();
        assert_eq!(
            &calls[..4],
            &[
                (Call::Register(HealthStatus::Passing), Duration::ZERO),
                (Call::Heartbeat(HealthStatus::Passing), Duration::from_secs(1)),
                (Call::Register(HealthStatus::Passing), Duration::from_secs(1)),
                (Call::Heartbeat(HealthStatus::Passing), Duration::from_secs(2)),
            ]
        );
        assert!(*h.registered.borrow());
        h.shutdown.cancel();
        h.task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_before_registration_does_not_deregister() {
        let h = start(vec![], AppHealth::Unhealthy);
        tokio::time::sleep(Duration::from_secs(2)).await;
        h.shutdown.cancel();
        h.task.await.unwrap();
        assert!(h.fake.calls().is_empty());
    }

    #[test]
    fn output_is_bounded_on_a_char_boundary() {
        let long = "é".repeat(5000);
        let out = bounded_output(&long);
        assert!(out.len() <= trellis_shared::types::MAX_OUTPUT_LEN);
        assert!(out.chars().all(|c| c == 'é'));
    }
}
