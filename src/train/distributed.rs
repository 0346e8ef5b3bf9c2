//! What the training loop does differently over several ranks (DDP's part of the reference):
//! agree on stepping, sum the epoch's figures, and start every rank from rank 0's state.

use super::optim::AdamW;
use super::run::TrainState;
use crate::checkpoint::StateDict;
use crate::dist::comm::{broadcast_vars, sum_values};
use crate::dist::Communicator;
use crate::nn::ParamStore;
use anyhow::{Context, Result};
use std::collections::BTreeMap;

/// Whether `mine` holds on every rank.
pub fn all_true(comm: &dyn Communicator, mine: bool) -> Result<bool> {
    let sum = sum_values(comm, &[if mine { 1.0 } else { 0.0 }])?;
    Ok(sum[0] as usize == comm.world_size())
}

/// The epoch's loss sums and step count over every rank.
pub fn sum_over_ranks(
    comm: &dyn Communicator,
    sums: BTreeMap<&'static str, f64>,
    n: usize,
) -> Result<(BTreeMap<&'static str, f64>, usize)> {
    let mut values: Vec<f64> = vec![n as f64];
    values.extend(sums.values());
    let total = sum_values(comm, &values)?;
    let summed = sums.keys().zip(&total[1..]).map(|(&k, &v)| (k, v)).collect();
    Ok((summed, total[0] as usize))
}

/// Every parameter and buffer (teacher, queues) set to rank 0's: DDP's broadcast when it wraps
/// the model, which is what makes every rank start from the same weights.
pub fn sync_model(comm: &dyn Communicator, store: &ParamStore) -> Result<()> {
    let mut vars: Vec<_> = store.params().into_iter().map(|p| p.var).collect();
    vars.extend(store.buffers().into_iter().map(|(_, v)| v));
    broadcast_vars(comm, &vars, 0)
}

/// Model, optimizer moments and run state set to rank 0's (which resumed from its
/// `checkpoint_last`; the other ranks read no file, so the output folder need not be shared).
pub fn sync_run_state(
    comm: &dyn Communicator,
    store: &ParamStore,
    optimizer: &mut AdamW,
    state: &mut TrainState,
) -> Result<()> {
    sync_model(comm, store)?;
    let mut moments = StateDict::new();
    for (name, t) in optimizer.state()? {
        moments.insert(name, comm.broadcast(&t, 0)?);
    }
    let bytes = comm.broadcast_bytes(&serde_json::to_vec(&*state)?, 0)?;
    *state = serde_json::from_slice(&bytes).context("rank 0 sent a run state this rank cannot read")?;
    optimizer.load_state(&moments, state.optimizer_step)?;
    Ok(())
}
