//! The outbound proxy's flags, mapped onto [`ProxyConfig`] and checked.

use clap::Args;
use trellis_shared::{ServiceName, WireDuration};

use super::{bad, ConfigError};
use crate::balance::BalanceConfig;
use crate::hedge::HedgeDelay;
use crate::outlier::OutlierConfig;
use crate::proxy::ProxyConfig;
use crate::retry::RetryConfig;
use crate::zone::ZoneConfig;

/// Outbound proxy flags (timeouts, retries, ejection, limits). Their defaults
/// are [`ProxyConfig::DEFAULT`]'s, written there once.
#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Timeout of one TCP connect to an endpoint.
    #[arg(long, env = "TRELLIS_CONNECT_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.connect_timeout))]
    pub connect_timeout: WireDuration,
    /// A new connection still pending after this also tries another endpoint (a full accept
    /// queue drops the SYN, which the kernel resends only after 1s); 0 turns it off.
    #[arg(long, env = "TRELLIS_CONNECT_HEDGE", default_value_t = WireDuration(ProxyConfig::DEFAULT.connect_hedge))]
    pub connect_hedge: WireDuration,
    /// Timeout of one attempt, until response headers (idempotent requests are retried after it).
    #[arg(long, env = "TRELLIS_TRY_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.per_try_timeout))]
    pub try_timeout: WireDuration,
    /// Timeout of a whole request with its retries, until response headers; answers 504.
    #[arg(long, env = "TRELLIS_REQUEST_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.overall_timeout))]
    pub request_timeout: WireDuration,
    /// Most attempts per request, the first included.
    #[arg(long, env = "TRELLIS_MAX_ATTEMPTS", default_value_t = ProxyConfig::DEFAULT.max_attempts)]
    pub max_attempts: u32,
    /// Retries allowed as a share of recent requests.
    #[arg(long, env = "TRELLIS_RETRY_BUDGET", default_value_t = RetryConfig::DEFAULT.budget_ratio)]
    pub retry_budget: f64,
    /// Retries per second always allowed, whatever the budget.
    #[arg(long, env = "TRELLIS_RETRY_MIN_PER_SECOND", default_value_t = RetryConfig::DEFAULT.min_retries_per_second)]
    pub retry_min_per_second: u32,
    /// How far back the retry budget looks.
    #[arg(long, env = "TRELLIS_RETRY_WINDOW", default_value_t = WireDuration(RetryConfig::DEFAULT.window))]
    pub retry_window: WireDuration,
    /// Ceiling of the first retry's full-jitter backoff; doubles per retry.
    #[arg(long, env = "TRELLIS_RETRY_BACKOFF_BASE", default_value_t = WireDuration(RetryConfig::DEFAULT.backoff_base))]
    pub retry_backoff_base: WireDuration,
    /// Largest retry backoff ceiling.
    #[arg(long, env = "TRELLIS_RETRY_BACKOFF_CAP", default_value_t = WireDuration(RetryConfig::DEFAULT.backoff_cap))]
    pub retry_backoff_cap: WireDuration,
    /// Largest request body buffered so it can be replayed on a retry, in bytes.
    #[arg(long, env = "TRELLIS_MAX_REPLAY_BODY", default_value_t = ProxyConfig::DEFAULT.replay_buffer_bytes)]
    pub max_replay_body: usize,
    /// Consecutive failures (timeouts, resets, 502/503/504) that eject an endpoint; refused connects eject at once.
    #[arg(long, env = "TRELLIS_EJECTION_FAILURES", default_value_t = OutlierConfig::DEFAULT.consecutive_failures)]
    pub ejection_failures: u32,
    /// Length of a first ejection; it grows with each repeated ejection.
    #[arg(long, env = "TRELLIS_EJECTION_BASE", default_value_t = WireDuration(OutlierConfig::DEFAULT.base_ejection))]
    pub ejection_base: WireDuration,
    /// Longest ejection.
    #[arg(long, env = "TRELLIS_EJECTION_MAX", default_value_t = WireDuration(OutlierConfig::DEFAULT.max_ejection))]
    pub ejection_max: WireDuration,
    /// Largest share of a service's endpoints ejected at once, in percent (one may always be).
    #[arg(long, env = "TRELLIS_EJECTION_MAX_PERCENT", default_value_t = OutlierConfig::DEFAULT.max_ejected_percent)]
    pub ejection_max_percent: u8,
    /// How long a new endpoint (or one back from an ejection) takes to get its full share of
    /// requests, rising from 10 %; 0 turns slow start off.
    #[arg(long, env = "TRELLIS_SLOW_START", default_value_t = WireDuration(BalanceConfig::DEFAULT.slow_start))]
    pub slow_start: WireDuration,
    /// Hedge late idempotent requests without a body to SERVICE: after DELAY (e.g. 50ms, or
    /// `auto` for the service's observed p95) without an answer, also send to another endpoint.
    /// Repeat, or comma-separate. Default: none.
    #[arg(long = "hedge", env = "TRELLIS_HEDGE", value_delimiter = ',', value_name = "SERVICE=DELAY")]
    pub hedges: Vec<String>,
    /// Keep each service's traffic in this sidecar's --zone while that zone can carry it; applies
    /// only with --zone, to endpoints registered with a zone.
    #[arg(long, env = "TRELLIS_ZONE_AWARE", default_value_t = ZoneConfig::DEFAULT.enabled, action = clap::ArgAction::Set, value_name = "true|false")]
    pub zone_aware: bool,
    /// Fewest usable (not ejected) endpoints in this zone that keep a service's traffic in it.
    #[arg(long, env = "TRELLIS_ZONE_MIN_LOCAL", default_value_t = ZoneConfig::DEFAULT.min_local)]
    pub zone_min_local: usize,
    /// Requests in flight per usable local endpoint above which other zones are added.
    #[arg(long, env = "TRELLIS_ZONE_SPILL_LOAD", default_value_t = ZoneConfig::DEFAULT.spill_load)]
    pub zone_spill_load: f64,
    /// Requests in flight (in every zone) per usable local endpoint below which other zones are
    /// dropped again.
    #[arg(long, env = "TRELLIS_ZONE_RETURN_LOAD", default_value_t = ZoneConfig::DEFAULT.return_load)]
    pub zone_return_load: f64,
    /// Most open client connections on the outbound port; more are answered 503 overloaded.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = ProxyConfig::DEFAULT.max_connections)]
    pub max_connections: usize,
    /// Most requests waiting for response headers; more are answered 503 overloaded.
    #[arg(long, env = "TRELLIS_MAX_PENDING", default_value_t = ProxyConfig::DEFAULT.max_pending_requests)]
    pub max_pending: usize,
    /// Largest request head (request line and headers), in bytes; larger gets 431.
    #[arg(long, env = "TRELLIS_MAX_HEADER_BYTES", default_value_t = ProxyConfig::DEFAULT.max_header_bytes)]
    pub max_header_bytes: usize,
    /// Longest wait for a request head on an open or idle client connection.
    #[arg(long, env = "TRELLIS_HEADER_READ_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.header_read_timeout))]
    pub header_read_timeout: WireDuration,
    /// How long a request for a service never seen before waits for its first discovery answer.
    #[arg(long, env = "TRELLIS_DISCOVERY_WAIT", default_value_t = WireDuration(ProxyConfig::DEFAULT.discovery_wait))]
    pub discovery_wait: WireDuration,
    /// Idle pooled connections to endpoints are closed after this.
    #[arg(long, env = "TRELLIS_POOL_IDLE_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.pool_idle_timeout))]
    pub pool_idle_timeout: WireDuration,
    /// Idle pooled connections kept per endpoint.
    #[arg(long, env = "TRELLIS_POOL_MAX_IDLE", default_value_t = ProxyConfig::DEFAULT.pool_max_idle_per_endpoint)]
    pub pool_max_idle: usize,
    /// Refuse every endpoint not registered as mesh TLS (a mesh that has fully moved to mutual
    /// TLS); they are dropped before the balancer and counted in endpoints_refused{reason="plain_text"}.
    /// Without it, plain-text endpoints are reached as before.
    #[arg(long, env = "TRELLIS_REQUIRE_MTLS", default_value_t = ProxyConfig::DEFAULT.require_mtls, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true", value_name = "true|false")]
    pub require_mtls: bool,
}

impl ProxyArgs {
    /// The proxy's settings (checked by [`RunArgs::settings`]).
    pub fn proxy_config(&self) -> ProxyConfig {
        ProxyConfig {
            connect_timeout: self.connect_timeout.0,
            connect_hedge: self.connect_hedge.0,
            per_try_timeout: self.try_timeout.0,
            overall_timeout: self.request_timeout.0,
            max_attempts: self.max_attempts,
            replay_buffer_bytes: self.max_replay_body,
            max_connections: self.max_connections,
            max_pending_requests: self.max_pending,
            max_header_bytes: self.max_header_bytes,
            header_read_timeout: self.header_read_timeout.0,
            discovery_wait: self.discovery_wait.0,
            pool_idle_timeout: self.pool_idle_timeout.0,
            pool_max_idle_per_endpoint: self.pool_max_idle,
            // Set from --upgrade-idle-timeout (`UpgradeArgs`).
            upgrade_idle_timeout: ProxyConfig::DEFAULT.upgrade_idle_timeout,
            retry: RetryConfig {
                budget_ratio: self.retry_budget,
                min_retries_per_second: self.retry_min_per_second,
                window: self.retry_window.0,
                backoff_base: self.retry_backoff_base.0,
                backoff_cap: self.retry_backoff_cap.0,
            },
            outlier: OutlierConfig {
                consecutive_failures: self.ejection_failures,
                base_ejection: self.ejection_base.0,
                max_ejection: self.ejection_max.0,
                max_ejected_percent: self.ejection_max_percent,
            },
            balance: BalanceConfig {
                slow_start: self.slow_start.0,
                // The zone is the sidecar's own (`--zone`), set by `RunArgs::settings`.
                zone: ZoneConfig {
                    local: None,
                    enabled: self.zone_aware,
                    min_local: self.zone_min_local,
                    spill_load: self.zone_spill_load,
                    return_load: self.zone_return_load,
                },
            },
            hedges: Vec::new(),
            require_mtls: self.require_mtls,
        }
    }
}

impl ProxyArgs {
    /// `--hedge SERVICE=DELAY` values, checked.
    pub(super) fn hedges(&self) -> Result<Vec<(ServiceName, HedgeDelay)>, ConfigError> {
        let mut out: Vec<(ServiceName, HedgeDelay)> = Vec::new();
        for item in &self.hedges {
            let err = |why: String| bad(format!("--hedge {item:?} is invalid: {why}"));
            let (name, delay) = item
                .split_once('=')
                .ok_or_else(|| err("expected SERVICE=DELAY, e.g. users=50ms or users=auto".into()))?;
            let name = ServiceName::new(name.trim()).map_err(|e| err(e.to_string()))?;
            let delay: HedgeDelay = delay.parse().map_err(err)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(err(format!("{name} is named twice")));
            }
            out.push((name, delay));
        }
        Ok(out)
    }

    pub(super) fn check(&self) -> Result<(), ConfigError> {
        for (flag, d) in [
            ("--connect-timeout", self.connect_timeout.0),
            ("--try-timeout", self.try_timeout.0),
            ("--request-timeout", self.request_timeout.0),
            ("--ejection-base", self.ejection_base.0),
            ("--retry-window", self.retry_window.0),
            ("--header-read-timeout", self.header_read_timeout.0),
        ] {
            if d.is_zero() {
                return Err(bad(format!("{flag} must be above zero")));
            }
        }
        if self.max_attempts == 0 {
            return Err(bad("--max-attempts must be at least 1"));
        }
        if !self.retry_budget.is_finite() || !(0.0..=10.0).contains(&self.retry_budget) {
            return Err(bad(format!("--retry-budget must be between 0 and 10, got {}", self.retry_budget)));
        }
        if self.ejection_max < self.ejection_base {
            return Err(bad("--ejection-max must not be shorter than --ejection-base"));
        }
        if self.ejection_max_percent > 100 {
            return Err(bad("--ejection-max-percent must be between 0 and 100"));
        }
        if self.ejection_failures == 0 {
            return Err(bad("--ejection-failures must be at least 1"));
        }
        if self.retry_backoff_cap < self.retry_backoff_base {
            return Err(bad("--retry-backoff-cap must not be shorter than --retry-backoff-base"));
        }
        if self.max_header_bytes < 8192 {
            return Err(bad("--max-header-bytes must be at least 8192"));
        }
        if self.zone_min_local == 0 {
            return Err(bad("--zone-min-local must be at least 1"));
        }
        if !(self.zone_return_load.is_finite() && self.zone_spill_load.is_finite())
            || self.zone_return_load <= 0.0
            || self.zone_return_load >= self.zone_spill_load
        {
            return Err(bad(format!(
                "--zone-return-load ({}) must be above zero and below --zone-spill-load ({})",
                self.zone_return_load, self.zone_spill_load
            )));
        }
        if self.max_connections == 0 || self.max_pending == 0 {
            return Err(bad("--max-connections and --max-pending must be at least 1"));
        }
        Ok(())
    }
}
