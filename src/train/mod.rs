//! The training machinery every task shares: the epoch loop (learning-rate schedule, α ramp,
//! backward, AdamW), run folders (logs, configs, metrics), checkpoints with optimizer state and
//! resuming.

pub mod fit;
pub mod optim;
pub mod run;
pub mod schedule;

use crate::data::loader::mix;
use crate::nn::seed_dropout;
use anyhow::{bail, Result};
use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressStyle};
use optim::AdamW;
use rand::rngs::StdRng;
use rand::SeedableRng;
use schedule::{alpha, ScheduleConfig};
use std::collections::BTreeMap;
use std::io::IsTerminal;

/// Losses of one step, by name; their sum is what is minimised.
pub type Losses = Vec<(&'static str, Tensor)>;

/// What stays fixed over a run.
pub struct LoopConfig {
    pub schedule: ScheduleConfig,
    pub alpha: f64,
    pub warm_up: bool,
    pub seed: u64,
}

impl LoopConfig {
    /// From a task config: `schedular`, `alpha` (0 when the task does not distil) and `warm_up`
    /// (default on, as every reference config but VE's).
    pub fn from_config(cfg: &crate::config::TaskConfig, seed: u64) -> anyhow::Result<Self> {
        Ok(Self {
            schedule: cfg.block("schedular")?,
            alpha: cfg.alpha.unwrap_or(0.0),
            warm_up: cfg.bool_or("warm_up", true)?,
            seed,
        })
    }
}

/// A progress bar on a terminal; a log line every 50 steps elsewhere (as the reference prints).
pub struct Progress {
    bar: Option<ProgressBar>,
    header: String,
    total: usize,
}

impl Progress {
    pub fn new(header: &str, total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total as u64);
            b.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            b.set_prefix(header.to_string());
            b
        });
        Self { bar, header: header.to_string(), total }
    }

    pub fn step(&self, i: usize, msg: impl Fn() -> String) {
        match &self.bar {
            Some(b) => {
                b.set_message(msg());
                b.inc(1);
            }
            None if i.is_multiple_of(50) || i + 1 == self.total => {
                eprintln!("{} [{:>5}/{}] {}", self.header, i + 1, self.total, msg())
            }
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// One training epoch. `step` computes the losses of a batch given α and the step RNG (hard
/// negatives, masking); this function does the rest. `first_iter` > 0 when batches were skipped.
/// Returns the epoch means of every loss and the last learning rate, keyed `lr`, `loss_<name>`.
pub fn train_epoch<B, I, F>(
    cfg: &LoopConfig,
    optimizer: &mut AdamW,
    epoch: usize,
    batches: I,
    iters_per_epoch: usize,
    mut step: F,
) -> Result<BTreeMap<String, f64>>
where
    I: Iterator<Item = Result<B>>,
    F: FnMut(B, f64, &mut StdRng) -> Result<Losses>,
{
    // Everything random in an epoch derives from (seed, epoch): a resumed run replays it exactly.
    seed_dropout(mix(cfg.seed, 2 * epoch as u64 + 1));
    let mut rng = StdRng::seed_from_u64(mix(cfg.seed, 2 * epoch as u64));
    let progress = Progress::new(&format!("Train Epoch: [{epoch}]"), iters_per_epoch);
    let mut sums: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut lr = cfg.schedule.lr(epoch, 0);
    let mut n = 0usize;
    for (i, batch) in batches.enumerate() {
        lr = cfg.schedule.lr(epoch, i);
        let a = alpha(cfg.alpha, cfg.warm_up, epoch, i, iters_per_epoch);
        let losses = step(batch?, a, &mut rng)?;
        let mut total: Option<Tensor> = None;
        let mut shown = Vec::new();
        for (name, l) in &losses {
            let v = l.to_scalar::<f32>()? as f64;
            if !v.is_finite() {
                bail!("loss_{name} became {v} at epoch {epoch}, iteration {i} (learning rate {lr:e})");
            }
            *sums.entry(name).or_default() += v;
            shown.push(format!("loss_{name}: {v:.4}"));
            total = Some(match total {
                None => l.clone(),
                Some(t) => (t + l)?,
            });
        }
        let Some(total) = total else { bail!("the task returned no loss") };
        optimizer.step(&total.backward()?, lr)?;
        n += 1;
        progress.step(i, || format!("lr: {lr:.6e}  {}", shown.join("  ")));
    }
    progress.finish();
    let mut out: BTreeMap<String, f64> =
        sums.into_iter().map(|(k, v)| (format!("loss_{k}"), v / n.max(1) as f64)).collect();
    out.insert("lr".into(), lr);
    Ok(out)
}
