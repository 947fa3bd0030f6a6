//! Prometheus metrics (`GET /metrics`), all prefixed `trellis_registry_`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use trellis_shared::ServiceSummary;

/// Counters the stores feed (expiry and the brake, in either store); clones share the values with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct StoreMetrics {
    pub expirations: Counter,
    /// 1 while the expiry brake holds.
    pub brake_engaged: Gauge,
    /// Instances kept past their lease by the brake.
    pub brake_held: Gauge,
}

/// Metrics the etcd store feeds; clones share the values with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct EtcdMetrics {
    /// 1 while the store cannot reach a quorum and answers from its cache.
    pub stale: Gauge,
    /// Discovery answers served flagged stale.
    pub stale_answers: Counter,
}

/// What the accept loop and the connections' tasks count; clones share the values with `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// Connections refused because their address had `--max-connections-per-ip` open.
    pub refused_per_ip: Counter,
    /// Connections cut because a head (or the handshake before the first) took too long.
    pub header_timeouts: Counter,
    /// Connections closed after `--idle-timeout` without a request.
    pub idle_closed: Counter,
    /// TLS handshakes that failed (wrong CA, no client certificate, plain HTTP to the TLS port).
    pub tls_failures: Counter,
}

/// Which API operation a request was, as a bounded label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Register,
    Heartbeat,
    Deregister,
    List,
    Get,
    /// A blocking query (`?index=`): its latency is mostly the wait.
    Watch,
    Health,
    Metrics,
    /// `POST /v1/identity/sign`.
    IdentitySign,
    /// The Consul-compatible API (`/v1/agent/`, `/v1/catalog/`, `/v1/health/`).
    Consul,
    /// A blocking query of the Consul-compatible API.
    ConsulWatch,
    /// `GET /v1/status`.
    Status,
    /// `GET /v1/overview`, blocking or not.
    Overview,
    /// The dashboard's files under `/ui/`.
    Ui,
    Other,
}

impl Route {
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Register => "register",
            Route::Heartbeat => "heartbeat",
            Route::Deregister => "deregister",
            Route::List => "list",
            Route::Get => "get",
            Route::Watch => "watch",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::IdentitySign => "identity_sign",
            Route::Consul => "consul",
            Route::ConsulWatch => "consul_watch",
            Route::Status => "status",
            Route::Overview => "overview",
            Route::Ui => "ui",
            Route::Other => "other",
        }
    }
}

impl EncodeLabelValue for Route {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: Route,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

/// `result="ok|failed"` of an ACL reload.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

impl ResultLabels {
    pub fn of(ok: bool) -> Self {
        ResultLabels { result: if ok { "ok" } else { "failed" } }
    }
}

/// `reason="missing|unknown|denied"` of a failed token check (no per-client label: cardinality).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub registrations: Counter,
    pub heartbeats: Counter,
    pub deregistrations: Counter,
    pub store: StoreMetrics,
    pub etcd: EtcdMetrics,
    pub open_watches: Gauge,
    pub watches_refused: Counter,
    pub connections: Gauge,
    pub connections_refused: Counter,
    pub conn: ConnectionMetrics,
    pub requests: Family<RequestLabels, Histogram>,
    pub acl_reloads: Family<ResultLabels, Counter>,
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// `POST /v1/identity/sign` answers by `result` (`ok`, `invalid`, `refused`, `no_ca`, `failed`).
    pub certificates: Family<ResultLabels, Counter>,
    instances: Family<ServiceLabels, Gauge>,
    healthy: Family<ServiceLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("trellis_registry");
        let m = Metrics {
            registrations: Counter::default(),
            heartbeats: Counter::default(),
            deregistrations: Counter::default(),
            store: StoreMetrics::default(),
            etcd: EtcdMetrics::default(),
            open_watches: Gauge::default(),
            watches_refused: Counter::default(),
            connections: Gauge::default(),
            connections_refused: Counter::default(),
            conn: ConnectionMetrics::default(),
            requests: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.5, 16))),
            acl_reloads: Family::default(),
            auth_failures: Family::default(),
            certificates: Family::default(),
            instances: Family::default(),
            healthy: Family::default(),
            registry: Registry::default(),
        };
        registry.register("instances", "Registered instances per service", m.instances.clone());
        registry.register(
            "healthy_instances",
            "Instances per service that discovery shows (passing or warning)",
            m.healthy.clone(),
        );
        registry.register(
            "registrations",
            "Successful registrations and re-registrations",
            m.registrations.clone(),
        );
        registry.register(
            "certificates_signed",
            "Mesh identity requests (POST /v1/identity/sign) by result: ok, invalid, refused, no_ca, failed",
            m.certificates.clone(),
        );
        registry.register("heartbeats", "Heartbeats accepted", m.heartbeats.clone());
        registry.register("deregistrations", "Instances removed by a DELETE", m.deregistrations.clone());
        registry.register(
            "expirations",
            "Instances removed because their lease ran out",
            m.store.expirations.clone(),
        );
        registry.register(
            "store_stale",
            "1 while the etcd store has no quorum and discovery answers from the cache",
            m.etcd.stale.clone(),
        );
        registry.register(
            "stale_answers",
            "Discovery answers flagged X-Trellis-Stale because etcd had no quorum",
            m.etcd.stale_answers.clone(),
        );
        registry.register(
            "expiry_brake_engaged",
            "1 while the expiry brake pauses expiry because too few renewals arrive",
            m.store.brake_engaged.clone(),
        );
        registry.register(
            "expiry_brake_held",
            "Instances past their lease kept registered by the expiry brake",
            m.store.brake_held.clone(),
        );
        registry.register("open_watches", "Blocking queries being held", m.open_watches.clone());
        registry.register(
            "watches_refused",
            "Blocking queries answered at once because the open-watch cap was reached",
            m.watches_refused.clone(),
        );
        registry.register("connections", "Open client connections", m.connections.clone());
        registry.register(
            "connections_refused",
            "Connections refused because the connection cap was reached",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_refused_per_ip",
            "Connections refused because their address had --max-connections-per-ip open",
            m.conn.refused_per_ip.clone(),
        );
        registry.register(
            "header_timeouts",
            "Connections closed because a request head, or the handshake before it, took longer than --header-timeout",
            m.conn.header_timeouts.clone(),
        );
        registry.register(
            "idle_connections_closed",
            "Connections closed after --idle-timeout without a request",
            m.conn.idle_closed.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed",
            m.conn.tls_failures.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request to response, by route and status",
            m.requests.clone(),
        );
        registry.register("acl_reloads", "Reloads of the ACL file, by result", m.acl_reloads.clone());
        registry.register(
            "auth_failures",
            "Requests refused by the ACL: token missing, unknown, or without the right",
            m.auth_failures.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Renders the text exposition, refreshing per-service gauges from `services`.
    pub fn render(&self, services: &[ServiceSummary]) -> String {
        // Rebuilt at scrape time so services that emptied disappear.
        self.instances.clear();
        self.healthy.clear();
        for s in services {
            let labels = ServiceLabels { service: s.name.to_string() };
            self.instances.get_or_create(&labels).set(s.instances as i64);
            self.healthy.get_or_create(&labels).set(s.healthy as i64);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use trellis_shared::ServiceName;

    use super::*;

    #[test]
    fn renders_prefixed_metrics() {
        let m = Metrics::new();
        m.heartbeats.inc();
        m.requests.get_or_create(&RequestLabels { route: Route::Heartbeat, status: 204 }).observe(0.001);
        let s = ServiceSummary { name: ServiceName::new("users").unwrap(), instances: 3, healthy: 2 };
        let text = m.render(&[s]);
        assert!(text.contains("trellis_registry_heartbeats_total 1"), "{text}");
        assert!(text.contains("trellis_registry_instances{service=\"users\"} 3"), "{text}");
        assert!(text.contains("trellis_registry_healthy_instances{service=\"users\"} 2"), "{text}");
        assert!(text.contains("trellis_registry_request_duration_seconds_bucket{"), "{text}");
        assert!(text.contains("route=\"heartbeat\""), "{text}");
    }
}
