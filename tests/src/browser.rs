//! A real browser for the dashboard's tests: Debian's `chromium`, headless,
//! driven over the Chrome DevTools Protocol on a WebSocket.
//!
//! Chromium starts with `--remote-debugging-port=0` and writes the port it
//! bound to `DevToolsActivePort` in its profile directory (the same "bind 0,
//! report it" as our ready files). A [`Page`] is a tab attached with a flat
//! session; [`Page::eval`] runs an expression in it (awaiting a promise) and
//! returns its JSON value. Tests wait on what the page's script puts in the
//! DOM, never on a fixed delay, and the page is never reloaded by the test:
//! whatever changes in it came from its own script.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::process::{log_dir, unique_path, Launch, Proc};

/// How long a DevTools command may take before the test gives up.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// The browser binary: `TRELLIS_CHROMIUM`, else `chromium` on the PATH
/// (`scripts/ci-deps.sh` installs Debian's package).
pub fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("TRELLIS_CHROMIUM") {
        return PathBuf::from(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser"] {
            let p = dir.join(name);
            if p.is_file() {
                return p;
            }
        }
    }
    panic!("chromium is not installed: run scripts/ci-deps.sh as root (apt-get install chromium), or set TRELLIS_CHROMIUM")
}

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A headless Chromium with its own throw-away profile; killed on drop.
pub struct Browser {
    _proc: Proc,
    socket: Socket,
    next_id: u64,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// A tab, attached: commands to it carry its session id.
pub struct Page {
    session: String,
}

impl Browser {
    /// Starts the browser with a window of `width` x `height` and connects to it.
    pub async fn launch(width: u32, height: u32) -> Browser {
        let profile = unique_path(&std::env::temp_dir(), "trellis-chromium", "profile");
        std::fs::create_dir_all(&profile).expect("profile directory");
        let mut args = vec![
            "--headless".to_string(),
            "--disable-gpu".into(),
            "--no-first-run".into(),
            "--no-default-browser-check".into(),
            "--disable-extensions".into(),
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--remote-debugging-address=127.0.0.1".into(),
            "--remote-debugging-port=0".into(),
            format!("--window-size={width},{height}"),
            format!("--user-data-dir={}", profile.display()),
        ];
        // Chromium refuses to run as root inside its own sandbox.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            args.push("--no-sandbox".into());
        }
        args.push("about:blank".into());
        let launch = Launch::new("chromium", &chromium()).args(&args).log_to(unique_path(
            &log_dir(),
            "chromium",
            "log",
        ));
        let proc = launch.spawn().expect("start chromium");
        let port_file = profile.join("DevToolsActivePort");
        let url = crate::wait_for("chromium's DevToolsActivePort", Duration::from_secs(60), || {
            let port_file = port_file.clone();
            async move { devtools_url(&port_file) }
        })
        .await;
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str()).await.expect("connect to DevTools");
        Browser { _proc: proc, socket, next_id: 0, profile }
    }

    /// Sends a command (to the browser, or to a page's session) and returns its result.
    pub async fn command(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.socket.send(Message::text(msg.to_string())).await.expect("send to DevTools");
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, async {
            while let Some(frame) = self.socket.next().await {
                let Ok(Message::Text(text)) = frame else { continue };
                let Ok(v) = serde_json::from_str::<Value>(&text) else { continue };
                // Events have no id; answers to other commands cannot be pending.
                if v["id"].as_u64() == Some(id) {
                    return v;
                }
            }
            panic!("DevTools closed the connection during {method}");
        })
        .await
        .unwrap_or_else(|_| panic!("DevTools did not answer {method} within {COMMAND_TIMEOUT:?}"));
        if let Some(e) = answer.get("error") {
            panic!("DevTools {method} failed: {e}");
        }
        answer["result"].clone()
    }

    /// Opens `url` in a new tab of `width` x `height` CSS pixels.
    pub async fn open(&mut self, url: &str, width: u32, height: u32) -> Page {
        let target = self.command(None, "Target.createTarget", json!({"url": "about:blank"})).await;
        let target = target["targetId"].as_str().expect("targetId").to_string();
        let attached =
            self.command(None, "Target.attachToTarget", json!({"targetId": target, "flatten": true})).await;
        let page = Page { session: attached["sessionId"].as_str().expect("sessionId").to_string() };
        let metrics = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false});
        self.command(Some(&page.session), "Emulation.setDeviceMetricsOverride", metrics).await;
        self.command(Some(&page.session), "Page.enable", json!({})).await;
        self.command(Some(&page.session), "Page.navigate", json!({"url": url})).await;
        page
    }

    /// Evaluates `expression` in the page (awaiting it if it is a promise) and
    /// returns its value; an exception in the page fails the test.
    pub async fn eval(&mut self, page: &Page, expression: &str) -> Value {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let r = self.command(Some(&page.session), "Runtime.evaluate", params).await;
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression} threw in the page: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Waits until `expression` is truthy in the page; returns its value.
    pub async fn wait_until(
        &mut self,
        page: &Page,
        what: &str,
        timeout: Duration,
        expression: &str,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            // Before the first navigation commits there is no document to ask.
            let v = self
                .eval(
                    page,
                    &format!("(() => {{ try {{ return {expression}; }} catch (_) {{ return null; }} }})()"),
                )
                .await;
            if !(v.is_null() || v == json!(false) || v == json!("") || v == json!(0)) {
                return v;
            }
            if tokio::time::Instant::now() >= deadline {
                let state = self.eval(page, "document.documentElement.outerHTML.slice(0, 4000)").await;
                panic!("timed out after {timeout:?} waiting for {what}; the page: {state}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Emulates `prefers-color-scheme` (`light` or `dark`).
    pub async fn color_scheme(&mut self, page: &Page, scheme: &str) {
        let params = json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]});
        self.command(Some(&page.session), "Emulation.setEmulatedMedia", params).await;
    }

    /// A PNG of the page's viewport, written to `path`.
    pub async fn screenshot(&mut self, page: &Page, path: &Path) {
        use base64::Engine;
        let r = self.command(Some(&page.session), "Page.captureScreenshot", json!({"format": "png"})).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("screenshot data"))
            .expect("base64 screenshot");
        std::fs::write(path, png).expect("write the screenshot");
    }
}

/// The browser's WebSocket URL from `DevToolsActivePort` (port, then path),
/// once the file is complete.
fn devtools_url(port_file: &Path) -> Option<String> {
    let text = std::fs::read_to_string(port_file).ok()?;
    let mut lines = text.lines();
    let port: u16 = lines.next()?.trim().parse().ok()?;
    let path = lines.next()?.trim();
    path.starts_with("/devtools/").then(|| format!("ws://127.0.0.1:{port}{path}"))
}
