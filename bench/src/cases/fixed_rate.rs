//! Case 2: constant rates: latency added over direct and proxy CPU per request.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use super::{ratio, us, Sizes};
use crate::load::{open_loop, LoadResult};
use crate::peers::{self, Env, Kind};
use crate::procstat;
use crate::report::Section;

struct Row {
    kind: Kind,
    rate: f64,
    load: LoadResult,
    cpu_per_1k_ms: Option<f64>,
    cpu_share: Option<f64>,
    busy: Vec<f64>,
}

fn measure(kind: Kind, env: &Env, sizes: &Sizes) -> Result<Vec<Row>, String> {
    let backends = peers::start_backends(env, "rate").map_err(|e| e.to_string())?;
    let target = peers::start(kind, env, &backends, "rate").map_err(|e| e.to_string())?;
    let lt = target.load_target();
    let mut rows = Vec::new();
    for &rate in &sizes.rates {
        open_loop(&lt, rate, sizes.rate_connections, Duration::ZERO, sizes.warmup);
        let cpu0 = target.pid().map(procstat::cpu_time);
        let j0 = procstat::cpu_jiffies();
        let load = open_loop(&lt, rate, sizes.rate_connections, Duration::ZERO, sizes.rate_duration);
        let j1 = procstat::cpu_jiffies();
        let cpu = target.pid().map(procstat::cpu_time);
        let cpu_per_1k_ms = match (cpu0, cpu) {
            (Some(a), Some(b)) if load.ok > 0 => {
                Some((b - a).as_secs_f64() * 1000.0 / (load.ok as f64 / 1000.0))
            }
            _ => None,
        };
        let cpu_share = match (cpu0, cpu) {
            (Some(a), Some(b)) => Some(100.0 * (b - a).as_secs_f64() / sizes.rate_duration.as_secs_f64()),
            _ => None,
        };
        rows.push(Row { kind, rate, load, cpu_per_1k_ms, cpu_share, busy: procstat::busy_percent(&j0, &j1) });
    }
    Ok(rows)
}

pub fn run(env: &Env, sizes: &Sizes, charts: &Path, charts_rel: &str) -> Section {
    let title = "Case 2: fixed rates — added latency and CPU per request";
    let (rows, mut b) = super::measure_each(2, &Kind::ALL, |kind| measure(kind, env, sizes));
    let rows: Vec<_> = rows.into_iter().flatten().collect();
    let _ = writeln!(
        b,
        "\nOpen loop: requests due on a fixed schedule over {} keep-alive connections, latency counted from \
         when each request was due (no coordinated omission), {:.0} s per rate after a {:.1} s warm-up. \
         Added latency is the target's percentile minus direct's at the same rate. CPU per 1,000 requests is \
         the proxy's user + system time over the window.\n",
        sizes.rate_connections,
        sizes.rate_duration.as_secs_f64(),
        sizes.warmup.as_secs_f64()
    );
    for &rate in &sizes.rates {
        let at: Vec<&Row> = rows.iter().filter(|r| r.rate == rate).collect();
        let direct = at.iter().find(|r| r.kind == Kind::Direct);
        let _ = writeln!(b, "### {rate:.0} requests/s\n");
        let _ = writeln!(
            b,
            "| target | achieved req/s | p50 | p99 | p99.9 | added p50 | added p99 | failed | CPU per 1k req | proxy CPU (% of a core) | core 0 busy |"
        );
        let _ = writeln!(b, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &at {
            let added = |p: f64| match direct {
                Some(d) if r.kind != Kind::Direct => us(r.load.pct_us(p) - d.load.pct_us(p)),
                _ => "—".into(),
            };
            let _ = writeln!(
                b,
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.kind.name(),
                r.load.rps(),
                us(r.load.pct_us(50.0)),
                us(r.load.pct_us(99.0)),
                us(r.load.pct_us(99.9)),
                added(50.0),
                added(99.0),
                r.load.failed,
                r.cpu_per_1k_ms.map_or("—".into(), |v| format!("{v:.1} ms")),
                r.cpu_share.map_or("—".into(), |v| format!("{v:.0}%")),
                r.busy.first().map_or("—".into(), |v| format!("{v:.0}%")),
            );
        }
        let get = |k: Kind| at.iter().find(|r| r.kind == k);
        if let (Some(t), Some(d)) = (get(Kind::Trellis), direct) {
            let added50 = t.load.pct_us(50.0) - d.load.pct_us(50.0);
            let added99 = t.load.pct_us(99.0) - d.load.pct_us(99.0);
            let _ = writeln!(b, "\nTrellis CPU per request ÷ peer: {}", {
                let mut s = Vec::new();
                for peer in [Kind::Haproxy, Kind::Nginx] {
                    if let Some(p) = get(peer) {
                        s.push(format!(
                            "{} {}",
                            peer.name(),
                            ratio(t.cpu_per_1k_ms.unwrap_or(f64::NAN), p.cpu_per_1k_ms.unwrap_or(f64::NAN))
                        ));
                    }
                }
                s.join(", ")
            });
            let _ = writeln!(b, "\nTargets at {rate:.0} req/s:\n");
            let mark = |ok: bool| if ok { "✅ met:" } else { "❌ not met:" };
            // A proxy cannot take latency away: a negative figure means the
            // machine's other load, not the target, set that percentile.
            let judge = |added: f64, limit: f64| {
                if added < 0.0 {
                    "⚠️ inconclusive (direct's own percentile was worse in this run, so other load on the machine set it):"
                } else {
                    mark(added <= limit)
                }
            };
            let _ = writeln!(b, "- {} ≤ 100 µs p50 added ({})", judge(added50, 100.0), us(added50));
            let _ = writeln!(b, "- {} ≤ 500 µs p99 added ({})", judge(added99, 500.0), us(added99));
            for peer in [Kind::Haproxy, Kind::Nginx] {
                if let (Some(p), Some(tc)) = (get(peer), t.cpu_per_1k_ms) {
                    let pc = p.cpu_per_1k_ms.unwrap_or(0.0);
                    let _ = writeln!(
                        b,
                        "- {} CPU per request ≤ {}'s ({tc:.1} vs {pc:.1} ms per 1k)",
                        mark(tc <= pc),
                        peer.name()
                    );
                }
            }
        }
        let file = format!("case2-rate-{rate:.0}.svg");
        let series: Vec<(String, &hdrhistogram::Histogram<u64>)> =
            at.iter().map(|r| (r.kind.name().to_string(), &r.load.hist)).collect();
        match crate::chart::percentiles(
            &charts.join(&file),
            &format!("Case 2: latency at {rate:.0} req/s"),
            &series,
        ) {
            Ok(()) => {
                let _ =
                    writeln!(b, "\n![Case 2 latency percentiles at {rate:.0} req/s]({charts_rel}/{file})\n");
            }
            Err(e) => {
                let _ = writeln!(b, "\n(chart not drawn: {e})\n");
            }
        }
    }
    Section { title: title.into(), body: b }
}
