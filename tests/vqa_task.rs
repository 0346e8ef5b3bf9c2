//! `albef vqa` on tiny synthetic data: training lowers the loss, evaluation writes
//! `vqa_result.json` and the VQA accuracy, and a missing or empty answer list is named.

use albef::data::synth::{generate, vocab_size, SynthConfig};
use albef::tasks::vqa::run;
use albef::tasks::RunOptions;
use std::path::{Path, PathBuf};

fn setup(name: &str, epochs: usize) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("albef-vqa-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    generate(&dir.join("data"), &SynthConfig { seed: 4, train: 40, val: 6, test: 6, image_size: 32, max_shapes: 2 })
        .unwrap();
    let bert = format!(
        r#"{{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "vocab_size": {}, "fusion_layer": 1, "encoder_width": 32}}"#,
        vocab_size()
    );
    std::fs::write(dir.join("bert.json"), bert).unwrap();
    let d = dir.display();
    let cfg = format!(
        "train_file: ['{d}/data/vqa_train.json']\ntest_file: ['{d}/data/vqa_test.json']\nanswer_list: '{d}/data/answer_list.json'\n\
         vqa_root: '{d}/data/'\nvg_root: '{d}/data/'\nimage_res: 32\nbatch_size_train: 16\nbatch_size_test: 8\nk_test: 4\n\
         alpha: 0.4\ndistill: True\nwarm_up: True\neos: '[SEP]'\nbert_config: '{d}/bert.json'\ndecoder_layers: 1\ninit_std: 0.1\n\
         vision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
         optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
         schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
    );
    std::fs::write(dir.join("vqa.yaml"), cfg).unwrap();
    let config = dir.join("vqa.yaml");
    (dir, config)
}

fn options(dir: &Path, config: &Path, out: &str) -> RunOptions {
    RunOptions { seed: 2, workers: Some(2), ..RunOptions::new(config, dir.join(out), dir.join("data/vocab.txt")) }
}

#[test]
fn vqa_trains_ranks_and_scores() {
    let (dir, config) = setup("train", 4);
    let opts = options(&dir, &config, "run");
    let out = run(&opts).unwrap();
    let losses: Vec<f64> = std::fs::read_to_string(opts.output_dir.join("log.txt"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap().get("train_loss").and_then(|v| v.as_f64())
        })
        .collect();
    assert_eq!(losses.len(), 4);
    assert!(losses[3] < losses[0], "VQA loss {losses:?}");
    let results: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(opts.output_dir.join("vqa_result.json")).unwrap()).unwrap();
    let test: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data/vqa_test.json")).unwrap()).unwrap();
    assert_eq!(results.len(), test.len());
    let answers: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data/answer_list.json")).unwrap()).unwrap();
    for (r, t) in results.iter().zip(&test) {
        assert_eq!(r["question_id"], t["question_id"]);
        assert!(answers.contains(&r["answer"].as_str().unwrap().to_string()));
    }
    let acc = out["test"]["vqa_acc"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&acc));
    // --evaluate from the trained checkpoint gives the same answers.
    let mut eval = options(&dir, &config, "eval");
    eval.evaluate = true;
    eval.checkpoint = Some(opts.output_dir.join("checkpoint_best.safetensors"));
    let e = run(&eval).unwrap();
    assert_eq!(e["test"], out["test"]);
    let again: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval.output_dir.join("vqa_result.json")).unwrap()).unwrap();
    assert_eq!(again, serde_json::Value::Array(results));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn answer_list_problems_are_named() {
    let (dir, config) = setup("bad", 1);
    let list = dir.join("data/answer_list.json");
    std::fs::write(&list, "[]").unwrap();
    let e = format!("{:#}", run(&options(&dir, &config, "o")).unwrap_err());
    assert!(e.contains("answer_list.json") && e.contains("empty"), "{e}");
    std::fs::remove_file(&list).unwrap();
    let e = format!("{:#}", run(&options(&dir, &config, "o")).unwrap_err());
    assert!(e.contains("answer_list.json"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
