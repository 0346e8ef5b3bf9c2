//! The evaluation image transform: decode → RGB → `Resize((R, R), BICUBIC)` exactly as Pillow
//! does it → `ToTensor` → `Normalize` with CLIP's mean and std (§6.4).

use crate::util::contain_panics;
use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

pub const MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
// CLIP's constants as the reference writes them (f32 rounds the last digits).
#[allow(clippy::excessive_precision)]
pub const STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

/// Pillow's `Image.MAX_IMAGE_PIXELS`: larger images are refused before decoding (a few-byte
/// file can claim 100,000 × 100,000 pixels, 30 GB decoded). Raised with `--max-image-pixels`.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 89_478_485;

static MAX_IMAGE_PIXELS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(DEFAULT_MAX_IMAGE_PIXELS);

/// Sets the process-wide pixel limit of [`RgbImage::decode`].
pub fn set_max_image_pixels(n: u64) {
    MAX_IMAGE_PIXELS.store(n, std::sync::atomic::Ordering::Relaxed);
}

pub fn max_image_pixels() -> u64 {
    MAX_IMAGE_PIXELS.load(std::sync::atomic::Ordering::Relaxed)
}

/// An 8-bit RGB image, row-major HWC.
#[derive(Clone, Debug, PartialEq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Decodes JPEG or PNG; grey, grey+alpha and RGBA become RGB (alpha dropped, as PIL's
    /// `convert('RGB')`). A JPEG that ends before its end-of-image marker is refused: the
    /// decoder would fill the missing part with grey, where Pillow (the reference) raises.
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("cannot open image {}", path.display()))?;
        Self::decode(&bytes, &path.display().to_string())
    }

    /// [`RgbImage::open`] on bytes already read (a tar shard's member); `name` is for errors.
    pub fn decode(bytes: &[u8], name: &str) -> Result<Self> {
        let reader = || {
            image::ImageReader::new(std::io::Cursor::new(bytes))
                .with_guessed_format()
                .with_context(|| format!("cannot read image {name}"))
        };
        // The header alone gives the size: refuse a bomb before anything is allocated for it.
        // The decoders panic on some damaged files (zune-jpeg indexes out of bounds in its IDCT):
        // `contain_panics` makes that an error naming the file.
        let damaged = || format!("cannot decode image {name} (truncated or not an image?)");
        let header = reader()?;
        let (w, h) = contain_panics(|| Ok(header.into_dimensions()?)).with_context(damaged)?;
        let (pixels, max) = (w as u64 * h as u64, max_image_pixels());
        if pixels > max {
            anyhow::bail!(
                "image {name} is {w} × {h} = {pixels} pixels, more than the limit of {max} (a decompression bomb?); \
                 raise it with --max-image-pixels if the image is genuine"
            );
        }
        // With a raised limit the decoder may still ask for more memory than there is, and an
        // allocation failure there aborts the process: ask first, fallibly.
        let need = pixels.saturating_mul(8);
        if Vec::<u8>::new().try_reserve_exact(need as usize).is_err() {
            anyhow::bail!("image {name} is {w} × {h} pixels: not enough memory to decode it ({need} bytes)");
        }
        let mut reader = reader()?;
        // The decoder's own allocation cap follows the pixel limit (8 bytes/pixel: 16-bit RGBA).
        let mut limits = image::Limits::default();
        limits.max_alloc = Some(limits.max_alloc.unwrap_or(0).max(max.saturating_mul(8)));
        reader.limits(limits);
        if reader.format() == Some(image::ImageFormat::Jpeg) {
            if let Err(why) = jpeg_complete(bytes) {
                anyhow::bail!("cannot decode image {name}: JPEG truncated ({why})");
            }
        }
        let img = contain_panics(|| Ok(reader.decode()?)).with_context(damaged)?;
        let rgb = img.to_rgb8();
        Ok(Self { width: rgb.width() as usize, height: rgb.height() as usize, data: rgb.into_raw() })
    }
}

/// Walks a JPEG's marker segments (skipping each by its length, so thumbnails inside APP
/// segments do not count) and the entropy-coded data after each SOS, up to the EOI marker.
/// Whatever follows EOI is ignored, as libjpeg does.
fn jpeg_complete(b: &[u8]) -> std::result::Result<(), String> {
    let mut i = 2; // after SOI
    loop {
        // Next marker: libjpeg skips stray bytes and 0xFF fill before it.
        while i < b.len() && b[i] != 0xFF {
            i += 1;
        }
        while i < b.len() && b[i] == 0xFF {
            i += 1;
        }
        let Some(&m) = b.get(i) else {
            return Err(format!("no end-of-image marker in its {} bytes", b.len()));
        };
        i += 1;
        match m {
            0xD9 => return Ok(()),
            0x01 | 0xD0..=0xD8 => continue, // no length field
            _ => {}
        }
        let Some(len) = b.get(i..i + 2).map(|l| u16::from_be_bytes([l[0], l[1]]) as usize) else {
            return Err(format!("ends inside marker 0xFF{m:02X} at byte {}", i - 2));
        };
        if len < 2 || i + len > b.len() {
            return Err(format!("ends inside the segment of marker 0xFF{m:02X} at byte {}", i - 2));
        }
        i += len;
        if m == 0xDA {
            // Entropy-coded data runs to the next marker that is neither a stuffed 0xFF00 nor a
            // restart marker.
            let start = i;
            loop {
                match (b.get(i), b.get(i + 1)) {
                    (Some(0xFF), Some(0xFF)) => i += 1, // fill before a marker
                    (Some(0xFF), Some(0x00 | 0xD0..=0xD7)) => i += 2,
                    (Some(0xFF), Some(_)) => break,
                    (Some(_), _) => i += 1,
                    (None, _) => {
                        return Err(format!(
                            "scan data from byte {start} ends at byte {} without an end-of-image marker",
                            b.len()
                        ))
                    }
                }
            }
        }
    }
}

// Pillow 13.0.0's Resample.c: coefficients in double, rounded to fixed point with 22 fractional
// bits, two separable passes with an 8-bit intermediate.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per output pixel: first input index and fixed-point weights (`precompute_coeffs` +
/// `normalize_coeffs_8bpc`).
fn coefficients(in_size: usize, out_size: usize) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let w: Vec<f64> = (xmin..xmax).map(|x| bicubic_filter((x as f64 - center + 0.5) * ss)).collect();
            let total: f64 = w.iter().sum();
            let k = w
                .iter()
                .map(|&v| {
                    let v = if total != 0.0 { v / total } else { v };
                    let scaled = v * (1u32 << PRECISION_BITS) as f64;
                    if v < 0.0 {
                        (scaled - 0.5) as i32
                    } else {
                        (scaled + 0.5) as i32
                    }
                })
                .collect();
            (xmin, k)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One horizontal pass over input rows `rows`, to `coeffs.len()` columns.
fn horizontal_pass(img: &RgbImage, coeffs: &[(usize, Vec<i32>)], rows: std::ops::Range<usize>) -> RgbImage {
    let out_w = coeffs.len();
    let mut data = Vec::with_capacity(out_w * rows.len() * 3);
    for y in rows.clone() {
        let row = &img.data[y * img.width * 3..(y + 1) * img.width * 3];
        for (xmin, k) in coeffs {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &w) in k.iter().enumerate() {
                    acc += row[(xmin + i) * 3 + c] as i64 * w as i64;
                }
                data.push(clip8(acc));
            }
        }
    }
    RgbImage { width: out_w, height: rows.len(), data }
}

/// One vertical pass to `coeffs.len()` rows; `offset` is the first input row `img` holds.
fn vertical_pass(img: &RgbImage, coeffs: &[(usize, Vec<i32>)], offset: usize) -> RgbImage {
    let w = img.width;
    let mut data = Vec::with_capacity(w * coeffs.len() * 3);
    for (ymin, k) in coeffs {
        let ymin = ymin - offset;
        for x in 0..w {
            for c in 0..3 {
                let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                for (i, &wt) in k.iter().enumerate() {
                    acc += img.data[((ymin + i) * w + x) * 3 + c] as i64 * wt as i64;
                }
                data.push(clip8(acc));
            }
        }
    }
    RgbImage { width: w, height: coeffs.len(), data }
}

/// `PIL.Image.resize((w, h), BICUBIC)` on an RGB image, bit-exact with Pillow 13.0.0 (what
/// installing the reference gives today). Sizes are at least 1, as Pillow requires.
pub fn pillow_resize_bicubic(img: &RgbImage, out_w: usize, out_h: usize) -> RgbImage {
    let (in_w, in_h) = (img.width, img.height);
    let need_horizontal = out_w != in_w;
    let need_vertical = out_h != in_h;
    // Pillow 13.0.0, ImagingResampleInner: the vertical pass runs first when the height shrinks
    // by more than twice as many pixels as the width does (a speed choice that changes the
    // rounding of the 8-bit intermediate). Pillow 12.1 and older always ran horizontal first;
    // 12.2-12.3 went vertical first only when shrinking images over 100x taller than wide.
    let dh = in_h as i64 - out_h as i64;
    let dw = in_w as i64 - out_w as i64;
    let vertical_first = dh > 0 && dh > 2 * dw;
    let vert = coefficients(in_h, out_h);
    if vertical_first {
        // Full-width vertical pass, then horizontal over all of its rows.
        let tmp = vertical_pass(img, &vert, 0);
        return if need_horizontal { horizontal_pass(&tmp, &coefficients(in_w, out_w), 0..out_h) } else { tmp };
    }
    match (need_horizontal, need_vertical) {
        (true, true) => {
            // Horizontal pass only over the input rows the vertical pass reads.
            let first = vert[0].0;
            let (last_min, last_k) = &vert[out_h - 1];
            let tmp = horizontal_pass(img, &coefficients(in_w, out_w), first..last_min + last_k.len());
            vertical_pass(&tmp, &vert, first)
        }
        (true, false) => horizontal_pass(img, &coefficients(in_w, out_w), 0..in_h),
        (false, true) => vertical_pass(img, &vert, 0),
        (false, false) => img.clone(),
    }
}

/// `ToTensor` + `Normalize(CLIP mean, std)`: (3, H, W) f32, channel-planar.
pub fn to_normalized_chw(img: &RgbImage) -> Vec<f32> {
    let n = img.width * img.height;
    let mut out = vec![0f32; 3 * n];
    for i in 0..n {
        for c in 0..3 {
            out[c * n + i] = (img.data[i * 3 + c] as f32 / 255.0 - MEAN[c]) / STD[c];
        }
    }
    out
}

/// The reference's test transform at resolution `res`: (3, res, res) values.
pub fn eval_transform_host(img: &RgbImage, res: usize) -> Vec<f32> {
    to_normalized_chw(&pillow_resize_bicubic(img, res, res))
}

/// [`eval_transform_host`] as a tensor.
pub fn eval_transform(img: &RgbImage, res: usize, device: &Device) -> candle_core::Result<Tensor> {
    Tensor::from_vec(eval_transform_host(img, res), (3, res, res), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grey_rgba_and_jpeg_become_rgb() {
        let dir = std::env::temp_dir().join(format!("albef-img-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let grey = image::GrayImage::from_fn(5, 4, |x, y| image::Luma([(x * 40 + y) as u8]));
        grey.save(dir.join("grey.png")).unwrap();
        let img = RgbImage::open(&dir.join("grey.png")).unwrap();
        assert_eq!((img.width, img.height), (5, 4));
        assert_eq!(&img.data[3 * 6..3 * 6 + 3], &[41, 41, 41]);
        let rgba = image::RgbaImage::from_fn(3, 2, |x, _| image::Rgba([10 * x as u8, 20, 30, 0]));
        rgba.save(dir.join("rgba.png")).unwrap();
        let img = RgbImage::open(&dir.join("rgba.png")).unwrap();
        assert_eq!(&img.data[3..6], &[10, 20, 30], "alpha dropped, colour kept");
        let rgb = image::RgbImage::from_fn(16, 16, |_, _| image::Rgb([200, 100, 50]));
        rgb.save(dir.join("flat.jpg")).unwrap();
        let img = RgbImage::open(&dir.join("flat.jpg")).unwrap();
        assert!(
            img.data.chunks(3).all(|p| (p[0] as i32 - 200).abs() <= 3 && (p[1] as i32 - 100).abs() <= 3),
            "JPEG decoded"
        );
        let t = eval_transform(&img, 8, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[3, 8, 8]);
        std::fs::write(dir.join("broken.jpg"), b"\xff\xd8\xff\xe0 not really").unwrap();
        let e = RgbImage::open(&dir.join("broken.jpg")).unwrap_err();
        assert!(format!("{e:#}").contains("broken.jpg"), "{e:#}");
    }

    /// A JPEG cut inside its scan data decodes without error in the `image` crate (it fills the
    /// rest with grey); Pillow refuses it, so must we. Complete files, with whatever follows EOI,
    /// still open.
    #[test]
    fn jpeg_cut_inside_scan_data_is_refused() {
        let dir = std::env::temp_dir().join(format!("albef-img-cut-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut s = 7u32;
        let noise = image::RgbImage::from_fn(48, 40, |_, _| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            image::Rgb([(s >> 24) as u8, (s >> 16) as u8, (s >> 8) as u8])
        });
        noise.save(dir.join("whole.jpg")).unwrap();
        let bytes = std::fs::read(dir.join("whole.jpg")).unwrap();
        assert!(RgbImage::open(&dir.join("whole.jpg")).is_ok());
        // Trailing bytes after EOI (padding, appended data) are ignored, as by libjpeg.
        std::fs::write(dir.join("padded.jpg"), [&bytes[..], &[0u8; 37], b"trailer"].concat()).unwrap();
        assert!(RgbImage::open(&dir.join("padded.jpg")).is_ok());
        // An APP segment holding a complete thumbnail (its own FF D9) does not count as the end.
        let thumb: Vec<u8> = [&b"Exif\0\0"[..], &bytes].concat();
        let app1 = [&[0xFF, 0xE1][..], &((thumb.len() + 2) as u16).to_be_bytes(), &thumb].concat();
        let with_thumb = [&bytes[..2], &app1, &bytes[2..]].concat();
        std::fs::write(dir.join("thumb.jpg"), &with_thumb).unwrap();
        assert!(RgbImage::open(&dir.join("thumb.jpg")).is_ok());
        for (name, file) in [("cut.jpg", &bytes), ("thumbcut.jpg", &with_thumb)] {
            let sos = file.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
            let cut = &file[..sos + (file.len() - sos) * 3 / 4];
            assert!(image::load_from_memory(cut).is_ok(), "the decoder alone accepts {name}");
            std::fs::write(dir.join(name), cut).unwrap();
            let e = match RgbImage::open(&dir.join(name)) {
                Ok(_) => panic!("{name} opened: the decoder filled the missing scan data"),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(name) && e.contains("truncated"), "{e}");
        }
        // Cut inside a header segment, and with no scan at all.
        std::fs::write(dir.join("head.jpg"), &bytes[..30]).unwrap();
        assert!(format!("{:#}", RgbImage::open(&dir.join("head.jpg")).unwrap_err()).contains("head.jpg"));
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let img = RgbImage { width: 2, height: 2, data: (0..12).collect() };
        assert_eq!(pillow_resize_bicubic(&img, 2, 2), img);
    }
}
