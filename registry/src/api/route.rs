//! Which route a request takes, from its method and path alone: the label its
//! metrics carry, and whether the heartbeat fast path can serve it. Nothing
//! here allocates; it runs once per request.

use axum::http::Method;

use crate::metrics::Route;

/// The route of a request, as the router would match it: path segments are
/// matched undecoded and none may be empty.
pub fn route_of(method: &Method, path: &str, query: Option<&str>) -> Route {
    match path {
        "/health" => return Route::Health,
        "/metrics" => return Route::Metrics,
        "/v1/identity/sign" => return Route::IdentitySign,
        "/v1/services" if method == Method::GET => return Route::List,
        "/v1/status" => return Route::Status,
        "/v1/overview" => return Route::Overview,
        "/ui" => return Route::Ui,
        p if p.starts_with("/ui/") => return Route::Ui,
        _ => {}
    }
    if ["/v1/agent/", "/v1/catalog/", "/v1/health/"].iter().any(|p| path.starts_with(p)) {
        return match query {
            Some(q) if q.split('&').any(|kv| kv.starts_with("index=") && kv != "index=0") => {
                Route::ConsulWatch
            }
            _ => Route::Consul,
        };
    }
    let Some(rest) = path.strip_prefix("/v1/services/") else { return Route::Other };
    let mut segments = [""; 4];
    let mut n = 0;
    for s in rest.split('/') {
        if n == segments.len() || s.is_empty() {
            return Route::Other;
        }
        segments[n] = s;
        n += 1;
    }
    match (&segments[..n], method) {
        ([_], &Method::GET) if query.is_some_and(|q| q.contains("index=")) => Route::Watch,
        ([_], &Method::GET) | ([_, "leases"], &Method::GET) => Route::Get,
        ([_, "instances", _], &Method::PUT) => Route::Register,
        ([_, "instances", _], &Method::DELETE) => Route::Deregister,
        ([_, "instances", _, "heartbeat"], &Method::PUT) => Route::Heartbeat,
        _ => Route::Other,
    }
}

/// `(service, id)` of `/v1/services/{service}/instances/{id}/heartbeat`, for
/// paths without percent-escapes (valid names never need them; escaped paths
/// go through the router, which decodes them).
pub fn heartbeat_path(path: &str) -> Option<(&str, &str)> {
    if path.contains('%') {
        return None;
    }
    let rest = path.strip_prefix("/v1/services/")?.strip_suffix("/heartbeat")?;
    let (service, id) = rest.split_once("/instances/")?;
    (!service.is_empty() && !service.contains('/') && !id.is_empty() && !id.contains('/'))
        .then_some((service, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_as_the_router_matches_them() {
        let cases = [
            (Method::GET, "/health", None, Route::Health),
            (Method::POST, "/health", None, Route::Health),
            (Method::GET, "/metrics", None, Route::Metrics),
            (Method::GET, "/v1/services", None, Route::List),
            (Method::DELETE, "/v1/services", None, Route::Other),
            (Method::GET, "/v1/services/users", None, Route::Get),
            (Method::GET, "/v1/services/users", Some("index=4&wait=1s"), Route::Watch),
            (Method::GET, "/v1/services/a%2Fb", Some("all=true"), Route::Get),
            (Method::POST, "/v1/services/users", None, Route::Other),
            (Method::PUT, "/v1/services/users/instances/a", None, Route::Register),
            (Method::DELETE, "/v1/services/users/instances/a", None, Route::Deregister),
            (Method::PATCH, "/v1/services/users/instances/a", None, Route::Other),
            (Method::PUT, "/v1/services/users/instances/a/heartbeat", None, Route::Heartbeat),
            (Method::GET, "/v1/services/users/instances/a/heartbeat", None, Route::Other),
            (Method::PUT, "/v1/services/users/instances//heartbeat", None, Route::Other),
            (Method::GET, "/v1/services/", None, Route::Other),
            (Method::PUT, "/v1/services/users/instances/a/heartbeat/x", None, Route::Other),
            (Method::GET, "/v2/services", None, Route::Other),
            (Method::POST, "/v1/identity/sign", None, Route::IdentitySign),
            (Method::POST, "/v1/identity/sign/x", None, Route::Other),
            (Method::GET, "/v1/catalog/services", Some("wait=120000ms"), Route::Consul),
            (Method::GET, "/v1/health/service/users", Some("index=0"), Route::Consul),
            (Method::GET, "/v1/health/service/users", Some("passing=1&index=9&wait=5s"), Route::ConsulWatch),
            (Method::PUT, "/v1/agent/service/register", None, Route::Consul),
            (Method::GET, "/v1/services/users/leases", None, Route::Get),
            (Method::GET, "/v1/status", None, Route::Status),
            (Method::GET, "/v1/overview", Some("index=3&wait=10s"), Route::Overview),
            (Method::GET, "/ui/", None, Route::Ui),
            (Method::GET, "/ui/app.js", None, Route::Ui),
            (Method::GET, "/uix", None, Route::Other),
        ];
        for (method, path, query, route) in cases {
            assert_eq!(route_of(&method, path, query), route, "{method} {path} {query:?}");
        }
    }

    #[test]
    fn matches_only_plain_heartbeat_paths() {
        assert_eq!(heartbeat_path("/v1/services/users/instances/a-1/heartbeat"), Some(("users", "a-1")));
        for other in [
            "/v1/services/users/instances/a-1",
            "/v1/services/users/instances//heartbeat",
            "/v1/services//instances/a/heartbeat",
            "/v1/services/users/instances/a/b/heartbeat",
            "/v1/services/users/x/instances/a/heartbeat",
            "/v1/services/users/instances/a%2Fb/heartbeat",
            "/v2/services/users/instances/a/heartbeat",
        ] {
            assert_eq!(heartbeat_path(other), None, "{other}");
        }
    }
}
