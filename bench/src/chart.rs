//! Latency-percentile charts (SVG, no system fonts needed): one line per
//! target, percentile on a "nines" axis (50, 90, 99, 99.9, ...), latency on a
//! log axis.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Highest percentile drawn: 99.99 when the sample has enough requests.
fn max_nines(h: &Histogram<u64>) -> f64 {
    if h.len() >= 100_000 {
        4.0
    } else if h.len() >= 10_000 {
        3.0
    } else {
        2.0
    }
}

fn nines_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    if p < 99.0 {
        format!("p{p:.0}")
    } else {
        let s = format!("{p:.3}");
        format!("p{}", s.trim_end_matches('0').trim_end_matches('.'))
    }
}

/// Writes `path` with one line per (name, latency histogram in ns).
pub fn percentiles(path: &Path, title: &str, series: &[(String, &Histogram<u64>)]) -> Result<(), String> {
    let series: Vec<_> = series.iter().filter(|(_, h)| !h.is_empty()).collect();
    if series.is_empty() {
        return Err("no data".into());
    }
    let max_x = series.iter().map(|(_, h)| max_nines(h)).fold(f64::INFINITY, f64::min);
    let mut lines = Vec::new();
    let (mut lo, mut hi) = (f64::INFINITY, 0f64);
    for (name, h) in &series {
        let mut pts = Vec::new();
        let steps = (max_x * 40.0) as usize;
        for i in 0..=steps {
            let x = max_x * i as f64 / steps as f64;
            let p = 100.0 * (1.0 - 10f64.powf(-x));
            let v = (h.value_at_percentile(p) as f64 / 1000.0).max(1.0);
            lo = lo.min(v);
            hi = hi.max(v);
            pts.push((x, v));
        }
        lines.push((name.clone(), pts));
    }
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..max_x, ((lo * 0.8).max(1.0)..hi * 1.25).log_scale())
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs, log scale)")
        .x_labels(max_x as usize + 1)
        .x_label_formatter(&|x| nines_label(*x))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, (name, pts)) in lines.into_iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_read_as_percentiles() {
        assert_eq!(nines_label(0.0), "p0");
        assert_eq!(nines_label(1.0), "p90");
        assert_eq!(nines_label(2.0), "p99");
        assert_eq!(nines_label(3.0), "p99.9");
    }

    #[test]
    fn writes_an_svg() {
        let mut h = crate::load::new_histogram();
        for v in 1..20_000u64 {
            h.record(v * 100).unwrap();
        }
        let path = std::env::temp_dir().join(format!("trellis-bench-chart-{}.svg", std::process::id()));
        percentiles(&path, "test", &[("a".into(), &h)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(svg.contains("<svg") && svg.contains("p99"));
    }
}
