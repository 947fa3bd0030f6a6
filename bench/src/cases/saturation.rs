//! Case 1: HTTP/1.1, 64 connections, small response, at saturation.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::{ratio, us, Sizes};
use crate::load::{closed_loop, LoadResult};
use crate::peers::{self, Env, Kind};
use crate::procstat;
use crate::report::Section;

pub struct Row {
    pub kind: Kind,
    pub load: LoadResult,
    pub cpu_per_1k_ms: Option<f64>,
    /// Proxy CPU time over the window as a share of one core, percent.
    pub cpu_share: Option<f64>,
    pub peak_rss_kib: Option<u64>,
    pub idle_rss_kib: Option<u64>,
    pub busy: Vec<f64>,
}

fn measure(kind: Kind, env: &Env, sizes: &Sizes) -> Result<Row, String> {
    let backends = peers::start_backends(env, "sat").map_err(|e| e.to_string())?;
    let target = peers::start(kind, env, &backends, "sat").map_err(|e| e.to_string())?;
    // Idle: started and ready (one request proxied), before any load.
    std::thread::sleep(Duration::from_millis(500));
    let idle = target.pid().map(procstat::rss_kib);
    let lt = target.load_target();
    closed_loop(&lt, sizes.connections, Duration::ZERO, sizes.warmup).map_err(|e| e.to_string())?;
    let cpu0 = target.pid().map(procstat::cpu_time);
    let j0 = procstat::cpu_jiffies();
    let load =
        closed_loop(&lt, sizes.connections, Duration::ZERO, sizes.saturation).map_err(|e| e.to_string())?;
    let j1 = procstat::cpu_jiffies();
    let cpu = target.pid().map(procstat::cpu_time);
    let cpu_per_1k_ms = match (cpu0, cpu) {
        (Some(a), Some(b)) if load.ok > 0 => Some((b - a).as_secs_f64() * 1000.0 / (load.ok as f64 / 1000.0)),
        _ => None,
    };
    let cpu_share = match (cpu0, cpu) {
        (Some(a), Some(b)) => Some(100.0 * (b - a).as_secs_f64() / sizes.saturation.as_secs_f64()),
        _ => None,
    };
    Ok(Row {
        kind,
        cpu_per_1k_ms,
        cpu_share,
        peak_rss_kib: target.pid().map(procstat::peak_rss_kib),
        idle_rss_kib: idle,
        busy: procstat::busy_percent(&j0, &j1),
        load,
    })
}

fn mib(k: Option<u64>) -> String {
    k.map_or("—".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

pub fn run(env: &Env, sizes: &Sizes, charts: &Path, charts_rel: &str) -> Section {
    let title = "Case 1: HTTP/1.1 at saturation";
    let (rows, errors) = super::measure_each(1, &Kind::ALL, |kind| measure(kind, env, sizes));
    let mut b = String::new();
    let _ = writeln!(
        b,
        "Closed loop: {} keep-alive connections, each sending its next GET as soon as the previous answer \
         arrived, for {:.0} s after a {:.1} s warm-up; response body 17 bytes. Proxy CPU is user + system time \
         of the proxy's processes over the measured window (from /proc/<pid>/stat). Core busy figures show \
         whether the load side (core 1: generator + backends) saturated before the proxy (core 0); core 0 busy \
         above the proxy's own share is other work on the machine.\n",
        sizes.connections,
        sizes.saturation.as_secs_f64(),
        sizes.warmup.as_secs_f64()
    );
    let _ = writeln!(b, "| target | req/s | p50 | p99 | p99.9 | failed | proxy CPU per 1k req | proxy CPU (% of a core) | peak RSS | idle RSS | core 0 busy | core 1 busy |");
    let _ = writeln!(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let busy = |i: usize| r.busy.get(i).map_or("—".into(), |v| format!("{v:.0}%"));
        let _ = writeln!(
            b,
            "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            r.kind.name(),
            r.load.rps(),
            us(r.load.pct_us(50.0)),
            us(r.load.pct_us(99.0)),
            us(r.load.pct_us(99.9)),
            r.load.failed,
            r.cpu_per_1k_ms.map_or("—".into(), |v| format!("{v:.1} ms")),
            r.cpu_share.map_or("—".into(), |v| format!("{v:.0}%")),
            mib(r.peak_rss_kib),
            mib(r.idle_rss_kib),
            busy(0),
            busy(1),
        );
    }
    b.push_str(&errors);
    let get = |k: Kind| rows.iter().find(|r| r.kind == k);
    if let Some(t) = get(Kind::Trellis) {
        let _ = writeln!(b, "\nRatios (Trellis ÷ peer, same run):\n");
        let _ = writeln!(b, "| peer | req/s | p99 | CPU per request | peak RSS |\n|---|---:|---:|---:|---:|");
        for peer in [Kind::Haproxy, Kind::Nginx] {
            if let Some(p) = get(peer) {
                let _ = writeln!(
                    b,
                    "| {} | {} | {} | {} | {} |",
                    peer.name(),
                    ratio(t.load.rps(), p.load.rps()),
                    ratio(t.load.pct_us(99.0), p.load.pct_us(99.0)),
                    ratio(t.cpu_per_1k_ms.unwrap_or(f64::NAN), p.cpu_per_1k_ms.unwrap_or(f64::NAN)),
                    ratio(t.peak_rss_kib.unwrap_or(0) as f64, p.peak_rss_kib.unwrap_or(0) as f64),
                );
            }
        }
        let mut checks = Vec::new();
        for peer in [Kind::Haproxy, Kind::Nginx] {
            if let Some(p) = get(peer) {
                checks.push((format!("req/s ≥ 1.0× {}", peer.name()), t.load.rps() >= p.load.rps()));
                checks.push((
                    format!("p99 no worse than {}", peer.name()),
                    t.load.pct_us(99.0) <= p.load.pct_us(99.0),
                ));
            }
        }
        checks.push(("RSS ≤ 20 MB loaded".into(), t.peak_rss_kib.is_some_and(|k| k * 1024 <= 20_000_000)));
        checks.push(("RSS ≤ 10 MB idle".into(), t.idle_rss_kib.is_some_and(|k| k * 1024 <= 10_000_000)));
        let _ = writeln!(b, "\nTargets:\n");
        for (what, ok) in checks {
            let _ = writeln!(b, "- {} {what}", if ok { "✅ met:" } else { "❌ not met:" });
        }
    }
    let file = "case1-saturation.svg";
    let series: Vec<(String, &hdrhistogram::Histogram<u64>)> =
        rows.iter().map(|r| (r.kind.name().to_string(), &r.load.hist)).collect();
    match crate::chart::percentiles(
        &charts.join(file),
        "Case 1: latency at saturation, 64 connections",
        &series,
    ) {
        Ok(()) => {
            let _ = writeln!(b, "\n![Case 1 latency percentiles]({charts_rel}/{file})\n");
        }
        Err(e) => {
            let _ = writeln!(b, "\n(chart not drawn: {e})\n");
        }
    }
    Section { title: title.into(), body: b }
}
