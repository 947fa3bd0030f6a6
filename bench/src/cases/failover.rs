//! Case 5: steady GET load through each proxy to three backends, `kill -9` of
//! one backend: failed requests, and time until no request goes to the dead
//! backend.
//!
//! Who still sends to the dead backend is seen from outside every proxy the
//! same way: tcpdump on loopback records each connection attempt (SYN) and
//! each data-bearing segment sent to the dead backend's request port after the
//! kill. Health checks go to the backend's second port, so they are not
//! counted as requests.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Sizes;
use crate::load::open_loop;
use crate::peers::{self, Env, Kind};
use crate::procs::{wait_until, Proc};
use crate::report::Section;

struct Row {
    kind: Kind,
    ok: u64,
    failed: u64,
    /// Failures, seconds after the kill (negative: before).
    failures_after_kill: Vec<f64>,
    /// Connection attempts and data segments to the dead port after the kill.
    syns: usize,
    data: usize,
    /// Seconds from the kill to the last of those.
    last_sent: Option<f64>,
    window_after_kill: f64,
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

fn measure(kind: Kind, env: &Env, sizes: &Sizes) -> Result<Row, String> {
    let tag = format!("fail-{}", kind.name());
    let mut backends = peers::start_backends(env, &tag).map_err(|e| e.to_string())?;
    let target = peers::start(kind, env, &backends, &tag).map_err(|e| e.to_string())?;
    let dead = backends.traffic[0];
    let filter = format!(
        "tcp dst port {} and (tcp[tcpflags] & tcp-syn != 0 or (ip[2:2] - ((ip[0]&0xf)<<2) - ((tcp[12]&0xf0)>>2)) > 0)",
        dead.port()
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
    std::thread::sleep(before + Duration::from_millis(20));
    let killed_at = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs_f64();
    backends.procs[0].kill9();
    let result = load.join().map_err(|_| "load generator panicked".to_string())?;
    std::thread::sleep(Duration::from_millis(200));
    drop(dump);
    let log = std::fs::read_to_string(env.work.join(format!("{tag}-tcpdump.log"))).unwrap_or_default();
    let pkts: Vec<(f64, bool)> = parse_tcpdump(&log).into_iter().filter(|(t, _)| *t >= killed_at).collect();
    let kill_offset = (before + Duration::from_millis(20)).as_secs_f64();
    Ok(Row {
        kind,
        ok: result.ok,
        failed: result.failed,
        failures_after_kill: result.failures_at.iter().map(|d| d.as_secs_f64() - kill_offset).collect(),
        syns: pkts.iter().filter(|(_, s)| *s).count(),
        data: pkts.iter().filter(|(_, s)| !*s).count(),
        last_sent: pkts.last().map(|(t, _)| t - killed_at),
        window_after_kill: after.as_secs_f64(),
    })
}

pub fn run(env: &Env, sizes: &Sizes) -> Section {
    let title = "Case 5: failover — `kill -9` of one backend under steady load";
    let (rows, mut b) = super::measure_each(5, &Kind::PROXIES, |kind| measure(kind, env, sizes));
    let _ = writeln!(
        b,
        "\nOpen loop at {:.0} GET/s over 16 connections through each proxy to three backends; backend 1 is \
         killed with SIGKILL {:.0} s in and the load goes on for {:.0} s after. A failed request is any \
         non-2xx answer, reset or timeout seen by the client (which never retries). \"Last sent to dead\" is \
         the time from the kill to the last connection attempt or request bytes sent to the dead backend's \
         request port (tcpdump on loopback); health checks use a separate port and are not counted. \
         HAProxy checks every 1 s (fall 2); nginx has no active checks in its open-source build and relies \
         on `max_fails=1 fail_timeout=10s`, so it sends one request to the dead server every 10 s \
         (retried on another server); Trellis uses its defaults (passive ejection, the backend's sidecar \
         health check, the registry's watch).\n",
        sizes.failover_rate,
        sizes.failover_before_kill.as_secs_f64(),
        sizes.failover_after_kill.as_secs_f64()
    );
    let _ = writeln!(b, "| proxy | requests ok | failed | failures after kill (s) | connection attempts to dead | request segments to dead | last sent to dead |");
    let _ = writeln!(b, "|---|---:|---:|---|---:|---:|---:|");
    for r in &rows {
        let fails: Vec<String> = r.failures_after_kill.iter().take(8).map(|t| format!("{t:.3}")).collect();
        let more = if r.failures_after_kill.len() > 8 { ", …" } else { "" };
        let last = match r.last_sent {
            None => "nothing after the kill".to_string(),
            Some(t) if t > r.window_after_kill - 1.0 => {
                format!("{:.0} ms (still sending at the end)", t * 1000.0)
            }
            Some(t) => format!("{:.0} ms", t * 1000.0),
        };
        let _ = writeln!(
            b,
            "| {} | {} | {} | {}{} | {} | {} | {} |",
            r.kind.name(),
            r.ok,
            r.failed,
            if fails.is_empty() { "—".into() } else { fails.join(", ") },
            more,
            r.syns,
            r.data,
            last
        );
    }
    if let Some(t) = rows.iter().find(|r| r.kind == Kind::Trellis) {
        let fastest = rows
            .iter()
            .filter(|r| r.kind != Kind::Trellis)
            .all(|p| t.last_sent.unwrap_or(0.0) <= p.last_sent.unwrap_or(0.0));
        let mark = |ok: bool| if ok { "✅ met:" } else { "❌ not met:" };
        let _ = writeln!(b, "\nTargets:\n");
        let _ = writeln!(b, "- {} Trellis zero failed requests ({})", mark(t.failed == 0), t.failed);
        let _ = writeln!(b, "- {} Trellis the fastest to stop sending to the dead backend", mark(fastest));
    }
    Section { title: title.into(), body: b }
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
