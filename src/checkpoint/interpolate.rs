//! Position-embedding interpolation (`interpolate_pos_embed` in the reference): the patch grid
//! is resized with PyTorch's bicubic (`F.interpolate(mode='bicubic', align_corners=False)`,
//! Keys kernel with A = −0.75, no antialiasing, border-clamped taps); the cls entry is kept.

use candle_core::{Result, Tensor};

const A: f32 = -0.75;

fn cubic1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// Tap offset (−1..=2 around floor) and weights for output index `dst` of a resize in → out.
fn taps(dst: usize, in_size: usize, out_size: usize) -> (i64, [f32; 4]) {
    let scale = in_size as f32 / out_size as f32;
    let src = (dst as f32 + 0.5) * scale - 0.5;
    let floor = src.floor();
    let t = src - floor;
    (floor as i64, [cubic2(t + 1.0), cubic1(t), cubic1(1.0 - t), cubic2(2.0 - t)])
}

/// Resizes a (C, h, w) row-major grid to (C, out_h, out_w) as PyTorch's CPU bicubic does:
/// interpolate along x within each of the four rows, then along y.
pub fn torch_interpolate_bicubic(
    data: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; channels * out_h * out_w];
    let clamp = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
    for oy in 0..out_h {
        let (y0, wy) = taps(oy, h, out_h);
        for ox in 0..out_w {
            let (x0, wx) = taps(ox, w, out_w);
            for c in 0..channels {
                let plane = &data[c * h * w..(c + 1) * h * w];
                let mut acc = 0f32;
                for (j, wyj) in wy.iter().enumerate() {
                    let yy = clamp(y0 - 1 + j as i64, h);
                    let mut row = 0f32;
                    for (i, wxi) in wx.iter().enumerate() {
                        let xx = clamp(x0 - 1 + i as i64, w);
                        row += plane[yy * w + xx] * wxi;
                    }
                    acc += row * wyj;
                }
                out[c * out_h * out_w + oy * out_w + ox] = acc;
            }
        }
    }
    out
}

/// [`torch_interpolate_bicubic`] of one plane, bit for bit, in two passes: each source row is
/// interpolated along x once (instead of once per output row), then the columns along y. The
/// same products are summed in the same order, so the result is identical; ~4× fewer operations
/// when upsampling a small grid to an image (grounding's Grad-CAM maps).
pub fn torch_upsample_bicubic_plane(plane: &[f32], h: usize, w: usize, out_h: usize, out_w: usize) -> Vec<f32> {
    let clamp = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
    let xs: Vec<(i64, [f32; 4])> = (0..out_w).map(|ox| taps(ox, w, out_w)).collect();
    let mut rows = vec![0f32; h * out_w];
    for yy in 0..h {
        for (ox, (x0, wx)) in xs.iter().enumerate() {
            let mut row = 0f32;
            for (i, wxi) in wx.iter().enumerate() {
                row += plane[yy * w + clamp(x0 - 1 + i as i64, w)] * wxi;
            }
            rows[yy * out_w + ox] = row;
        }
    }
    let mut out = vec![0f32; out_h * out_w];
    for oy in 0..out_h {
        let (y0, wy) = taps(oy, h, out_h);
        let src: [usize; 4] = std::array::from_fn(|j| clamp(y0 - 1 + j as i64, h));
        for ox in 0..out_w {
            let mut acc = 0f32;
            for (j, wyj) in wy.iter().enumerate() {
                acc += rows[src[j] * out_w + ox] * wyj;
            }
            out[oy * out_w + ox] = acc;
        }
    }
    out
}

/// (1, n_extra + g_old², E) → (1, n_extra + g_new², E). Unchanged when the grids agree.
pub fn interpolate_pos_embed(pos: &Tensor, num_patches_new: usize, n_extra: usize) -> Result<Tensor> {
    let (_, n_old, e) = pos.dims3()?;
    let g_old = ((n_old - n_extra) as f64).sqrt() as usize;
    let g_new = (num_patches_new as f64).sqrt() as usize;
    if g_old == g_new {
        return Ok(pos.clone());
    }
    if g_old * g_old + n_extra != n_old {
        candle_core::bail!("pos_embed has {n_old} tokens, which is not {n_extra} + a square grid")
    }
    let extra = pos.narrow(1, 0, n_extra)?;
    // (g², E) → (E, g, g) channel planes.
    let grid = pos.narrow(1, n_extra, g_old * g_old)?.squeeze(0)?.t()?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    let resized = torch_interpolate_bicubic(&grid, e, g_old, g_old, g_new, g_new);
    let resized = Tensor::from_vec(resized, (e, g_new * g_new), pos.device())?.t()?.unsqueeze(0)?;
    Tensor::cat(&[&extra.to_dtype(resized.dtype())?, &resized], 1)?.contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_two_pass_plane_upsampling_is_bit_identical() {
        let plane: Vec<f32> = (0..24 * 24).map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 9.0).collect();
        for (oh, ow) in [(480, 640), (37, 53), (24, 24), (5, 9)] {
            let a = torch_interpolate_bicubic(&plane, 1, 24, 24, oh, ow);
            let b = torch_upsample_bicubic_plane(&plane, 24, 24, oh, ow);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{oh}x{ow}");
        }
    }
}
