//! The target service of a request, and RFC 9110 hop-by-hop headers.

use http::header::{HeaderName, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Request};
use trellis_shared::ServiceName;

use crate::error::ProxyError;

/// The service a request is for: the host of an absolute-form URI (a client
/// using the sidecar as `HTTP_PROXY`), or else the Host header, without port,
/// case-folded, without a trailing dot.
pub fn target_service<B>(req: &Request<B>) -> Result<ServiceName, ProxyError> {
    let host = match req.uri().host() {
        Some(h) => h,
        None => {
            let value = req.headers().get(HOST).ok_or_else(|| {
                ProxyError::BadRequest("no Host header: it must name the target service".into())
            })?;
            let value = value
                .to_str()
                .map_err(|_| ProxyError::BadRequest("the Host header is not visible ASCII".into()))?;
            strip_port(value)
        }
    };
    let host = host.strip_suffix('.').unwrap_or(host);
    let name = if host.bytes().any(|b| b.is_ascii_uppercase()) {
        host.to_ascii_lowercase()
    } else {
        host.to_string()
    };
    ServiceName::new(name).map_err(|e| ProxyError::BadRequest(format!("Host does not name a service: {e}")))
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers dropped whether `Connection` names them or not.
static HOP_BY_HOP: [&HeaderName; 5] = [&KEEP_ALIVE, &PROXY_CONNECTION, &TE, &TRANSFER_ENCODING, &UPGRADE];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == CONNECTION || HOP_BY_HOP.contains(&name)
}

/// Removes the headers that concern only one connection (RFC 9110 §7.6.1):
/// those named in `Connection`, and `Connection`, `Proxy-Connection`,
/// `Keep-Alive`, `TE`, `Transfer-Encoding` and `Upgrade`. hyper frames bodies
/// itself on each side. End-to-end headers (`x-request-id`, `traceparent`, ...)
/// are not touched.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the few names present is
    // cheaper than hashing each hop-by-hop name (this ran twice per request
    // and was about 3 % of the proxy's instructions).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if headers.contains_key(CONNECTION) {
        // Rare enough that collecting the listed names first is fine.
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("").split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        headers.remove(CONNECTION);
        for n in listed {
            headers.remove(n);
        }
    }
    for name in HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: Option<&str>) -> Request<()> {
        let mut b = Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(HOST, h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn target_from_host_or_absolute_uri() {
        let t = |uri, host| target_service(&req(uri, host)).map(|n| n.to_string());
        assert_eq!(t("/x", Some("users")).unwrap(), "users");
        assert_eq!(t("/x", Some("users:8080")).unwrap(), "users");
        assert_eq!(t("/x", Some("Users.")).unwrap(), "users");
        assert_eq!(t("http://orders:80/x?y=1", Some("ignored")).unwrap(), "orders");
        assert_eq!(t("http://orders/x", None).unwrap(), "orders");
        for bad in [None, Some("bad_name"), Some("a.b"), Some("[::1]:80"), Some(""), Some("-x")] {
            let e = t("/x", bad).unwrap_err();
            assert!(matches!(e, ProxyError::BadRequest(_)), "{bad:?}: {e}");
        }
    }

    #[test]
    fn strips_hop_by_hop_only() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "keep-alive, x-private".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert("x-request-id", "abc".parse().unwrap());
        h.insert("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".parse().unwrap());
        h.insert(HOST, "users".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["host", "traceparent", "x-request-id"]);
        assert_eq!(h["traceparent"], "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
    }

    #[test]
    fn any_single_hop_by_hop_header_is_found() {
        for name in ["connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade"] {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", "abc".parse().unwrap());
            h.insert(HeaderName::from_static(name), "x".parse().unwrap());
            strip_hop_by_hop(&mut h);
            assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-request-id"], "{name}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
    }
}
