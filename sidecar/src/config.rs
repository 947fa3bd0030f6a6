//! Command-line and environment configuration.
//!
//! Every flag has an environment variable `TRELLIS_<FLAG>` and a documented
//! default; `docs/sidecar.md` explains each default. [`RunArgs::settings`]
//! checks everything once and turns the flags into the per-concern structs the
//! modules take, so a bad value stops the sidecar at start with a clear message.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use reqwest::Url;
use trellis_shared::types::{validate_metadata, DEFAULT_WEIGHT, WEIGHT_RANGE};
use trellis_shared::{
    Address, ClientConfig, HealthStatus, InstanceId, RegisterRequest, ServiceName, WireDuration, Zone,
};

use crate::discovery::DiscoveryConfig;
use crate::health::{HealthCheck, HealthConfig};
use crate::inbound::InboundConfig;
use crate::proxy::ProxyConfig;

mod identity;
mod inbound;
mod proxy;
mod registry_client;
mod upgrade;
use crate::registration::RegistrationConfig;
use crate::shutdown::ShutdownConfig;
pub use identity::{IdentityArgs, IdentitySettings};
pub use inbound::InboundArgs;
pub use proxy::ProxyArgs;
pub use registry_client::{RegistryClientArgs, TOKEN_ENV};
pub use upgrade::UpgradeArgs;

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| format!("{e} (examples: 500ms, 5s, 1m)"))
}

#[derive(Debug, Parser)]
#[command(
    name = "sidecar",
    version,
    about = "The Trellis sidecar: registers the local app, checks its health, and proxies its outbound HTTP calls.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when the local sidecar's admin `/ready` answers 200, 1 otherwise
    /// (for container healthchecks in images without a shell).
    Probe(ProbeArgs),
}

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Admin address of the sidecar to probe (0.0.0.0 means this host's loopback).
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// How long to wait for the answer.
    #[arg(long, env = "TRELLIS_PROBE_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub timeout: Duration,
}

/// Flags of the sidecar itself.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Registry base URLs, comma-separated; requests fail over between them. Required.
    #[arg(long, env = "TRELLIS_REGISTRY", value_name = "URL[,URL...]")]
    pub registry: Option<String>,
    #[command(flatten)]
    pub registry_client: RegistryClientArgs,

    // ---- The local app (all optional: without --service the sidecar only proxies).
    /// Service name to register the local app under.
    #[arg(long, env = "TRELLIS_SERVICE")]
    pub service: Option<ServiceName>,
    /// Where the local app listens, HOST:PORT (checked and, by default, advertised with this port).
    #[arg(long, env = "TRELLIS_APP", value_name = "HOST:PORT")]
    pub app: Option<String>,
    /// Instance id. Default: this host's name and the app's port (`web-1-8080`), stable across restarts.
    #[arg(long, env = "TRELLIS_INSTANCE_ID")]
    pub instance_id: Option<InstanceId>,
    /// Address peers use to reach the app, HOST:PORT (HOST may be a hostname). Default: the app's
    /// host when it is a non-loopback IP or a hostname, else this host's first non-loopback address;
    /// with the app's port.
    #[arg(long, env = "TRELLIS_ADVERTISE", value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Zone (failure domain) of this instance.
    #[arg(long, env = "TRELLIS_ZONE")]
    pub zone: Option<Zone>,
    /// Load-balancing weight of this instance (1-10000).
    #[arg(long, env = "TRELLIS_WEIGHT", default_value_t = DEFAULT_WEIGHT)]
    pub weight: u32,
    /// Metadata key=value; repeat the flag, or comma-separate in the environment variable.
    #[arg(long = "metadata", env = "TRELLIS_METADATA", value_name = "K=V", value_delimiter = ',')]
    pub metadata: Vec<String>,
    /// A tag of this instance (Consul's tags: shown by the registry's API and
    /// its Consul-compatible routes, where `?tag=` filters on them); repeat
    /// the flag, or comma-separate in the environment variable.
    #[arg(long = "tag", env = "TRELLIS_TAGS", value_name = "TAG", value_delimiter = ',')]
    pub tags: Vec<String>,

    // ---- Health and registration.
    /// App health check: `tcp` (connect to the app port) or `http:/path` (GET, 2xx passes).
    #[arg(long, env = "TRELLIS_HEALTH", default_value = "tcp", value_name = "tcp|http:/PATH")]
    pub health: String,
    /// Time between health checks.
    #[arg(long, env = "TRELLIS_HEALTH_INTERVAL", default_value = "1s", value_parser = duration)]
    pub health_interval: Duration,
    /// Timeout of one health check; must be shorter than the interval.
    #[arg(long, env = "TRELLIS_HEALTH_TIMEOUT", default_value = "500ms", value_parser = duration)]
    pub health_timeout: Duration,
    /// Consecutive passing checks that make an unhealthy app healthy again.
    #[arg(long, env = "TRELLIS_HEALTHY_THRESHOLD", default_value_t = 2)]
    pub healthy_threshold: u32,
    /// Consecutive failing checks that make a healthy app unhealthy (hidden).
    #[arg(long, env = "TRELLIS_UNHEALTHY_THRESHOLD", default_value_t = 2)]
    pub unhealthy_threshold: u32,
    /// Time between heartbeats; also the ceiling of every registry retry delay.
    #[arg(long, env = "TRELLIS_HEARTBEAT_INTERVAL", default_value = "1s", value_parser = duration)]
    pub heartbeat_interval: Duration,
    /// Lease TTL asked of the registry: the instance is removed this long after its last heartbeat.
    /// Also how long instances are kept after a registry restart while they re-register.
    #[arg(long, env = "TRELLIS_TTL", default_value = "5s", value_parser = duration)]
    pub ttl: Duration,

    // ---- Listeners and runtime.
    /// Outbound proxy listener (the app sends its calls here).
    #[arg(long, env = "TRELLIS_OUTBOUND", default_value = "127.0.0.1:15001")]
    pub outbound: SocketAddr,
    /// Admin listener (/ready, /metrics, /endpoints).
    #[arg(long, env = "TRELLIS_ADMIN", default_value = "127.0.0.1:15000")]
    pub admin: SocketAddr,
    /// Once every listener is bound, write their addresses here as JSON:
    /// `{"outbound":"IP:PORT","admin":"IP:PORT","upstreams":{"NAME":"IP:PORT"}}`, and
    /// `"inbound":"IP:PORT"` with --inbound
    /// (how a caller learns the ports when a listener was given port 0).
    #[arg(long, env = "TRELLIS_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<std::path::PathBuf>,
    /// Tokio worker threads; 1 runs everything on the main thread (a
    /// current-thread runtime: cheapest per request, one core at most).
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// Log filter (RUST_LOG syntax); RUST_LOG wins when set.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    // ---- Discovery.
    /// An upstream service to watch from the start (never evicted); repeat, or comma-separate.
    #[arg(long = "upstream-service", env = "TRELLIS_UPSTREAM_SERVICE", value_delimiter = ',')]
    pub upstream_services: Vec<ServiceName>,
    /// A dedicated local port for one upstream service, NAME=127.0.0.1:PORT: every request on it
    /// (HTTP/1.1 or HTTP/2) goes to NAME whatever its Host. Repeat, or comma-separate. Default: none.
    #[arg(long = "upstream", env = "TRELLIS_UPSTREAM", value_delimiter = ',', value_name = "NAME=ADDR")]
    pub upstreams: Vec<String>,
    /// Most upstream services watched at once (caps what arbitrary Host headers can cost).
    #[arg(long, env = "TRELLIS_MAX_UPSTREAM_SERVICES", default_value_t = 256)]
    pub max_upstream_services: usize,
    /// A service not called for this long stops being watched.
    #[arg(long, env = "TRELLIS_UPSTREAM_IDLE_TIMEOUT", default_value = "5m", value_parser = duration)]
    pub upstream_idle_timeout: Duration,
    /// Below this share of healthy instances (0-1), route to every instance of a service, critical
    /// ones too (Envoy's panic threshold); 0 turns it off.
    #[arg(long, env = "TRELLIS_PANIC_THRESHOLD", default_value_t = crate::health_panic::DEFAULT_THRESHOLD)]
    pub panic_threshold: f64,

    // ---- Proxy.
    #[command(flatten)]
    pub proxy: ProxyArgs,
    #[command(flatten)]
    pub upgrade: UpgradeArgs,

    // ---- Mesh identity.
    #[command(flatten)]
    pub identity: IdentityArgs,
    // ---- Inbound (mutual TLS in front of the app).
    #[command(flatten)]
    pub inbound: InboundArgs,

    // ---- Shutdown.
    /// After deregistering, keep proxying this long so peers' watches catch up.
    #[arg(long, env = "TRELLIS_DRAIN", default_value = "2s", value_parser = duration)]
    pub drain: Duration,
    /// After the drain, how long in-flight requests get to finish before the sidecar exits.
    #[arg(long, env = "TRELLIS_GRACE", default_value = "5s", value_parser = duration)]
    pub grace: Duration,
}

/// A configuration error, printed as is before exiting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// What registering the local app needs.
#[derive(Debug, Clone)]
pub struct AppSettings {
    pub registration: RegistrationConfig,
    pub health: HealthConfig,
}

/// Everything the sidecar runs with, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub registry: Vec<Url>,
    pub client: ClientConfig,
    /// `None` without `--service`: nothing is registered.
    pub app: Option<AppSettings>,
    pub discovery: DiscoveryConfig,
    pub upstream_services: Vec<ServiceName>,
    /// Dedicated upstream ports: the service and where to listen for it.
    pub upstream_ports: Vec<(ServiceName, SocketAddr)>,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
    /// Where to write the bound addresses once listening (`--ready-file`).
    pub ready_file: Option<std::path::PathBuf>,
    pub workers: usize,
    pub shutdown: ShutdownConfig,
    pub log_level: String,
    pub proxy: ProxyConfig,
    /// `None` without `--mtls` (and what implies it): no mesh identity.
    pub identity: Option<IdentitySettings>,
    /// The inbound side (`--inbound`), when on.
    pub inbound: Option<InboundSettings>,
}

/// Where the inbound side listens and how it behaves.
#[derive(Debug, Clone)]
pub struct InboundSettings {
    pub listen: SocketAddr,
    pub config: InboundConfig,
}

/// Splits `host:port` (`[v6]:port` for IPv6); the host may be a hostname.
pub fn parse_host_port(s: &str, what: &str) -> Result<(Address, u16), ConfigError> {
    let err = || bad(format!("{what} {s:?} is invalid: expected HOST:PORT (e.g. 10.0.0.5:8080 or app:8080)"));
    let (host, port) = s.rsplit_once(':').ok_or_else(err)?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    let port: u16 = port.parse().map_err(|_| err())?;
    if port == 0 {
        return Err(bad(format!("{what} {s:?} is invalid: port must be between 1 and 65535")));
    }
    let host = Address::new(host).map_err(|e| bad(format!("{what} {s:?} is invalid: {e}")))?;
    Ok((host, port))
}

/// `--upstream NAME=ADDR` values, checked: valid names, distinct addresses
/// that are not the outbound or admin listener.
fn parse_upstream_ports(
    items: &[String],
    outbound: SocketAddr,
    admin: SocketAddr,
) -> Result<Vec<(ServiceName, SocketAddr)>, ConfigError> {
    let mut out: Vec<(ServiceName, SocketAddr)> = Vec::new();
    for item in items {
        let err = |why: String| bad(format!("--upstream {item:?} is invalid: {why}"));
        let (name, addr) = item
            .split_once('=')
            .ok_or_else(|| err("expected NAME=ADDR, e.g. users=127.0.0.1:16001".into()))?;
        let name = ServiceName::new(name.trim()).map_err(|e| err(e.to_string()))?;
        let addr: SocketAddr = addr.trim().parse().map_err(|e| err(format!("{e} (expected IP:PORT)")))?;
        // Port 0 asks the kernel for a fresh port each time, so it never collides.
        if addr.port() != 0 && (addr == outbound || addr == admin || out.iter().any(|(_, a)| *a == addr)) {
            return Err(err(format!("{addr} is already used by another listener")));
        }
        out.push((name, addr));
    }
    Ok(out)
}

fn parse_metadata(items: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut map = BTreeMap::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| bad(format!("--metadata {item:?} is invalid: expected KEY=VALUE")))?;
        map.insert(k.trim().to_string(), v.to_string());
    }
    validate_metadata(&map).map_err(|e| bad(format!("--metadata: {e}")))?;
    Ok(map)
}

impl RunArgs {
    /// Checks every flag and builds the settings.
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let list = self.registry.as_deref().ok_or_else(|| {
            bad("--registry (or TRELLIS_REGISTRY) is required: the registry URL(s), e.g. http://registry:7600")
        })?;
        let registry =
            trellis_shared::client::parse_urls(list).map_err(|e| bad(format!("--registry: {e}")))?;
        if self.heartbeat_interval.is_zero() || self.heartbeat_interval >= self.ttl {
            return Err(bad(format!(
                "--heartbeat-interval ({}) must be above zero and shorter than --ttl ({})",
                WireDuration(self.heartbeat_interval),
                WireDuration(self.ttl)
            )));
        }
        let client = self
            .registry_client
            .apply(ClientConfig { backoff_cap: self.heartbeat_interval, ..ClientConfig::default() })?;
        if !client.tls.is_empty() {
            if let Some(plain) = registry.iter().find(|u| u.scheme() != "https") {
                return Err(bad(format!(
                    "--registry {plain} is plain http:// but registry TLS files are given; use https://"
                )));
            }
        }

        let app = match (&self.service, &self.app) {
            (None, None) => None,
            (None, Some(_)) => return Err(bad("--app needs --service (the name to register the app under)")),
            (Some(_), None) => return Err(bad("--service needs --app HOST:PORT (where the app listens)")),
            (Some(service), Some(app)) => Some(self.app_settings(service, app)?),
        };

        if self.workers == 0 {
            return Err(bad("--workers must be at least 1"));
        }
        if self.max_upstream_services == 0 {
            return Err(bad("--max-upstream-services must be at least 1"));
        }
        let upstream_ports = parse_upstream_ports(&self.upstreams, self.outbound, self.admin)?;
        let mut upstream_services = self.upstream_services.clone();
        // A dedicated port's service is watched from the start, like --upstream-service.
        upstream_services.extend(upstream_ports.iter().map(|(n, _)| n.clone()));
        upstream_services.sort();
        upstream_services.dedup();
        if upstream_services.len() > self.max_upstream_services {
            return Err(bad(format!(
                "{} --upstream-service names exceed --max-upstream-services ({})",
                upstream_services.len(),
                self.max_upstream_services
            )));
        }
        if self.upstream_idle_timeout.is_zero() {
            return Err(bad("--upstream-idle-timeout must be above zero"));
        }
        if !(0.0..=1.0).contains(&self.panic_threshold) {
            return Err(bad("--panic-threshold must lie between 0 and 1"));
        }
        self.proxy.check()?;
        let proxy = {
            let mut proxy = ProxyConfig { hedges: self.proxy.hedges()?, ..self.proxy.proxy_config() };
            proxy.balance.zone.local = self.zone.clone();
            self.upgrade.apply(&mut proxy)?;
            proxy
        };
        let inbound = self
            .inbound
            .config(app.as_ref().map(|a| a.health.target.as_str()), &proxy)?
            .map(|(listen, config)| InboundSettings { listen, config });
        let identity = self.identity.settings(self.service.as_ref(), inbound.is_some())?;

        Ok(Settings {
            registry,
            client,
            app,
            discovery: DiscoveryConfig {
                max_services: self.max_upstream_services,
                idle_timeout: self.upstream_idle_timeout,
                restart_retention: self.ttl,
                panic_threshold: self.panic_threshold,
            },
            upstream_services,
            upstream_ports,
            outbound: self.outbound,
            admin: self.admin,
            ready_file: self.ready_file.clone(),
            workers: self.workers,
            shutdown: ShutdownConfig { drain: self.drain, grace: self.grace },
            log_level: self.log_level.clone(),
            proxy,
            inbound,
            identity,
        })
    }

    fn app_settings(&self, service: &ServiceName, app: &str) -> Result<AppSettings, ConfigError> {
        let (app_host, app_port) = parse_host_port(app, "--app")?;
        // Behind an inbound side, peers reach the app through it only.
        let (address, port) = match (&self.advertise, self.inbound.inbound) {
            (Some(a), _) => parse_host_port(a, "--advertise")?,
            // An inbound side bound to one address is reachable there only.
            (None, Some(inbound)) if !inbound.ip().is_unspecified() => {
                let host =
                    Address::new(inbound.ip().to_string()).map_err(|e| bad(format!("--inbound: {e}")))?;
                (host, inbound.port())
            }
            (None, Some(inbound)) => (crate::host::default_advertise_host(&app_host), inbound.port()),
            (None, None) => (crate::host::default_advertise_host(&app_host), app_port),
        };
        let id = match &self.instance_id {
            Some(id) => id.clone(),
            None => crate::host::default_instance_id(app_port).map_err(bad)?,
        };
        if !WEIGHT_RANGE.contains(&self.weight) {
            return Err(bad(format!(
                "--weight must be between {} and {}, got {}",
                WEIGHT_RANGE.start(),
                WEIGHT_RANGE.end(),
                self.weight
            )));
        }
        let check: HealthCheck = self.health.parse().map_err(|e| bad(format!("--health: {e}")))?;
        if self.health_interval.is_zero()
            || self.health_timeout.is_zero()
            || self.health_timeout >= self.health_interval
        {
            return Err(bad(format!(
                "--health-timeout ({}) must be above zero and shorter than --health-interval ({})",
                WireDuration(self.health_timeout),
                WireDuration(self.health_interval)
            )));
        }
        if self.healthy_threshold == 0 || self.unhealthy_threshold == 0 {
            return Err(bad("--healthy-threshold and --unhealthy-threshold must be at least 1"));
        }
        // The app is checked where it listens; an unspecified bind address means this host.
        let target_host = match app_host.ip() {
            Some(ip) if ip.is_unspecified() => "127.0.0.1".to_string(),
            Some(IpAddr::V6(ip)) => format!("[{ip}]"),
            _ => app_host.to_string(),
        };
        let mut request = RegisterRequest::new(address, port);
        request.ttl = Some(WireDuration(self.ttl));
        request.zone = self.zone.clone();
        request.weight = Some(self.weight);
        request.metadata = parse_metadata(&self.metadata)?;
        request.tags = self.tags.clone();
        trellis_shared::types::validate_tags(&request.tags).map_err(|e| bad(format!("--tag: {e}")))?;
        request.status = Some(HealthStatus::Passing);
        request.mesh_tls = self.inbound.inbound.is_some();
        // An inbound port of 0 is chosen by the kernel; `run` advertises the
        // bound port, so only the rest is checked here.
        let mut checked = request.clone();
        if checked.port == 0 {
            checked.port = 1;
        }
        checked.validate().map_err(bad)?;
        Ok(AppSettings {
            registration: RegistrationConfig {
                service: service.clone(),
                id,
                request,
                heartbeat_interval: self.heartbeat_interval,
                backoff_base: Duration::from_millis(100).min(self.heartbeat_interval),
            },
            health: HealthConfig {
                check,
                target: format!("{target_host}:{app_port}"),
                interval: self.health_interval,
                timeout: self.health_timeout,
                healthy_threshold: self.healthy_threshold,
                unhealthy_threshold: self.unhealthy_threshold,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Settings, String> {
        let mut all = vec!["sidecar"];
        all.extend_from_slice(args);
        let cli = Cli::try_parse_from(all).map_err(|e| e.to_string())?;
        cli.run.settings().map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_proxy_only() {
        let s = parse(&["--registry", "http://127.0.0.1:7600"]).unwrap();
        assert!(s.app.is_none());
        assert_eq!(s.outbound, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(s.admin, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(s.discovery.max_services, 256);
        assert_eq!(s.discovery.panic_threshold, 0.5);
        assert_eq!(s.client.backoff_cap, Duration::from_secs(1));
        assert_eq!(s.shutdown.drain, Duration::from_secs(2));
    }

    #[test]
    fn panic_threshold_is_a_share() {
        let with = |v: &str| parse(&["--registry", "http://r:1", &format!("--panic-threshold={v}")]);
        assert_eq!(with("0").unwrap().discovery.panic_threshold, 0.0);
        assert_eq!(with("1").unwrap().discovery.panic_threshold, 1.0);
        for v in ["1.5", "-0.1", "NaN"] {
            let e = with(v).unwrap_err();
            assert!(e.contains("--panic-threshold"), "{v}: {e}");
        }
        assert!(with("half").is_err());
    }

    #[test]
    fn cli_defaults_round_trip_to_the_proxy_defaults() {
        let cli = Cli::try_parse_from(["sidecar", "--registry", "http://r:1"]).unwrap();
        let ours = cli.run.settings().unwrap().proxy;
        let theirs = ProxyConfig::default();
        assert_eq!(format!("{ours:?}"), format!("{theirs:?}"));
    }

    #[test]
    fn zone_aware_routing_takes_the_sidecars_zone_and_checks_its_marks() {
        let s = parse(&["--registry", "http://r:1", "--zone", "eu-1a"]).unwrap();
        let zone = &s.proxy.balance.zone;
        assert_eq!(zone.routing_zone().map(|z| z.as_str()), Some("eu-1a"));
        let off = parse(&["--registry", "http://r:1", "--zone", "eu-1a", "--zone-aware", "false"]).unwrap();
        assert!(off.proxy.balance.zone.routing_zone().is_none());
        let bad = parse(&["--registry", "http://r:1", "--zone-spill-load", "1", "--zone-return-load", "1"]);
        assert!(bad.unwrap_err().contains("--zone-return-load"));
        assert!(parse(&["--registry", "http://r:1", "--zone-min-local", "0"]).is_err());
    }

    #[test]
    fn full_app_settings() {
        let s = parse(&[
            "--registry",
            "http://r1:7600,http://r2:7600",
            "--service",
            "users",
            "--app",
            "127.0.0.1:8080",
            "--advertise",
            "users-1:8080",
            "--zone",
            "a",
            "--metadata",
            "version=2",
            "--metadata",
            "track=canary",
            "--tag",
            "v2",
            "--tag",
            "canary",
            "--health",
            "http:/health",
            "--upstream-service",
            "orders",
        ])
        .unwrap();
        assert_eq!(s.registry.len(), 2);
        let app = s.app.unwrap();
        assert_eq!(app.registration.request.address.as_str(), "users-1");
        assert_eq!(app.registration.request.port, 8080);
        assert_eq!(app.registration.request.metadata.len(), 2);
        assert_eq!(app.registration.request.tags, ["v2", "canary"]);
        assert_eq!(app.registration.request.ttl, Some(WireDuration(Duration::from_secs(5))));
        assert!(app.registration.id.as_str().ends_with("-8080"));
        assert_eq!(app.health.target, "127.0.0.1:8080");
        assert_eq!(app.health.check, HealthCheck::Http { path: "/health".into() });
        assert_eq!(s.upstream_services, vec![ServiceName::new("orders").unwrap()]);
        assert!(s.upstream_ports.is_empty());
    }

    #[test]
    fn dedicated_upstream_ports() {
        let s = parse(&[
            "--registry",
            "http://r:1",
            "--upstream",
            "users=127.0.0.1:16001",
            "--upstream",
            "orders=127.0.0.1:16002",
        ])
        .unwrap();
        let names: Vec<String> = s.upstream_ports.iter().map(|(n, a)| format!("{n}={a}")).collect();
        assert_eq!(names, ["users=127.0.0.1:16001", "orders=127.0.0.1:16002"]);
        assert_eq!(s.upstream_services.len(), 2);
        for (arg, needle) in [
            ("users", "NAME=ADDR"),
            ("Bad_Name=127.0.0.1:1", "invalid"),
            ("users=nowhere", "IP:PORT"),
            ("users=127.0.0.1:15001", "already used"),
        ] {
            let e = parse(&["--registry", "http://r:1", "--upstream", arg]).err().unwrap();
            assert!(e.contains(needle), "{arg}: {e}");
        }
    }

    #[test]
    fn default_advertise_is_not_loopback_when_an_interface_exists() {
        let s = parse(&["--registry", "http://r:1", "--service", "users", "--app", "0.0.0.0:8080"]).unwrap();
        let app = s.app.unwrap();
        assert_eq!(app.registration.request.port, 8080);
        assert_eq!(app.health.target, "127.0.0.1:8080");
        // On a host with only loopback the fallback is 127.0.0.1; either way an IP.
        assert!(app.registration.request.address.ip().is_some());
    }

    #[test]
    fn bad_config_is_refused_with_a_clear_message() {
        let cases: &[(&[&str], &str)] = &[
            (&[], "--registry"),
            (&["--registry", "ftp://x"], "scheme"),
            (&["--registry", "http://r", "--service", "users"], "--app"),
            (&["--registry", "http://r", "--app", "127.0.0.1:1"], "--service"),
            (&["--registry", "http://r", "--service", "Users", "--app", "a:1"], "service name"),
            (&["--registry", "http://r", "--service", "u", "--app", "a"], "HOST:PORT"),
            (&["--registry", "http://r", "--service", "u", "--app", "a:0"], "port"),
            (&["--registry", "http://r", "--service", "u", "--app", "a:1", "--health", "udp"], "--health"),
            (
                &["--registry", "http://r", "--service", "u", "--app", "a:1", "--metadata", "novalue"],
                "KEY=VALUE",
            ),
            (&["--registry", "http://r", "--service", "u", "--app", "a:1", "--weight", "0"], "--weight"),
            (&["--registry", "http://r", "--service", "u", "--app", "a:1", "--tag", "a b"], "--tag"),
            (
                &["--registry", "http://r", "--service", "u", "--app", "a:1", "--health-timeout", "2s"],
                "--health-timeout",
            ),
            (&["--registry", "http://r", "--heartbeat-interval", "10s"], "--heartbeat-interval"),
            (&["--registry", "http://r", "--health-interval", "soon"], "examples"),
            (&["--registry", "http://r", "--workers", "0"], "--workers"),
            (&["--registry", "http://r", "--max-attempts", "0"], "--max-attempts"),
            (&["--registry", "http://r", "--outbound", "nowhere"], "--outbound"),
        ];
        for (args, needle) in cases {
            let e = parse(args).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(e.contains(needle), "{args:?}: {e:?} does not mention {needle}");
        }
    }

    #[test]
    fn mesh_identity_flags() {
        let r = ["--registry", "http://r:1"];
        assert!(parse(&r).unwrap().identity.is_none());
        let app = ["--service", "users", "--app", "127.0.0.1:8080"];
        let s = parse(&[&r[..], &app[..], &["--mtls"]].concat()).unwrap().identity.unwrap();
        assert_eq!(s.service.as_str(), "users");
        assert_eq!(s.trust_domain.as_str(), "trellis.local");
        let client =
            parse(&[&r[..], &["--identity", "web", "--trust-domain", "prod.example"]].concat()).unwrap();
        let s = client.identity.unwrap();
        assert_eq!((s.service.as_str(), s.trust_domain.as_str()), ("web", "prod.example"));
        for (args, needle) in [
            (&["--mtls"][..], "--identity"),
            (&["--identity", "web", "--service", "users", "--app", "127.0.0.1:1"][..], "differs"),
            (&["--mtls", "--identity", "web", "--trust-domain", "Bad Domain"][..], "--trust-domain"),
        ] {
            let e = parse(&[&r[..], args].concat()).unwrap_err();
            assert!(e.contains(needle), "{args:?}: {e}");
        }
    }

    #[test]
    fn inbound_is_advertised_with_mesh_tls_and_forwards_to_the_app() {
        let app = ["--registry", "http://r:1", "--service", "users", "--app", "127.0.0.1:8080"];
        let with = |extra: &[&str]| {
            let mut args = app.to_vec();
            args.extend_from_slice(extra);
            parse(&args).unwrap()
        };
        let s = with(&["--inbound", "0.0.0.0:15006", "--allow-from", "web,admin", "--allow-from", "web"]);
        let request = &s.app.as_ref().unwrap().registration.request;
        assert_eq!((request.port, request.mesh_tls), (15006, true));
        let inbound = s.inbound.unwrap();
        assert_eq!(inbound.listen, "0.0.0.0:15006".parse().unwrap());
        assert_eq!(inbound.config.app, "127.0.0.1:8080");
        let allowed = vec![ServiceName::new("admin").unwrap(), ServiceName::new("web").unwrap()];
        assert_eq!(inbound.config.allow_from, crate::inbound::AllowFrom::Only(allowed));
        assert_eq!(inbound.config.max_concurrency, InboundConfig::DEFAULT.max_concurrency);
        // Port 0: `run` advertises the port bound, at the one address it binds.
        let s = with(&["--inbound", "127.0.0.1:0"]);
        let request = &s.app.as_ref().unwrap().registration.request;
        assert_eq!((request.address.as_str(), request.port), ("127.0.0.1", 0));
        assert_eq!(s.inbound.unwrap().config.allow_from, crate::inbound::AllowFrom::Any);
        // --advertise still wins.
        let s = with(&["--inbound", "0.0.0.0:15006", "--advertise", "users-1:443"]);
        assert_eq!(s.app.unwrap().registration.request.port, 443);
        // Without --inbound: the app's own port, in plain text.
        let s = with(&[]);
        let request = &s.app.as_ref().unwrap().registration.request;
        assert_eq!((request.port, request.mesh_tls), (8080, false));
        assert!(s.inbound.is_none());
    }

    #[test]
    fn inbound_flags_are_checked() {
        let app = ["--service", "users", "--app", "127.0.0.1:8080", "--inbound", "127.0.0.1:0"];
        let cases: &[(&[&str], &str)] = &[
            (&["--inbound", "127.0.0.1:15006"], "--inbound needs --service"),
            (&["--allow-from", "web"], "--allow-from needs --inbound"),
            (&["--inbound", "nowhere"], "--inbound"),
            (&["--allow-from", "Not_A_Name"], "--allow-from"),
        ];
        for (args, needle) in cases {
            let mut all = vec!["--registry", "http://r:1"];
            all.extend_from_slice(args);
            let e = parse(&all).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(e.contains(needle), "{args:?}: {e:?} does not mention {needle}");
        }
        let with_app: &[(&[&str], &str)] = &[
            (&["--inbound-max-concurrency", "0"], "--inbound-max-concurrency"),
            (&["--inbound-max-connections", "0"], "--inbound-max-connections"),
            (&["--inbound-header-timeout", "0s"], "--inbound-header-timeout"),
            (&["--inbound-idle-timeout", "5s"], "--inbound-idle-timeout"),
        ];
        for (args, needle) in with_app {
            let mut all = vec!["--registry", "http://r:1"];
            all.extend_from_slice(&app);
            all.extend_from_slice(args);
            let e = parse(&all).err().unwrap_or_else(|| panic!("{args:?} was accepted"));
            assert!(e.contains(needle), "{args:?}: {e:?} does not mention {needle}");
        }
    }

    #[test]
    fn probe_subcommand_parses_without_registry() {
        let cli = Cli::try_parse_from(["sidecar", "probe", "--admin", "127.0.0.1:9"]).unwrap();
        match cli.command {
            Some(Command::Probe(p)) => assert_eq!(p.admin.port(), 9),
            None => panic!("probe not parsed"),
        }
    }

    #[test]
    fn default_advertise_keeps_a_usable_app_host() {
        let host = |app: &str| {
            let s = parse(&["--registry", "http://r:1", "--service", "users", "--app", app]).unwrap();
            s.app.unwrap().registration.request.address.to_string()
        };
        assert_eq!(host("users-app:8080"), "users-app");
        assert_eq!(host("10.1.2.3:8080"), "10.1.2.3");
        // Loopback apps advertise an interface address (127.0.0.1 only on a host without one).
        assert!(host("localhost:8080").parse::<IpAddr>().is_ok());
        assert!(host("127.0.0.1:8080").parse::<IpAddr>().is_ok());
    }

    #[test]
    fn host_port_forms() {
        assert_eq!(parse_host_port("[::1]:80", "x").unwrap().0.as_str(), "::1");
        assert_eq!(parse_host_port("app-1:80", "x").unwrap().1, 80);
        assert!(parse_host_port("app_1:80", "x").is_err());
        assert!(parse_host_port(":80", "x").is_err());
    }
}
