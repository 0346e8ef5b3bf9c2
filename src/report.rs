//! Small human-facing outputs: PNG line charts (plotters, with a compiled-in font) and a
//! Markdown results table.

use anyhow::{anyhow, Result};
use image::RgbImage;
use plotters::prelude::*;
use std::path::Path;

/// One line of a chart, named in the legend.
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A y axis with its lines; `range` fixes the scale (else it fits the data).
pub struct Axis {
    pub label: String,
    pub lines: Vec<Line>,
    pub range: Option<(f64, f64)>,
}

pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub left: Axis,
    /// A second scale on the right (validation metrics beside the losses).
    pub right: Option<Axis>,
    /// Points are whole numbers of x (epochs): marked, and the x ticks are whole numbers.
    pub integer_x: bool,
}

pub const CHART_SIZE: (u32, u32) = (800, 450);

const COLORS: [RGBColor; 6] = [
    RGBColor(200, 40, 40),
    RGBColor(40, 90, 200),
    RGBColor(30, 140, 60),
    RGBColor(230, 130, 20),
    RGBColor(140, 60, 170),
    RGBColor(90, 90, 90),
];

/// Plotters finds fonts by family name; this one is compiled in (Hack, MIT / Bitstream Vera
/// licence, from egui's `epaint_default_fonts`), so no system font library is needed.
fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, epaint_default_fonts::HACK_REGULAR)
            .unwrap_or_else(|_| unreachable!("the bundled Hack font parses"));
    });
}

/// The range that shows `lines` (from 0 when the values are non-negative and not far from it),
/// with a margin.
fn fit_range(lines: &[Line], axis: impl Fn(&(f64, f64)) -> f64) -> (f64, f64) {
    let values = lines.iter().flat_map(|l| l.points.iter().map(&axis)).filter(|v| v.is_finite());
    let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    if lo >= 0.0 && lo < 0.5 * hi {
        lo = 0.0;
    }
    if hi - lo < 1e-9 {
        hi = lo + 1.0;
    }
    let pad = 0.05 * (hi - lo);
    (if lo == 0.0 { 0.0 } else { lo - pad }, hi + pad)
}

fn plot_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing the chart: {e:?}")
}

/// Draws `chart` at [`CHART_SIZE`] (title, labelled axes with ticks, a legend) and writes it as
/// PNG, atomically.
pub fn line_chart(chart: &Chart, path: &Path) -> Result<()> {
    register_font();
    let (w, h) = CHART_SIZE;
    let mut pixels = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let all: Vec<&Line> = chart.left.lines.iter().chain(chart.right.iter().flat_map(|a| &a.lines)).collect();
        let (mut x0, mut x1) = fit_range(&chart.left.lines, |p| p.0);
        if let Some(r) = &chart.right {
            let (a, b) = fit_range(&r.lines, |p| p.0);
            (x0, x1) = (x0.min(a), x1.max(b));
        }
        if chart.integer_x {
            // Whole epochs, with room for the end markers.
            let last = all.iter().flat_map(|l| l.points.iter().map(|p| p.0)).fold(0.0, f64::max);
            (x0, x1) = (-0.25, last + 0.25);
        }
        let (y0, y1) = chart.left.range.unwrap_or_else(|| fit_range(&chart.left.lines, |p| p.1));
        let mut builder = ChartBuilder::on(&root);
        builder.caption(&chart.title, ("sans-serif", 20)).margin(12).x_label_area_size(40).y_label_area_size(60);
        if chart.right.is_some() {
            builder.right_y_label_area_size(60);
        }
        // The right scale is set before the mesh is drawn, so that its label area gets the right
        // axis's ticks only (without a right axis it is unused).
        let (r0, r1) = match &chart.right {
            Some(right) => right.range.unwrap_or_else(|| fit_range(&right.lines, |p| p.1)),
            None => (0.0, 1.0),
        };
        let mut ctx =
            builder.build_cartesian_2d(x0..x1, y0..y1).map_err(plot_error)?.set_secondary_coord(x0..x1, r0..r1);
        let whole =
            |x: &f64| if (x - x.round()).abs() < 1e-6 { format!("{}", x.round() as i64) } else { String::new() };
        let plain = |x: &f64| {
            let s = format!("{x:.3}");
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        };
        let x_format: &dyn Fn(&f64) -> String = if chart.integer_x { &whole } else { &plain };
        let x_ticks = if chart.integer_x { ((x1 - x0).ceil() as usize + 1).min(12) } else { 10 };
        ctx.configure_mesh()
            .x_desc(&chart.x_label)
            .y_desc(&chart.left.label)
            .x_labels(x_ticks)
            .x_label_formatter(x_format)
            .y_labels(8)
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 15))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.1))
            .draw()
            .map_err(plot_error)?;
        let mut color = COLORS.iter().cycle();
        for line in &chart.left.lines {
            let c = *color.next().unwrap_or(&BLACK);
            ctx.draw_series(LineSeries::new(line.points.iter().copied(), c.stroke_width(2)))
                .map_err(plot_error)?
                .label(&line.label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
            if chart.integer_x {
                ctx.draw_series(line.points.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(plot_error)?;
            }
        }
        if let Some(right) = &chart.right {
            ctx.configure_secondary_axes()
                .y_desc(&right.label)
                .y_labels(8)
                .label_style(("sans-serif", 13))
                .axis_desc_style(("sans-serif", 15))
                .draw()
                .map_err(plot_error)?;
            for line in &right.lines {
                let c = *color.next().unwrap_or(&BLACK);
                ctx.draw_secondary_series(LineSeries::new(line.points.iter().copied(), c.stroke_width(2)))
                    .map_err(plot_error)?
                    .label(format!("{} (right axis)", line.label))
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
                // Triangles tell the right axis's lines from the left's circles.
                ctx.draw_secondary_series(line.points.iter().map(|&p| TriangleMarker::new(p, 5, c.filled())))
                    .map_err(plot_error)?;
            }
        }
        // Losses fall and metrics rise: with a metric on the right the upper right corner is taken.
        let legend =
            if chart.right.is_some() { SeriesLabelPosition::MiddleRight } else { SeriesLabelPosition::UpperRight };
        ctx.configure_series_labels()
            .position(legend)
            .label_font(("sans-serif", 13))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(plot_error)?;
        root.present().map_err(plot_error)?;
    }
    let img = RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow!("chart buffer has the wrong size"))?;
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::util::write_atomic(path, &bytes)
}

/// A Markdown table of named metrics for several splits.
pub fn metrics_table(rows: &[(&str, &crate::util::Metrics)]) -> String {
    let Some((_, first)) = rows.first() else { return String::new() };
    let keys: Vec<&String> = first.keys().collect();
    let mut out = format!(
        "| split | {} |\n|---|{}\n",
        keys.iter().map(|k| k.as_str()).collect::<Vec<_>>().join(" | "),
        "---|".repeat(keys.len())
    );
    for (name, m) in rows {
        let cells: Vec<String> =
            keys.iter().map(|k| format!("{:.2}", m.get(*k).copied().unwrap_or(f64::NAN))).collect();
        out.push_str(&format!("| {name} | {} |\n", cells.join(" | ")));
    }
    out
}
