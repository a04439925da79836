//! SVG charts (plotters): one per workload, a horizontal bar per strategy and thread count
//! showing the median ns per block, with a whisker from the fastest to the slowest repetition.

use crate::lab::report::ResultRow;
use crate::lab::strategy::StrategyKind;
use crate::lab::workload::Workload;
use plotters::coord::ranged1d::{IntoSegmentedCoord, SegmentValue};
use plotters::prelude::*;
use std::path::{Path, PathBuf};

const BAR: RGBColor = RGBColor(0x4c, 0x72, 0xb0);
const ENGINE_BAR: RGBColor = RGBColor(0xdd, 0x84, 0x52);

/// Writes `DIR/<workload>.svg` for the rows of `workload` (already ranked) and returns its path.
pub fn write_svg(dir: &Path, workload: &Workload, rows: &[&ResultRow]) -> Result<PathBuf, String> {
    let path = dir.join(format!("{workload}.svg"));
    draw(&path, workload, rows).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(path)
}

fn draw(
    path: &Path,
    workload: &Workload,
    rows: &[&ResultRow],
) -> Result<(), Box<dyn std::error::Error>> {
    let several_thread_counts = rows.iter().any(|r| r.threads != rows[0].threads);
    // Drawn top-down in report order: bar `i` sits in segment `n - 1 - i` (of at least two:
    // plotters cannot segment a one-value range).
    let n = rows.len();
    let labels: Vec<String> = rows
        .iter()
        .rev()
        .map(|r| match several_thread_counts {
            true => format!("{} ({}t)", r.strategy.name(), r.threads),
            false => r.strategy.name().to_owned(),
        })
        .collect();
    // A log axis: equal ratios look equal, and a 400x outlier does not flatten the others.
    let x_min = rows
        .iter()
        .map(|r| r.ns_per_block_min)
        .fold(f64::INFINITY, f64::min)
        .max(1e-3)
        / 2.0;
    let x_max = rows
        .iter()
        .map(|r| r.ns_per_block_max)
        .fold(x_min, f64::max)
        * 12.0;
    let height = 110 + 36 * n as u32;

    let area = SVGBackend::new(path, (1000, height)).into_drawing_area();
    area.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&area)
        .caption(
            format!("{workload}: {}", workload.description()),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(170)
        .build_cartesian_2d(
            (x_min..x_max).log_scale(),
            (0..n.max(2) - 1).into_segmented(),
        )?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(n)
        .x_desc("ns per block, log scale (bar: median; whisker: min..max of the repetitions; lower is better)")
        .y_label_formatter(&|segment| match segment {
            SegmentValue::CenterOf(i) => labels.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        })
        .draw()?;

    let slot = |i: usize| n - 1 - i;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let color = if r.strategy == StrategyKind::Engine {
            ENGINE_BAR
        } else {
            BAR
        };
        let corners = [
            (x_min, SegmentValue::Exact(slot(i))),
            (r.ns_per_block, SegmentValue::Exact(slot(i) + 1)),
        ];
        let mut bar = Rectangle::new(corners, color.filled());
        bar.set_margin(6, 6, 0, 0);
        bar
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let y = SegmentValue::CenterOf(slot(i));
        PathElement::new(
            vec![(r.ns_per_block_min, y.clone()), (r.ns_per_block_max, y)],
            BLACK.stroke_width(2),
        )
    }))?;
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let ratio = r
            .ratio_to_engine
            .map_or_else(String::new, |x| format!(" ({x:.2}x engine)"));
        let text = format!(
            " {:.1} ns{ratio}, peak {:.1} MiB",
            r.ns_per_block,
            r.peak_rss_kib as f64 / 1024.0
        );
        Text::new(
            text,
            (r.ns_per_block_max, SegmentValue::CenterOf(slot(i))),
            ("sans-serif", 13),
        )
    }))?;
    area.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::measure::{Job, JobOutput, RepSample};
    use crate::lab::workload::WorkloadKind;

    #[test]
    fn writes_one_svg_with_a_bar_per_row() {
        let rows: Vec<ResultRow> = [StrategyKind::Engine, StrategyKind::Wine]
            .into_iter()
            .map(|strategy| {
                let job = Job {
                    workload: WorkloadKind::Propset.into(),
                    strategy,
                    threads: 1,
                    reps: 1,
                    warmups: 0,
                    rep_ms: 1,
                };
                let output = JobOutput {
                    samples: vec![RepSample {
                        blocks: 10,
                        nanos: 100,
                    }],
                    rss_before_kib: 1,
                    peak_rss_kib: 2048,
                    rss_after_kib: 1,
                };
                ResultRow::new(&job, &output)
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("mapialloc-lab-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = write_svg(
            &dir,
            &WorkloadKind::Propset.into(),
            &rows.iter().collect::<Vec<_>>(),
        )
        .unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("propset") && svg.contains("wine"));
    }
}
