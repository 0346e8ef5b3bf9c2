//! `albef retrieval` end to end on a tiny synthetic dataset the test writes: training lowers the
//! loss, an interrupted run resumes to the same weights, evaluation writes its files, and bad
//! input gives errors that name the file, entry, key or checkpoint at fault.

use albef::checkpoint::read_checkpoint;
use albef::data::synth::{generate, SynthConfig};
use albef::tasks::retrieval::{run, RetrievalOptions};
use albef::tasks::RunOptions;
use candle_core::Device;
use std::path::{Path, PathBuf};

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("albef-retrieval-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = SynthConfig { seed: 5, train: 48, val: 8, test: 8, image_size: 32, max_shapes: 1 };
        generate(&dir.join("data"), &cfg).unwrap();
        std::fs::write(
            dir.join("bert.json"),
            r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 40, "vocab_size": 150, "fusion_layer": 1, "encoder_width": 32}"#,
        )
        .unwrap();
        let f = Self { dir };
        f.write_config("config.yaml", 3, "");
        f
    }

    fn write_config(&self, name: &str, epochs: usize, extra: &str) -> PathBuf {
        let d = self.dir.display();
        let text = format!(
            "train_file: ['{d}/data/retrieval_train.json']\nval_file: '{d}/data/retrieval_val.json'\ntest_file: '{d}/data/retrieval_test.json'\n\
             image_root: '{d}/data'\nbert_config: '{d}/bert.json'\nimage_res: 32\nbatch_size_train: 16\nbatch_size_test: 8\n\
             queue_size: 32\nmomentum: 0.9\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\nk_test: 4\nalpha: 0.4\ndistill: True\nwarm_up: True\n\
             init_std: 0.1\nvision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
             optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
             schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n{extra}"
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn options(&self, config: &Path, out: &str) -> RetrievalOptions {
        let run = RunOptions {
            seed: 3,
            workers: Some(2),
            ..RunOptions::new(config, self.dir.join(out), self.dir.join("data/vocab.txt"))
        };
        RetrievalOptions { run, save_scores: false }
    }
}

fn log_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("log.txt")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn training_lowers_the_loss_and_writes_its_outputs() {
    let f = Fixture::new("train");
    let mut opts = f.options(&f.dir.join("config.yaml"), "run");
    opts.save_scores = true;
    let metrics = run(&opts).unwrap();
    let log = log_lines(&opts.run.output_dir);
    let epochs: Vec<&serde_json::Value> = log.iter().filter(|r| r.get("epoch").is_some()).collect();
    assert_eq!(epochs.len(), 3);
    let first = epochs[0]["train_loss_ita"].as_f64().unwrap() + epochs[0]["train_loss_itm"].as_f64().unwrap();
    let last = epochs[2]["train_loss_ita"].as_f64().unwrap() + epochs[2]["train_loss_itm"].as_f64().unwrap();
    assert!(last < first, "training loss went from {first} to {last}");
    for key in ["train_lr", "val_txt_r1", "val_img_r10", "val_r_mean"] {
        assert!(epochs[0].get(key).is_some(), "log.txt lacks {key}");
    }
    // metrics.json holds val (best epoch) and test, with the reference's metric names.
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(opts.run.output_dir.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(saved, metrics);
    let names: Vec<&str> = saved["test"].as_object().unwrap().keys().map(|s| s.as_str()).collect();
    assert_eq!(
        names,
        ["txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10", "img_r_mean", "r_mean"]
    );
    for file in ["config.yaml", "checkpoint_best.safetensors", "checkpoint_last.safetensors", "scores_test.safetensors"]
    {
        assert!(opts.run.output_dir.join(file).is_file(), "{file} missing");
    }
    let scores = read_checkpoint(&opts.run.output_dir.join("scores_test.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(scores.tensors["score_i2t"].dims(), &[8, 16]);
    assert_eq!(scores.tensors["score_t2i"].dims(), &[16, 8]);

    // Evaluating the trained checkpoint reproduces the test metrics (zero-shot uses this path).
    let mut eval = f.options(&f.dir.join("config.yaml"), "eval");
    eval.run.evaluate = true;
    eval.run.checkpoint = Some(opts.run.output_dir.join("checkpoint_best.safetensors"));
    let m = run(&eval).unwrap();
    assert_eq!(m["test"], saved["test"]);
    assert!(m["val"]["r_mean"].as_f64().is_some());
}

#[test]
fn an_interrupted_run_resumes_to_the_same_weights() {
    let f = Fixture::new("resume");
    let config = f.write_config("two.yaml", 2, "");
    let full = f.options(&config, "full");
    run(&full).unwrap();
    let mut first = f.options(&config, "split");
    first.run.stop_after_epoch = Some(1);
    run(&first).unwrap();
    assert!(!first.run.output_dir.join("metrics.json").exists(), "a stopped run does not look complete");
    let mut rest = f.options(&config, "split");
    rest.run.resume = true;
    run(&rest).unwrap();
    let a = read_checkpoint(&full.run.output_dir.join("checkpoint_last.safetensors"), &Device::Cpu).unwrap();
    let b = read_checkpoint(&rest.run.output_dir.join("checkpoint_last.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(a.tensors.len(), b.tensors.len());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        let diff = (t.to_dtype(candle_core::DType::F64).unwrap() - u.to_dtype(candle_core::DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(diff.to_scalar::<f64>().unwrap(), 0.0, "{name} differs after resume");
    }
    let la = log_lines(&full.run.output_dir);
    let lb = log_lines(&rest.run.output_dir);
    assert_eq!(la, lb, "same log records");
}

fn err(opts: &RetrievalOptions) -> String {
    format!("{:#}", run(opts).unwrap_err())
}

#[test]
fn bad_input_is_named() {
    let f = Fixture::new("bad");
    let data = f.dir.join("data");
    // A missing image: the file and its annotation entry are named; nothing is written.
    let gone = data.join("images/train_00003.png");
    std::fs::rename(&gone, data.join("moved.png")).unwrap();
    let opts = f.options(&f.dir.join("config.yaml"), "out_missing");
    let e = err(&opts);
    assert!(e.contains("train_00003.png") && e.contains("entry 6 of") && e.contains("retrieval_train.json"), "{e}");
    assert!(!opts.run.output_dir.exists(), "no output folder for bad input");
    std::fs::rename(data.join("moved.png"), &gone).unwrap();

    // An unreadable image is caught when loaded, and still named.
    let broken = data.join("images/val_00002.png");
    let png = std::fs::read(&broken).unwrap();
    std::fs::write(&broken, &png[..png.len() / 3]).unwrap();
    let mut eval = f.options(&f.dir.join("config.yaml"), "out_broken");
    eval.run.evaluate = true;
    let e = err(&eval);
    assert!(e.contains("val_00002.png") && e.contains("entry 2 of"), "{e}");
    assert!(!eval.run.output_dir.join("metrics.json").exists());
    std::fs::write(&broken, &png).unwrap();

    // A JSON file that is not a list, and an entry without a field.
    std::fs::write(f.dir.join("notlist.json"), r#"{"image": "x.png"}"#).unwrap();
    let cfg = std::fs::read_to_string(f.write_config("c1.yaml", 1, ""))
        .unwrap()
        .replace("data/retrieval_val.json", "notlist.json");
    std::fs::write(f.dir.join("c1.yaml"), &cfg).unwrap();
    let e = err(&f.options(&f.dir.join("c1.yaml"), "o1"));
    assert!(e.contains("notlist.json") && e.contains("expected a JSON list"), "{e}");
    let cfg =
        std::fs::read_to_string(f.dir.join("config.yaml")).unwrap().replace("data/retrieval_test.json", "nofield.json");
    std::fs::write(f.dir.join("c2.yaml"), cfg).unwrap();
    std::fs::write(
        f.dir.join("nofield.json"),
        r#"[{"image": "images/val_00000.png", "caption": ["a"]}, {"image": "images/val_00001.png"}]"#,
    )
    .unwrap();
    let e = err(&f.options(&f.dir.join("c2.yaml"), "o2"));
    assert!(e.contains("nofield.json") && e.contains("entry 1") && e.contains("'caption'"), "{e}");

    // A config missing keys lists them all.
    let cfg = std::fs::read_to_string(f.dir.join("config.yaml")).unwrap();
    let cut: String = cfg
        .lines()
        .filter(|l| !l.starts_with("k_test") && !l.starts_with("optimizer"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(f.dir.join("c3.yaml"), cut).unwrap();
    let e = err(&f.options(&f.dir.join("c3.yaml"), "o3"));
    assert!(e.contains("missing keys") && e.contains("k_test") && e.contains("optimizer"), "{e}");

    // A checkpoint of another task is explained.
    let mut wrong = f.options(&f.dir.join("config.yaml"), "o4");
    wrong.run.checkpoint = Some(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vqa/checkpoint.pth"));
    let e = err(&wrong);
    assert!(e.contains("fine-tuned Vqa checkpoint") && e.contains("cannot initialise a Retrieval model"), "{e}");
}

#[test]
fn misspelt_or_unimplemented_config_keys_stop_before_any_output() {
    let f = Fixture::new("keys");
    let typo = f.write_config("typo.yaml", 1, "batch_size_trian: 8\n");
    let opts = f.options(&typo, "out_typo");
    let e = err(&opts);
    assert!(e.contains("typo.yaml") && e.contains("unknown key 'batch_size_trian'"), "{e}");
    assert!(e.contains("did you mean 'batch_size_train'"), "{e}");
    assert!(!opts.run.output_dir.exists(), "nothing written for a bad config");

    let cfg = std::fs::read_to_string(f.dir.join("config.yaml")).unwrap().replace("sched: cosine", "sched: step");
    std::fs::write(f.dir.join("step.yaml"), cfg).unwrap();
    let opts = f.options(&f.dir.join("step.yaml"), "out_step");
    let e = err(&opts);
    assert!(e.contains("step.yaml") && e.contains("schedular.sched \"step\" is not implemented"), "{e}");
    assert!(!opts.run.output_dir.exists(), "nothing written for a bad config");
}
