//! The mesh identity's flags: whether the sidecar holds one, for which
//! service, in which trust domain (docs/mtls.md).

use clap::Args;
use trellis_shared::ServiceName;

use super::{bad, ConfigError};
use crate::identity::renew::RenewConfig;
use crate::identity::{TrustDomain, DEFAULT_TRUST_DOMAIN};

/// Mesh identity flags.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Hold a mesh identity: an ECDSA P-256 key made in memory and a short-lived
    /// certificate for it from the registry (`POST /v1/identity/sign`, with the
    /// token's write right on the service), renewed at about 70 % of its
    /// lifetime. `/ready` waits for the first certificate. Implied by --inbound.
    #[arg(long, env = "TRELLIS_MTLS")]
    pub mtls: bool,
    /// The service whose identity to hold when the sidecar registers nothing (a
    /// pure client). Default: --service. Implies --mtls.
    #[arg(long, env = "TRELLIS_IDENTITY", value_name = "SERVICE")]
    pub identity: Option<ServiceName>,
    /// Trust domain of the mesh: identities are `spiffe://<trust-domain>/svc/<service>`.
    /// Must match the registry's --trust-domain.
    #[arg(long, env = "TRELLIS_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
}

/// What holding an identity needs, checked.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    pub service: ServiceName,
    pub trust_domain: TrustDomain,
    pub renew: RenewConfig,
}

impl IdentityArgs {
    /// `None` when the sidecar holds no identity. `service` is `--service`;
    /// `implied` is true when another flag needs an identity (`--inbound`).
    pub fn settings(
        &self,
        service: Option<&ServiceName>,
        implied: bool,
    ) -> Result<Option<IdentitySettings>, ConfigError> {
        let trust_domain: TrustDomain =
            self.trust_domain.parse().map_err(|e| bad(format!("--trust-domain: {e}")))?;
        if !(self.mtls || implied || self.identity.is_some()) {
            return Ok(None);
        }
        let service = match (&self.identity, service) {
            (Some(identity), Some(service)) if identity != service => {
                return Err(bad(format!(
                    "--identity {identity} differs from --service {service}: a sidecar holds its service's identity"
                )))
            }
            (Some(identity), _) => identity.clone(),
            (None, Some(service)) => service.clone(),
            (None, None) => {
                return Err(bad("--mtls needs --service, or --identity SERVICE for a sidecar that registers nothing"))
            }
        };
        Ok(Some(IdentitySettings { service, trust_domain, renew: RenewConfig::default() }))
    }
}
