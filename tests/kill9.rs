//! Kill -9 anywhere: a tiny `albef retrieval` run is SIGKILLed at random moments (in training,
//! validation, checkpoint and log writes, the final evaluation) and restarted with `--resume` each
//! time; after every kill each checkpoint opens and `log.txt` has whole, unduplicated lines; at
//! the end weights, optimizer state, run state, `log.txt` and `losses.jsonl` equal an
//! uninterrupted run's bit for bit. A second run into a folder a live run holds is refused.

use albef::checkpoint::read_checkpoint;
use albef::data::synth::{generate, SynthConfig};
use candle_core::Device;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const KILLS: usize = 60;

fn setup(name: &str, epochs: usize) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("albef-kill9-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    generate(&dir.join("data"), &SynthConfig { seed: 5, train: 32, val: 8, test: 8, image_size: 32, max_shapes: 1 })
        .unwrap();
    std::fs::write(
        dir.join("bert.json"),
        r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "vocab_size": 150, "fusion_layer": 1, "encoder_width": 32}"#,
    )
    .unwrap();
    let d = dir.display();
    let config = format!(
        "train_file: ['{d}/data/retrieval_train.json']\nval_file: '{d}/data/retrieval_val.json'\ntest_file: '{d}/data/retrieval_test.json'\n\
         image_root: '{d}/data'\nbert_config: '{d}/bert.json'\nimage_res: 32\nbatch_size_train: 8\nbatch_size_test: 8\n\
         queue_size: 16\nmomentum: 0.9\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\nk_test: 4\nalpha: 0.4\ndistill: True\nwarm_up: True\n\
         init_std: 0.1\nvision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
         optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
         schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
    );
    let path = dir.join("config.yaml");
    std::fs::write(&path, config).unwrap();
    (dir, path)
}

fn start(dir: &Path, config: &Path, out: &str) -> Child {
    Command::new(env!("CARGO_BIN_EXE_albef"))
        .arg("retrieval")
        .arg("--config")
        .arg(config)
        .arg("--output_dir")
        .arg(dir.join(out))
        .arg("--text_encoder")
        .arg(dir.join("data/vocab.txt"))
        .args(["--seed", "3", "--workers", "2", "--resume"])
        // Every atomic write pauses halfway, so that a good share of the kills land inside one.
        .env("ALBEF_FAULT_SLOW_WRITES", "40")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "albef failed: {err}");
    err
}

/// Every checkpoint present opens; every log line is whole JSON; epochs appear once, in order.
fn check_consistent(out: &Path, kill: usize) {
    for name in ["checkpoint_last.safetensors", "checkpoint_best.safetensors"] {
        let p = out.join(name);
        if p.exists() {
            read_checkpoint(&p, &Device::Cpu).unwrap_or_else(|e| panic!("after kill {kill}: {name}: {e:#}"));
        }
    }
    let text = std::fs::read_to_string(out.join("log.txt")).unwrap_or_default();
    assert!(text.is_empty() || text.ends_with('\n'), "after kill {kill}: torn last line in log.txt");
    let mut next = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("after kill {kill}: bad log line {line:?}: {e}"));
        if v.get("train_loss_ita").is_some() {
            assert_eq!(v["epoch"], next, "after kill {kill}: epochs out of order or duplicated:\n{text}");
            next += 1;
        }
    }
}

fn assert_same_checkpoint(a: &Path, b: &Path) {
    let (a, b) = (read_checkpoint(a, &Device::Cpu).unwrap(), read_checkpoint(b, &Device::Cpu).unwrap());
    assert_eq!(a.metadata, b.metadata);
    assert_eq!(a.tensors.keys().collect::<Vec<_>>(), b.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &a.tensors {
        let u = &b.tensors[name];
        let bits = |t: &candle_core::Tensor| -> Vec<u8> {
            let t = t.flatten_all().unwrap();
            match t.dtype() {
                candle_core::DType::I64 => t.to_vec1::<i64>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => t.to_vec1::<f32>().unwrap().iter().flat_map(|v| v.to_le_bytes()).collect(),
            }
        };
        assert_eq!(bits(t), bits(u), "tensor {name} differs");
    }
}

fn assert_same_run(r: &Path, out: &Path) {
    assert_same_checkpoint(&r.join("checkpoint_last.safetensors"), &out.join("checkpoint_last.safetensors"));
    assert_same_checkpoint(&r.join("checkpoint_best.safetensors"), &out.join("checkpoint_best.safetensors"));
    assert_eq!(
        std::fs::read_to_string(r.join("log.txt")).unwrap(),
        std::fs::read_to_string(out.join("log.txt")).unwrap()
    );
    assert_eq!(std::fs::read(r.join("metrics.json")).unwrap(), std::fs::read(out.join("metrics.json")).unwrap());
    let steps = std::fs::read_to_string(r.join("losses.jsonl")).unwrap();
    assert!(!steps.is_empty());
    assert_eq!(steps, std::fs::read_to_string(out.join("losses.jsonl")).unwrap(), "losses.jsonl differs");
}

#[test]
fn killed_at_random_moments_a_resumed_run_ends_bit_identical() {
    let (dir, config) = setup("loop", 4);
    let t0 = Instant::now();
    finish(start(&dir, &config, "ref"));
    let full = t0.elapsed();
    let (r, out) = (dir.join("ref"), dir.join("out"));
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    let (mut kills, mut runs_done, mut in_writes) = (0, 0, 0);
    while kills < KILLS {
        let mut child = start(&dir, &config, "out");
        // Uniform over a whole run (start-up included), so that kills land in every phase.
        std::thread::sleep(full.mul_f64(rng.random_range(0.0..1.0)));
        if child.try_wait().unwrap().is_some() {
            // The interrupted run reached its end: it must equal the uninterrupted one. Then a
            // new run, so that kills keep landing in training and checkpoint writes too.
            finish(child);
            check_consistent(&out, kills);
            assert_same_run(&r, &out);
            runs_done += 1;
            std::fs::remove_dir_all(&out).unwrap();
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // A temporary file left behind: the kill landed inside a checkpoint or output write.
        let tmp = std::fs::read_dir(&out)
            .is_ok_and(|d| d.flatten().any(|e| e.file_name().to_string_lossy().contains(".tmp")));
        in_writes += tmp as usize;
        check_consistent(&out, kills);
    }
    finish(start(&dir, &config, "out"));
    check_consistent(&out, kills);
    assert_same_run(&r, &out);
    eprintln!("{kills} kills ({in_writes} inside a file write); {} interrupted runs ended equal to the uninterrupted one ({full:?})", runs_done + 1);
    assert!(runs_done >= 2, "the kills left too few runs to compare");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_run_into_a_held_output_folder_is_refused() {
    let (dir, config) = setup("lock", 40);
    let mut first = start(&dir, &config, "out");
    let lock = dir.join("out/.albef.lock");
    let t0 = Instant::now();
    while !lock.exists() && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(first.try_wait().unwrap().is_none(), "the first run ended too soon to test the lock");
    let second = start(&dir, &config, "out").wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success() && err.contains("is in use by another albef run"), "{err}");
    first.kill().unwrap();
    first.wait().unwrap();
    // The lock dies with its holder, even under SIGKILL.
    let mut third = start(&dir, &config, "out");
    std::thread::sleep(Duration::from_millis(500));
    let gone = third.try_wait().unwrap();
    assert!(gone.is_none() || gone.unwrap().success(), "a run after the holder died was refused");
    third.kill().unwrap();
    third.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
