//! Who is calling, and whether they may: the caller's service from its
//! (already verified) certificate, checked against `--allow-from` once per
//! connection, since a connection's certificate never changes. Each request
//! then costs one atomic add on the caller's counters.

use std::sync::Arc;

use http::HeaderValue;
use rustls_pki_types::CertificateDer;
use trellis_shared::ServiceName;

use crate::identity::MeshIdentity;
use crate::metrics::{CallerCounters, Metrics};

/// Which services may call the app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllowFrom {
    /// Any service holding a certificate from the mesh's CA (the default).
    Any,
    /// Only these services.
    Only(Vec<ServiceName>),
}

impl AllowFrom {
    /// An empty list means any mesh service.
    pub fn from_list(mut services: Vec<ServiceName>) -> AllowFrom {
        if services.is_empty() {
            return AllowFrom::Any;
        }
        services.sort();
        services.dedup();
        AllowFrom::Only(services)
    }

    pub fn allows(&self, caller: &ServiceName) -> bool {
        match self {
            AllowFrom::Any => true,
            AllowFrom::Only(list) => list.binary_search(caller).is_ok(),
        }
    }
}

/// The caller of one connection and what was decided about it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub service: ServiceName,
    /// `x-trellis-caller`'s value, made once.
    pub header: HeaderValue,
    pub allowed: bool,
    pub counters: CallerCounters,
}

impl Caller {
    /// The caller presenting `certs` (verified by the handshake); `None` when
    /// the leaf names no service of this trust domain.
    pub fn identify(
        identity: &MeshIdentity,
        certs: &[CertificateDer<'_>],
        allow: &AllowFrom,
        metrics: &Metrics,
    ) -> Option<Arc<Caller>> {
        let service = identity.peer_service(certs)?;
        // A service name is a DNS label: always a valid header value.
        let header = HeaderValue::from_str(service.as_str()).ok()?;
        Some(Arc::new(Caller {
            allowed: allow.allows(&service),
            counters: metrics.caller(service.as_str()),
            header,
            service,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> Vec<ServiceName> {
        list.iter().map(|n| ServiceName::new(*n).unwrap()).collect()
    }

    #[test]
    fn empty_list_allows_any_mesh_service() {
        let any = AllowFrom::from_list(Vec::new());
        assert_eq!(any, AllowFrom::Any);
        assert!(any.allows(&ServiceName::new("whoever").unwrap()));
    }

    #[test]
    fn a_list_allows_exactly_its_services() {
        let only = AllowFrom::from_list(names(&["web", "admin", "web"]));
        assert_eq!(only, AllowFrom::Only(names(&["admin", "web"])));
        assert!(only.allows(&ServiceName::new("web").unwrap()));
        assert!(only.allows(&ServiceName::new("admin").unwrap()));
        assert!(!only.allows(&ServiceName::new("billing").unwrap()));
        assert!(!only.allows(&ServiceName::new("webx").unwrap()));
    }
}
