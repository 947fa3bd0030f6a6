//! Flags of the inbound side (mutual TLS in front of the app), mapped onto
//! [`InboundConfig`] and checked.

use std::net::SocketAddr;

use clap::Args;
use trellis_shared::{ServiceName, WireDuration};

use super::{bad, ConfigError};
use crate::inbound::{AllowFrom, InboundConfig};
use crate::proxy::ProxyConfig;

/// Inbound flags. The limits' defaults are [`InboundConfig::DEFAULT`]'s,
/// written there once.
#[derive(Debug, Args)]
pub struct InboundArgs {
    /// Listen here for calls from other sidecars (mutual TLS with the mesh's certificates, e.g.
    /// 0.0.0.0:15006) and forward them to --app; the registration then advertises this port
    /// (unless --advertise is given) and marks the instance mesh_tls. Needs --service and --app;
    /// implies --mtls. Default: off.
    #[arg(long, env = "TRELLIS_INBOUND", value_name = "ADDR")]
    pub inbound: Option<SocketAddr>,
    /// Services allowed to call the app through the inbound side (others get 403 not_allowed);
    /// repeat, or comma-separate. Default: any service holding a certificate from the mesh's CA.
    #[arg(long, env = "TRELLIS_ALLOW_FROM", value_delimiter = ',', value_name = "SERVICE[,SERVICE...]")]
    pub allow_from: Vec<ServiceName>,
    /// Most open connections on the inbound port (upgraded ones included); one more is closed
    /// before its TLS handshake.
    #[arg(long, env = "TRELLIS_INBOUND_MAX_CONNECTIONS", default_value_t = InboundConfig::DEFAULT.max_connections)]
    pub inbound_max_connections: usize,
    /// Most requests in flight to the app through the inbound side (a stream counts until its
    /// last byte); one more is answered 503 overloaded at once.
    #[arg(long, env = "TRELLIS_INBOUND_MAX_CONCURRENCY", default_value_t = InboundConfig::DEFAULT.max_concurrency)]
    pub inbound_max_concurrency: usize,
    /// Longest time from accept to the end of the first request head (TLS handshake included),
    /// and for a later request head from its first byte; the connection is then closed.
    #[arg(long, env = "TRELLIS_INBOUND_HEADER_TIMEOUT", default_value_t = WireDuration(InboundConfig::DEFAULT.header_timeout))]
    pub inbound_header_timeout: WireDuration,
    /// An inbound connection without a request in progress for this long is closed gracefully;
    /// at least --inbound-header-timeout.
    #[arg(long, env = "TRELLIS_INBOUND_IDLE_TIMEOUT", default_value_t = WireDuration(InboundConfig::DEFAULT.idle_timeout))]
    pub inbound_idle_timeout: WireDuration,
}

impl InboundArgs {
    /// The inbound listener and its settings, or `None` without `--inbound`.
    /// `app` is where the app listens (`--app`, checked); the proxy's
    /// connect, pool and upgrade timeouts and header size apply to the app side too.
    pub fn config(
        &self,
        app: Option<&str>,
        proxy: &ProxyConfig,
    ) -> Result<Option<(SocketAddr, InboundConfig)>, ConfigError> {
        let Some(listen) = self.inbound else {
            if !self.allow_from.is_empty() {
                return Err(bad("--allow-from needs --inbound (the listener it guards)"));
            }
            return Ok(None);
        };
        let app = app.ok_or_else(|| {
            bad("--inbound needs --service and --app (the app it forwards to, registered under that name)")
        })?;
        if self.inbound_max_connections == 0 || self.inbound_max_concurrency == 0 {
            return Err(bad("--inbound-max-connections and --inbound-max-concurrency must be at least 1"));
        }
        let (header, idle) = (self.inbound_header_timeout.0, self.inbound_idle_timeout.0);
        if header.is_zero() {
            return Err(bad("--inbound-header-timeout must be above zero"));
        }
        // The watchdog looks at a busy or new connection once per header
        // timeout; a shorter idle timeout would be enforced late.
        if idle < header {
            return Err(bad(format!(
                "--inbound-idle-timeout ({}) must be at least --inbound-header-timeout ({})",
                self.inbound_idle_timeout, self.inbound_header_timeout
            )));
        }
        Ok(Some((
            listen,
            InboundConfig {
                app: app.to_string(),
                allow_from: AllowFrom::from_list(self.allow_from.clone()),
                max_connections: self.inbound_max_connections,
                max_concurrency: self.inbound_max_concurrency,
                header_timeout: header,
                idle_timeout: idle,
                max_header_bytes: proxy.max_header_bytes,
                connect_timeout: proxy.connect_timeout,
                pool_idle_timeout: proxy.pool_idle_timeout,
                upgrade_idle_timeout: proxy.upgrade_idle_timeout,
            },
        )))
    }
}
