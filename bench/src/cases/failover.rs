//! Case 5: failover — steady GET load through each proxy to three backends
//! while one of them fails, in three scenarios:
//!
//! - **kill**: `kill -9` of backend 1.
//! - **overlap**: backend 2 is slow from the start (its answers come after
//!   2 s, its health checks at once), so a proxy that ejects on timeouts has
//!   already ejected it when backend 1 is killed: two failures overlap.
//! - **pause**: backend 1 is frozen with SIGSTOP; the kernel still accepts
//!   connections and requests for it, nothing answers. Trellis runs it twice:
//!   with its defaults, and with hedged requests (`--hedge`), which only it has.
//!
//! Per proxy: failed requests, requests sent to the failed backend after the
//! failure, and the worst latency. Who still sends to that backend is seen from
//! outside every proxy the same way: tcpdump on loopback records each
//! connection attempt (SYN) and each data-bearing segment sent to its request
//! port after the failure. Health checks go to the backend's second port, so
//! they are not counted as requests.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Sizes;
use crate::load::open_loop;
use crate::peers::{self, Env, Front, Kind, Tuning};
use crate::procs::{wait_until, Proc};
use crate::report::Section;

/// How slow the slow backend of the overlap scenario is: well past every
/// proxy's per-try timeout there, short of the load generator's own.
const SLOW_ANSWER: Duration = Duration::from_secs(2);

/// Per-try timeout given to every proxy when a backend is slow or frozen: the
/// load generator gives up after 2 s, so a proxy waiting longer on one backend
/// fails the request whatever else it does.
const SOFT_FAILURE_TRY_TIMEOUT: Duration = Duration::from_millis(500);

/// Hedge delay of the extra Trellis row in the pause scenario: about ten times
/// a healthy answer's latency here, a tenth of the per-try timeout, so a
/// request stuck on the frozen backend costs this rather than the timeout.
const PAUSE_HEDGE: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Kill,
    Overlap,
    Pause,
}

impl Scenario {
    const ALL: [Scenario; 3] = [Scenario::Kill, Scenario::Overlap, Scenario::Pause];

    fn tag(self) -> &'static str {
        match self {
            Scenario::Kill => "kill",
            Scenario::Overlap => "overlap",
            Scenario::Pause => "pause",
        }
    }

    fn delays(self) -> [Duration; 3] {
        match self {
            Scenario::Overlap => [Duration::ZERO, SLOW_ANSWER, Duration::ZERO],
            Scenario::Kill | Scenario::Pause => [Duration::ZERO; 3],
        }
    }

    fn tuning(self) -> Tuning {
        match self {
            Scenario::Kill => Tuning::default(),
            Scenario::Overlap | Scenario::Pause => {
                Tuning { try_timeout: Some(SOFT_FAILURE_TRY_TIMEOUT), ..Tuning::default() }
            }
        }
    }

    /// The hedge delay of an extra Trellis row, for the scenario where a late
    /// answer, not a refused connect, is what a request meets.
    fn hedge(self) -> Option<Duration> {
        match self {
            Scenario::Pause => Some(PAUSE_HEDGE),
            Scenario::Kill | Scenario::Overlap => None,
        }
    }

    /// What happens to backend 1, as the table says it.
    fn event(self) -> &'static str {
        match self {
            Scenario::Kill | Scenario::Overlap => "kill",
            Scenario::Pause => "pause",
        }
    }
}

struct Row {
    kind: Kind,
    /// The client sidecar's `--hedge` delay (Trellis only).
    hedge: Option<Duration>,
    ok: u64,
    failed: u64,
    /// Failures, seconds after the failure of backend 1 (negative: before).
    failures_after: Vec<f64>,
    /// Connection attempts and data segments to backend 1's request port after its failure.
    syns: usize,
    data: usize,
    /// Seconds from the failure to the last of those.
    last_sent: Option<f64>,
    window_after: f64,
    /// Latency of successful requests, µs: worst and 99th percentile.
    worst_us: f64,
    p99_us: f64,
}

/// Timestamps of packets to the dead port from tcpdump's `-tt` output: (epoch seconds, is_syn).
fn parse_tcpdump(log: &str) -> Vec<(f64, bool)> {
    log.lines()
        .filter_map(|l| {
            let t: f64 = l.split_whitespace().next()?.parse().ok()?;
            Some((t, l.contains("Flags [S]")))
        })
        .collect()
}

/// Sends `sig` to a backend process.
fn signal(p: &Proc, sig: i32) {
    // SAFETY: kill(2) on the pid of our own child; no memory is touched.
    unsafe {
        libc::kill(p.pid(), sig);
    }
}

impl Row {
    /// The proxy column: the target, and the hedge when there is one.
    fn label(&self) -> String {
        match self.hedge {
            None => self.kind.name().into(),
            Some(d) => format!("{} `--hedge {}={}ms`", self.kind.name(), peers::SERVICE, d.as_millis()),
        }
    }
}

fn measure(kind: Kind, env: &Env, sizes: &Sizes, scenario: Scenario, tuning: Tuning) -> Result<Row, String> {
    let hedged = if tuning.hedge.is_some() { "-hedged" } else { "" };
    let tag = format!("fail-{}-{}{hedged}", scenario.tag(), kind.name());
    let mut backends =
        peers::start_backends_with(env, &tag, &scenario.delays()).map_err(|e| e.to_string())?;
    let target =
        peers::start_tuned(kind, env, &backends, &tag, Front::Http1, tuning).map_err(|e| e.to_string())?;
    let victim = backends.traffic[0];
    let filter = format!(
        "tcp dst port {} and (tcp[tcpflags] & tcp-syn != 0 or (ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2)) > 0)",
        victim.port()
    );
    let args: Vec<String> =
        ["-i", "lo", "-n", "-tt", "-l", "-p", &filter].iter().map(|s| s.to_string()).collect();
    let dump = Proc::spawn(&format!("{tag}-tcpdump"), Path::new("tcpdump"), &args, env.load_core, &env.work)
        .map_err(|e| e.to_string())?;
    wait_until("tcpdump", Duration::from_secs(10), || {
        std::fs::read_to_string(&dump.log).is_ok_and(|s| s.contains("listening on"))
    })
    .map_err(|e| e.to_string())?;
    let lt = target.load_target();
    let (rate, before, after) = (sizes.failover_rate, sizes.failover_before_kill, sizes.failover_after_kill);
    let load = std::thread::spawn(move || open_loop(&lt, rate, 16, Duration::ZERO, before + after));
    // The failure's place in the scenario, not a wait for an event.
    std::thread::sleep(before + Duration::from_millis(20));
    let failed_at = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs_f64();
    match scenario {
        Scenario::Kill | Scenario::Overlap => backends.procs[0].kill9(),
        Scenario::Pause => signal(&backends.procs[0], libc::SIGSTOP),
    }
    let result = load.join().map_err(|_| "load generator panicked".to_string())?;
    if scenario == Scenario::Pause {
        signal(&backends.procs[0], libc::SIGCONT);
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(dump);
    let log = std::fs::read_to_string(env.work.join(format!("{tag}-tcpdump.log"))).unwrap_or_default();
    let pkts: Vec<(f64, bool)> = parse_tcpdump(&log).into_iter().filter(|(t, _)| *t >= failed_at).collect();
    let offset = (before + Duration::from_millis(20)).as_secs_f64();
    Ok(Row {
        kind,
        hedge: tuning.hedge,
        ok: result.ok,
        failed: result.failed,
        failures_after: result.failures_at.iter().map(|d| d.as_secs_f64() - offset).collect(),
        syns: pkts.iter().filter(|(_, s)| *s).count(),
        data: pkts.iter().filter(|(_, s)| !*s).count(),
        last_sent: pkts.last().map(|(t, _)| t - failed_at),
        window_after: after.as_secs_f64(),
        worst_us: result.hist.max() as f64 / 1000.0,
        p99_us: result.pct_us(99.0),
    })
}

pub fn run(env: &Env, sizes: &Sizes) -> Section {
    let title =
        "Case 5: failover — a backend killed, killed while another is slow, or paused, under steady load";
    let mut b = String::new();
    let _ = writeln!(
        b,
        "Open loop at {:.0} GET/s over 16 connections through each proxy to three backends; backend 1 fails \
         {:.0} s in and the load goes on for {:.0} s after. A failed request is any non-2xx answer, reset or \
         timeout (2 s) seen by the client, which never retries. \"Sent to backend 1\" counts the connection \
         attempts and request segments sent to backend 1's request port after its failure (tcpdump on \
         loopback); health checks use a separate port and are not counted. \"Last sent\" is the time from the \
         failure to the last of them. Worst latency and p99 are over the successful requests. HAProxy checks \
         every 1 s (fall 2); nginx has no active checks in its open-source build and relies on \
         `max_fails=1 fail_timeout=10s`; Trellis uses its defaults (passive ejection, the registry's watch) \
         unless a scenario says otherwise, and each backend's sidecar checks `GET /health` on the health port \
         every 1 s (2 failures hide the instance), as HAProxy does.\n",
        sizes.failover_rate,
        sizes.failover_before_kill.as_secs_f64(),
        sizes.failover_after_kill.as_secs_f64()
    );
    let mut targets = Vec::new();
    for scenario in Scenario::ALL {
        let tuning = scenario.tuning();
        let (mut rows, mut errors) =
            super::measure_each(5, &Kind::PROXIES, |kind| measure(kind, env, sizes, scenario, tuning));
        if let Some(delay) = scenario.hedge() {
            let hedged = Tuning { hedge: Some(delay), ..tuning };
            let (more, e) =
                super::measure_each(5, &[Kind::Trellis], |kind| measure(kind, env, sizes, scenario, hedged));
            rows.extend(more);
            errors.push_str(&e);
        }
        let _ = writeln!(b, "\n### {}\n\n{}", heading(scenario), explanation(scenario));
        b.push_str(&errors);
        table(&mut b, scenario, &rows);
        if let Some(t) = rows.iter().find(|r| r.kind == Kind::Trellis && r.hedge.is_none()) {
            let fastest = rows
                .iter()
                .filter(|r| r.kind != Kind::Trellis)
                .all(|p| t.last_sent.unwrap_or(0.0) <= p.last_sent.unwrap_or(0.0));
            targets.push(Target::Failed(scenario, t.failed));
            targets.push(Target::Fastest(scenario, fastest));
        }
        if let Some(h) = rows.iter().find(|r| r.kind == Kind::Trellis && r.hedge.is_some()) {
            targets.push(Target::HedgedP99(scenario, h.p99_us, h.hedge.unwrap_or_default()));
        }
    }
    if !targets.is_empty() {
        let _ = writeln!(b, "\nTargets:\n");
        for t in targets {
            let _ = writeln!(b, "- {}", t.line());
        }
    }
    Section { title: title.into(), body: b }
}

/// A target the case checks, with what was measured.
enum Target {
    /// Trellis with its defaults: zero failed requests.
    Failed(Scenario, u64),
    /// Trellis with its defaults stopped sending to backend 1 no later than any peer.
    Fastest(Scenario, bool),
    /// Trellis with hedging: p99 (µs) under 100 ms plus the hedge delay.
    HedgedP99(Scenario, f64, Duration),
}

impl Target {
    fn line(&self) -> String {
        let mark = |ok: bool| if ok { "✅ met:" } else { "❌ not met:" };
        match *self {
            Target::Failed(s, failed) => {
                format!("{} {}: Trellis zero failed requests ({failed})", mark(failed == 0), s.tag())
            }
            Target::Fastest(s, fastest) => {
                format!("{} {}: Trellis the fastest to stop sending to backend 1", mark(fastest), s.tag())
            }
            Target::HedgedP99(s, p99_us, delay) => {
                let bound = Duration::from_millis(100) + delay;
                format!(
                    "{} {}: Trellis with `--hedge` p99 under {} ms ({})",
                    mark(p99_us < bound.as_secs_f64() * 1e6),
                    s.tag(),
                    bound.as_millis(),
                    super::us(p99_us)
                )
            }
        }
    }
}

fn heading(scenario: Scenario) -> &'static str {
    match scenario {
        Scenario::Kill => "`kill -9` of backend 1",
        Scenario::Overlap => "Backend 2 slow from the start, then `kill -9` of backend 1",
        Scenario::Pause => "SIGSTOP of backend 1",
    }
}

fn explanation(scenario: Scenario) -> String {
    let try_ms = SOFT_FAILURE_TRY_TIMEOUT.as_millis();
    match scenario {
        Scenario::Kill => "Every proxy with the configuration shown at the top.\n".into(),
        Scenario::Overlap => format!(
            "Backend 2 answers requests after {} s (its health port at once, so only the proxies' view of \
             requests can find it out). Every proxy gets a {try_ms} ms per-try timeout (Trellis \
             `--try-timeout`, HAProxy `timeout server`, nginx `proxy_read_timeout`) and retries elsewhere after \
             it. Trellis ejects backend 2 after three timeouts, which is its whole ejected-share bound (50 % of 3) \
             when backend 1 dies; a refused connect ejects backend 1 all the same, since the bound applies only \
             to soft failures, and backend 3 carries the load.\n",
            SLOW_ANSWER.as_secs()
        ),
        Scenario::Pause => format!(
            "Backend 1 is stopped (SIGSTOP) and stays stopped to the end: connections and requests still reach \
             its socket, nothing answers, its health checks time out. Every proxy gets a {try_ms} ms per-try \
             timeout, as in the overlap scenario; the worst latency shows what a request sent to the frozen \
             backend cost. Trellis runs a second time with `--hedge {}={}ms` on its client sidecar (HAProxy and \
             nginx have no request hedging): a GET without an answer after {} ms is also sent to another \
             backend, the first answer wins, and the hedge is paid from the retry budget.\n",
            peers::SERVICE,
            PAUSE_HEDGE.as_millis(),
            PAUSE_HEDGE.as_millis()
        ),
    }
}

fn table(b: &mut String, scenario: Scenario, rows: &[Row]) {
    let ev = scenario.event();
    let _ = writeln!(
        b,
        "| proxy | requests ok | failed | failures after {ev} (s) | connection attempts to backend 1 | \
         request segments to backend 1 | last sent to backend 1 | worst latency | p99 |"
    );
    let _ = writeln!(b, "|---|---:|---:|---|---:|---:|---:|---:|---:|");
    for r in rows {
        let fails: Vec<String> = r.failures_after.iter().take(8).map(|t| format!("{t:.3}")).collect();
        let more = if r.failures_after.len() > 8 { ", …" } else { "" };
        let last = match r.last_sent {
            None => format!("nothing after the {ev}"),
            Some(t) if t > r.window_after - 1.0 => format!("{:.0} ms (still sending at the end)", t * 1000.0),
            Some(t) => format!("{:.0} ms", t * 1000.0),
        };
        let _ = writeln!(
            b,
            "| {} | {} | {} | {}{} | {} | {} | {} | {} | {} |",
            r.label(),
            r.ok,
            r.failed,
            if fails.is_empty() { "—".into() } else { fails.join(", ") },
            more,
            r.syns,
            r.data,
            last,
            super::us(r.worst_us),
            super::us(r.p99_us),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_tcpdump_lines() {
        let log = "listening on lo, link-type EN10MB\n\
                   1764090000.123456 IP 127.0.0.1.5000 > 127.0.0.1.20001: Flags [S], seq 1, length 0\n\
                   1764090000.223456 IP 127.0.0.1.5001 > 127.0.0.1.20001: Flags [P.], seq 1:40, length 39\n";
        let p = parse_tcpdump(log);
        assert_eq!(p.len(), 2);
        assert!(p[0].1 && !p[1].1);
        assert!((p[1].0 - 1764090000.223456).abs() < 1e-6);
    }
}
