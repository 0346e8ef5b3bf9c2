//! Helpers shared by the fixture tests: the sets under `tests/fixtures/` are outputs of the
//! official PyTorch code on tiny random-weight models (see their `manifest.json`).
#![allow(dead_code)]

use albef::model::{BertConfig, ModelConfig, VisionConfig};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixture_dir(set: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(set)
}

pub fn manifest(set: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_dir(set).join("manifest.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn io(set: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture_dir(set).join("io.safetensors"), &Device::Cpu).unwrap()
}

pub fn scalar(set: &str, name: &str) -> f64 {
    manifest(set)["scalars"][name]["value"].as_f64().unwrap_or_else(|| panic!("{set}: no scalar {name}"))
}

/// The fixture's `config.json` as a [`ModelConfig`].
pub fn model_config(set: &str) -> ModelConfig {
    let text = std::fs::read_to_string(fixture_dir(set).join("config.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let bert: BertConfig = serde_json::from_value(v["bert_config"].clone()).unwrap();
    let vit = &v["vit"];
    let task = &v["task_config"];
    let vision = VisionConfig {
        patch_size: vit["patch_size"].as_u64().unwrap() as usize,
        embed_dim: vit["embed_dim"].as_u64().unwrap() as usize,
        depth: vit["depth"].as_u64().unwrap() as usize,
        num_heads: vit["num_heads"].as_u64().unwrap() as usize,
        mlp_ratio: vit["mlp_ratio"].as_f64().unwrap(),
        layer_norm_eps: vit["layer_norm_eps"].as_f64().unwrap(),
        image_res: task["image_res"].as_u64().unwrap() as usize,
    };
    ModelConfig {
        vision,
        bert,
        embed_dim: task["embed_dim"].as_u64().unwrap() as usize,
        temp: task["temp"].as_f64().unwrap(),
        queue_size: task["queue_size"].as_u64().unwrap() as usize,
        momentum: task["momentum"].as_f64().unwrap(),
        distill: task["distill"].as_bool().unwrap(),
        ..ModelConfig::default()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

/// Max error where |want| ≤ 1 is absolute and above 1 relative, as the issue defines "within".
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f32) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let (g, w) = (flat(got), flat(want));
    let mut worst = (0f32, 0usize);
    for (i, (a, b)) in g.iter().zip(w.iter()).enumerate() {
        let err = (a - b).abs() / b.abs().max(1.0);
        // NaN counts as the worst error.
        if err.is_nan() || err > worst.0 {
            worst = (err, i);
        }
    }
    assert!(
        worst.0 <= tol,
        "{name}: error {:.3e} at {} (got {}, want {}) exceeds {tol:e}",
        worst.0,
        worst.1,
        g[worst.1],
        w[worst.1]
    );
}

pub fn assert_scalar(name: &str, got: f64, want: f64, tol: f64) {
    let err = (got - want).abs() / want.abs().max(1.0);
    assert!(err <= tol, "{name}: got {got}, want {want} (error {err:.3e} > {tol:e})");
}

/// Relative error check for gradients: ‖got − want‖ / ‖want‖ (elementwise-relative is noisy on
/// entries near zero).
pub fn assert_rel(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{name}: shape");
    let (g, w) = (flat(got), flat(want));
    let diff: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum::<f64>().sqrt().max(1e-30);
    assert!(diff / norm <= tol, "{name}: relative error {:.3e} exceeds {tol:e}", diff / norm);
}

/// Writes `tensors` (f32) as a `torch.save` zip file, under `wrap` (`{'model': …}`) when given, so
/// that tests can make small files in the layouts of the real downloads.
pub fn write_pth(path: &std::path::Path, tensors: &[(String, Tensor)], wrap: Option<&str>) {
    use std::io::Write;
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    let mut pkl = vec![0x80, 2];
    if let Some(key) = wrap {
        pkl.push(b'}');
        unicode(&mut pkl, key);
    }
    pkl.push(b'}');
    for (i, (name, t)) in tensors.iter().enumerate() {
        unicode(&mut pkl, name);
        pkl.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        pkl.push(b'(');
        unicode(&mut pkl, "storage");
        pkl.extend(b"ctorch\nFloatStorage\n");
        unicode(&mut pkl, &i.to_string());
        unicode(&mut pkl, "cpu");
        int(&mut pkl, t.elem_count());
        pkl.extend(b"tQ");
        int(&mut pkl, 0);
        pkl.push(b'(');
        for &d in t.dims() {
            int(&mut pkl, d);
        }
        pkl.push(b't');
        pkl.push(b'(');
        for &s in t.stride() {
            int(&mut pkl, s);
        }
        pkl.push(b't');
        pkl.push(0x89);
        pkl.extend(b"ccollections\nOrderedDict\n)R");
        pkl.extend(b"tRs");
    }
    if wrap.is_some() {
        pkl.push(b's');
    }
    pkl.push(b'.');
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    let opts: zip::write::SimpleFileOptions =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(&pkl).unwrap();
    for (i, (_, t)) in tensors.iter().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        zip.write_all(&bytes).unwrap();
    }
    zip.start_file("archive/version", opts).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
