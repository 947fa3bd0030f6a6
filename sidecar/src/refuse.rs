//! Endpoints the sidecar refuses to connect to, whatever the registry says.
//!
//! Whoever can write to the registry chooses where this sidecar's app traffic
//! goes. Some destinations are never a real instance and only serve an attack:
//! - the sidecar's own listeners (outbound, admin, dedicated upstream ports):
//!   a request would loop through the proxy or reach the admin API;
//! - an unspecified address (`0.0.0.0`, `::`), which connects to this host;
//! - a multicast address;
//! - a link-local address (`169.254.0.0/16`, `fe80::/10`), home of the cloud
//!   metadata service at `169.254.169.254`;
//! - with `--require-mtls`, an instance not registered as mesh TLS: in a mesh
//!   that has fully moved to mutual TLS, a plain-text endpoint is either left
//!   over or forged, and it could not prove which service it is.
//!
//! Loopback endpoints stay allowed (a single-host setup registers them).
//! An address given as a host name is not resolved here and is not checked.
//! A listener bound to an unspecified address is matched on its port with any
//! loopback address or any of this host's interface addresses.

use std::net::{IpAddr, SocketAddr};

use trellis_shared::{Address, Instance};

/// Why an endpoint is refused (the `reason` label of `endpoints_refused`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    OwnListener,
    Unspecified,
    Multicast,
    LinkLocal,
    PlainText,
}

impl RefuseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RefuseReason::OwnListener => "own_listener",
            RefuseReason::Unspecified => "unspecified",
            RefuseReason::Multicast => "multicast",
            RefuseReason::LinkLocal => "link_local",
            RefuseReason::PlainText => "plain_text",
        }
    }
}

/// The check applied to every endpoint a watch learns of; built once at start.
#[derive(Debug, Clone, Default)]
pub struct EndpointFilter {
    /// The sidecar's bound listeners.
    own: Vec<SocketAddr>,
    /// This host's interface addresses, for listeners bound to an unspecified address.
    host_ips: Vec<IpAddr>,
    /// `--require-mtls`: only mesh TLS instances are endpoints.
    require_mtls: bool,
}

impl EndpointFilter {
    /// A filter refusing `own` listeners as well as the address classes above.
    pub fn new(own: Vec<SocketAddr>, host_ips: Vec<IpAddr>) -> Self {
        EndpointFilter { own, host_ips, require_mtls: false }
    }

    /// Refuses instances not registered as mesh TLS too (`--require-mtls`).
    pub fn require_mtls(mut self, require: bool) -> Self {
        self.require_mtls = require;
        self
    }

    /// Why the registry's `instance` must not be connected to, if it must not.
    pub fn check_instance(&self, instance: &Instance) -> Option<RefuseReason> {
        if self.require_mtls && !instance.mesh_tls {
            return Some(RefuseReason::PlainText);
        }
        self.check(&instance.address, instance.port)
    }

    /// A filter for `own` listeners, with this host's addresses read from its interfaces.
    pub fn for_listeners(own: Vec<SocketAddr>) -> Self {
        let host_ips = if_addrs::get_if_addrs()
            .map(|list| list.into_iter().map(|i| i.ip()).collect())
            .unwrap_or_default();
        Self::new(own, host_ips)
    }

    /// Why `address:port` must not be connected to, if it must not.
    pub fn check(&self, address: &Address, port: u16) -> Option<RefuseReason> {
        let ip = address.ip()?.to_canonical();
        if ip.is_unspecified() {
            return Some(RefuseReason::Unspecified);
        }
        if ip.is_multicast() {
            return Some(RefuseReason::Multicast);
        }
        if is_link_local(ip) {
            return Some(RefuseReason::LinkLocal);
        }
        let own = self.own.iter().any(|l| {
            l.port() == port
                && (l.ip().to_canonical() == ip
                    || (l.ip().is_unspecified() && (ip.is_loopback() || self.host_ips.contains(&ip))))
        });
        own.then_some(RefuseReason::OwnListener)
    }
}

fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(f: &EndpointFilter, host: &str, port: u16) -> Option<RefuseReason> {
        f.check(&Address::new(host).unwrap(), port)
    }

    #[test]
    fn refuses_own_listeners_and_special_addresses() {
        let f = EndpointFilter::new(
            vec!["127.0.0.1:15000".parse().unwrap(), "0.0.0.0:15001".parse().unwrap()],
            vec!["10.0.0.5".parse().unwrap()],
        );
        assert_eq!(check(&f, "127.0.0.1", 15000), Some(RefuseReason::OwnListener));
        assert_eq!(check(&f, "127.0.0.1", 15001), Some(RefuseReason::OwnListener));
        assert_eq!(check(&f, "10.0.0.5", 15001), Some(RefuseReason::OwnListener));
        assert_eq!(check(&f, "10.0.0.6", 15001), None, "another host's port 15001");
        assert_eq!(check(&f, "10.0.0.5", 15000), None, "the admin listener is on loopback only");
        assert_eq!(check(&f, "127.0.0.1", 8080), None, "loopback endpoints stay allowed");
        assert_eq!(check(&f, "169.254.169.254", 80), Some(RefuseReason::LinkLocal));
        assert_eq!(check(&f, "fe80::1", 80), Some(RefuseReason::LinkLocal));
        assert_eq!(check(&f, "::ffff:169.254.1.1", 80), Some(RefuseReason::LinkLocal));
        assert_eq!(check(&f, "0.0.0.0", 80), Some(RefuseReason::Unspecified));
        assert_eq!(check(&f, "::", 80), Some(RefuseReason::Unspecified));
        assert_eq!(check(&f, "224.0.0.1", 80), Some(RefuseReason::Multicast));
        assert_eq!(check(&f, "ff02::1", 80), Some(RefuseReason::Multicast));
        assert_eq!(check(&f, "users.internal", 15000), None, "host names are not resolved");
    }
}
