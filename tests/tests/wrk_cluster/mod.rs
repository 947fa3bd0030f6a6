//! A cluster as a new user builds one, for the failure tests under real load:
//! a registry, three Python backends (`tests/backends/echo_backend.py`, accept
//! backlog 5, one connection per request) each behind its own sidecar, a client
//! sidecar, and `wrk` driving the client sidecar's outbound port.
//!
//! Every process binds port 0 and reports its addresses in a ready file (read
//! by the tests library's `start_ready`); the cluster waits for those and for
//! the client to know every backend.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use trellis_tests::{start_ready, strings, wait_for, Launch, Proc, RegistryProc, SidecarProc};

pub const SERVICE: &str = "echo";

/// How a backend answers.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// At once.
    Prompt,
    /// After this long: a slow instance.
    Slow(Duration),
}

/// One Python backend and its sidecar.
pub struct Backend {
    pub name: String,
    pub app: Proc,
    pub addr: SocketAddr,
    pub sidecar: Proc,
}

/// The client sidecar the load goes through.
pub struct Client {
    pub proc: Proc,
    pub outbound: SocketAddr,
    pub admin: SocketAddr,
}

/// Fields drop in order: the client first, the registry last, so no sidecar
/// watches a registry that is already gone.
pub struct Cluster {
    pub client: Client,
    pub backends: Vec<Backend>,
    pub registry: Proc,
}

async fn start_backend(registry: SocketAddr, i: usize, behaviour: Behaviour) -> Backend {
    let name = format!("b{}", i + 1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("backends/echo_backend.py");
    let mut args = strings(&[&script.display().to_string(), "--name", &name]);
    if let Behaviour::Slow(d) = behaviour {
        args.extend(strings(&["--delay", &d.as_secs_f64().to_string()]));
    }
    let (app, ready) =
        start_ready(Launch::new(&format!("{name}-app"), Path::new("python3")).args(&args)).await;
    let addr = ready.addr("listen");
    let extra = strings(&[
        "--service",
        SERVICE,
        "--app",
        &addr.to_string(),
        // The backend listens on loopback only; by default the sidecar would
        // advertise this host's first non-loopback address.
        "--advertise",
        &addr.to_string(),
        "--instance-id",
        &format!("echo-{name}"),
        "--workers",
        "1",
    ]);
    let sidecar = SidecarProc::spawn(&format!("{name}-sidecar"), &format!("http://{registry}"), &extra).await;
    Backend { name, app, addr, sidecar: sidecar.proc }
}

impl Cluster {
    /// Starts the registry, one backend per entry of `backends`, and a client
    /// sidecar with `client_extra` flags; returns once the client sidecar sees
    /// every backend as an active endpoint.
    pub async fn start(backends: &[Behaviour], client_extra: &[&str]) -> Cluster {
        let registry = RegistryProc::start("registry", &[]).await;
        let mut started = Vec::new();
        for (i, b) in backends.iter().enumerate() {
            started.push(start_backend(registry.addr, i, *b).await);
        }
        let mut extra = strings(&["--upstream-service", SERVICE]);
        extra.extend(strings(client_extra));
        let sidecar = SidecarProc::spawn("client-sidecar", &registry.url(), &extra).await;
        let client = Client { proc: sidecar.proc, outbound: sidecar.outbound, admin: sidecar.admin };
        let n = backends.len();
        let admin = client.admin;
        wait_for(
            &format!("the client sidecar to see {n} active {SERVICE} endpoints"),
            Duration::from_secs(30),
            || async move {
                let states = endpoint_states(admin).await;
                (states.len() == n && states.iter().all(|s| s == "active")).then_some(())
            },
        )
        .await;
        Cluster { client, backends: started, registry: registry.proc }
    }
}

/// The client's endpoints of the service, by state.
pub async fn endpoint_states(admin: SocketAddr) -> Vec<String> {
    trellis_tests::admin::endpoint_list(admin, SERVICE)
        .await
        .into_iter()
        .map(|e| e["state"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// The client sidecar's counters that explain a lost request.
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCounters {
    pub ejections: f64,
    pub retries: f64,
    pub retries_refused_by_budget: f64,
    pub hedges: f64,
    /// Answers by class as the per-service metric counts them (the
    /// upstream's own and the sidecar's once the service has had endpoints).
    pub responses_4xx: f64,
    pub responses_5xx: f64,
    /// Every answer the sidecar made up itself, also those the per-service
    /// metric cannot count (too many pending requests, no target service).
    pub proxy_errors: f64,
}

/// Sum of every sample of `name` (any labels) in Prometheus text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        // fold from +0.0: an empty f64 sum() is -0.0, which prints as "-0".
        .fold(0.0, |a, b| a + b)
}

/// What changed between two readings.
impl std::ops::Sub for ClientCounters {
    type Output = ClientCounters;

    fn sub(self, before: ClientCounters) -> ClientCounters {
        ClientCounters {
            ejections: self.ejections - before.ejections,
            retries: self.retries - before.retries,
            retries_refused_by_budget: self.retries_refused_by_budget - before.retries_refused_by_budget,
            hedges: self.hedges - before.hedges,
            responses_4xx: self.responses_4xx - before.responses_4xx,
            responses_5xx: self.responses_5xx - before.responses_5xx,
            proxy_errors: self.proxy_errors - before.proxy_errors,
        }
    }
}

impl Client {
    pub async fn counters(&self) -> ClientCounters {
        let text = match reqwest::get(format!("http://{}/metrics", self.admin)).await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(e) => panic!("client sidecar /metrics: {e}"),
        };
        let class = |class: &str| {
            let label = format!(r#"class="{class}""#);
            text.lines()
                .filter(|l| l.starts_with("trellis_sidecar_requests_total{") && l.contains(&label))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .fold(0.0, |a, b| a + b)
        };
        ClientCounters {
            ejections: metric_sum(&text, "trellis_sidecar_ejections_total"),
            retries: metric_sum(&text, "trellis_sidecar_retries_total"),
            retries_refused_by_budget: metric_sum(&text, "trellis_sidecar_retries_refused_by_budget_total"),
            hedges: metric_sum(&text, "trellis_sidecar_hedges_total"),
            responses_4xx: class("4xx"),
            responses_5xx: class("5xx"),
            proxy_errors: metric_sum(&text, "trellis_sidecar_proxy_errors_total"),
        }
    }
}

/// What wrk measured.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WrkReport {
    pub requests: u64,
    pub non_2xx: u64,
    pub connect_errors: u64,
    pub read_errors: u64,
    pub write_errors: u64,
    pub timeouts: u64,
    /// Worst and 99th-percentile latency, in milliseconds.
    pub max_ms: f64,
    pub p99_ms: Option<f64>,
}

impl WrkReport {
    pub fn socket_errors(&self) -> u64 {
        self.connect_errors + self.read_errors + self.write_errors + self.timeouts
    }
}

/// wrk's durations: `850.00us`, `12.34ms`, `1.02s`, `1.50m`.
fn millis(s: &str) -> Option<f64> {
    let split = s.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "us" => n / 1000.0,
        "ms" => n,
        "s" => n * 1000.0,
        "m" => n * 60_000.0,
        "h" => n * 3_600_000.0,
        _ => return None,
    })
}

/// Parses wrk's summary. "Non-2xx or 3xx responses" and "Socket errors" are
/// printed only when non-zero, so absent means zero.
pub fn parse_wrk(out: &str) -> Result<WrkReport, String> {
    let mut r = WrkReport::default();
    let mut saw_requests = false;
    for line in out.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = rest.trim().parse().map_err(|_| format!("bad line: {line}"))?;
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for part in rest.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(k), Some(v)) = (kv.next(), kv.next()) else { continue };
                let v: u64 = v.parse().map_err(|_| format!("bad line: {line}"))?;
                match k {
                    "connect" => r.connect_errors = v,
                    "read" => r.read_errors = v,
                    "write" => r.write_errors = v,
                    "timeout" => r.timeouts = v,
                    _ => {}
                }
            }
        } else if words.len() >= 4 && words[0] == "Latency" {
            r.max_ms = millis(words[3]).ok_or_else(|| format!("bad line: {line}"))?;
        } else if words.len() == 2 && words[0] == "99%" {
            r.p99_ms = millis(words[1]);
        } else if words.len() >= 3 && words[1] == "requests" && words[2] == "in" {
            r.requests = words[0].parse().map_err(|_| format!("bad line: {line}"))?;
            saw_requests = true;
        }
    }
    if saw_requests {
        Ok(r)
    } else {
        Err(format!("no summary in wrk's output:\n{out}"))
    }
}

/// `wrk -t1 -c32` running against a client sidecar's outbound port with
/// `Host: echo`.
pub struct Wrk {
    child: std::process::Child,
}

impl Wrk {
    /// Starts `wrk -t1 -c32 -dDURATION EXTRA... http://OUTBOUND/`.
    pub fn start(outbound: SocketAddr, duration: Duration, extra: &[&str]) -> Wrk {
        let child = Command::new("wrk")
            .args(["-t1", "-c32", &format!("-d{}s", duration.as_secs()), "-H", &format!("Host: {SERVICE}")])
            .args(extra)
            .arg(format!("http://{outbound}/"))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("wrk: {e} (scripts/ci-deps.sh installs it)"));
        Wrk { child }
    }

    /// Waits for the end of the run and parses its summary.
    pub async fn finish(self) -> WrkReport {
        let child = self.child;
        let out = tokio::task::spawn_blocking(move || child.wait_with_output())
            .await
            .expect("join wrk")
            .expect("wait for wrk");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "wrk failed: {}\n{stdout}{stderr}", out.status);
        parse_wrk(&stdout).unwrap_or_else(|e| panic!("{e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_summaries() {
        let out = "Running 8s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n\
                   \x20 Thread Stats   Avg      Stdev     Max   +/- Stdev\n\
                   \x20   Latency     5.12ms    2.00ms   1.02s    90.00%\n\
                   \x20   Req/Sec     6.00k   500.00     7.00k    70.00%\n\
                   \x20 Latency Distribution\n     50%    4.00ms\n     99%  850.00us\n\
                   \x20 48000 requests in 8.00s, 5.00MB read\n\
                   \x20 Socket errors: connect 0, read 5, write 1, timeout 2\n\
                   \x20 Non-2xx or 3xx responses: 2000\nRequests/sec:   6000.00\n";
        let r = parse_wrk(out).unwrap();
        assert_eq!(r.requests, 48000);
        assert_eq!(r.non_2xx, 2000);
        assert_eq!((r.read_errors, r.write_errors, r.timeouts), (5, 1, 2));
        assert_eq!(r.socket_errors(), 8);
        assert_eq!(r.max_ms, 1020.0);
        assert_eq!(r.p99_ms, Some(0.85));
        let clean = "  10 requests in 1.00s, 1.00KB read\n    Latency   1.00ms  0.10ms  2.00ms  50.00%\n";
        let r = parse_wrk(clean).unwrap();
        assert_eq!((r.non_2xx, r.socket_errors(), r.p99_ms), (0, 0, None));
        assert!(parse_wrk("unable to connect").is_err());
    }

    #[test]
    fn sums_metric_samples_by_exact_name() {
        let text = "# HELP x\ntrellis_sidecar_retries_total{service=\"echo\"} 3\n\
                    trellis_sidecar_retries_refused_by_budget_total{service=\"echo\"} 7\n\
                    trellis_sidecar_retries_total{service=\"other\"} 1\n";
        assert_eq!(metric_sum(text, "trellis_sidecar_retries_total"), 4.0);
        assert_eq!(metric_sum(text, "trellis_sidecar_retries_refused_by_budget_total"), 7.0);
    }
}
