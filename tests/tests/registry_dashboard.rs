//! The dashboard in a real browser: the registry binary serves `/ui/`, Debian's
//! headless Chromium loads it (driven over the DevTools protocol, see
//! `tests/src/browser.rs`), and the tests read what the page's own script
//! rendered: the token form, every service with its counts, the highlighted
//! and protected ones, a change made in the registry appearing without a
//! reload, a service's instances with their leases, and the expiry brake's
//! banner while it holds.
//!
//! Screenshots go to the test log directory, or to
//! `TRELLIS_DASHBOARD_SCREENSHOTS` when set (how docs/dashboard*.png are made).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use trellis_registry::acl::rules::digest_of;
use trellis_tests::browser::{Browser, Page};
use trellis_tests::process::{log_dir, unique_path};
use trellis_tests::{strings, wait_for, RegistryProc};

const WIDTH: u32 = 1440;
const HEIGHT: u32 = 900;
/// A generous bound for the page to render what it was sent.
const RENDER: Duration = Duration::from_secs(30);
/// The dashboard's promise: a change shows within a second.
const LIVE: Duration = Duration::from_secs(1);

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A registry client with an optional token.
struct Api {
    http: reqwest::Client,
    url: String,
    token: Option<String>,
}

impl Api {
    fn new(reg: &RegistryProc, token: Option<&str>) -> Api {
        Api { http: reqwest::Client::new(), url: reg.url(), token: token.map(str::to_string) }
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.url));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn register(&self, service: &str, id: &str, body: Value) {
        let resp = self
            .req(reqwest::Method::PUT, &format!("/v1/services/{service}/instances/{id}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "register {service}/{id}: {}", resp.text().await.unwrap_or_default());
    }

    async fn heartbeat(&self, service: &str, id: &str, body: Value) {
        let resp = self
            .req(reqwest::Method::PUT, &format!("/v1/services/{service}/instances/{id}/heartbeat"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "heartbeat {service}/{id}");
    }

    async fn deregister(&self, service: &str, id: &str) {
        let resp = self
            .req(reqwest::Method::DELETE, &format!("/v1/services/{service}/instances/{id}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204, "deregister {service}/{id}");
    }

    /// Heartbeats the registry accepted, from its own metric.
    async fn heartbeats_served(&self) -> u64 {
        let text = self.req(reqwest::Method::GET, "/metrics").send().await.unwrap().text().await.unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix("trellis_registry_heartbeats_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64
    }

    async fn status(&self) -> Value {
        self.req(reqwest::Method::GET, "/v1/status").send().await.unwrap().json().await.unwrap()
    }
}

/// An instance body: address, port, a long lease, and `extra` fields.
fn instance(port: u16, extra: Value) -> Value {
    let mut body = json!({"address": "10.0.0.1", "port": port, "ttl": "5m"});
    for (k, v) in extra.as_object().into_iter().flatten() {
        body[k] = v.clone();
    }
    body
}

/// The services table as the page rendered it.
const ROWS: &str = r#"[...document.querySelectorAll('#services-body tr')].map(r => ({
    name: r.dataset.service,
    cells: Object.fromEntries([...r.querySelectorAll('[data-col]')].map(c => [c.dataset.col, c.textContent])),
    down: r.classList.contains('down'),
    hidden: r.hidden,
}))"#;

fn row<'a>(rows: &'a Value, name: &str) -> &'a Value {
    rows.as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no row for {name} in {rows}"))
}

fn cell(rows: &Value, name: &str, col: &str) -> String {
    row(rows, name)["cells"][col].as_str().unwrap_or_default().to_string()
}

fn screenshot_path(name: &str) -> PathBuf {
    match std::env::var_os("TRELLIS_DASHBOARD_SCREENSHOTS") {
        Some(dir) => PathBuf::from(dir).join(format!("{name}.png")),
        None => unique_path(&log_dir(), name, "png"),
    }
}

/// How long after `since` the page shows `expression` as true.
async fn shows_within(
    browser: &mut Browser,
    page: &Page,
    what: &str,
    since: Instant,
    expression: &str,
) -> Duration {
    browser.wait_until(page, what, RENDER, expression).await;
    let took = since.elapsed();
    println!("{what}: shown {took:?} after the change");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_asks_for_a_token_shows_every_service_and_follows_changes_live() {
    let admin = hex(&rand::random::<[u8; 32]>());
    let acl = unique_path(&log_dir(), "dashboard-acl", "toml");
    std::fs::write(
        &acl,
        format!(
            "default = \"deny\"\n[[tokens]]\nname = \"ops\"\nsecret_sha256 = \"{}\"\nadmin = true\n",
            hex(&digest_of(admin.as_bytes()))
        ),
    )
    .unwrap();
    let args = strings(&["--acl-file", &acl.display().to_string(), "--protection-threshold", "0.5"]);
    let reg = RegistryProc::start("registry-dashboard", &args).await;
    let api = Api::new(&reg, Some(&admin));
    let meta = json!({"zone": "eu-1a", "tags": ["v2", "canary"], "metadata": {"version": "1.4.2"}});
    api.register("users", "u1", instance(8080, meta)).await;
    api.register("users", "u2", instance(8081, json!({"zone": "eu-1b"}))).await;
    api.register("users", "u3", instance(8082, json!({"zone": "eu-1b", "status": "warning"}))).await;
    api.heartbeat("users", "u3", json!({"output": "disk 91% full"})).await;
    api.register("billing", "b1", instance(9000, json!({"status": "critical"}))).await;
    api.register("payments", "p1", instance(9100, json!({}))).await;
    api.register("payments", "p2", instance(9101, json!({"status": "critical"}))).await;
    api.register("payments", "p3", instance(9102, json!({"status": "critical"}))).await;

    let mut browser = Browser::launch(WIDTH, HEIGHT).await;
    let page = browser.open(&format!("{}/ui/", reg.url()), WIDTH, HEIGHT).await;

    // No token yet, default deny: the token form, with the registry's reason.
    browser
        .wait_until(&page, "the token form", RENDER, "document.documentElement.dataset.state === 'auth'")
        .await;
    let message = browser.eval(&page, "document.getElementById('auth-message').textContent").await;
    assert!(message.as_str().unwrap_or("").contains("needs a token"), "{message}");
    let submit = format!(
        "document.getElementById('token').value = {}; document.getElementById('token-form').requestSubmit(); true",
        json!(admin)
    );
    browser.eval(&page, &submit).await;
    browser
        .wait_until(
            &page,
            "three services",
            RENDER,
            "document.documentElement.dataset.state === 'live' && document.querySelectorAll('#services-body tr').length === 3",
        )
        .await;
    let kept = browser.eval(&page, "sessionStorage.getItem('trellis.token')").await;
    assert!(kept.as_str() == Some(admin.as_str()), "the token is kept in session storage");

    // Every service with its counts, zones and guards.
    let rows = browser.eval(&page, ROWS).await;
    let counts = |name: &str| {
        ["instances", "passing", "warning", "critical"]
            .map(|c| cell(&rows, name, c).parse::<u32>().unwrap_or(99))
    };
    assert_eq!(counts("users"), [3, 2, 1, 0], "{rows}");
    assert_eq!(counts("billing"), [1, 0, 0, 1], "{rows}");
    assert_eq!(counts("payments"), [3, 1, 0, 2], "{rows}");
    assert_eq!(cell(&rows, "users", "zones"), "eu-1a, eu-1b");
    assert_eq!(cell(&rows, "billing", "zones"), "–");
    assert!(row(&rows, "billing")["down"] == true, "billing has no healthy instance: highlighted");
    assert!(cell(&rows, "billing", "guards").contains("no healthy instance"));
    assert!(row(&rows, "users")["down"] == false && row(&rows, "payments")["down"] == false);
    assert!(cell(&rows, "payments", "guards").contains("protection threshold holding"), "{rows}");
    assert!(!cell(&rows, "users", "guards").contains("protection"), "{rows}");

    // The registry's status, with the admin token.
    let fact = |name: &str| format!("document.querySelector('[data-fact=\"{name}\"] dd').textContent");
    browser.wait_until(&page, "the status", RENDER, &format!("{} === 'memory'", fact("store"))).await;
    assert_eq!(browser.eval(&page, &fact("epoch")).await, api.status().await["epoch"]);
    assert_eq!(browser.eval(&page, &fact("expiry-brake")).await, "armed");
    assert_eq!(browser.eval(&page, &fact("instances")).await, "7 (4 healthy)");
    assert_eq!(browser.eval(&page, "document.getElementById('brake-banner').hidden").await, true);

    // The filter box: by zone, then cleared.
    let filter = |q: &str| {
        format!("(() => {{ const f = document.getElementById('filter'); f.value = {}; f.dispatchEvent(new Event('input')); return true; }})()", json!(q))
    };
    browser.eval(&page, &filter("eu-1b")).await;
    let rows = browser.eval(&page, ROWS).await;
    let shown: Vec<&Value> = rows.as_array().unwrap().iter().filter(|r| r["hidden"] == false).collect();
    assert_eq!(shown.len(), 1, "{rows}");
    assert_eq!(shown[0]["name"], "users");
    browser.eval(&page, &filter("")).await;

    // Live: changes made in the registry show up without a reload (a value
    // set in the page's window would not survive one).
    let updates =
        browser.eval(&page, "window.__sameDocument = true; +document.documentElement.dataset.updates").await;
    let changed = Instant::now();
    api.register("orders", "o1", instance(7000, json!({"zone": "us-2a"}))).await;
    let took = shows_within(
        &mut browser,
        &page,
        "a new service",
        changed,
        "document.querySelector('tr[data-service=\"orders\"]') !== null",
    )
    .await;
    assert!(took < LIVE, "the new service showed after {took:?}");
    let changed = Instant::now();
    api.heartbeat("users", "u1", json!({"status": "critical"})).await;
    let took = shows_within(
        &mut browser,
        &page,
        "a health change",
        changed,
        "document.querySelector('tr[data-service=\"users\"] [data-col=\"critical\"]').textContent === '1'",
    )
    .await;
    assert!(took < LIVE, "the health change showed after {took:?}");
    let changed = Instant::now();
    api.deregister("billing", "b1").await;
    let took = shows_within(
        &mut browser,
        &page,
        "a removed service",
        changed,
        "document.querySelector('tr[data-service=\"billing\"]') === null",
    )
    .await;
    assert!(took < LIVE, "the removal showed after {took:?}");
    assert_eq!(
        browser.eval(&page, "window.__sameDocument === true").await,
        true,
        "the page was not reloaded"
    );
    let now = browser.eval(&page, "+document.documentElement.dataset.updates").await;
    assert!(now.as_u64() >= updates.as_u64().map(|u| u + 3), "updates {updates} -> {now}");

    // A service's page: every instance, its details and its lease.
    browser.eval(&page, "location.hash = '#/service/users'; true").await;
    browser
        .wait_until(
            &page,
            "the users page",
            RENDER,
            "document.documentElement.dataset.view === 'service' && document.querySelectorAll('#instances-body tr').length === 3 && document.querySelector('#instances-body tr[data-instance=\"u1\"] [data-col=\"lease-left\"]').textContent !== '–'",
        )
        .await;
    let cells = |id: &str| {
        format!("Object.fromEntries([...document.querySelectorAll('#instances-body tr[data-instance=\"{id}\"] [data-col]')].map(c => [c.dataset.col, c.textContent]))")
    };
    let u1 = browser.eval(&page, &cells("u1")).await;
    assert_eq!(u1["address"], "10.0.0.1");
    assert_eq!(u1["port"], "8080");
    assert_eq!(u1["zone"], "eu-1a");
    assert_eq!(u1["weight"], "100");
    assert_eq!(u1["tags"], "v2canary");
    assert_eq!(u1["metadata"], "version1.4.2");
    assert_eq!(u1["status"], "critical");
    assert!(u1["since-heartbeat"].as_str().unwrap_or("").ends_with(" ago"), "{u1}");
    let left = u1["lease-left"].as_str().unwrap_or("");
    assert!(left.starts_with("4m") || left.starts_with("5m"), "a 5m lease renewed moments ago: {u1}");
    let u3 = browser.eval(&page, &cells("u3")).await;
    assert_eq!(u3["output"], "disk 91% full");
    assert_eq!(u3["status"], "warning");
    let changed = Instant::now();
    api.heartbeat("users", "u2", json!({"status": "critical", "output": "connection refused"})).await;
    let took = shows_within(
        &mut browser,
        &page,
        "an instance's health change",
        changed,
        "document.querySelector('#instances-body tr[data-instance=\"u2\"] [data-col=\"status\"]').textContent === 'critical'",
    )
    .await;
    assert!(took < LIVE, "the instance's change showed after {took:?}");
    browser.screenshot(&page, &screenshot_path("dashboard-service")).await;
}

/// Stops one instance's heartbeat loop.
#[derive(Clone, Default)]
struct StopFlag(Arc<AtomicBool>);

/// Heartbeats `service/id` every 400 ms (a fifth of its 2 s TTL) until stopped.
fn heartbeats(api: &Api, service: &str, id: &str) -> StopFlag {
    let flag = StopFlag::default();
    let (http, url, f) = (
        api.http.clone(),
        format!("{}/v1/services/{service}/instances/{id}/heartbeat", api.url),
        flag.clone(),
    );
    tokio::spawn(async move {
        while !f.0.load(Ordering::Relaxed) {
            let _ = http.put(&url).send().await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    });
    flag
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_emergency_banner_shows_while_the_expiry_brake_holds() {
    let reg =
        RegistryProc::start("registry-dashboard-brake", &strings(&["--protection-threshold", "0.5"])).await;
    let api = Api::new(&reg, None);
    // Every instance has a 2 s lease and heartbeats: the brake's window is the
    // longest TTL, and a long-lived instance would stretch it.
    let mut fleet: Vec<(&str, String, Value)> = Vec::new();
    for i in 0..10 {
        let zone = ["eu-1a", "eu-1b"][i % 2];
        fleet.push((
            "users",
            format!("users-{i}"),
            json!({"address": format!("10.0.1.{i}"), "zone": zone, "tags": ["v2"]}),
        ));
    }
    fleet.push(("billing", "billing-1".into(), json!({"status": "critical", "zone": "eu-1a"})));
    fleet.push(("payments", "pay-1".into(), json!({"zone": "eu-1a"})));
    fleet.push(("payments", "pay-2".into(), json!({"status": "critical", "zone": "eu-1b"})));
    fleet.push(("payments", "pay-3".into(), json!({"status": "critical", "zone": "eu-1b"})));
    fleet.push(("orders", "orders-1".into(), json!({"zone": "eu-1a"})));
    fleet.push(("orders", "orders-2".into(), json!({"zone": "eu-1b", "status": "warning"})));
    let mut flags = Vec::new();
    for (port, (service, id, extra)) in (8080..).zip(&fleet) {
        let mut body = instance(port, extra.clone());
        body["ttl"] = json!("2s");
        api.register(service, id, body).await;
        flags.push(heartbeats(&api, service, id));
    }

    let mut browser = Browser::launch(WIDTH, HEIGHT).await;
    let page = browser.open(&format!("{}/ui/", reg.url()), WIDTH, HEIGHT).await;
    browser
        .wait_until(
            &page,
            "four services",
            RENDER,
            "document.querySelectorAll('#services-body tr').length === 4",
        )
        .await;
    // The brake learns each instance's heartbeat rate over a few TTLs: about
    // fifteen heartbeats each (see registry_guards.rs).
    let want = 15 * fleet.len() as u64;
    wait_for("the renewal rates to be learnt", Duration::from_secs(60), || async {
        (api.heartbeats_served().await >= want).then_some(())
    })
    .await;
    assert_eq!(browser.eval(&page, "document.getElementById('brake-banner').hidden").await, true);

    // The ten users instances go silent (10 of 16): the brake engages, and the page says so.
    let silent = Instant::now();
    for f in &flags[..10] {
        f.0.store(true, Ordering::Relaxed);
    }
    shows_within(
        &mut browser,
        &page,
        "the emergency banner",
        silent,
        "!document.getElementById('brake-banner').hidden",
    )
    .await;
    let banner = browser.eval(&page, "document.getElementById('brake-banner').textContent").await;
    assert!(banner.as_str().unwrap_or("").contains("EMERGENCY"), "{banner}");
    // Once their leases ran out, the banner counts the instances it holds.
    browser
        .wait_until(
            &page,
            "10 held instances",
            RENDER,
            "document.getElementById('brake-text').textContent.includes(' 10 instance(s)')",
        )
        .await;
    let fact =
        browser.eval(&page, "document.querySelector('[data-fact=\"expiry-brake\"] dd').textContent").await;
    assert_eq!(fact, "ENGAGED");
    let rows = browser.eval(&page, ROWS).await;
    assert_eq!(cell(&rows, "users", "instances"), "10", "the brake keeps every instance: {rows}");
    assert!(cell(&rows, "payments", "guards").contains("protection threshold holding"), "{rows}");
    browser.screenshot(&page, &screenshot_path("dashboard")).await;
    browser.color_scheme(&page, "dark").await;
    browser.screenshot(&page, &screenshot_path("dashboard-dark")).await;
    browser.color_scheme(&page, "light").await;

    // They come back: the brake releases and the banner goes.
    let back = Instant::now();
    for (service, id, _) in &fleet[..10] {
        flags.push(heartbeats(&api, service, id));
    }
    shows_within(
        &mut browser,
        &page,
        "the banner's removal",
        back,
        "document.getElementById('brake-banner').hidden",
    )
    .await;
    for f in &flags {
        f.0.store(true, Ordering::Relaxed);
    }
}

/// The dashboard's files are public; its data routes keep the token rules.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_routes_keep_the_token_rules() {
    let (admin, reader) = (hex(&rand::random::<[u8; 32]>()), hex(&rand::random::<[u8; 32]>()));
    let acl = unique_path(&log_dir(), "dashboard-acl", "toml");
    let token = |name: &str, secret: &str, rights: &str| {
        format!(
            "[[tokens]]\nname = \"{name}\"\nsecret_sha256 = \"{}\"\n{rights}\n",
            hex(&digest_of(secret.as_bytes()))
        )
    };
    let file = format!(
        "default = \"deny\"\n{}{}",
        token("ops", &admin, "admin = true"),
        token("reader", &reader, "read = [\"users\"]")
    );
    std::fs::write(&acl, file).unwrap();
    let reg =
        RegistryProc::start("registry-dashboard-acl", &strings(&["--acl-file", &acl.display().to_string()]))
            .await;
    let (ops, reads, nobody) =
        (Api::new(&reg, Some(&admin)), Api::new(&reg, Some(&reader)), Api::new(&reg, None));
    ops.register("users", "u1", instance(8080, json!({}))).await;
    ops.register("billing", "b1", instance(9000, json!({}))).await;
    let get = |api: &Api, path: &str| api.req(reqwest::Method::GET, path).send();

    for (path, content_type) in
        [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/style.css", "text/css")]
    {
        let r = get(&nobody, path).await.unwrap();
        assert_eq!(r.status(), 200, "{path} needs no token");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(content_type), "{path}: {h:?}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    let r = get(&nobody, "/ui").await.unwrap();
    assert_eq!(r.url().path(), "/ui/", "redirected to the page");

    let code = |v: &Value| v["error"].as_str().unwrap_or("").to_string();
    let r = get(&nobody, "/v1/overview").await.unwrap();
    assert_eq!(r.status(), 401);
    let names = |v: &Value| -> Vec<String> {
        v["services"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect()
    };
    let v: Value = get(&reads, "/v1/overview").await.unwrap().json().await.unwrap();
    assert_eq!(names(&v), ["users"], "a reader sees what it may read: {v}");
    let v: Value = get(&ops, "/v1/overview").await.unwrap().json().await.unwrap();
    assert_eq!(names(&v), ["billing", "users"], "{v}");

    let r = get(&reads, "/v1/status").await.unwrap();
    assert_eq!(r.status(), 403, "the status needs what /metrics needs");
    assert_eq!(code(&r.json().await.unwrap()), "permission_denied");
    assert_eq!(get(&ops, "/v1/status").await.unwrap().status(), 200);

    let r = get(&reads, "/v1/services/billing/leases").await.unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = get(&reads, "/v1/services/users/leases").await.unwrap().json().await.unwrap();
    assert_eq!(v["leases"][0]["id"], "u1", "{v}");
    assert_eq!(v["leases"][0]["ttl_ms"], 300_000, "{v}");

    for bad in
        ["/v1/status?x=1", "/v1/overview?all=true", "/v1/overview?wait=5s", "/v1/services/users/leases?all=1"]
    {
        let r = get(&ops, bad).await.unwrap();
        assert_eq!(r.status(), 400, "{bad}");
        assert_eq!(code(&r.json().await.unwrap()), "invalid_query", "{bad}");
    }
}
