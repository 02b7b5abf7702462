//! SVG charts of a benchmark's results (`--charts DIR`), drawn with
//! plotters from the same rows the tables and JSON lines show.
//!
//! Two kinds: [`lines`] (one line per series over a numeric x, optionally
//! on a log scale) and [`bars`] (grouped bars per category). Text is left
//! to the SVG viewer's sans-serif font.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use crate::report::Row;

/// Colors of the series, in order (Tableau 10).
const COLORS: [RGBColor; 8] = [
    RGBColor(0x4e, 0x79, 0xa7),
    RGBColor(0xf2, 0x8e, 0x2b),
    RGBColor(0xe1, 0x57, 0x59),
    RGBColor(0x76, 0xb7, 0xb2),
    RGBColor(0x59, 0xa1, 0x4f),
    RGBColor(0xed, 0xc9, 0x48),
    RGBColor(0xb0, 0x7a, 0xa1),
    RGBColor(0x9c, 0x75, 0x5f),
];

/// One named series of (x, y) points.
pub type Series = (String, Vec<(f64, f64)>);

fn err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("chart: {e}")
}

/// The number field `key` of `row`.
pub fn num(row: &Row, key: &str) -> Option<f64> {
    row.get(key).and_then(Value::as_f64)
}

/// The text field `key` of `row`.
pub fn text<'a>(row: &'a Row, key: &str) -> Option<&'a str> {
    row.get(key).and_then(Value::as_str)
}

/// Groups the `rows` of the sections whose name starts with `section` into
/// series named by `name`, with points (x, y).
pub fn series_of(
    rows: &[(String, Row)],
    section: &str,
    name: impl Fn(&Row) -> Option<String>,
    point: impl Fn(&Row) -> Option<(f64, f64)>,
) -> Vec<Series> {
    let mut out: Vec<Series> = Vec::new();
    for (s, r) in rows {
        if !s.starts_with(section) {
            continue;
        }
        let (Some(n), Some(p)) = (name(r), point(r)) else {
            continue;
        };
        match out.iter_mut().find(|(m, _)| *m == n) {
            Some((_, pts)) => pts.push(p),
            None => out.push((n, vec![p])),
        }
    }
    for (_, pts) in &mut out {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    out
}

/// How the x axis of a line chart is scaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XScale {
    /// As it is.
    Linear,
    /// Logarithmic, ticks at powers of two (sizes).
    Log2,
    /// Logarithmic, ticks at powers of ten (counts).
    Log10,
}

/// A line chart: one line (with dots) per series; `x_label` formats an x
/// value (in the data's units, whatever the scale).
#[allow(clippy::too_many_arguments)]
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[Series],
    scale: XScale,
    x_label: &dyn Fn(f64) -> String,
    y_from_zero: bool,
) -> anyhow::Result<()> {
    type Map = fn(f64) -> f64;
    let (to, from): (Map, Map) = match scale {
        XScale::Linear => (|x| x, |x| x),
        XScale::Log2 => (|x| x.max(f64::MIN_POSITIVE).log2(), |x| x.exp2()),
        XScale::Log10 => (|x| x.max(f64::MIN_POSITIVE).log10(), |x| 10f64.powf(x)),
    };
    let series: Vec<Series> = series
        .iter()
        .map(|(n, p)| (n.clone(), p.iter().map(|&(x, y)| (to(x), y)).collect()))
        .collect();
    let pts = || series.iter().flat_map(|(_, p)| p.iter());
    if pts().next().is_none() {
        return Ok(());
    }
    let (mut x0, mut x1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (mut y0, mut y1) = pts().fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if y_from_zero {
        y0 = y0.min(0.0);
    }
    let pad = ((y1 - y0) * 0.1).max(y1.abs() * 0.02).max(1e-9);
    y1 += pad;
    if !y_from_zero {
        y0 -= pad;
    }
    if x0 == x1 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let span = x1 - x0;
    let root = SVGBackend::new(path, (820, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x0 - span * 0.05..x1 + span * 0.05, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&|x| {
            // Whole numbers only: thread counts, and whole powers on a log scale.
            if (x - x.round()).abs() > 1e-6 {
                String::new()
            } else {
                x_label(from(x.round()))
            }
        })
        .draw()
        .map_err(err)?;
    for (i, (name, p)) in series.iter().enumerate() {
        let c = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(p.iter().copied(), c.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart
            .draw_series(p.iter().map(|&q| Circle::new(q, 3, c.filled())))
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// A grouped bar chart: per category, one bar per series (`values[i]` of
/// a series is its bar in `categories[i]`; NaN: no bar).
pub fn bars(
    path: &Path,
    title: &str,
    y_desc: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> anyhow::Result<()> {
    let top = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    if categories.is_empty() || series.is_empty() || top <= 0.0 {
        return Ok(());
    }
    let root = SVGBackend::new(path, (820, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let n = categories.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..n, 0.0..top * 1.15)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(categories.len() * 2 + 1)
        .x_label_formatter(&|x| {
            // Labels at the middle of each category.
            let i = x.floor();
            if (x - i - 0.5).abs() < 1e-6 && (i as usize) < categories.len() {
                categories[i as usize].clone()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(err)?;
    let width = 0.8 / series.len() as f64;
    for (s, (name, values)) in series.iter().enumerate() {
        let c = COLORS[s % COLORS.len()];
        chart
            .draw_series(values.iter().enumerate().filter(|(_, v)| v.is_finite()).map(|(i, &v)| {
                let x = i as f64 + 0.1 + width * s as f64;
                Rectangle::new([(x, 0.0), (x + width * 0.92, v)], c.filled())
            }))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// `1 GiB`, `64 TiB` for a size in bytes given as f64.
pub fn size_label(x: f64) -> String {
    crate::human_size(x.round().max(0.0) as u64)
}

/// `12` for a count.
pub fn count_label(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.0}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}
