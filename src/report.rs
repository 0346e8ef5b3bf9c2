//! Small human-facing outputs: a PNG line chart (no font or plotting dependency) and a
//! Markdown results table.

use anyhow::Result;
use image::{Rgb, RgbImage};
use std::path::Path;

/// One line of a chart: values over epochs, in a colour, on a 0..`max` scale.
pub struct Series<'a> {
    pub values: &'a [f64],
    pub color: [u8; 3],
    pub max: f64,
}

fn line(img: &mut RgbImage, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: [u8; 3]) {
    let steps = ((x1 - x0).abs().max((y1 - y0).abs()) as usize).max(1);
    for s in 0..=steps {
        let t = s as f64 / steps as f64;
        let (x, y) = (x0 + t * (x1 - x0), y0 + t * (y1 - y0));
        for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
            let (px, py) = (x as i64 + dx, y as i64 + dy);
            if px >= 0 && py >= 0 && (px as u32) < img.width() && (py as u32) < img.height() {
                img.put_pixel(px as u32, py as u32, Rgb(color));
            }
        }
    }
}

/// Draws each series against the epoch index on a white 640×360 canvas with a light grid
/// (tenths of each scale), and writes it as PNG.
pub fn line_chart(series: &[Series], path: &Path) -> Result<()> {
    let (w, h, margin) = (640u32, 360u32, 30.0);
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    let (pw, ph) = (w as f64 - 2.0 * margin, h as f64 - 2.0 * margin);
    for i in 0..=10 {
        let y = margin + ph * i as f64 / 10.0;
        line(&mut img, (margin, y), (margin + pw, y), [225, 225, 225]);
    }
    line(&mut img, (margin, margin), (margin, margin + ph), [0, 0, 0]);
    line(&mut img, (margin, margin + ph), (margin + pw, margin + ph), [0, 0, 0]);
    for s in series {
        let n = s.values.len();
        let point = |i: usize, v: f64| {
            let x = margin + if n > 1 { pw * i as f64 / (n - 1) as f64 } else { pw / 2.0 };
            (x, margin + ph * (1.0 - (v / s.max).clamp(0.0, 1.0)))
        };
        for i in 1..n {
            line(&mut img, point(i - 1, s.values[i - 1]), point(i, s.values[i]), s.color);
        }
        for (i, &v) in s.values.iter().enumerate() {
            let (x, y) = point(i, v);
            for d in -3..=3 {
                line(&mut img, (x - 3.0, y + d as f64), (x + 3.0, y + d as f64), s.color);
            }
        }
    }
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
