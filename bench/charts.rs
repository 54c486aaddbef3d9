//! The benchmark's pictures: SVG charts (plotters' SVG backend, a dev-dependency) written beside
//! the CSV/JSON. Pure drawing: the numbers come from the run, the caption says when, where and
//! under what load.

use std::path::Path;

use plotters::prelude::*;

/// One curve: its legend and its (x, y) points.
pub struct Curve {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A horizontal reference line (a ceiling, a floor) with its legend.
pub struct Level {
    pub label: String,
    pub y: f64,
}

type Drawn = Result<(), Box<dyn std::error::Error>>;

const SIZE: (u32, u32) = (900, 560);

/// Records/s against messages in flight (log scale), one curve per message size, the
/// database's ceilings as dashed lines.
pub fn throughput(path: &Path, caption: &str, curves: &[Curve], ceilings: &[Level]) -> Drawn {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, foot) = root.split_vertically(SIZE.1 - 30);
    foot.draw_text(caption, &("sans-serif", 13).into_text_style(&foot), (10, 8))?;
    let x_max = max_of(curves.iter().flat_map(|c| c.points.iter().map(|p| p.0))).max(2.0);
    let y_max = max_of(
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .chain(ceilings.iter().map(|l| l.y)),
    ) * 1.1;
    let mut chart = ChartBuilder::on(&chart_area)
        .caption("feedd: records/s by messages in flight", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((1f64..x_max * 1.2).log_scale(), 0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("messages in flight (all clients)")
        .y_desc("records/s acknowledged")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    plot(&mut chart, curves, ceilings, (1.0, x_max * 1.2), true)?;
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// Ack latency by percentile (x in nines: 1 = p90, 2 = p99, 3 = p99.9), log-scale ms, one
/// curve per offered load, the server's floors as dashed lines.
pub fn latency(path: &Path, caption: &str, curves: &[Curve], floors: &[Level]) -> Drawn {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let (chart_area, foot) = root.split_vertically(SIZE.1 - 30);
    foot.draw_text(caption, &("sans-serif", 13).into_text_style(&foot), (10, 8))?;
    let values = || {
        curves
            .iter()
            .flat_map(|c| c.points.iter().map(|p| p.1))
            .chain(floors.iter().map(|l| l.y))
    };
    let y_min = values().fold(f64::INFINITY, f64::min).max(0.001) * 0.8;
    let y_max = max_of(values()) * 1.3;
    let mut chart = ChartBuilder::on(&chart_area)
        .caption(
            "feedd: ack latency distribution, 1 record/message",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..3.2, (y_min..y_max).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("ack latency, ms (received to reply)")
        .x_labels(4)
        .x_label_formatter(&|x| format!("p{}", percentile_of_nines(*x)))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()?;
    plot(&mut chart, curves, floors, (0.0, 3.2), false)?;
    legend(&mut chart)?;
    root.present()?;
    Ok(())
}

/// The percentile `nines` stands for: 0 → 0, 1 → 90, 2 → 99, 3 → 99.9 (rounded for a label).
pub fn percentile_of_nines(nines: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-nines));
    let text = format!("{p:.1}");
    text.strip_suffix(".0").map(str::to_string).unwrap_or(text)
}

/// The quantile at `nines` (1 → 0.9, 2 → 0.99).
pub fn quantile_of_nines(nines: f64) -> f64 {
    1.0 - 10f64.powf(-nines)
}

fn max_of(values: impl Iterator<Item = f64>) -> f64 {
    values.filter(|v| v.is_finite()).fold(0.0, f64::max)
}

/// Segments of a dashed horizontal line at `y` from `x.0` to `x.1` (dashes even on a log axis).
fn dashed(x: (f64, f64), y: f64, log: bool) -> Vec<Vec<(f64, f64)>> {
    let map = |v: f64| if log { v.ln() } else { v };
    let unmap = |v: f64| if log { v.exp() } else { v };
    let (a, b) = (map(x.0), map(x.1));
    let n = 40;
    (0..n)
        .step_by(2)
        .map(|i| {
            let from = a + (b - a) * i as f64 / n as f64;
            let to = a + (b - a) * (i + 1) as f64 / n as f64;
            vec![(unmap(from), y), (unmap(to), y)]
        })
        .collect()
}

/// The curves (lines with dots) and the dashed levels across `x`, each with its legend entry.
fn plot<'a, DB, CT>(
    chart: &mut ChartContext<'a, DB, CT>,
    curves: &[Curve],
    levels: &[Level],
    x: (f64, f64),
    log_x: bool,
) -> Drawn
where
    DB: DrawingBackend + 'a,
    DB::ErrorType: 'static,
    CT: plotters::coord::CoordTranslate<From = (f64, f64)>,
{
    for (i, curve) in curves.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(curve.points.clone(), color.stroke_width(2)))?
            .label(&curve.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        chart.draw_series(PointSeries::of_element(
            curve.points.clone(),
            3,
            color.filled(),
            &|c, s, st| Circle::new(c, s, st),
        ))?;
    }
    for (i, level) in levels.iter().enumerate() {
        let color = Palette99::pick(curves.len() + i).to_rgba();
        let line = dashed(x, level.y, log_x);
        chart
            .draw_series(line.into_iter().map(|seg| PathElement::new(seg, color)))?
            .label(&level.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
    }
    Ok(())
}

fn legend<'a, DB: DrawingBackend + 'a, CT: plotters::coord::CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>>
where
    DB::ErrorType: 'static,
{
    chart
        .configure_series_labels()
        // Between the ceilings (high) and the curves (low) on one, right of p0 on the other.
        .position(SeriesLabelPosition::MiddleRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}
