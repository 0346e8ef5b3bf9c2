//! A shortened `albef demo` end to end: it learns (R@1 far above chance) and every output file
//! exists and parses.

use albef::tasks::demo::{run, DemoOptions};

#[test]
fn short_demo_learns_and_writes_its_report() {
    let dir = std::env::temp_dir().join(format!("albef-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let opts = DemoOptions {
        output_dir: dir.clone(),
        seed: 42,
        train_images: 500,
        test_images: 30,
        epochs: 8,
        max_shapes: 2,
        batch_size: 16,
        vqa_epochs: 1,
        workers: Some(2),
        ..Default::default()
    };
    let s = run(&opts).unwrap();
    // 30 test images with 2 captions each: chance R@1 is 3.3% (text → image) and at most 6.7%
    // (image → text), chance R@5 16.7%, chance r_mean about 18.
    for (key, min) in [("txt_r1", 10.0), ("img_r1", 10.0), ("txt_r5", 40.0), ("img_r5", 40.0), ("r_mean", 40.0)] {
        assert!(s.test[key] >= min, "{key} = {} (want ≥ {min}); all: {:?}", s.test[key], s.test);
    }

    for line in std::fs::read_to_string(dir.join("log.txt")).unwrap().lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap_or_else(|e| panic!("log.txt line {line:?}: {e}"));
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(metrics["test"]["txt_r1"].as_f64().unwrap(), s.test["txt_r1"]);
    let curves = image::open(dir.join("curves.png")).unwrap();
    assert_eq!((curves.width(), curves.height()), (640, 360));
    let report = std::fs::read_to_string(&s.report).unwrap();
    assert!(report.contains("| test |") && report.contains("txt_r1") && report.contains("![curves](curves.png)"));
    let shown: Vec<&str> =
        report.lines().filter_map(|l| l.strip_prefix("![test image ").and_then(|r| r.split("](").nth(1))).collect();
    assert_eq!(shown.len(), 4);
    for img in shown {
        assert!(dir.join(img.trim_end_matches(')')).is_file(), "{img}");
    }
    albef::checkpoint::read_checkpoint(&dir.join("checkpoint_best.safetensors"), &candle_core::Device::Cpu).unwrap();

    // A second run reuses the generated data.
    let vqa = s.vqa.as_ref().expect("the VQA part ran");
    assert!(vqa["questions"] > 0.0 && (0.0..=100.0).contains(&vqa["vqa_acc"]));
    assert!(report.contains("VQA accuracy") && dir.join("vqa/vqa_result.json").is_file());
    let again = run(&DemoOptions { epochs: 1, vqa_epochs: 0, ..opts }).unwrap();
    assert!(again.report.is_file());
    let _ = std::fs::remove_dir_all(&dir);
}
