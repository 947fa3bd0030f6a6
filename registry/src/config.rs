//! Command line and environment configuration of the registry.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, FromArgMatches, Parser, Subcommand};

use crate::store::StoreSpec;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7600";

#[derive(Debug, Parser)]
#[command(name = "registry", version, about = "The Trellis service registry")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Exit 0 when the registry on this host answers `GET /health`, 1 otherwise
    /// (for healthchecks in images without a shell).
    Probe {
        /// Address to probe. Default: 127.0.0.1 at the port of `--listen`.
        #[arg(long, env = "TRELLIS_PROBE_ADDR")]
        addr: Option<SocketAddr>,
        /// How long to wait for the answer.
        #[arg(long, env = "TRELLIS_PROBE_TIMEOUT", default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Write a CA, the registry's certificate, an ACL file and one token per
    /// service into DIR (and etcd's certificates and passwords when asked):
    /// everything to run with TLS and tokens. Prints what it wrote, never a secret.
    Init(crate::init::InitArgs),
    /// Prepare etcd for the registry: create the root user, a role with
    /// readwrite on the prefix, the registry's user with that role, and turn
    /// etcd's authentication on. Idempotent (exit 0 when already done).
    EtcdSetup(crate::store::etcd::setup::SetupArgs),
    /// The operator commands: services, show, watch, deregister.
    #[command(flatten)]
    Operator(crate::cli::Command),
}

/// Everything the server needs. Every field has a flag and a `TRELLIS_<FLAG>`
/// environment variable.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address and port to listen on.
    #[arg(long, env = "TRELLIS_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,
    /// Once listening, write `{"listen":"IP:PORT"}` here (the bound address,
    /// which is how a caller learns the port when `--listen` has port 0).
    #[arg(long, env = "TRELLIS_READY_FILE", value_name = "PATH")]
    pub ready_file: Option<std::path::PathBuf>,
    /// Lease length of a registration that does not name one.
    #[arg(long, env = "TRELLIS_DEFAULT_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub default_ttl: Duration,
    /// Shortest lease a registration may ask for.
    #[arg(long, env = "TRELLIS_MIN_TTL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub min_ttl: Duration,
    /// Longest lease a registration may ask for.
    #[arg(long, env = "TRELLIS_MAX_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_ttl: Duration,
    /// Longest a blocking query is held; larger `wait` values are capped to it.
    #[arg(long, env = "TRELLIS_MAX_WAIT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_wait: Duration,
    /// Most blocking queries held open at once; past it they answer at once.
    #[arg(long, env = "TRELLIS_MAX_WATCHES", default_value_t = 16_384)]
    pub max_watches: usize,
    /// Most client connections open at once; past it new connections get `503 overloaded`.
    #[arg(long, env = "TRELLIS_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,
    /// Largest request body accepted, in bytes; larger ones get `413 payload_too_large`.
    #[arg(long, env = "TRELLIS_MAX_BODY", default_value_t = 65_536)]
    pub max_body: usize,
    /// How long a shutdown waits for open requests to finish before exiting anyway.
    #[arg(long, env = "TRELLIS_SHUTDOWN_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Tokio worker threads. 1 runs everything on the main thread (a
    /// current-thread runtime: no work-stealing hand-offs, the cheapest per
    /// request when the registry has one core); 0 (the default) starts one per core.
    #[arg(long, env = "TRELLIS_WORKERS", default_value_t = 0)]
    pub workers: usize,
    /// Log filter (tracing `EnvFilter` syntax); `RUST_LOG` overrides it when set.
    #[arg(long, env = "TRELLIS_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
    /// Where registrations live: `memory` (embedded, one registry) or
    /// `etcd://host:2379,host:2379[/prefix]` (replicas sharing an etcd cluster;
    /// prefix default `/trellis`). See docs/ha.md.
    #[arg(long, env = "TRELLIS_STORE", default_value = "memory")]
    pub store: StoreSpec,
    /// etcd store: how long one request to one etcd member may take before the
    /// registry tries the next member.
    #[arg(long, env = "TRELLIS_ETCD_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub etcd_timeout: Duration,
    /// etcd store: period of the linearizable read that detects a lost quorum;
    /// two failures in a row mark discovery stale and refuse writes.
    #[arg(long, env = "TRELLIS_ETCD_CHECK_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub etcd_check_interval: Duration,
    #[command(flatten)]
    pub etcd_client: crate::store::etcd::config::EtcdClientArgs,
    /// Expiry brake: pause expiry while fewer than `--brake-threshold` of the
    /// expected renewals arrive (protection from mass expiry). `true` or `false`.
    #[arg(long, env = "TRELLIS_EXPIRY_BRAKE", default_value_t = true, action = clap::ArgAction::Set)]
    pub expiry_brake: bool,
    /// Expiry brake: the fraction of expected renewals (over a window of the
    /// longest TTL) below which expiry pauses. It resumes at halfway between this
    /// and 1 (0.75 for the default 0.5).
    #[arg(long, env = "TRELLIS_BRAKE_THRESHOLD", default_value_t = 0.5)]
    pub brake_threshold: f64,
    /// Expiry brake: never engage with fewer instances registered than this.
    #[arg(long, env = "TRELLIS_BRAKE_MIN_INSTANCES", default_value_t = 10)]
    pub brake_min_instances: usize,
    /// Protection threshold, per service: when its healthy share falls to or
    /// below this fraction, discovery returns all its instances flagged
    /// `"protected": true`. 0 (the default) turns it off.
    #[arg(long, env = "TRELLIS_PROTECTION_THRESHOLD", default_value_t = 0.0)]
    pub protection_threshold: f64,
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    #[command(flatten)]
    pub connections: crate::server::limits::ConnectionLimits,
    #[command(flatten)]
    pub acl: crate::acl::AclArgs,
    #[command(flatten)]
    pub limits: crate::limits::Limits,
    #[command(flatten)]
    pub identity: crate::identity::IdentityArgs,
    #[command(flatten)]
    pub consul: crate::consul::config::ConsulArgs,
}

impl Default for Config {
    /// The defaults written on the flags above, as an empty command line
    /// gives them, without reading the environment.
    fn default() -> Self {
        let command = Config::augment_args(clap::Command::new("registry")).mut_args(|arg| arg.env(None));
        command
            .try_get_matches_from(["registry"])
            .and_then(|m| Config::from_arg_matches(&m))
            .unwrap_or_else(|e| panic!("the flags' defaults do not parse: {e}"))
    }
}

/// A configuration that cannot work; `main` prints it and exits 2.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    /// The memory store's protections from mass expiry.
    pub fn guards(&self) -> crate::brake::GuardConfig {
        crate::brake::GuardConfig {
            brake: self.expiry_brake,
            brake_threshold: self.brake_threshold,
            brake_release: self.brake_threshold + (1.0 - self.brake_threshold) / 2.0,
            brake_min_instances: self.brake_min_instances,
            protection_threshold: self.protection_threshold,
        }
    }

    /// Checks relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.min_ttl.is_zero() {
            return Err(ConfigError("--min-ttl must be above zero".into()));
        }
        if !(0.0..1.0).contains(&self.brake_threshold) {
            return Err(ConfigError("--brake-threshold must be at least 0 and below 1".into()));
        }
        if !(0.0..=1.0).contains(&self.protection_threshold) {
            return Err(ConfigError("--protection-threshold must lie between 0 and 1".into()));
        }
        if self.min_ttl > self.max_ttl {
            return Err(ConfigError("--min-ttl must not exceed --max-ttl".into()));
        }
        if self.default_ttl < self.min_ttl || self.default_ttl > self.max_ttl {
            return Err(ConfigError("--default-ttl must lie between --min-ttl and --max-ttl".into()));
        }
        if self.max_connections == 0 {
            return Err(ConfigError("--max-connections must be at least 1".into()));
        }
        if self.etcd_timeout.is_zero() || self.etcd_check_interval.is_zero() {
            return Err(ConfigError("--etcd-timeout and --etcd-check-interval must be above zero".into()));
        }
        if self.max_body < 1024 {
            return Err(ConfigError("--max-body must be at least 1024 bytes".into()));
        }
        self.tls.validate().map_err(ConfigError)?;
        self.identity.validate().map_err(ConfigError)?;
        self.connections.validate(self.max_wait).map_err(ConfigError)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_the_flags_and_not_the_environment() {
        // The variable is set for this process only; no other test reads it.
        std::env::set_var("TRELLIS_MAX_WATCHES", "7");
        let d = Config::default();
        assert_eq!(d.max_watches, 16_384);
        assert_eq!(Cli::try_parse_from(["registry"]).unwrap().config.max_watches, 7);
        std::env::remove_var("TRELLIS_MAX_WATCHES");
        assert_eq!(d.listen, DEFAULT_LISTEN.parse().unwrap());
        assert_eq!(d.store, StoreSpec::Memory);
        assert!(d.validate().is_ok());
    }

    #[test]
    fn flags_parse_durations_and_reject_bad_relations() {
        let cli = Cli::try_parse_from(["registry", "--min-ttl", "10s", "--default-ttl", "500ms"]).unwrap();
        assert_eq!(cli.config.default_ttl, Duration::from_millis(500));
        assert!(cli.config.validate().is_err());
        assert!(Cli::try_parse_from(["registry", "--max-wait", "soon"]).is_err());
        let cli = Cli::try_parse_from(["registry", "probe", "--addr", "127.0.0.1:1"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Probe { .. })));
    }
}
