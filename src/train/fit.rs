//! The epoch-level driver every task shares: train an epoch, validate, log, keep the best and
//! the last checkpoint, stop early on request.

use super::optim::AdamW;
use super::run::{RunDir, TrainState, BEST, LAST};
use super::{train_epoch, LoopConfig, Losses};
use crate::data::loader::BatchSource;
use crate::dist::Communicator;
use crate::nn::ParamStore;
use crate::task::Task;
use crate::util::Metrics;
use anyhow::{bail, Result};
use rand::rngs::StdRng;
use serde_json::json;

pub struct FitConfig<'a> {
    pub run: &'a RunDir,
    pub loop_cfg: &'a LoopConfig,
    /// Continue from `checkpoint_last` (model, optimizer, epochs done).
    pub resume: bool,
    /// Written into checkpoints (`albef_task`).
    pub task: Task,
    pub epochs: usize,
    pub stop_after_epoch: Option<usize>,
    /// Validation metric that picks `checkpoint_best` (higher is better); without validation the
    /// last epoch is the best.
    pub select: Option<&'a str>,
    /// Prefix of the validation metrics in `log.txt` (`val` → `val_r_mean`; empty: the names as
    /// they are, for metrics already named per split such as grounding's `val_d`, `testA_d`).
    pub val_prefix: &'a str,
}

pub enum FitEnd {
    Finished {
        state: TrainState,
        best_val: Option<Metrics>,
    },
    /// Stopped on request after this many epochs; `--resume` continues.
    Stopped(usize),
}

/// `key_prefix_metric` entries for a log record (the bare names for an empty prefix).
pub fn prefixed(prefix: &str, m: &Metrics) -> serde_json::Map<String, serde_json::Value> {
    let name = |k: &str| if prefix.is_empty() { k.to_string() } else { format!("{prefix}_{k}") };
    m.iter().map(|(k, v)| (name(k), json!(v))).collect()
}

pub fn print_metrics(split: &str, m: &Metrics) {
    let cells: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    eprintln!("{split}: {}", cells.join("  "));
}

/// Trains epoch after epoch on `source`'s batches: `step(batch, α, rng)` gives a batch's losses
/// (see [`train_epoch`]); after each epoch `stats(epoch)` gives the task's own training figures
/// (logged `train_<name>` beside the mean losses), `validate(epoch)` the validation metrics (or
/// `None`), then the epoch is logged and checkpointed.
pub fn fit<S: BatchSource + ?Sized>(
    cfg: &FitConfig,
    store: &ParamStore,
    optimizer: &mut AdamW,
    source: &S,
    mut step: impl FnMut(Vec<S::Item>, f64, &mut StdRng) -> Result<Losses>,
    mut stats: impl FnMut(usize) -> Result<Metrics>,
    mut validate: impl FnMut(usize) -> Result<Option<Metrics>>,
) -> Result<FitEnd> {
    // `--resume` before any epoch completed (killed in the first one) starts over, so that a
    // restart can always pass it.
    let dist = cfg.loop_cfg.dist.as_deref();
    let mut resume = cfg.resume && cfg.run.file(LAST).is_file();
    if let Some(comm) = dist {
        // Rank 0 alone reads the output folder; the others take its decision and its state.
        resume = comm.broadcast_bytes(&[resume as u8], 0)? == [1];
    }
    if cfg.resume && !resume {
        eprintln!("--resume: no {LAST} yet (no epoch completed): starting from epoch 0");
    }
    let mut state = if resume && cfg.run.is_primary() {
        cfg.run.resume(store, optimizer, store.device())?
    } else {
        TrainState::default()
    };
    if let (Some(comm), true) = (dist, resume) {
        super::distributed::sync_run_state(comm, store, optimizer, &mut state)?;
    }
    if resume {
        eprintln!("resuming after {} completed epoch(s)", state.epochs_done);
    }
    if cfg.resume {
        // A run killed after logging an epoch but before its checkpoint redoes that epoch.
        cfg.run.truncate_log(state.epochs_done)?;
        cfg.run.truncate_step_losses(state.epochs_done)?;
    }
    let last_epoch = cfg.stop_after_epoch.map_or(cfg.epochs, |n| n.min(cfg.epochs));
    let mut best_val = None;
    for epoch in state.epochs_done..last_epoch {
        let iters = source.num_batches(epoch as u64);
        if iters == 0 {
            bail!("the training set has fewer examples ({}) than one batch", source.num_examples());
        }
        let means = train_epoch(
            cfg.loop_cfg,
            optimizer,
            &mut state.skipped_nonfinite,
            epoch,
            source.batches(epoch as u64)?,
            iters,
            &mut step,
            |iter, step, lr, losses| {
                let mut record = serde_json::Map::new();
                record.insert("epoch".into(), json!(epoch));
                record.insert("iter".into(), json!(iter));
                record.insert("step".into(), json!(step));
                record.insert("lr".into(), json!(lr));
                record.extend(losses.iter().map(|(k, v)| (k.to_string(), json!(v))));
                cfg.run.log_step(&serde_json::Value::Object(record))
            },
        )?;
        let extra = stats(epoch)?;
        let val = validate(epoch)?;
        let mut record: serde_json::Map<String, serde_json::Value> =
            means.iter().map(|(k, v)| (format!("train_{k}"), json!(v))).collect();
        record.extend(prefixed("train", &extra));
        if let Some(v) = &val {
            print_metrics(&format!("epoch {epoch} val"), v);
            record.extend(prefixed(cfg.val_prefix, v));
        }
        if cfg.loop_cfg.skip_nonfinite > 0 {
            record.insert("skipped_nonfinite".into(), json!(state.skipped_nonfinite));
        }
        record.insert("epoch".into(), json!(epoch));
        // Never checkpoint a model that went non-finite: checkpoint_last stays at the last good epoch.
        if !store.all_finite()? {
            bail!("the model's parameters became non-finite during epoch {epoch}; checkpoint_last holds the last good epoch");
        }
        cfg.run.sync_step_losses()?;
        cfg.run.log(&serde_json::Value::Object(record))?;
        state.epochs_done = epoch + 1;
        state.optimizer_step = optimizer.step;
        let score = match (cfg.select, &val) {
            (Some(key), Some(v)) => v.get(key).copied(),
            _ => None,
        };
        // A NaN metric is never the best (NaN > b is false, but a first epoch has no b).
        let score = match score {
            Some(s) if !s.is_finite() => {
                eprintln!(
                    "warning: validation {} is {s} at epoch {epoch}; not a best checkpoint",
                    cfg.select.unwrap_or("")
                );
                None
            }
            s => s,
        };
        let better = match (score, state.best_metric) {
            (Some(s), Some(b)) => s > b,
            (Some(_), None) => true,
            (None, _) => cfg.select.is_none(),
        };
        if better {
            state.best_metric = score;
            state.best_epoch = Some(epoch);
            cfg.run.save_checkpoint(BEST, cfg.task, store, None, &state)?;
            best_val = val.clone();
        }
        cfg.run.save_checkpoint(LAST, cfg.task, store, Some(optimizer), &state)?;
    }
    if last_epoch < cfg.epochs {
        eprintln!("stopped after epoch {last_epoch} of {}; continue with --resume", cfg.epochs);
        return Ok(FitEnd::Stopped(last_epoch));
    }
    Ok(FitEnd::Finished { state, best_val })
}

/// Loads `checkpoint_best` back into the model (to test with it); in a data-parallel run rank 0
/// reads it and the others receive its weights.
pub fn load_best(run: &RunDir, store: &ParamStore, dist: Option<&dyn Communicator>) -> Result<()> {
    if run.is_primary() {
        let ckpt = crate::checkpoint::read_checkpoint(&run.file(BEST), store.device())?;
        crate::checkpoint::load_into(store, &ckpt.tensors)?;
    }
    if let Some(comm) = dist {
        super::distributed::sync_model(comm, store)?;
    }
    Ok(())
}
