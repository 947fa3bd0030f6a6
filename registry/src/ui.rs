//! The dashboard: a page, a script and a style sheet compiled into the binary
//! (`registry/ui/`) and served under `/ui/`, so it works offline, from a
//! `FROM scratch` image, and behind the registry's own TLS. The files are
//! public (they hold no data); the script reads the API with the token the
//! operator types in, like any other client (docs/dashboard.md).
//!
//! Every answer carries a Content-Security-Policy that allows scripts, styles
//! and requests from this origin only, with no inline script and no `eval`.

use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

const INDEX_HTML: &str = include_str!("../ui/index.html");
const APP_JS: &str = include_str!("../ui/app.js");
const STYLE_CSS: &str = include_str!("../ui/style.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                   img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes, for any router state.
pub fn routes<T: Clone + Send + Sync + 'static>() -> Router<T> {
    Router::new()
        .route("/ui", get(|| async { redirect() }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX_HTML) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP_JS) }))
        .route("/ui/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE_CSS) }))
}

fn secured(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The files change only with the binary; revalidating costs one small request.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(HeaderName::from_static("cross-origin-opener-policy"), HeaderValue::from_static("same-origin"));
    resp
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    secured(([(header::CONTENT_TYPE, content_type)], body).into_response())
}

/// `/ui` to `/ui/`, so the page's relative links resolve under it.
fn redirect() -> Response {
    secured((StatusCode::PERMANENT_REDIRECT, [(header::LOCATION, "/ui/")]).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_loads_its_script_and_styles_as_files_and_nothing_inline() {
        assert!(INDEX_HTML.contains(r#"<script src="app.js" defer></script>"#));
        assert!(INDEX_HTML.contains(r#"href="style.css""#));
        // CSP forbids inline script, handlers and styles: the page must not need them.
        for inline in ["<script>", " onclick=", " onload=", " onsubmit=", " style=\"", "<style"] {
            assert!(!INDEX_HTML.contains(inline), "inline {inline:?} in index.html");
        }
        for forbidden in ["eval(", "new Function", "innerHTML", "document.write"] {
            assert!(!APP_JS.contains(forbidden), "{forbidden:?} in app.js");
        }
        assert!(!CSP.contains("unsafe"), "{CSP}");
    }
}
