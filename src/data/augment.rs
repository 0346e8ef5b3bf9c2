//! Training-time image augmentation: torchvision's `RandomResizedCrop` (bicubic) and
//! `RandomHorizontalFlip`, and the reference's `RandomAugment(2, 7)` (`dataset/randaugment.py`,
//! OpenCV-based ops re-implemented on 8-bit RGB).

use super::transform::{pillow_resize_bicubic, RgbImage};
use rand::Rng;

/// `RandomResizedCrop(size, scale, ratio=(3/4, 4/3), BICUBIC)` as torchvision's `get_params`.
pub fn random_resized_crop<R: Rng>(img: &RgbImage, size: usize, scale: (f64, f64), rng: &mut R) -> RgbImage {
    let (w_img, h_img) = (img.width as f64, img.height as f64);
    let area = w_img * h_img;
    let (r0, r1) = (3.0f64 / 4.0, 4.0f64 / 3.0);
    let mut chosen = None;
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let aspect = rng.random_range(r0.ln()..=r1.ln()).exp();
        let w = (target * aspect).sqrt().round() as usize;
        let h = (target / aspect).sqrt().round() as usize;
        if w > 0 && h > 0 && w <= img.width && h <= img.height {
            let i = rng.random_range(0..=img.height - h);
            let j = rng.random_range(0..=img.width - w);
            chosen = Some((i, j, h, w));
            break;
        }
    }
    let (i, j, h, w) = chosen.unwrap_or_else(|| {
        // Fallback: the central crop with the ratio clamped into range.
        let in_ratio = w_img / h_img;
        let (w, h) = if in_ratio < r0 {
            (img.width, (w_img / r0).round() as usize)
        } else if in_ratio > r1 {
            ((h_img * r1).round() as usize, img.height)
        } else {
            (img.width, img.height)
        };
        ((img.height - h) / 2, (img.width - w) / 2, h, w)
    });
    pillow_resize_bicubic(&crop(img, j, i, w, h), size, size)
}

pub fn crop(img: &RgbImage, x: usize, y: usize, w: usize, h: usize) -> RgbImage {
    let mut data = Vec::with_capacity(w * h * 3);
    for row in y..y + h {
        let start = (row * img.width + x) * 3;
        data.extend_from_slice(&img.data[start..start + w * 3]);
    }
    RgbImage { width: w, height: h, data }
}

pub fn hflip(img: &RgbImage) -> RgbImage {
    let mut data = Vec::with_capacity(img.data.len());
    for row in img.data.chunks(img.width * 3) {
        for px in row.chunks(3).rev() {
            data.extend_from_slice(px);
        }
    }
    RgbImage { width: img.width, height: img.height, data }
}

/// The ten operations ALBEF samples from (colour ops were removed on purpose upstream).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Identity,
    AutoContrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

pub const OPS: [Op; 10] = [
    Op::Identity,
    Op::AutoContrast,
    Op::Equalize,
    Op::Brightness,
    Op::Sharpness,
    Op::ShearX,
    Op::ShearY,
    Op::TranslateX,
    Op::TranslateY,
    Op::Rotate,
];

const MAX_LEVEL: f64 = 10.0;
const FILL: u8 = 128;

/// `RandomAugment(N, M)`: N ops drawn with replacement, each applied with probability 0.5.
pub fn random_augment<R: Rng>(img: &RgbImage, n: usize, level: f64, rng: &mut R) -> RgbImage {
    let ops: Vec<Op> = (0..n).map(|_| OPS[rng.random_range(0..OPS.len())]).collect();
    let mut img = img.clone();
    for op in ops {
        if rng.random::<f64>() > 0.5 {
            continue;
        }
        img = apply(&img, op, level, rng);
    }
    img
}

fn apply<R: Rng>(img: &RgbImage, op: Op, level: f64, rng: &mut R) -> RgbImage {
    let enhance = (level / MAX_LEVEL) * 1.8 + 0.1;
    // The reference negates shear and translation when random() > 0.5, rotation when < 0.5.
    let signed = |v: f64, rng: &mut R, negate_above: bool| {
        let r = rng.random::<f64>();
        if (negate_above && r > 0.5) || (!negate_above && r < 0.5) {
            -v
        } else {
            v
        }
    };
    match op {
        Op::Identity => img.clone(),
        Op::AutoContrast => per_channel_lut(img, autocontrast_lut),
        Op::Equalize => per_channel_lut(img, equalize_lut),
        Op::Brightness => {
            let lut: Vec<u8> = (0..256).map(|v| (v as f32 * enhance as f32).clamp(0.0, 255.0) as u8).collect();
            RgbImage { width: img.width, height: img.height, data: img.data.iter().map(|&v| lut[v as usize]).collect() }
        }
        Op::Sharpness => sharpness(img, enhance as f32),
        Op::ShearX => {
            let s = signed((level / MAX_LEVEL) * 0.3, rng, true);
            warp_affine(img, [[1.0, s, 0.0], [0.0, 1.0, 0.0]])
        }
        Op::ShearY => {
            let s = signed((level / MAX_LEVEL) * 0.3, rng, true);
            warp_affine(img, [[1.0, 0.0, 0.0], [s, 1.0, 0.0]])
        }
        Op::TranslateX => {
            let o = signed((level / MAX_LEVEL) * 10.0, rng, true);
            warp_affine(img, [[1.0, 0.0, -o], [0.0, 1.0, 0.0]])
        }
        Op::TranslateY => {
            let o = signed((level / MAX_LEVEL) * 10.0, rng, true);
            warp_affine(img, [[1.0, 0.0, 0.0], [0.0, 1.0, -o]])
        }
        Op::Rotate => {
            let deg = signed((level / MAX_LEVEL) * 30.0, rng, false);
            let (cx, cy) = (img.width as f64 / 2.0, img.height as f64 / 2.0);
            let (a, b) = (deg.to_radians().cos(), deg.to_radians().sin());
            // cv2.getRotationMatrix2D(center, deg, 1)
            warp_affine(img, [[a, b, (1.0 - a) * cx - b * cy], [-b, a, b * cx + (1.0 - a) * cy]])
        }
    }
}

fn per_channel_lut(img: &RgbImage, make: fn(&[u32; 256], usize) -> [u8; 256]) -> RgbImage {
    let mut luts = Vec::with_capacity(3);
    for c in 0..3 {
        let mut hist = [0u32; 256];
        for px in img.data.chunks(3) {
            hist[px[c] as usize] += 1;
        }
        luts.push(make(&hist, img.width * img.height));
    }
    let data = img
        .data
        .chunks(3)
        .flat_map(|px| [luts[0][px[0] as usize], luts[1][px[1] as usize], luts[2][px[2] as usize]])
        .collect();
    RgbImage { width: img.width, height: img.height, data }
}

/// `autocontrast_func(cutoff=0)`: stretch min..max to 0..255.
fn autocontrast_lut(hist: &[u32; 256], _n: usize) -> [u8; 256] {
    let low = hist.iter().position(|&h| h > 0).unwrap_or(0);
    let high = hist.iter().rposition(|&h| h > 0).unwrap_or(255);
    let mut lut = [0u8; 256];
    for (v, o) in lut.iter_mut().enumerate() {
        *o = if high <= low {
            v as u8
        } else {
            let scale = 255.0 / (high - low) as f64;
            (v as f64 * scale - low as f64 * scale).clamp(0.0, 255.0) as u8
        };
    }
    lut
}

/// `equalize_func`: PIL's histogram equalisation.
fn equalize_lut(hist: &[u32; 256], _n: usize) -> [u8; 256] {
    let nonzero: Vec<u32> = hist.iter().copied().filter(|&h| h != 0).collect();
    let step = nonzero[..nonzero.len().saturating_sub(1)].iter().map(|&h| h as u64).sum::<u64>() / 255;
    let mut lut = [0u8; 256];
    if step == 0 {
        for (v, o) in lut.iter_mut().enumerate() {
            *o = v as u8;
        }
        return lut;
    }
    let mut acc = step / 2;
    for (v, o) in lut.iter_mut().enumerate() {
        *o = (acc / step).min(255) as u8;
        acc += hist[v] as u64;
    }
    lut
}

/// `sharpness_func`: blend with a 3×3 smoothing of the interior; the cast to uint8 wraps
/// instead of clipping, as the reference's `astype(np.uint8)` does.
fn sharpness(img: &RgbImage, factor: f32) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut out = img.data.clone();
    if w < 3 || h < 3 {
        return img.clone();
    }
    for y in 1..h - 1 {
        for x in 1..w - 1 {
            for c in 0..3 {
                let mut acc = 0f32;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let k = if dx == 1 && dy == 1 { 5.0 } else { 1.0 };
                        acc += k * img.data[((y + dy - 1) * w + x + dx - 1) * 3 + c] as f32;
                    }
                }
                let blurred = (acc / 13.0).round().clamp(0.0, 255.0);
                let v = img.data[(y * w + x) * 3 + c] as f32;
                out[(y * w + x) * 3 + c] = (blurred + factor * (v - blurred)) as i32 as u8;
            }
        }
    }
    RgbImage { width: w, height: h, data: out }
}

/// `cv2.warpAffine(img, M, (W, H), INTER_LINEAR, borderValue=128)`: M maps source to
/// destination, so each output pixel samples the source at M⁻¹·(x, y); taps outside the image read
/// the fill value.
fn warp_affine(img: &RgbImage, m: [[f64; 3]; 2]) -> RgbImage {
    let det = m[0][0] * m[1][1] - m[0][1] * m[1][0];
    let inv = [
        [m[1][1] / det, -m[0][1] / det, (m[0][1] * m[1][2] - m[1][1] * m[0][2]) / det],
        [-m[1][0] / det, m[0][0] / det, (m[1][0] * m[0][2] - m[0][0] * m[1][2]) / det],
    ];
    let (w, h) = (img.width as i64, img.height as i64);
    let get = |x: i64, y: i64, c: usize| -> f64 {
        if x < 0 || y < 0 || x >= w || y >= h {
            FILL as f64
        } else {
            img.data[((y * w + x) * 3) as usize + c] as f64
        }
    };
    let mut data = vec![0u8; img.data.len()];
    for y in 0..h {
        for x in 0..w {
            let sx = inv[0][0] * x as f64 + inv[0][1] * y as f64 + inv[0][2];
            let sy = inv[1][0] * x as f64 + inv[1][1] * y as f64 + inv[1][2];
            let (x0, y0) = (sx.floor() as i64, sy.floor() as i64);
            let (fx, fy) = (sx - x0 as f64, sy - y0 as f64);
            for c in 0..3 {
                let v = get(x0, y0, c) * (1.0 - fx) * (1.0 - fy)
                    + get(x0 + 1, y0, c) * fx * (1.0 - fy)
                    + get(x0, y0 + 1, c) * (1.0 - fx) * fy
                    + get(x0 + 1, y0 + 1, c) * fx * fy;
                data[((y * w + x) * 3) as usize + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage { width: img.width, height: img.height, data }
}

/// The fine-tuning train transform: crop (scale 0.5–1) → flip → RandomAugment(2, 7).
pub fn train_augment<R: Rng>(img: &RgbImage, res: usize, scale_min: f64, rng: &mut R) -> RgbImage {
    let img = random_resized_crop(img, res, (scale_min, 1.0), rng);
    let img = if rng.random::<f64>() < 0.5 { hflip(&img) } else { img };
    random_augment(&img, 2, 7.0, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn gradient(w: usize, h: usize) -> RgbImage {
        let data = (0..w * h).flat_map(|i| [(i % w * 255 / w) as u8, (i / w * 255 / h) as u8, 100]).collect();
        RgbImage { width: w, height: h, data }
    }

    #[test]
    fn crop_flip_and_luts() {
        let img = gradient(8, 6);
        let f = hflip(&img);
        assert_eq!(&f.data[0..3], &img.data[7 * 3..8 * 3]);
        assert_eq!(hflip(&f), img);
        let c = crop(&img, 2, 1, 3, 2);
        assert_eq!((c.width, c.height), (3, 2));
        assert_eq!(&c.data[0..3], &img.data[(8 + 2) * 3..(8 + 2) * 3 + 3]);
        // Autocontrast stretches a 50..150 channel to 0..255.
        let mut hist = [0u32; 256];
        hist[50] = 3;
        hist[150] = 5;
        let lut = autocontrast_lut(&hist, 8);
        assert_eq!((lut[50], lut[150], lut[100]), (0, 255, 127));
        // Translation by +7 px: column 7 of the output is column 0 of the input.
        let t = warp_affine(&img, [[1.0, 0.0, 7.0], [0.0, 1.0, 0.0]]);
        assert_eq!(&t.data[7 * 3..8 * 3], &img.data[0..3]);
        assert_eq!(&t.data[0..3], &[FILL, FILL, FILL]);
    }

    #[test]
    fn train_transform_is_seeded_and_sized() {
        let img = gradient(40, 30);
        let a = train_augment(&img, 16, 0.5, &mut rand::rngs::StdRng::seed_from_u64(1));
        let b = train_augment(&img, 16, 0.5, &mut rand::rngs::StdRng::seed_from_u64(1));
        assert_eq!(a, b);
        assert_eq!((a.width, a.height, a.data.len()), (16, 16, 16 * 16 * 3));
        for op in OPS {
            let out = apply(&img, op, 7.0, &mut rand::rngs::StdRng::seed_from_u64(2));
            assert_eq!(out.data.len(), img.data.len(), "{op:?}");
        }
    }
}
