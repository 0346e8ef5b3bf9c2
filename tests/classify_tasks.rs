//! `albef ve` and `albef nlvr` on tiny synthetic data: training lowers the loss, evaluation
//! writes accuracy and per-example predictions, and bad labels are named.

use albef::data::synth::{generate, vocab_size, SynthConfig};
use albef::task::Task;
use albef::tasks::classify::{run, ClassifyOptions};
use albef::tasks::RunOptions;
use std::path::{Path, PathBuf};

fn setup(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-classify-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    generate(&dir.join("data"), &SynthConfig { seed: 9, train: 48, val: 8, test: 8, image_size: 32, max_shapes: 2 })
        .unwrap();
    let bert = format!(
        r#"{{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "vocab_size": {}, "fusion_layer": 1, "encoder_width": 32}}"#,
        vocab_size()
    );
    std::fs::write(dir.join("bert.json"), bert).unwrap();
    dir
}

fn config(dir: &Path, task: Task, epochs: usize) -> PathBuf {
    let d = dir.display();
    let (files, root, extra) = match task {
        Task::Ve => ("train_file: '{d}/data/ve_train.json'\nval_file: '{d}/data/ve_val.json'\ntest_file: '{d}/data/ve_test.json'\n", format!("{d}/data/ve_images"), "batch_size_train: 16\nbatch_size_test: 16\nwarm_up: False\n"),
        _ => ("train_file: ['{d}/data/nlvr_train.json']\nval_file: ['{d}/data/nlvr_val.json']\ntest_file: ['{d}/data/nlvr_test.json']\n", format!("{d}/data"), "batch_size: 8\nwarm_up: True\nnlvr_layers: 3\n"),
    };
    let text = format!(
        "{}image_root: '{root}'\nbert_config: '{d}/bert.json'\nimage_res: 32\nalpha: 0.4\ndistill: True\n{extra}init_std: 0.1\n\
         vision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
         optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
         schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n",
        files.replace("{d}", &d.to_string())
    );
    let path = dir.join(format!("{task:?}.yaml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn options(dir: &Path, task: Task, config: PathBuf, out: &str) -> ClassifyOptions {
    let run =
        RunOptions { seed: 1, workers: Some(2), ..RunOptions::new(config, dir.join(out), dir.join("data/vocab.txt")) };
    ClassifyOptions { task, run, teacher_from_checkpoint: false }
}

fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("log.txt"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter_map(|r| r.get("train_loss").and_then(|v| v.as_f64()))
        .collect()
}

fn train_then_evaluate(task: Task, classes: &[&str]) {
    let dir = setup(&format!("{task:?}"));
    let cfg = config(&dir, task, 4);
    let opts = options(&dir, task, cfg.clone(), "run");
    let m = run(&opts).unwrap();
    let l = losses(&opts.run.output_dir);
    assert_eq!(l.len(), 4);
    assert!(l[3] < l[0], "{task:?} training loss {l:?}");
    assert!(m["val"]["acc"].as_f64().is_some() && m["test"]["acc"].as_f64().is_some());
    let preds: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(opts.run.output_dir.join("predictions_test.json")).unwrap())
            .unwrap();
    assert!(!preds.is_empty());
    for p in &preds {
        assert!(
            classes.contains(&p["prediction"].as_str().unwrap()) && classes.contains(&p["label"].as_str().unwrap())
        );
    }
    // --evaluate with the trained checkpoint gives the same test accuracy and writes val predictions.
    let mut eval = options(&dir, task, cfg, "eval");
    eval.run.evaluate = true;
    eval.run.checkpoint = Some(opts.run.output_dir.join("checkpoint_best.safetensors"));
    let e = run(&eval).unwrap();
    assert_eq!(e["test"], m["test"]);
    assert!(
        eval.run.output_dir.join("predictions_val.json").is_file()
            && eval.run.output_dir.join("metrics.json").is_file()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ve_trains_and_evaluates() {
    train_then_evaluate(Task::Ve, &["contradiction", "neutral", "entailment"]);
}

#[test]
fn nlvr_trains_and_evaluates() {
    train_then_evaluate(Task::Nlvr, &["False", "True"]);
}

#[test]
fn unknown_label_and_pretraining_checkpoint_are_explained() {
    let dir = setup("bad");
    let cfg = config(&dir, Task::Ve, 1);
    let file = dir.join("data/ve_test.json");
    let text = std::fs::read_to_string(&file).unwrap().replacen("\"entailment\"", "\"maybe\"", 1);
    std::fs::write(&file, text).unwrap();
    let e = format!("{:#}", run(&options(&dir, Task::Ve, cfg, "o")).unwrap_err());
    assert!(e.contains("ve_test.json") && e.contains("\"maybe\"") && e.contains("entailment"), "{e}");
    let mut nlvr = options(&dir, Task::Nlvr, config(&dir, Task::Nlvr, 1), "o2");
    nlvr.run.checkpoint =
        Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pretrain/checkpoint.pth"));
    let e = format!("{:#}", run(&nlvr).unwrap_err());
    assert!(e.contains("text-assignment checkpoint"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn text_assignment_pretraining_feeds_nlvr() {
    use albef::tasks::nlvr_pretrain::run as pretrain;
    let dir = setup("ta");
    let d = dir.display();
    let ta_cfg = dir.join("ta.yaml");
    std::fs::write(
        &ta_cfg,
        format!(
            "train_file: ['{d}/data/retrieval_train.json']\nimage_root: '{d}/data'\nbert_config: '{d}/bert.json'\nimage_res: 32\n\
             vision_width: 32\nembed_dim: 16\nbatch_size: 16\nnlvr_layers: 3\ninit_std: 0.1\n\
             vision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
             optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
             schedular: {{sched: cosine, lr: 1e-3, epochs: 3, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
        ),
    )
    .unwrap();
    let out = dir.join("ta_out");
    pretrain(&RunOptions {
        seed: 1,
        workers: Some(2),
        ..RunOptions::new(ta_cfg, out.clone(), dir.join("data/vocab.txt"))
    })
    .unwrap();
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let losses: Vec<f64> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["train_loss_ta"].as_f64())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));
    assert!(losses[2] < losses[0], "text-assignment loss {losses:?}");
    // NLVR2 fine-tuning starts from the TA checkpoint (the reference's teacher quirk by default).
    let mut nlvr = options(&dir, Task::Nlvr, config(&dir, Task::Nlvr, 1), "nlvr_from_ta");
    nlvr.run.checkpoint = Some(out.join("checkpoint_last.safetensors"));
    let m = run(&nlvr).unwrap();
    assert!(m["test"]["acc"].as_f64().is_some());
    let _ = std::fs::remove_dir_all(&dir);
}
