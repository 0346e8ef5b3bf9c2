//! The training machinery every task shares: the epoch loop (learning-rate schedule, α ramp,
//! backward, AdamW), run folders (logs, configs, metrics), checkpoints with optimizer state and
//! resuming.

pub mod distributed;
pub mod fit;
pub mod optim;
pub mod run;
pub mod schedule;

use crate::config::ScheduleConfig;
use crate::data::loader::mix;
use crate::dist::Comm;
use crate::nn::seed_dropout;
use crate::progress::Progress;
use anyhow::{bail, Result};
use candle_core::backprop::GradStore;
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
    /// Steps with a non-finite loss or gradient norm tolerated over the run (skipped, not
    /// applied); one more stops the run.
    pub skip_nonfinite: u64,
    /// The data-parallel communicator (gradients averaged over ranks, epoch figures summed).
    /// `seed` is then this rank's (`base + rank`, as the reference).
    pub dist: Option<Comm>,
    /// Gradient accumulation (`--accum-steps N`, `accum_steps:`): the gradients of N consecutive
    /// micro-batches (the loader's batches) are averaged and make one AdamW step, taken at the
    /// learning rate of the window's last iteration. 1: a step every batch, as the reference.
    ///
    /// Each micro-batch is a complete step of the task as it is without accumulation: for ITC
    /// and ITM its in-batch negatives are the other samples of that micro-batch only, the
    /// teacher's EMA runs before its forward and its momentum features are enqueued (the queue
    /// advances by the micro-batch size; the next micro-batch finds them among its queue keys).
    /// So accumulating N batches of b is the reference run with `batch_size_train: b` — the same
    /// negatives, queue contents and EMA updates, one per micro-batch — except that the weights
    /// move every N micro-batches, by the averaged gradient, where the reference with batch b
    /// steps after every batch. It is not the reference with batch N·b: there each query's ITC
    /// softmax would hold N·b in-batch keys (plus the same queue) and the hard ITM negatives
    /// would be drawn from N·b candidates. Windows are aligned to the epoch's iterations
    /// (0..N, N..2N, …); a shorter last window is averaged over what it holds; a skipped
    /// non-finite micro-batch is left out of its window's average.
    pub accum_steps: usize,
}

impl LoopConfig {
    pub fn new(training: &crate::config::Training, seed: u64) -> Self {
        Self {
            schedule: training.schedule.clone(),
            alpha: training.alpha,
            warm_up: training.warm_up,
            seed,
            skip_nonfinite: 0,
            dist: None,
            accum_steps: training.accum_steps.max(1),
        }
    }
}

/// One training epoch. `step` computes the losses of a batch given α and the step RNG (hard
/// negatives, masking); this function does the rest.
/// Returns the epoch means of every loss and the last learning rate, keyed `lr` and by loss name.
/// A non-finite loss or gradient norm stops it with an error naming epoch, iteration and loss,
/// unless `skipped` (the run's count so far) is below `cfg.skip_nonfinite`: then the step is
/// skipped, counted, and the epoch goes on. After each applied iteration (micro-batch)
/// `on_step(iteration, optimizer steps so far, lr, losses)` sees the step's loss values.
#[allow(clippy::too_many_arguments)]
pub fn train_epoch<B, I, F>(
    cfg: &LoopConfig,
    optimizer: &mut AdamW,
    skipped: &mut u64,
    epoch: usize,
    batches: I,
    iters_per_epoch: usize,
    mut step: F,
    mut on_step: impl FnMut(usize, u64, f64, &[(&'static str, f64)]) -> Result<()>,
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
    let accum = cfg.accum_steps.max(1);
    // Summed parameter gradients of the current accumulation window, and how many they are.
    let mut window: (Option<GradStore>, usize) = (None, 0);
    let mut batches = batches;
    for i in 0.. {
        let batch = batches.next();
        // Ranks step together: the epoch ends for all when one has no batch left (a stream).
        if let Some(comm) = &cfg.dist {
            if !distributed::all_true(comm.as_ref(), batch.is_some())? {
                break;
            }
        }
        let Some(batch) = batch else { break };
        lr = cfg.schedule.lr(epoch, i);
        let a = alpha(cfg.alpha, cfg.warm_up, epoch, i, iters_per_epoch);
        let losses = step(batch?, a, &mut rng)?;
        let mut total: Option<Tensor> = None;
        let mut values = Vec::new();
        for (name, l) in &losses {
            values.push((*name, l.to_scalar::<f32>()? as f64));
            total = Some(match total {
                None => l.clone(),
                Some(t) => (t + l)?,
            });
        }
        let Some(total) = total else { bail!("the task returned no loss") };
        let mut bad = values.iter().find(|(_, v)| !v.is_finite()).map(|&(name, v)| format!("{name} became {v}"));
        // Every rank skips a step that any rank must skip (else the gradient average waits forever).
        if let Some(comm) = &cfg.dist {
            if !distributed::all_true(comm.as_ref(), bad.is_none())? && bad.is_none() {
                bad = Some("another rank's loss became non-finite".to_string());
            }
        }
        let mut grads = None;
        let bad = match bad {
            Some(bad) => Some(bad),
            None => {
                let mut g = total.backward()?;
                if let Some(comm) = &cfg.dist {
                    crate::dist::comm::average_gradients(comm.as_ref(), &optimizer.vars(), &mut g)?;
                }
                let norm = optimizer.grad_norm(&g)?;
                grads = Some(g);
                (!norm.is_finite()).then(|| format!("the gradient norm became {norm}"))
            }
        };
        if let Some(bad) = bad {
            let at = format!("at epoch {epoch}, iteration {i} (learning rate {lr:e})");
            if *skipped >= cfg.skip_nonfinite {
                bail!(
                    "{bad} {at}; stopping ({} non-finite step(s) skipped before, --skip-nonfinite {}). \
                     checkpoint_last holds the last good epoch",
                    *skipped,
                    cfg.skip_nonfinite
                );
            }
            *skipped += 1;
            eprintln!("warning: {bad} {at}; step skipped ({} of --skip-nonfinite {})", *skipped, cfg.skip_nonfinite);
            continue;
        }
        if let Some(grads) = grads {
            if accum == 1 {
                optimizer.step(&grads, lr)?;
            } else {
                optimizer.accumulate(&mut window.0, grads)?;
                window.1 += 1;
                if (i + 1) % accum == 0 {
                    step_window(optimizer, &mut window, lr)?;
                }
            }
        }
        on_step(i, optimizer.step, lr, &values)?;
        let mut shown = Vec::new();
        for (name, v) in values {
            *sums.entry(name).or_default() += v;
            shown.push(format!("{name}: {v:.4}"));
        }
        n += 1;
        progress.step(i, || format!("lr: {lr:.6e}  {}", shown.join("  ")));
    }
    step_window(optimizer, &mut window, lr)?;
    progress.finish();
    // The reference logs the means over every rank's steps (`synchronize_between_processes`).
    let (sums, n) = match &cfg.dist {
        Some(comm) => distributed::sum_over_ranks(comm.as_ref(), sums, n)?,
        None => (sums, n),
    };
    let mut out: BTreeMap<String, f64> = sums.into_iter().map(|(k, v)| (k.to_string(), v / n.max(1) as f64)).collect();
    out.insert("lr".into(), lr);
    Ok(out)
}

/// One AdamW step with the mean of an accumulation window's gradients (nothing if it is empty).
fn step_window(optimizer: &mut AdamW, window: &mut (Option<GradStore>, usize), lr: f64) -> Result<()> {
    if let (Some(sum), n) = (window.0.take(), window.1) {
        optimizer.step(&optimizer.scaled(&sum, 1.0 / n as f64)?, lr)?;
    }
    window.1 = 0;
    Ok(())
}
