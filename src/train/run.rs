//! A run's output folder: `log.txt` (one JSON object per epoch, like the reference), `losses.jsonl`
//! (one per optimizer step), the resolved
//! config, `metrics.json`, and checkpoints written atomically, with what resuming needs.

use crate::checkpoint::{albef_metadata, read_checkpoint, save_safetensors, StateDict};
use crate::nn::ParamStore;
use crate::task::Task;
use crate::train::optim::AdamW;
use crate::util::write_atomic;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const LAST: &str = "checkpoint_last.safetensors";
pub const BEST: &str = "checkpoint_best.safetensors";
/// One JSON object per epoch.
pub const LOG: &str = "log.txt";
/// One JSON object per optimizer step: `epoch`, `iter` (in the epoch), `step` (optimizer steps
/// so far), `lr` and each loss.
pub const STEP_LOSSES: &str = "losses.jsonl";

/// The records of a `losses.jsonl`, in order; a line that does not parse is an error naming it.
pub fn read_step_losses(path: &Path) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| format!("{}, line {}: not a JSON object", path.display(), i + 1))
        })
        .collect()
}

/// Progress of a run, stored in the last checkpoint.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    /// Epochs completed.
    pub epochs_done: usize,
    pub best_metric: Option<f64>,
    pub best_epoch: Option<usize>,
    pub optimizer_step: u64,
    /// Steps skipped for a non-finite loss or gradient (`--skip-nonfinite`), over the run.
    #[serde(default)]
    pub skipped_nonfinite: u64,
}

/// The lock file that marks an output folder as held by a live run.
pub const LOCK: &str = ".albef.lock";

pub struct RunDir {
    pub path: PathBuf,
    /// Held (an OS file lock, released when the process ends, however it ends) while this exists;
    /// `None` on the ranks > 0 of a data-parallel run, which write nothing.
    _lock: Option<std::fs::File>,
}

impl RunDir {
    /// Creates the folder and locks it: a second run into a folder a live run holds is refused.
    pub fn create(path: &Path) -> Result<Self> {
        std::fs::create_dir_all(path).with_context(|| format!("cannot create output folder {}", path.display()))?;
        let lock_path = path.join(LOCK);
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("cannot create {}", lock_path.display()))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "output folder {} is in use by another albef run (it holds {}); wait for it to end or choose \
                 another --output_dir",
                path.display(),
                lock_path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", lock_path.display()))
            }
        }
        // Temporary files of killed writers: nobody else can be writing here now.
        for entry in std::fs::read_dir(path)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.contains(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Self { path: path.to_path_buf(), _lock: Some(lock) })
    }

    /// The folder as a rank > 0 of a data-parallel run sees it: only rank 0 writes logs, metrics
    /// and checkpoints (`utils.is_main_process()` in the reference), so here every write does
    /// nothing and the folder is neither created nor locked.
    pub fn secondary(path: &Path) -> Self {
        Self { path: path.to_path_buf(), _lock: None }
    }

    /// Whether this process writes the run's files (false on ranks > 0).
    pub fn is_primary(&self) -> bool {
        self._lock.is_some()
    }

    pub fn file(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Appends one JSON object as a line of `log.txt`: one `write` of the whole line, synced, so
    /// that a kill leaves no torn line; a failed write (disk full) is cut off again.
    pub fn log(&self, record: &serde_json::Value) -> Result<()> {
        self.append_line(LOG, record, true)
    }

    /// Appends one optimizer step's record to `losses.jsonl`, as [`RunDir::log`] does but not
    /// synced: [`RunDir::sync_step_losses`] syncs once an epoch, before the epoch's `log.txt` line
    /// (a kill loses at most the steps of the epoch that a resumed run does again).
    pub fn log_step(&self, record: &serde_json::Value) -> Result<()> {
        self.append_line(STEP_LOSSES, record, false)
    }

    pub fn sync_step_losses(&self) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let path = self.file(STEP_LOSSES);
        if let Ok(f) = std::fs::OpenOptions::new().append(true).open(&path) {
            f.sync_data().with_context(|| format!("cannot sync {}", path.display()))?;
        }
        Ok(())
    }

    fn append_line(&self, name: &str, record: &serde_json::Value, sync: bool) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let path = self.file(name);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let before = f.metadata()?.len();
        let line = format!("{record}\n");
        let written = f.write_all(line.as_bytes()).and_then(|_| if sync { f.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let _ = f.set_len(before);
            return Err(e).with_context(|| format!("cannot write {} (disk full?)", path.display()));
        }
        Ok(())
    }

    /// Keeps the `losses.jsonl` lines of epochs before `epochs_done` (a resumed run does the
    /// others again), atomically; a torn last line (power loss) goes too.
    pub fn truncate_step_losses(&self, epochs_done: usize) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let path = self.file(STEP_LOSSES);
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let epoch_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok()?.get("epoch")?.as_u64();
        let kept: String = text
            .lines()
            .filter(|l| epoch_of(l).is_some_and(|e| e < epochs_done as u64))
            .map(|l| format!("{l}\n"))
            .collect();
        if kept.len() < text.len() {
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    /// Drops the `log.txt` lines after the one of epoch `epochs_done - 1` (epochs that a resumed
    /// run does again; all of them for 0), atomically.
    pub fn truncate_log(&self, epochs_done: usize) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let path = self.file(LOG);
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
        let lines: Vec<&str> = text.lines().collect();
        let epoch_of = |l: &str| serde_json::from_str::<serde_json::Value>(l).ok()?.get("epoch")?.as_u64();
        // The epoch records are 0, 1, … in order; keep through epoch `epochs_done - 1` (a final
        // record after them, whatever epoch it names, goes).
        let mut next = 0usize;
        let mut keep = if epochs_done == 0 { 0 } else { lines.len() };
        for (i, l) in lines.iter().enumerate() {
            if next < epochs_done && epoch_of(l) == Some(next as u64) {
                next += 1;
                if next == epochs_done {
                    keep = i + 1;
                    break;
                }
            }
        }
        if keep < lines.len() {
            let kept: String = lines[..keep].iter().map(|l| format!("{l}\n")).collect();
            write_atomic(&path, kept.as_bytes())?;
        }
        Ok(())
    }

    pub fn write_json(&self, name: &str, value: &serde_json::Value) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        write_atomic(&self.file(name), serde_json::to_string_pretty(value)?.as_bytes())
    }

    pub fn write_text(&self, name: &str, text: &str) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        write_atomic(&self.file(name), text.as_bytes())
    }

    /// Model (+ optimizer) tensors and the run state, in one safetensors file.
    pub fn save_checkpoint(
        &self,
        name: &str,
        task: Task,
        store: &ParamStore,
        optimizer: Option<&AdamW>,
        state: &TrainState,
    ) -> Result<()> {
        if !self.is_primary() {
            return Ok(());
        }
        let mut tensors: StateDict = store.named_tensors().into_iter().collect();
        if let Some(opt) = optimizer {
            tensors.extend(opt.state()?);
        }
        let mut meta = albef_metadata(task);
        meta.insert("albef_train_state".to_string(), serde_json::to_string(state)?);
        save_safetensors(&tensors, &meta, &self.file(name))
    }

    /// Restores model, optimizer and state from `checkpoint_last.safetensors`.
    pub fn resume(&self, store: &ParamStore, optimizer: &mut AdamW, device: &Device) -> Result<TrainState> {
        let path = self.file(LAST);
        if !path.is_file() {
            bail!("--resume: {} does not exist (no completed epoch to resume from)", path.display());
        }
        let ckpt = read_checkpoint(&path, device)?;
        let state: TrainState = serde_json::from_str(
            ckpt.metadata
                .get("albef_train_state")
                .with_context(|| format!("{} has no training state", path.display()))?,
        )?;
        let (opt_state, model): (StateDict, StateDict) =
            ckpt.tensors.into_iter().partition(|(k, _)| k.starts_with("optimizer."));
        let report = crate::checkpoint::load_into(store, &model)?;
        if !report.missing.is_empty() || !report.unexpected.is_empty() {
            bail!("{} does not match this model:\n{report}", path.display());
        }
        optimizer.load_state(&opt_state, state.optimizer_step)?;
        Ok(state)
    }
}
