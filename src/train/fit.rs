//! The epoch-level driver every task shares: train an epoch, validate, log, keep the best and
//! the last checkpoint, stop early on request.

use super::optim::AdamW;
use super::run::{RunDir, TrainState, BEST, LAST};
use crate::eval::retrieval::Metrics;
use crate::nn::ParamStore;
use anyhow::Result;
use serde_json::json;
use std::collections::BTreeMap;

pub struct FitConfig<'a> {
    pub run: &'a RunDir,
    /// Tag written into checkpoints (`albef_task`).
    pub task: &'a str,
    pub epochs: usize,
    pub stop_after_epoch: Option<usize>,
    /// Validation metric that picks `checkpoint_best` (higher is better); without validation the
    /// last epoch is the best.
    pub select: Option<&'a str>,
}

pub enum FitEnd {
    Finished {
        state: TrainState,
        best_val: Option<Metrics>,
    },
    /// Stopped on request after this many epochs; `--resume` continues.
    Stopped(usize),
}

/// `key_prefix_metric` entries for a log record.
pub fn prefixed(prefix: &str, m: &Metrics) -> serde_json::Map<String, serde_json::Value> {
    m.iter().map(|(k, v)| (format!("{prefix}_{k}"), json!(v))).collect()
}

pub fn print_metrics(split: &str, m: &Metrics) {
    let cells: Vec<String> = m.iter().map(|(k, v)| format!("{k} {v:.2}")).collect();
    eprintln!("{split}: {}", cells.join("  "));
}

/// Runs epochs `state.epochs_done..` : `train(epoch, optimizer)` returns the epoch's averaged
/// statistics, `validate(epoch)` the validation metrics (or `None`).
pub fn fit(
    cfg: &FitConfig,
    store: &ParamStore,
    optimizer: &mut AdamW,
    mut state: TrainState,
    mut train: impl FnMut(usize, &mut AdamW) -> Result<BTreeMap<String, f64>>,
    mut validate: impl FnMut(usize) -> Result<Option<Metrics>>,
) -> Result<FitEnd> {
    let last_epoch = cfg.stop_after_epoch.map_or(cfg.epochs, |n| n.min(cfg.epochs));
    let mut best_val = None;
    for epoch in state.epochs_done..last_epoch {
        let stats = train(epoch, optimizer)?;
        let val = validate(epoch)?;
        let mut record: serde_json::Map<String, serde_json::Value> =
            stats.iter().map(|(k, v)| (format!("train_{k}"), json!(v))).collect();
        if let Some(v) = &val {
            print_metrics(&format!("epoch {epoch} val"), v);
            record.extend(prefixed("val", v));
        }
        record.insert("epoch".into(), json!(epoch));
        cfg.run.log(&serde_json::Value::Object(record))?;
        state.epochs_done = epoch + 1;
        state.optimizer_step = optimizer.step;
        let score = match (cfg.select, &val) {
            (Some(key), Some(v)) => v.get(key).copied(),
            _ => None,
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

/// Loads `checkpoint_best` back into the model (to test with it).
pub fn load_best(run: &RunDir, store: &ParamStore) -> Result<()> {
    let ckpt = crate::checkpoint::read_checkpoint(&run.file(BEST), store.device())?;
    crate::checkpoint::load_into(store, &ckpt.tensors)?;
    Ok(())
}
