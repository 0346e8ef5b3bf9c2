//! The training machinery every task shares: the epoch loop (learning-rate schedule, α ramp,
//! backward, AdamW), run folders (logs, configs, metrics), checkpoints with optimizer state and
//! resuming.

pub mod fit;
pub mod optim;
pub mod run;
pub mod schedule;

use crate::config::ScheduleConfig;
use crate::data::loader::mix;
use crate::nn::seed_dropout;
use crate::progress::Progress;
use anyhow::{bail, Result};
use candle_core::Tensor;
use optim::AdamW;
use rand::rngs::StdRng;
use rand::SeedableRng;
use schedule::alpha;
use std::collections::BTreeMap;

/// Losses of one step by their log name (`loss`, `loss_ita`, … as the reference logs them); their
/// sum is what is minimised.
pub type Losses = Vec<(&'static str, Tensor)>;

/// What stays fixed over a run.
pub struct LoopConfig {
    pub schedule: ScheduleConfig,
    pub alpha: f64,
    pub warm_up: bool,
    pub seed: u64,
}

impl LoopConfig {
    pub fn new(training: &crate::config::Training, seed: u64) -> Self {
        Self { schedule: training.schedule.clone(), alpha: training.alpha, warm_up: training.warm_up, seed }
    }
}

/// One training epoch. `step` computes the losses of a batch given α and the step RNG (hard
/// negatives, masking); this function does the rest.
/// Returns the epoch means of every loss and the last learning rate, keyed `lr` and by loss name.
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
                bail!("{name} became {v} at epoch {epoch}, iteration {i} (learning rate {lr:e})");
            }
            *sums.entry(name).or_default() += v;
            shown.push(format!("{name}: {v:.4}"));
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
    let mut out: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k.to_string(), v / n.max(1) as f64)).collect();
    out.insert("lr".into(), lr);
    Ok(out)
}
