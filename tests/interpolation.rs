//! Position-embedding interpolation against values derived independently of the implementation.

use albef::checkpoint::{interpolate_pos_embed, torch_interpolate_bicubic};
use candle_core::{Device, Tensor};

/// Keys' cubic kernel with A = −0.75, written out from its definition.
fn keys(x: f64) -> f64 {
    let a = -0.75;
    let x = x.abs();
    if x <= 1.0 {
        (a + 2.0) * x.powi(3) - (a + 3.0) * x.powi(2) + 1.0
    } else if x < 2.0 {
        a * x.powi(3) - 5.0 * a * x.powi(2) + 8.0 * a * x - 4.0 * a
    } else {
        0.0
    }
}

/// The (out × in) 1-D interpolation matrix of PyTorch's bicubic with align_corners=False:
/// source coordinate (d + 0.5)·in/out − 0.5, taps clamped to the border.
fn matrix(n_in: usize, n_out: usize) -> Vec<Vec<f64>> {
    let mut m = vec![vec![0.0; n_in]; n_out];
    for (d, row) in m.iter_mut().enumerate() {
        let s = (d as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5;
        let f = s.floor();
        for k in -1..=2i64 {
            let src = f as i64 + k;
            let w = keys(s - src as f64);
            row[src.clamp(0, n_in as i64 - 1) as usize] += w;
        }
    }
    m
}

#[test]
fn matches_separable_matrix_form() {
    // Grid values from a fixed non-polynomial function, so every tap matters.
    let (g, out) = (4usize, 7usize);
    let grid: Vec<f64> = (0..g * g).map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0 + (i as f64).sin()).collect();
    let m = matrix(g, out);
    // expected = M · G · Mᵀ
    let mut expected = vec![0.0; out * out];
    for y in 0..out {
        for x in 0..out {
            let mut acc = 0.0;
            for i in 0..g {
                for j in 0..g {
                    acc += m[y][i] * grid[i * g + j] * m[x][j];
                }
            }
            expected[y * out + x] = acc;
        }
    }
    let got = torch_interpolate_bicubic(&grid.iter().map(|&v| v as f32).collect::<Vec<_>>(), 1, g, g, out, out);
    for (i, (a, b)) in got.iter().zip(&expected).enumerate() {
        assert!((*a as f64 - b).abs() < 1e-5, "element {i}: got {a}, want {b}");
    }
}

#[test]
fn hand_computed_upscale_of_two_by_two() {
    // 2 → 4 with rows (0, 1): source coords −0.25, 0.25, 0.75, 1.25. Keys' kernel (A = −0.75)
    // gives keys(0.25) = 0.87890625, keys(0.75) = 0.26171875, keys(1.25) = −0.10546875,
    // keys(1.75) = −0.03515625. At s = 0.25 the taps −1, 0, 1, 2 clamp to rows 0, 0, 1, 1, so the
    // value is keys(0.75) + keys(1.75) = 0.2265625; at s = −0.25 (taps −2..1) only the last tap,
    // weight keys(1.25), reads row 1. The other two follow by symmetry.
    let got = torch_interpolate_bicubic(&[0.0, 0.0, 1.0, 1.0], 1, 2, 2, 4, 4);
    // Column profile along y, constant along x: values at s = −0.25, 0.25, 0.75, 1.25.
    let want_rows = [-0.10546875, 0.2265625, 0.7734375, 1.10546875];
    for y in 0..4 {
        for x in 0..4 {
            assert!(
                (got[y * 4 + x] - want_rows[y] as f32).abs() < 1e-6,
                "({y},{x}): {} vs {}",
                got[y * 4 + x],
                want_rows[y]
            );
        }
    }
}

#[test]
fn keeps_cls_and_is_identity_on_same_grid() {
    let dev = Device::Cpu;
    let pos = Tensor::randn(0f32, 1.0, (1, 1 + 16, 3), &dev).unwrap();
    let same = interpolate_pos_embed(&pos, 16, 1).unwrap();
    assert_eq!(same.to_vec3::<f32>().unwrap(), pos.to_vec3::<f32>().unwrap());
    let up = interpolate_pos_embed(&pos, 36, 1).unwrap();
    assert_eq!(up.dims(), &[1, 37, 3]);
    assert_eq!(
        up.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap(),
        pos.get(0).unwrap().get(0).unwrap().to_vec1::<f32>().unwrap()
    );
    // A constant field stays constant (weights sum to one).
    let c = Tensor::ones((1, 17, 2), candle_core::DType::F32, &dev).unwrap();
    for v in interpolate_pos_embed(&c, 36, 1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap() {
        assert!((v - 1.0).abs() < 1e-6);
    }
}
