//! What the sidecar learns about the host it runs on, for the defaults of
//! its registration: the instance id (host name and app port) and the address
//! peers should use (the app's own host when peers can reach it, else this
//! host's first non-loopback address).

use std::net::{IpAddr, Ipv4Addr};

use trellis_shared::{Address, InstanceId};

/// Default instance id: host name and app port, stable across restarts.
pub fn default_instance_id(port: u16) -> Result<InstanceId, String> {
    let host = gethostname::gethostname().to_string_lossy().into_owned();
    let mut clean: String = host
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') { c } else { '-' })
        .collect();
    if clean.is_empty() {
        clean = "sidecar".into();
    }
    clean.truncate(trellis_shared::names::MAX_INSTANCE_ID_LEN - 6);
    InstanceId::new(format!("{clean}-{port}"))
        .map_err(|e| format!("cannot derive an instance id: {e}; set --instance-id"))
}

/// Default advertised host: the app's own host when peers can use it (a
/// specific non-loopback IP, or a hostname other than `localhost`, as when the
/// sidecar runs in its own container and reaches the app as `app:8080`), else
/// this host's first non-loopback address (IPv4 first).
pub fn default_advertise_host(app_host: &Address) -> Address {
    match app_host.ip() {
        Some(ip) if !ip.is_loopback() && !ip.is_unspecified() => return app_host.clone(),
        None if !app_host.as_str().trim_end_matches('.').eq_ignore_ascii_case("localhost") => {
            return app_host.clone()
        }
        _ => {}
    }
    let addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
        .map(|ifs| {
            ifs.into_iter().filter(|i| !i.is_loopback() && !i.is_link_local()).map(|i| i.ip()).collect()
        })
        .unwrap_or_default();
    let pick = addrs.iter().find(|ip| ip.is_ipv4()).or_else(|| addrs.first()).copied();
    let ip = pick.unwrap_or_else(|| {
        tracing::warn!("no non-loopback address found; advertising 127.0.0.1 (set --advertise)");
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    });
    // An IpAddr always makes a valid Address.
    Address::new(ip.to_string()).unwrap_or_else(|_| app_host.clone())
}
