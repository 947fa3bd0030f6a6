//! What the proxy reads of gRPC: whether a message is gRPC, and the
//! `grpc-timeout` a client gives its call.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::HeaderMap;

/// A gRPC request or response: `content-type: application/grpc[+proto|;...]`.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// The call's deadline from `grpc-timeout` (1 to 8 digits and a unit: `H`,
/// `M`, `S`, `m`, `u`, `n`). A malformed value is ignored, as gRPC servers do.
pub fn timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &'static str, v: &'static str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(name, v.parse().unwrap());
        m
    }

    #[test]
    fn parses_grpc_timeout() {
        let t = |v| timeout(&h("grpc-timeout", v));
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("500u"), Some(Duration::from_micros(500)));
        assert_eq!(t("7n"), Some(Duration::from_nanos(7)));
        for bad in ["", "m", "123456789S", "10x", "-1S", "1.5S", "S1"] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn recognises_grpc_content_types() {
        assert!(is_grpc(&h("content-type", "application/grpc")));
        assert!(is_grpc(&h("content-type", "application/grpc+proto")));
        assert!(!is_grpc(&h("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }
}
