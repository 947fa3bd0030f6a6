//! Flags of upgraded (WebSocket) connections.

use clap::Args;
use trellis_shared::WireDuration;

use super::{bad, ConfigError};
use crate::proxy::ProxyConfig;

/// Upgraded-connection limits.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// An upgraded (WebSocket) connection with no byte either way for this long is closed on both
    /// sides. Upgraded connections also count against --max-connections.
    #[arg(long, env = "TRELLIS_UPGRADE_IDLE_TIMEOUT", default_value_t = WireDuration(ProxyConfig::DEFAULT.upgrade_idle_timeout))]
    pub upgrade_idle_timeout: WireDuration,
}

impl UpgradeArgs {
    pub fn apply(&self, proxy: &mut ProxyConfig) -> Result<(), ConfigError> {
        if self.upgrade_idle_timeout.0.is_zero() {
            return Err(bad("--upgrade-idle-timeout must be above zero"));
        }
        proxy.upgrade_idle_timeout = self.upgrade_idle_timeout.0;
        Ok(())
    }
}
