//! Prometheus metrics of the sidecar, prefixed `trellis_sidecar_`.
//!
//! The request path never looks a label set up: the proxy asks once per
//! upstream service for a [`ServiceMetrics`] handle (cached next to the
//! service's endpoints) whose counters are shared with the registry, so
//! counting a request is an atomic add. Label sets are created only for
//! services that had endpoints, so arbitrary Host headers cannot grow the
//! metric families; errors decided before a service is known are counted by
//! error code only.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use trellis_shared::ErrorCode;

use crate::zone::ZoneCounters;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    service: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabels {
    service: String,
    zone: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrpcLabels {
    service: String,
    code: &'static str,
}

/// Label values of `grpc-status`: the 17 codes gRPC defines, then `other` (a
/// missing status, or one that is not a known code).
const GRPC_CODES: [&str; 18] =
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "other"];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    service: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Code {
    no_endpoints,
    upstream_failed,
    timeout,
    bad_request,
    overloaded,
    not_allowed,
    other,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallerLabels {
    caller: String,
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClosedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MtlsFailureLabels {
    service: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    code: Code,
}

type HistogramFamily = Family<ServiceLabels, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100µs .. ~52s in 20 doubling steps: the sidecar's own overhead is
    // sub-millisecond, upstream calls can take seconds.
    Histogram::new(exponential_buckets(0.0001, 2.0, 20))
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Every metric the sidecar exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    grpc: Family<GrpcLabels, Counter>,
    zone_requests: Family<ZoneLabels, Counter>,
    duration: HistogramFamily,
    retries: Family<ServiceLabels, Counter>,
    retries_refused: Family<ServiceLabels, Counter>,
    hedges: Family<ServiceLabels, Counter>,
    ejections: Family<ServiceLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    endpoints: Family<EndpointLabels, Gauge>,
    health_panic: Family<ServiceLabels, Gauge>,
    registry_up: Gauge,
    registry_errors: Counter,
    registry_auth_failures: Counter,
    endpoints_refused: Family<RefusedLabels, Counter>,
    connections: Gauge,
    /// The mesh identity's renewals and expiry.
    pub identity: crate::identity::renew::IdentityMetrics,
    inbound_requests: Family<CallerLabels, Counter>,
    inbound_closed: Family<ClosedLabels, Counter>,
    inbound_connections: Gauge,
    mtls_failures: Family<MtlsFailureLabels, Counter>,
    mtls_handshakes: Family<HandshakeLabels, Counter>,
    /// Serialises scrapes so that `clear_endpoints` + `set_endpoints` from one
    /// scrape never interleave with another's encode.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("trellis_sidecar");
        let requests = Family::<RequestLabels, Counter>::default();
        let grpc = Family::<GrpcLabels, Counter>::default();
        let zone_requests = Family::<ZoneLabels, Counter>::default();
        let duration: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let retries = Family::<ServiceLabels, Counter>::default();
        let retries_refused = Family::<ServiceLabels, Counter>::default();
        let hedges = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<ServiceLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let endpoints = Family::<EndpointLabels, Gauge>::default();
        let health_panic = Family::<ServiceLabels, Gauge>::default();
        let registry_up = Gauge::default();
        let registry_errors = Counter::default();
        let registry_auth_failures = Counter::default();
        let endpoints_refused = Family::<RefusedLabels, Counter>::default();
        let connections = Gauge::default();
        let identity = crate::identity::renew::IdentityMetrics::default();
        identity.register(&mut registry);
        let inbound_requests = Family::<CallerLabels, Counter>::default();
        let inbound_closed = Family::<ClosedLabels, Counter>::default();
        let inbound_connections = Gauge::default();
        let mtls_failures = Family::<MtlsFailureLabels, Counter>::default();
        let mtls_handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register(
            "requests",
            "Proxied requests by upstream service and response status class (the sidecar's own answers too, \
             `no_endpoints` once a request has found the service's endpoints)",
            requests.clone(),
        );
        registry.register(
            "grpc_responses",
            "Relayed gRPC responses by upstream service and grpc-status (from trailers, or headers when \
             trailers-only; other: missing or unknown)",
            grpc.clone(),
        );
        registry.register(
            "zone_requests",
            "Attempts sent to an endpoint in this sidecar's zone (local) or another (remote); counted when \
             both have a zone",
            zone_requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from receiving a proxied request to sending its response headers",
            duration.clone(),
        );
        registry.register("retries", "Retries sent to another attempt", retries.clone());
        registry.register(
            "retries_refused_by_budget",
            "Retries the retry budget refused",
            retries_refused.clone(),
        );
        registry.register(
            "hedges",
            "Requests also sent to a second endpoint because their answer was late (--hedge)",
            hedges.clone(),
        );
        registry.register("ejections", "Endpoints ejected by passive outlier detection", ejections.clone());
        registry.register(
            "proxy_errors",
            "Errors the sidecar answered itself, by error code",
            errors.clone(),
        );
        registry.register("endpoints", "Known upstream endpoints by state", endpoints.clone());
        registry.register(
            "health_panic",
            "1 while too few of the service's instances are healthy and every instance is routed to, \
             critical ones too (--panic-threshold)",
            health_panic.clone(),
        );
        registry.register("registry_up", "1 when the last registry call succeeded", registry_up.clone());
        registry.register("registry_errors", "Failed registry calls", registry_errors.clone());
        registry.register(
            "registry_auth_failures",
            "Registrations and heartbeats the registry refused with 401 or 403 (token missing, unknown or \
             without the right)",
            registry_auth_failures.clone(),
        );
        registry.register(
            "endpoints_refused",
            "Endpoints listed by the registry that the sidecar refuses to connect to, once per service and \
             address, by reason (own_listener, unspecified, multicast, link_local, plain_text)",
            endpoints_refused.clone(),
        );
        registry.register(
            "open_connections",
            "Open inbound connections on the outbound port",
            connections.clone(),
        );
        registry.register(
            "inbound_requests",
            "Requests on the inbound port by calling service (from its certificate) and decision (allowed, \
             not_allowed by --allow-from, overloaded past --inbound-max-concurrency)",
            inbound_requests.clone(),
        );
        registry.register(
            "inbound_connections_closed",
            "Inbound connections closed by the sidecar, by reason (over_limit, no_certificate, \
             bad_certificate, not_tls, handshake_failed, handshake_timeout, no_identity, header_timeout, idle)",
            inbound_closed.clone(),
        );
        registry.register(
            "inbound_open_connections",
            "Open connections on the inbound port (upgraded ones included)",
            inbound_connections.clone(),
        );
        registry.register(
            "mtls_failures",
            "Outbound mTLS handshakes that failed, by upstream service and reason (wrong_identity, \
             untrusted, expired, handshake, no_identity); each is a failed attempt, retried elsewhere",
            mtls_failures.clone(),
        );
        registry.register(
            "mtls_handshakes",
            "Outbound mTLS handshakes completed, by kind (full, resumed)",
            mtls_handshakes.clone(),
        );
        Metrics {
            registry,
            requests,
            grpc,
            zone_requests,
            duration,
            retries,
            retries_refused,
            hedges,
            ejections,
            errors,
            endpoints,
            health_panic,
            registry_up,
            registry_errors,
            registry_auth_failures,
            endpoints_refused,
            connections,
            identity,
            inbound_requests,
            inbound_closed,
            inbound_connections,
            mtls_failures,
            mtls_handshakes,
            scrape: Mutex::new(()),
        }
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let _scrape = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Sets the number of endpoints of `service` in `state` (control plane, at scrape time).
    pub fn set_endpoints(&self, service: &str, state: &str, n: i64) {
        self.endpoints
            .get_or_create(&EndpointLabels { service: service.to_string(), state: state.to_string() })
            .set(n);
    }

    /// Set at scrape time from the endpoint sets, like the endpoint gauges, so
    /// the discovery tasks need no handle on the metrics.
    pub fn set_health_panic(&self, service: &str, on: bool) {
        self.health_panic.get_or_create(&ServiceLabels { service: service.to_string() }).set(i64::from(on));
    }

    /// Forgets every endpoint and health-panic gauge, so services no longer
    /// watched disappear before the admin handler sets the current ones again.
    pub fn clear_endpoints(&self) {
        self.endpoints.clear();
        self.health_panic.clear();
    }

    pub fn set_registry_up(&self, up: bool) {
        self.registry_up.set(i64::from(up));
    }

    pub fn registry_error(&self) {
        self.registry_errors.inc();
    }

    pub fn registry_auth_failure(&self) {
        self.registry_auth_failures.inc();
    }

    pub fn endpoint_refused(&self, reason: &'static str) {
        self.endpoints_refused.get_or_create(&RefusedLabels { reason }).inc();
    }

    /// Counts an outbound mTLS handshake that failed (never on a request's
    /// success path: a failure also ejects the endpoint).
    pub fn mtls_failure(&self, service: &str, reason: &'static str) {
        self.mtls_failures.get_or_create(&MtlsFailureLabels { service: service.to_string(), reason }).inc();
    }

    /// The `full` and `resumed` handshake counters, taken once by the connector.
    pub fn mtls_handshake_counters(&self) -> (Counter, Counter) {
        let kind = |kind| self.mtls_handshakes.get_or_create(&HandshakeLabels { kind }).clone();
        (kind("full"), kind("resumed"))
    }

    /// Counts an error the sidecar answered itself.
    pub fn proxy_error(&self, code: ErrorCode) {
        let code = match code {
            ErrorCode::NoEndpoints => Code::no_endpoints,
            ErrorCode::UpstreamFailed => Code::upstream_failed,
            ErrorCode::Timeout => Code::timeout,
            ErrorCode::BadRequest => Code::bad_request,
            ErrorCode::Overloaded => Code::overloaded,
            ErrorCode::NotAllowed => Code::not_allowed,
            _ => Code::other,
        };
        self.errors.get_or_create(&ErrorLabels { code }).inc();
    }

    pub(crate) fn connections(&self) -> &Gauge {
        &self.connections
    }

    pub(crate) fn inbound_connections(&self) -> &Gauge {
        &self.inbound_connections
    }

    /// Counts an inbound connection the sidecar closed, by reason.
    pub fn inbound_closed(&self, reason: &'static str) {
        self.inbound_closed.get_or_create(&ClosedLabels { reason }).inc();
    }

    /// One calling service's decision counters; taken once per connection.
    pub fn caller(&self, caller: &str) -> CallerCounters {
        let c = |decision| {
            self.inbound_requests
                .get_or_create(&CallerLabels { caller: caller.to_string(), decision })
                .clone()
        };
        CallerCounters { allowed: c("allowed"), not_allowed: c("not_allowed"), overloaded: c("overloaded") }
    }

    /// The handles of one upstream service's metrics; cheap to use per request.
    pub fn service(&self, service: &str) -> ServiceMetrics {
        let s = ServiceLabels { service: service.to_string() };
        let requests = CLASSES.map(|class| {
            self.requests.get_or_create(&RequestLabels { service: service.to_string(), class }).clone()
        });
        let grpc = GRPC_CODES
            .map(|code| self.grpc.get_or_create(&GrpcLabels { service: service.to_string(), code }).clone());
        let zone = |zone| {
            self.zone_requests.get_or_create(&ZoneLabels { service: service.to_string(), zone }).clone()
        };
        ServiceMetrics {
            requests,
            zone: ZoneCounters { local: zone("local"), remote: zone("remote") },
            grpc: Arc::new(GrpcCounters(grpc)),
            duration: self.duration.get_or_create(&s).clone(),
            retries: self.retries.get_or_create(&s).clone(),
            retries_refused: self.retries_refused.get_or_create(&s).clone(),
            hedges: self.hedges.get_or_create(&s).clone(),
            ejections: self.ejections.get_or_create(&s).clone(),
        }
    }
}

/// One upstream service's metric handles.
#[derive(Debug, Clone)]
pub struct ServiceMetrics {
    requests: [Counter; 5],
    /// Shared with every gRPC response body that still has to see its status.
    pub grpc: Arc<GrpcCounters>,
    /// Attempts by zone, for [`crate::zone::ZoneState`].
    pub zone: ZoneCounters,
    duration: Histogram,
    pub retries: Counter,
    pub retries_refused: Counter,
    pub hedges: Counter,
    pub ejections: Counter,
}

impl ServiceMetrics {
    /// Counts a finished request by status class and records its latency in seconds.
    pub fn request(&self, status: u16, seconds: f64) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.requests[class].inc();
        self.duration.observe(seconds);
    }
}

/// The inbound decisions about one calling service.
#[derive(Debug, Clone)]
pub struct CallerCounters {
    pub allowed: Counter,
    pub not_allowed: Counter,
    pub overloaded: Counter,
}

/// One service's `grpc_responses` counters, one per status code.
#[derive(Debug)]
pub struct GrpcCounters([Counter; 18]);

impl GrpcCounters {
    /// Counts one gRPC response by the value of its `grpc-status` (`None`: it had none).
    pub fn record(&self, status: Option<&[u8]>) {
        let i = status
            .and_then(|s| std::str::from_utf8(s).ok())
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|&c| c <= 16)
            .unwrap_or(17);
        self.0[i].inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix_and_labels() {
        let m = Metrics::new();
        let s = m.service("users");
        s.request(200, 0.001);
        s.request(503, 0.002);
        s.retries.inc();
        s.zone.remote.inc();
        m.set_endpoints("users", "active", 3);
        m.set_registry_up(true);
        m.registry_error();
        m.proxy_error(ErrorCode::BadRequest);
        s.grpc.record(Some(b"0"));
        s.grpc.record(Some(b"14"));
        s.grpc.record(Some(b"99"));
        s.grpc.record(None);
        let text = m.encode();
        assert!(
            text.contains(r#"trellis_sidecar_grpc_responses_total{service="users",code="0"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_sidecar_grpc_responses_total{service="users",code="14"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_sidecar_grpc_responses_total{service="users",code="other"} 2"#),
            "{text}"
        );
        assert!(text.contains(r#"trellis_sidecar_requests_total{service="users",class="2xx"} 1"#), "{text}");
        assert!(text.contains(r#"trellis_sidecar_requests_total{service="users",class="5xx"} 1"#), "{text}");
        assert!(text.contains(r#"trellis_sidecar_retries_total{service="users"} 1"#), "{text}");
        assert!(
            text.contains(r#"trellis_sidecar_zone_requests_total{service="users",zone="remote"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"trellis_sidecar_zone_requests_total{service="users",zone="local"} 0"#),
            "{text}"
        );
        assert!(text.contains(r#"trellis_sidecar_endpoints{service="users",state="active"} 3"#), "{text}");
        assert!(text.contains("trellis_sidecar_registry_up 1"), "{text}");
        assert!(text.contains("trellis_sidecar_registry_errors_total 1"), "{text}");
        assert!(text.contains(r#"trellis_sidecar_proxy_errors_total{code="bad_request"} 1"#), "{text}");
        assert!(
            text.contains("trellis_sidecar_request_duration_seconds_count{service=\"users\"} 2"),
            "{text}"
        );
        m.clear_endpoints();
        assert!(!m.encode().contains("state=\"active\""));
    }
}
