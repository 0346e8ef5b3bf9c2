//! `pillow_resize_bicubic` against Pillow's own `Image.resize(size, BICUBIC)`, bit for bit:
//! the table, a grid over every branch of Pillow 13's pass-order rule, and
//! RandomResizedCrop-style crop + resize. Fixture: `tools/make_resize_fixture.py` (run once with
//! Pillow); inputs are regenerated here from the same counter-based noise.

use albef::data::augment::crop;
use albef::data::transform::{pillow_resize_bicubic, RgbImage};
use safetensors::{Dtype, SafeTensors};
use std::path::PathBuf;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resize")
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The script's `noise`: byte i of the HWC image is the top byte of splitmix64(seed * 2^32 + i).
fn noise(seed: u64, width: usize, height: usize) -> RgbImage {
    let data = (0..(width * height * 3) as u64).map(|i| (splitmix64((seed << 32).wrapping_add(i)) >> 56) as u8);
    RgbImage { width, height, data: data.collect() }
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01B3))
}

fn pair(v: &serde_json::Value) -> (usize, usize) {
    (v[0].as_u64().unwrap() as usize, v[1].as_u64().unwrap() as usize)
}

/// Where `got` differs from the stored expectation, in words; `None` when bit-exact.
fn mismatch(got: &RgbImage, stored: &str, view: &safetensors::tensor::TensorView) -> Option<String> {
    let row_len = got.width * 3;
    match stored {
        "pixels" => {
            assert_eq!(view.dtype(), Dtype::U8);
            assert_eq!(view.shape(), [got.height, got.width, 3]);
            let diffs: Vec<(usize, i32)> = got
                .data
                .iter()
                .zip(view.data())
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (&a, &b))| (i, (a as i32 - b as i32).abs()))
                .collect();
            let &(first, _) = diffs.first()?;
            let max = diffs.iter().map(|d| d.1).max().unwrap();
            let (y, x, c) = (first / row_len, first % row_len / 3, first % 3);
            Some(format!("{} values differ, max {max} levels, first at (y {y}, x {x}, c {c})", diffs.len()))
        }
        "row_fnv1a64" => {
            assert_eq!(view.dtype(), Dtype::U64);
            assert_eq!(view.shape(), [got.height]);
            let want = view.data().chunks(8).map(|b| u64::from_le_bytes(b.try_into().unwrap()));
            let bad: Vec<usize> = got
                .data
                .chunks(row_len)
                .zip(want)
                .enumerate()
                .filter(|(_, (row, h))| fnv1a64(row) != *h)
                .map(|(y, _)| y)
                .collect();
            let first = bad.first()?;
            Some(format!("{} of {} rows differ (row hashes), first row {first}", bad.len(), got.height))
        }
        other => panic!("unknown storage {other:?}"),
    }
}

#[test]
fn bicubic_resize_is_bit_exact_against_pillow() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("manifest.json")).unwrap()).unwrap();
    let pillow = manifest["versions"]["pillow"].as_str().unwrap();
    let bytes = std::fs::read(fixture_dir().join("expected.safetensors")).unwrap();
    let expected = SafeTensors::deserialize(&bytes).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (w, h) = pair(&case["input"]);
        let img = noise(case["seed"].as_u64().unwrap(), w, h);
        let want_hash = u64::from_str_radix(case["input_fnv1a64"].as_str().unwrap(), 16).unwrap();
        assert_eq!(fnv1a64(&img.data), want_hash, "{name}: input noise differs from the generator script's");
        let src = match case["crop"].as_array() {
            Some(b) => {
                let b: Vec<usize> = b.iter().map(|v| v.as_u64().unwrap() as usize).collect();
                crop(&img, b[0], b[1], b[2], b[3])
            }
            None => img,
        };
        let (ow, oh) = pair(&case["output"]);
        let got = pillow_resize_bicubic(&src, ow, oh);
        assert_eq!((got.width, got.height, got.data.len()), (ow, oh, ow * oh * 3), "{name}: output size");
        let view = expected.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        if let Some(why) = mismatch(&got, case["stored"].as_str().unwrap(), &view) {
            let order = case["pillow_matches"].as_str().unwrap();
            failures.push(format!("{name} ({}x{} -> {ow}x{oh}, Pillow: {order}): {why}", src.width, src.height));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Pillow {pillow}:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// The fixture really exercises both pass orders, so a rule that always picks one would fail above.
#[test]
fn fixture_covers_both_pass_orders() {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join("manifest.json")).unwrap()).unwrap();
    let orders: Vec<&str> =
        manifest["cases"].as_array().unwrap().iter().map(|c| c["pillow_matches"].as_str().unwrap()).collect();
    for order in ["horizontal_first", "vertical_first", "single_pass"] {
        assert!(orders.iter().filter(|&&o| o == order).count() >= 5, "too few {order} cases: {orders:?}");
    }
    assert!(!orders.contains(&"neither"), "a case matched neither explicit order");
}
