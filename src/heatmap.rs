//! Grad-CAM pictures, as `visualization.ipynb`'s `getAttMap` draws them: the map normalised to
//! [0, 1], upsampled to the image, blurred (σ = 0.02·max(H, W)), renormalised, coloured with
//! matplotlib's `jet` and blended as `(1 − m^0.7)·image + m^0.7·jet(m)`; and a figure of several
//! such pictures, each labelled (8×8 bitmap glyphs, no font file).

use crate::checkpoint::torch_interpolate_bicubic;
use crate::data::transform::RgbImage as Pixels;
use anyhow::Result;
use image::{imageops, Rgb, RgbImage};
use std::path::Path;

/// Piecewise-linear interpolation through `(x, y)` points sorted by x.
fn segments(x: f32, pts: &[(f32, f32)]) -> f32 {
    for w in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (w[0], w[1]);
        if x <= x1 {
            return y0 + (y1 - y0) * ((x - x0) / (x1 - x0)).clamp(0.0, 1.0);
        }
    }
    pts.last().map_or(0.0, |p| p.1)
}

/// matplotlib's `jet` colormap (its segment data), RGB in [0, 1].
pub fn jet(v: f32) -> [f32; 3] {
    let v = v.clamp(0.0, 1.0);
    [
        segments(v, &[(0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)]),
        segments(v, &[(0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)]),
        segments(v, &[(0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)]),
    ]
}

/// `m -= m.min(); if m.max() > 0: m /= m.max()`.
pub fn normalize(m: &mut [f32]) {
    let min = m.iter().copied().fold(f32::INFINITY, f32::min);
    m.iter_mut().for_each(|v| *v -= min);
    let max = m.iter().copied().fold(0f32, f32::max);
    if max > 0.0 {
        m.iter_mut().for_each(|v| *v /= max);
    }
}

/// `scipy.ndimage.gaussian_filter` on a row-major (h, w) plane: separable, kernel truncated at
/// 4σ, `reflect` borders (… c b a | a b c …).
pub fn gaussian_blur(data: &[f32], w: usize, h: usize, sigma: f64) -> Vec<f32> {
    let radius = (4.0 * sigma + 0.5) as i64;
    let mut kernel: Vec<f64> = (-radius..=radius).map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp()).collect();
    let total: f64 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let reflect = |i: i64, n: usize| -> usize {
        let n = n as i64;
        let period = 2 * n;
        let mut j = i.rem_euclid(period);
        if j >= n {
            j = period - 1 - j;
        }
        j as usize
    };
    let pass = |src: &[f32], len: usize, count: usize, at: &dyn Fn(usize, usize) -> usize| -> Vec<f32> {
        let mut out = vec![0f32; src.len()];
        for line in 0..count {
            for i in 0..len {
                let mut acc = 0f64;
                for (t, k) in kernel.iter().enumerate() {
                    acc += k * src[at(line, reflect(i as i64 + t as i64 - radius, len))] as f64;
                }
                out[at(line, i)] = acc as f32;
            }
        }
        out
    };
    let rows = pass(data, w, h, &|y, x| y * w + x);
    pass(&rows, h, w, &|x, y| y * w + x)
}

/// The picture of one (gh, gw) map over `img` (`getAttMap(img, map, blur)`). The notebook
/// upsamples with skimage's order-3 spline; here it is the bicubic `grounding_eval` uses.
pub fn overlay(img: &Pixels, map: &[f32], gh: usize, gw: usize, blur: bool) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut m = map.to_vec();
    normalize(&mut m);
    let mut up = torch_interpolate_bicubic(&m, 1, gh, gw, h, w);
    if blur {
        up = gaussian_blur(&up, w, h, 0.02 * w.max(h) as f64);
    }
    normalize(&mut up);
    let mut out = RgbImage::new(w as u32, h as u32);
    for (i, px) in out.pixels_mut().enumerate() {
        let v = up[i].clamp(0.0, 1.0);
        let a = v.powf(0.7);
        let c = jet(v);
        let mut rgb = [0u8; 3];
        for k in 0..3 {
            let base = img.data[i * 3 + k] as f32 / 255.0;
            rgb[k] = (((1.0 - a) * base + a * c[k]) * 255.0).round().clamp(0.0, 255.0) as u8;
        }
        *px = Rgb(rgb);
    }
    out
}

/// The image as it is, for a figure's first tile.
pub fn plain(img: &Pixels) -> RgbImage {
    RgbImage::from_raw(img.width as u32, img.height as u32, img.data.clone()).expect("RGB buffer of its size")
}

const GLYPH: u32 = 8;

/// Draws `text` with its top-left corner at (x, y), each glyph pixel `scale`² pixels; characters
/// outside ASCII are drawn as '?'. Clipped to the image.
pub fn draw_text(img: &mut RgbImage, text: &str, x: u32, y: u32, scale: u32, color: [u8; 3]) {
    for (n, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() { ch as usize } else { '?' as usize };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8u32 {
                if bits & (1 << col) == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let px = x + (n as u32 * GLYPH + col) * scale + dx;
                        let py = y + row as u32 * scale + dy;
                        if px < img.width() && py < img.height() {
                            img.put_pixel(px, py, Rgb(color));
                        }
                    }
                }
            }
        }
    }
}

/// Pictures in a grid of `columns`, each scaled to `tile_width` and labelled underneath.
pub fn figure(tiles: &[(RgbImage, String)], columns: usize, tile_width: u32) -> RgbImage {
    let (scale, pad) = (2, 6);
    let label_h = GLYPH * scale + 2 * pad;
    let scaled: Vec<RgbImage> = tiles
        .iter()
        .map(|(im, _)| {
            let h = ((im.height() as f64 * tile_width as f64 / im.width().max(1) as f64).round() as u32).max(1);
            imageops::resize(im, tile_width, h, imageops::FilterType::Triangle)
        })
        .collect();
    let cols = columns.clamp(1, tiles.len().max(1));
    let rows = tiles.len().div_ceil(cols);
    let tile_h = scaled.iter().map(|t| t.height()).max().unwrap_or(1) + label_h;
    let mut out = RgbImage::from_pixel(
        cols as u32 * (tile_width + pad) + pad,
        rows as u32 * (tile_h + pad) + pad,
        Rgb([255, 255, 255]),
    );
    let max_chars = ((tile_width - pad) / (GLYPH * scale)) as usize;
    for (i, (tile, (_, label))) in scaled.iter().zip(tiles).enumerate() {
        let (x, y) = (pad + (i % cols) as u32 * (tile_width + pad), pad + (i / cols) as u32 * (tile_h + pad));
        imageops::replace(&mut out, tile, x as i64, y as i64);
        let text: String = if label.chars().count() > max_chars {
            label.chars().take(max_chars.saturating_sub(2)).chain("..".chars()).collect()
        } else {
            label.clone()
        };
        draw_text(&mut out, &text, x, y + tile.height() + pad, scale, [0, 0, 0]);
    }
    out
}

/// Writes a PNG atomically.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)?;
    crate::util::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jet_ends_and_middle() {
        assert_eq!(jet(0.0), [0.0, 0.0, 0.5]);
        assert_eq!(jet(1.0), [0.5, 0.0, 0.0]);
        let m = jet(0.5);
        assert!(m[1] == 1.0 && m[0] > 0.4 && m[2] < 0.6, "{m:?}");
    }

    #[test]
    fn blur_keeps_the_mean_of_a_constant_and_spreads_a_peak() {
        let c = gaussian_blur(&[2.0; 30], 6, 5, 1.5);
        assert!(c.iter().all(|v| (v - 2.0).abs() < 1e-5));
        let mut p = vec![0f32; 81];
        p[40] = 1.0;
        let b = gaussian_blur(&p, 9, 9, 1.0);
        assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(b[40] < 0.2 && b[40] > b[41] && b[41] > b[42] && (b[39] - b[41]).abs() < 1e-7);
    }

    #[test]
    fn labels_are_drawn() {
        let mut img = RgbImage::from_pixel(40, 12, Rgb([255, 255, 255]));
        draw_text(&mut img, "Hi", 0, 0, 1, [0, 0, 0]);
        let dark = img.pixels().filter(|p| p.0 == [0, 0, 0]).count();
        assert!(dark > 10, "{dark}");
    }
}
