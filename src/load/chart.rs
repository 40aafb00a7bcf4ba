//! `kami load --chart FILE.svg`: throughput and order-creation latency over the
//! seconds of a run, drawn with plotters (SVG backend, no fonts needed to write it).

use plotters::prelude::*;

use super::LoadReport;

/// Draws `report` as an SVG file at `path`: on top buyers completed per second, below
/// p50 and p99 of order creation, both per bucket of `report.bucket_ms` (100 ms).
pub fn write_svg(report: &LoadReport, path: &std::path::Path) -> Result<(), String> {
    // Buckets of `bucket_ms` on an axis in seconds; counts scaled to per second.
    let width = report.bucket_ms.max(1) as f64 / 1000.0;
    let seconds = report.timeline.len().max(1) as f64 * width;
    let root = SVGBackend::new(path, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (top, bottom) = root.split_vertically(300);
    let title = format!(
        "kami load: {} buyers, {} connections, {} shard(s), {:?}",
        report.buyers, report.concurrency, report.shards, report.mode
    );

    let max_rate = report.timeline.iter().copied().max().unwrap_or(0).max(1) as f64 / width * 1.1;
    let mut rate = ChartBuilder::on(&top)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..max_rate)
        .map_err(|e| e.to_string())?;
    rate.configure_mesh().x_desc("second of the run").y_desc("buyers done / s").draw().map_err(|e| e.to_string())?;
    let points = report.timeline.iter().enumerate().map(|(b, &n)| ((b as f64 + 0.5) * width, n as f64 / width));
    rate.draw_series(LineSeries::new(points, BLUE.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label("buyers done per second")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    rate.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;

    let lat = &report.create_latency_by_bucket;
    let max_ms = lat.iter().map(|l| l[1]).fold(0.0, f64::max).max(1.0) * 1.1;
    let mut latency = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..seconds, 0f64..max_ms)
        .map_err(|e| e.to_string())?;
    latency
        .configure_mesh()
        .x_desc("second of the run")
        .y_desc("create order, ms")
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, (label, color)) in [("p50", GREEN), ("p99", RED)].into_iter().enumerate() {
        // Buckets in which no order was accepted have no latency to draw.
        let points = lat.iter().enumerate().filter(|(_, l)| l[1] > 0.0).map(|(b, l)| ((b as f64 + 0.5) * width, l[i]));
        latency
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(format!("create order {label}"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    latency.configure_series_labels().border_style(BLACK).draw().map_err(|e| e.to_string())?;
    root.present().map_err(|e| e.to_string())
}
