//! The attempt loop's bookkeeping, shared by plain requests ([`super::forward`])
//! and upgrades ([`super::upgrade`]): which endpoints this request tried, how
//! many attempts it made, the deadline every attempt and backoff ends at, the
//! retry budget, and what each attempt's outcome does to its endpoint's
//! outlier state (ejection within the ejected-share bound).
//!
//! The caller keeps the part that differs: how an attempt is sent and which
//! failures its protocol may send again ([`crate::retry::may_retry`] for
//! requests, only failed connects for upgrades).

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};
use trellis_shared::backoff::Backoff;

use super::ProxyConfig;
use crate::balance::{choose, Pick};
use crate::endpoints::{Endpoint, EndpointSet, ServiceEndpoints, ServicePolicy};
use crate::error::ProxyError;
use crate::outlier::{may_eject, Outcome, Via};

/// One request's attempts against one snapshot of a service's endpoints.
pub(super) struct Attempts<'a> {
    config: &'a ProxyConfig,
    svc: &'a ServiceEndpoints,
    policy: &'a ServicePolicy,
    set: &'a EndpointSet,
    timeout: Duration,
    deadline: Instant,
    max: u32,
    made: u32,
    tried: Vec<usize>,
    backoff: Option<Backoff>,
}

impl<'a> Attempts<'a> {
    /// Starts the request's accounting: it counts towards the retry budget
    /// now, and everything ends `timeout` after `start`.
    pub fn new(
        config: &'a ProxyConfig,
        svc: &'a ServiceEndpoints,
        policy: &'a ServicePolicy,
        set: &'a EndpointSet,
        start: Instant,
        timeout: Duration,
    ) -> Self {
        policy.budget.deposit(start);
        Attempts {
            config,
            svc,
            policy,
            set,
            timeout,
            deadline: start + timeout,
            max: config.max_attempts.max(1),
            made: 0,
            tried: Vec::new(),
            backoff: None,
        }
    }

    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Attempts made so far, the current one included.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// Whether another attempt could follow this one (before the budget is asked).
    pub fn has_more(&self) -> bool {
        self.made < self.max
    }

    /// The endpoint for the next attempt. A retry that finds the deadline
    /// passed is a timeout.
    pub fn next(&mut self) -> Result<Pick<'a>, ProxyError> {
        self.made += 1;
        let now = Instant::now();
        if self.made > 1 && now >= self.deadline {
            return Err(self.timed_out(self.timeout));
        }
        choose(self.set, &self.tried, now, &self.config.balance, &self.policy.zone)
            .ok_or_else(|| ProxyError::NoEndpoints(self.svc.name.clone()))
    }

    /// Another endpoint for the same attempt, when `pick`'s connection is slow
    /// to come: one this request has not tried, in normal rotation (never a
    /// probe or panic mode, which are not worth a duplicate connect). It counts
    /// as tried from now on.
    pub fn alternative(&mut self, pick: &Pick<'_>) -> Option<Pick<'a>> {
        self.alternative_to(pick.index)
    }

    /// [`Attempts::alternative`] to the endpoint at `index`.
    pub fn alternative_to(&mut self, index: usize) -> Option<Pick<'a>> {
        if !self.tried.contains(&index) {
            self.tried.push(index);
        }
        let alt = choose(self.set, &self.tried, Instant::now(), &self.config.balance, &self.policy.zone)?;
        if alt.via != Via::Normal {
            return None;
        }
        self.tried.push(alt.index);
        Some(alt)
    }

    /// The attempt got an answer its endpoint is not blamed for.
    pub fn succeeded(&self, pick: &mut Pick<'_>) {
        let outlier = &pick.endpoint.state.outlier;
        let was_ejected = outlier.is_ejected();
        outlier.record(Outcome::Success, pick.via, &self.config.outlier, pick.at, || true);
        if was_ejected && !outlier.is_ejected() {
            info!(service = %self.svc.name, instance = %pick.endpoint.id, via = ?pick.via, "endpoint restored");
        }
        pick.settled();
    }

    /// The attempt failed in a way its endpoint is blamed for; may eject it.
    pub fn failed(&self, pick: &mut Pick<'_>, outcome: Outcome) {
        self.record_failure(pick.endpoint, pick.via, pick.at, outcome);
        pick.settled();
    }

    /// An attempt that lost to its hedge, still without an answer: slow
    /// enough to count as a failure towards ejection, so a frozen endpoint
    /// leaves rotation instead of costing every request the hedge delay.
    pub fn lost_to_hedge(&self, endpoint: &Endpoint, via: Via, at: Instant) {
        self.record_failure(endpoint, via, at, Outcome::Failure);
    }

    fn record_failure(&self, ep: &Endpoint, via: Via, at: Instant, outcome: Outcome) {
        let config = &self.config.outlier;
        let set = self.set;
        let may = || {
            let ejected = set.endpoints.iter().filter(|e| e.state.outlier.is_ejected()).count();
            may_eject(set.endpoints.len(), ejected, config.max_ejected_percent)
        };
        if let Some(duration) = ep.state.outlier.record(outcome, via, config, at, may) {
            self.policy.metrics.ejections.inc();
            info!(service = %self.svc.name, instance = %ep.id, authority = %ep.authority, ?outcome, ejection = ?duration, "endpoint ejected");
        }
    }

    /// Whether the failed attempt may be followed by another: the protocol
    /// allows it (`allowed`), attempts and time are left, and the retry budget
    /// pays for it (a refusal is counted).
    pub fn may_retry(&self, allowed: bool) -> bool {
        if !(allowed && self.has_more() && Instant::now() < self.deadline) {
            return false;
        }
        if !self.policy.budget.try_withdraw(Instant::now()) {
            self.policy.metrics.retries_refused.inc();
            debug!(service = %self.svc.name, "retry refused by the budget");
            return false;
        }
        true
    }

    /// Whether a late attempt may be hedged now: attempts and time are left,
    /// and the retry budget pays for the hedge (which then counts as an
    /// attempt, and in the `hedges` metric).
    pub fn may_hedge(&mut self) -> bool {
        if !(self.has_more() && Instant::now() < self.deadline) {
            return false;
        }
        if !self.policy.budget.try_withdraw(Instant::now()) {
            self.policy.metrics.retries_refused.inc();
            return false;
        }
        self.made += 1;
        self.policy.metrics.hedges.inc();
        true
    }

    /// Before the next attempt: remembers the endpoint just tried, counts the
    /// retry, and waits out a full-jitter backoff (never past the deadline).
    pub async fn back_off(&mut self, tried: usize) {
        self.policy.metrics.retries.inc();
        if !self.tried.contains(&tried) {
            self.tried.push(tried);
        }
        let retry = &self.config.retry;
        let delay = self
            .backoff
            .get_or_insert_with(|| Backoff::new(retry.backoff_base, retry.backoff_cap))
            .next_delay();
        tokio::time::sleep_until((Instant::now() + delay).min(self.deadline)).await;
    }

    /// The request's timeout error, after `waited`.
    pub fn timed_out(&self, waited: Duration) -> ProxyError {
        ProxyError::Timeout { service: self.svc.name.clone(), waited }
    }

    /// Every attempt failed; `cause` is the last one's.
    pub fn exhausted(&self, cause: String) -> ProxyError {
        ProxyError::UpstreamFailed { service: self.svc.name.clone(), attempts: self.made, cause }
    }
}
