//! Case 3: HTTP/2 (h2c, prior knowledge) with 100 concurrent streams on one
//! connection, driven by h2load, through the Trellis sidecar, HAProxy in h2
//! mode and nginx with an `http2` listener. Every proxy speaks HTTP/1.1 with
//! keep-alive to the same three backends, so the case measures each proxy's
//! HTTP/2 server side plus its h2-to-h1 translation.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use super::{ratio, Sizes};
use crate::peers::{self, Env, Front, Kind, SERVICE};
use crate::procstat;
use crate::report::Section;

/// Streams per connection, and connections: 100 concurrent streams on one connection.
const STREAMS: usize = 100;
const CONNECTIONS: usize = 1;

/// What h2load printed, the parts the report uses.
#[derive(Debug, Clone, PartialEq)]
struct H2load {
    rps: f64,
    done: u64,
    ok_2xx: u64,
    /// Request time: min, mean, max, in µs.
    min_us: f64,
    mean_us: f64,
    max_us: f64,
}

impl H2load {
    fn failed(&self) -> u64 {
        self.done.saturating_sub(self.ok_2xx)
    }
}

/// `150us`, `10.52ms`, `1.2s` as µs.
fn duration_us(s: &str) -> Option<f64> {
    let (num, scale) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// The number before `word` in a line like `requests: 10 total, 9 done`.
fn count_before(line: &str, word: &str) -> Option<u64> {
    let mut prev = None;
    for tok in line.split(|c: char| c == ',' || c.is_whitespace()).filter(|t| !t.is_empty()) {
        if tok == word {
            return prev.and_then(|p: &str| p.parse().ok());
        }
        prev = Some(tok);
    }
    None
}

fn parse(out: &str) -> Result<H2load, String> {
    let line = |prefix: &str| {
        out.lines()
            .map(str::trim_start)
            .find(|l| l.starts_with(prefix))
            .ok_or_else(|| format!("h2load printed no `{prefix}` line:\n{out}"))
    };
    let finished = line("finished in")?;
    let rps = finished
        .split(',')
        .find_map(|p| p.trim().strip_suffix(" req/s").and_then(|v| v.parse::<f64>().ok()))
        .ok_or_else(|| format!("no req/s in `{finished}`"))?;
    let requests = line("requests:")?;
    let done = count_before(requests, "done").ok_or_else(|| format!("no done count in `{requests}`"))?;
    let codes = line("status codes:")?;
    let ok_2xx = count_before(codes, "2xx").ok_or_else(|| format!("no 2xx count in `{codes}`"))?;
    let times = line("time for request:")?;
    let cols: Vec<&str> = times.trim_start_matches("time for request:").split_whitespace().collect();
    let col = |i: usize| {
        cols.get(i).and_then(|c| duration_us(c)).ok_or_else(|| format!("cannot read column {i} of `{times}`"))
    };
    Ok(H2load { rps, done, ok_2xx, min_us: col(0)?, max_us: col(1)?, mean_us: col(2)? })
}

/// Runs h2load against `addr` for `secs` (it inherits the harness's pinning
/// to the load core). `:authority` names the service, as an app would.
fn h2load(addr: SocketAddr, secs: u64) -> Result<H2load, String> {
    let out = Command::new("h2load")
        .args(["-c", &CONNECTIONS.to_string(), "-m", &STREAMS.to_string(), "-t", "1"])
        .args(["-D", &secs.to_string()])
        .args(["-H", &format!(":authority: {SERVICE}")])
        .arg(format!("http://{addr}/"))
        .output()
        .map_err(|e| format!("h2load: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "h2load exited with {}: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse(&text)
}

/// h2load for a single request until one succeeds: the HTTP/2 readiness check.
fn wait_proxies(addr: SocketAddr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    loop {
        let out = Command::new("h2load")
            .args(["-n", "1", "-c", "1", "-H", &format!(":authority: {SERVICE}")])
            .arg(format!("http://{addr}/"))
            .output()
            .map_err(|e| format!("h2load: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if parse(&text).is_ok_and(|r| r.ok_2xx == 1) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!("no 2xx over HTTP/2 within {within:?}: {text}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

struct Row {
    kind: Kind,
    load: H2load,
    cpu_per_1k_ms: f64,
    cpu_share: f64,
    peak_rss_kib: u64,
    busy: Vec<f64>,
}

fn measure(kind: Kind, env: &Env, sizes: &Sizes) -> Result<Row, String> {
    let backends = peers::start_backends(env, "h2").map_err(|e| e.to_string())?;
    let target = peers::start_front(kind, env, &backends, "h2", Front::H2c).map_err(|e| e.to_string())?;
    let addr = *target.addrs.first().ok_or("target has no address")?;
    let pid = target.pid().ok_or("target has no process")?;
    wait_proxies(addr, Duration::from_secs(30)).map_err(|e| {
        format!("{e}; log:\n{}", target.main.as_ref().map(|p| p.log_tail()).unwrap_or_default())
    })?;
    // Whole seconds: h2load's -D takes no fractions.
    let secs = |d: Duration| d.as_secs().max(1);
    h2load(addr, secs(sizes.warmup))?;
    let cpu0 = procstat::cpu_time(pid);
    let j0 = procstat::cpu_jiffies();
    let t = Instant::now();
    let load = h2load(addr, secs(sizes.saturation))?;
    let window = t.elapsed();
    let cpu = procstat::cpu_time(pid) - cpu0;
    let busy = procstat::busy_percent(&j0, &procstat::cpu_jiffies());
    Ok(Row {
        kind,
        cpu_per_1k_ms: cpu.as_secs_f64() * 1000.0 / (load.ok_2xx.max(1) as f64 / 1000.0),
        cpu_share: 100.0 * cpu.as_secs_f64() / window.as_secs_f64(),
        peak_rss_kib: procstat::peak_rss_kib(pid),
        busy,
        load,
    })
}

pub fn run(env: &Env, sizes: &Sizes) -> Section {
    let title = "Case 3: HTTP/2 (h2c), 100 concurrent streams";
    let (rows, errors) = super::measure_each(3, &Kind::PROXIES, |kind| measure(kind, env, sizes));
    let mut b = String::new();
    let _ = writeln!(
        b,
        "`h2load -c {CONNECTIONS} -m {STREAMS} -t 1 -D {} -H ':authority: {SERVICE}' http://PROXY/` after a \
         {} s warm-up run: one HTTP/2 connection with prior knowledge (h2c) carrying up to {STREAMS} \
         concurrent streams, each GET sent as soon as a stream frees up. Every proxy reaches the three \
         HTTP/1.1 backends over keep-alive connections, so this is each proxy's HTTP/2 server side plus its \
         h2-to-h1 translation. The configurations are case 1's with the listener switched to HTTP/2: \
         HAProxy `bind ADDR proto h2`, nginx `listen ADDR http2;`; the Trellis sidecar takes HTTP/1.1 and \
         HTTP/2 on the same port with no setting. There is no direct row: the backends speak HTTP/1.1 only. \
         h2load reports request times as min / mean / max, not percentiles. Failed is done minus 2xx.\n",
        sizes.saturation.as_secs().max(1),
        sizes.warmup.as_secs().max(1),
    );
    let _ = writeln!(
        b,
        "| target | req/s | mean | min | max | failed | proxy CPU per 1k req | proxy CPU (% of a core) | peak RSS | core 0 busy | core 1 busy |"
    );
    let _ = writeln!(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let busy = |i: usize| r.busy.get(i).map_or("—".into(), |v| format!("{v:.0}%"));
        let _ = writeln!(
            b,
            "| {} | {:.0} | {} | {} | {} | {} | {:.1} ms | {:.0}% | {:.1} MiB | {} | {} |",
            r.kind.name(),
            r.load.rps,
            super::us(r.load.mean_us),
            super::us(r.load.min_us),
            super::us(r.load.max_us),
            r.load.failed(),
            r.cpu_per_1k_ms,
            r.cpu_share,
            r.peak_rss_kib as f64 / 1024.0,
            busy(0),
            busy(1),
        );
    }
    b.push_str(&errors);
    let get = |k: Kind| rows.iter().find(|r| r.kind == k);
    if let Some(t) = get(Kind::Trellis) {
        let _ = writeln!(b, "\nRatios (Trellis ÷ peer, same run):\n");
        let _ = writeln!(
            b,
            "| peer | req/s | mean latency | CPU per request | peak RSS |\n|---|---:|---:|---:|---:|"
        );
        for peer in [Kind::Haproxy, Kind::Nginx] {
            if let Some(p) = get(peer) {
                let _ = writeln!(
                    b,
                    "| {} | {} | {} | {} | {} |",
                    peer.name(),
                    ratio(t.load.rps, p.load.rps),
                    ratio(t.load.mean_us, p.load.mean_us),
                    ratio(t.cpu_per_1k_ms, p.cpu_per_1k_ms),
                    ratio(t.peak_rss_kib as f64, p.peak_rss_kib as f64),
                );
            }
        }
    }
    Section { title: title.into(), body: b }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "starting benchmark...
spawning thread #0: 1 total client(s). Timing-based test with 0s of warm-up time and 2s of main duration for timing.
Main benchmark duration is started for client #0.
Main benchmark duration is over for client #0. Stopping all clients.
Stopped all clients for thread #0

finished in 2.00s, 24718.50 req/s, 1.18MB/s
requests: 49437 total, 49537 started, 49437 done, 49430 succeeded, 7 failed, 0 errored, 0 timeout
status codes: 49430 2xx, 0 3xx, 0 4xx, 7 5xx
traffic: 2.36MB (2474227) total, 482.85KB (494435) headers (space savings 91.72%), 1.04MB (1087614) data
                     min         max         mean         sd        +/- sd
time for request:      297us     12.31ms      4.02ms       796us    80.54%
time for connect:      143us       143us       143us         0us   100.00%
time to 1st byte:     1.03ms      1.03ms      1.03ms         0us   100.00%
req/s           :   24718.19    24718.19    24718.19        0.00   100.00%
";

    #[test]
    fn reads_h2loads_summary() {
        let r = parse(SAMPLE).expect("parses");
        let rounded = H2load { mean_us: r.mean_us.round(), ..r.clone() };
        assert_eq!(
            rounded,
            H2load {
                rps: 24718.50,
                done: 49437,
                ok_2xx: 49430,
                min_us: 297.0,
                mean_us: 4020.0,
                max_us: 12310.0
            }
        );
        assert_eq!(r.failed(), 7);
    }

    #[test]
    fn reads_duration_units() {
        assert_eq!(duration_us("297us"), Some(297.0));
        assert_eq!(duration_us("1.5ms"), Some(1500.0));
        assert_eq!(duration_us("2.00s"), Some(2_000_000.0));
        assert_eq!(duration_us("12"), None);
    }

    #[test]
    fn a_truncated_summary_is_an_error() {
        let cut = SAMPLE.split("status codes").next().unwrap_or_default();
        assert!(parse(cut).is_err());
    }
}
