//! No silent NaN: a non-finite loss or gradient norm stops the run at that step, naming epoch,
//! iteration and loss; `checkpoint_last` stays at the last good epoch; a NaN metric is never the
//! best; `--skip-nonfinite N` skips up to N such steps and counts them in `log.txt`.

use albef::config::ScheduleConfig;
use albef::data::loader::{BatchSource, BoxedBatches};
use albef::nn::{Init, ParamStore};
use albef::task::Task;
use albef::train::fit::{fit, FitConfig, FitEnd};
use albef::train::optim::AdamW;
use albef::train::run::{RunDir, LAST};
use albef::train::{LoopConfig, Losses};
use albef::util::Metrics;
use candle_core::Device;
use std::path::PathBuf;

struct Toy;
impl BatchSource for Toy {
    type Item = usize;
    fn num_batches(&self, _: u64) -> usize {
        4
    }
    fn num_examples(&self) -> usize {
        4
    }
    fn batches(&self, _: u64) -> anyhow::Result<BoxedBatches<'_, usize>> {
        Ok(Box::new((0..4).map(|i| Ok(vec![i]))))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fault {
    None,
    /// The loss is NaN at (epoch, iteration).
    Loss(usize, usize),
    /// The loss is finite but its gradient infinite (√z at z = 0) at (epoch, iteration).
    Grad(usize, usize),
}

fn dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("albef-nonfinite-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Three epochs of a 4-parameter least-squares model with `fault` injected; validation gives
/// `metric(epoch)`.
fn train(
    out: &std::path::Path,
    fault: Fault,
    skip: u64,
    metric: fn(usize) -> f64,
    resume: bool,
) -> anyhow::Result<FitEnd> {
    let store = ParamStore::new(&Device::Cpu, 0);
    let w = store.root(true).get(4, "w", Init::Const(0.5))?;
    let z = store.root(true).get(1, "z", Init::Zeros)?;
    let mut optimizer = AdamW::new(&store, 0.0)?;
    let schedule = ScheduleConfig {
        sched: "cosine".into(),
        lr: 0.01,
        epochs: 3,
        min_lr: 0.001,
        warmup_lr: 0.001,
        warmup_epochs: 1,
        decay_rate: None,
        cooldown_epochs: None,
    };
    let loop_cfg =
        LoopConfig { schedule, alpha: 0.0, warm_up: false, seed: 1, skip_nonfinite: skip, accum_steps: 1, dist: None };
    let run = RunDir::create(out)?;
    let cfg = FitConfig {
        run: &run,
        loop_cfg: &loop_cfg,
        resume,
        task: Task::Retrieval,
        epochs: 3,
        stop_after_epoch: None,
        select: Some("score"),
        val_prefix: "val",
    };
    let mut epoch = 0;
    let step = |batch: Vec<usize>, _: f64, _: &mut rand::rngs::StdRng| -> anyhow::Result<Losses> {
        let i = batch[0];
        let mut fit_loss = (&w - 1.0)?.sqr()?.sum_all()?;
        if fault == Fault::Loss(epoch, i) {
            fit_loss = (fit_loss * f64::NAN)?;
        }
        let mut out: Losses = vec![("loss_fit", fit_loss)];
        if fault == Fault::Grad(epoch, i) {
            out.push(("loss_sqrt", z.sqrt()?.sum_all()?));
        }
        if i == 3 {
            epoch += 1;
        }
        Ok(out)
    };
    let validate =
        |e: usize| -> anyhow::Result<Option<Metrics>> { Ok(Some([("score".to_string(), metric(e))].into())) };
    fit(&cfg, &store, &mut optimizer, &Toy, step, |_| Ok(Metrics::new()), validate)
}

fn state(out: &std::path::Path, name: &str) -> serde_json::Value {
    let f = albef::checkpoint::CheckpointFile::open(&out.join(name)).unwrap();
    serde_json::from_str(&f.metadata["albef_train_state"]).unwrap()
}

fn log(out: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(out.join("log.txt")).unwrap_or_default();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn a_nan_loss_stops_the_run_naming_epoch_iteration_and_loss() {
    let out = dir("loss");
    let err = format!("{:#}", train(&out, Fault::Loss(1, 2), 0, |e| e as f64, false).err().expect("NaN accepted"));
    assert!(err.contains("loss_fit became NaN at epoch 1, iteration 2"), "{err}");
    assert_eq!(state(&out, LAST)["epochs_done"], 1, "checkpoint_last is the last good epoch");
    assert_eq!(log(&out).len(), 1);
}

#[test]
fn an_infinite_gradient_norm_stops_the_run() {
    let out = dir("grad");
    let err = format!("{:#}", train(&out, Fault::Grad(0, 1), 0, |e| e as f64, false).err().expect("inf accepted"));
    assert!(err.contains("gradient norm became inf at epoch 0, iteration 1"), "{err}");
    assert!(!out.join(LAST).exists(), "no checkpoint of a failed first epoch");
}

#[test]
fn skip_nonfinite_tolerates_n_steps_and_counts_them() {
    let out = dir("skip");
    let end = train(&out, Fault::Grad(1, 0), 1, |e| e as f64, false).unwrap();
    assert!(matches!(end, FitEnd::Finished { .. }));
    let lines = log(&out);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["skipped_nonfinite"], 0);
    assert_eq!(lines[1]["skipped_nonfinite"], 1);
    assert_eq!(lines[2]["skipped_nonfinite"], 1);
    assert_eq!(state(&out, LAST)["skipped_nonfinite"], 1);
    // The weights stayed finite (the skipped step was not applied).
    let f = albef::checkpoint::CheckpointFile::open(&out.join(LAST)).unwrap();
    let w = f.load("w", &Device::Cpu).unwrap().to_vec1::<f32>().unwrap();
    assert!(w.iter().all(|v| v.is_finite()), "{w:?}");
    // With none allowed, the first one stops the run.
    let out = dir("skip-over");
    let err = format!("{:#}", train(&out, Fault::Loss(2, 3), 0, |e| e as f64, false).err().unwrap());
    assert!(err.contains("epoch 2, iteration 3") && err.contains("--skip-nonfinite 0"), "{err}");
}

#[test]
fn a_nan_metric_is_never_the_best() {
    let out = dir("metric");
    let end = train(&out, Fault::None, 0, |e| if e == 0 { f64::NAN } else { 1.0 - e as f64 }, false).unwrap();
    // Epoch 0 is NaN, epoch 1 scores 0.0, epoch 2 scores -1.0: the best is epoch 1.
    assert_eq!(state(&out, "checkpoint_best.safetensors")["best_epoch"], 1);
    let FitEnd::Finished { state, .. } = end else { panic!("not finished") };
    assert_eq!(state.best_metric, Some(0.0));
}
