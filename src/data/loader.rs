//! A parallel, ordered, prefetching batch loader (the role of torch's `DataLoader`).
//!
//! Worker threads decode and augment samples; batches come out in order. Every sample gets its own
//! RNG seeded from (seed, epoch, index), so what a batch contains does not depend on thread
//! timing, and an epoch can be replayed exactly (which resuming relies on).

use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};

pub trait Dataset: Send + Sync + 'static {
    type Item: Send + 'static;
    fn len(&self) -> usize;
    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Self::Item>;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub workers: usize,
    /// Batches prepared ahead of the consumer.
    pub prefetch: usize,
    pub seed: u64,
    /// This process's rank and the number of processes: each reads its own shard of every
    /// epoch (see [`epoch_batches`]). 0 and 1 on one process.
    pub rank: usize,
    pub world_size: usize,
}

impl LoaderConfig {
    pub fn train(batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            shuffle: true,
            drop_last: true,
            workers: default_workers(),
            prefetch: 4,
            seed,
            rank: 0,
            world_size: 1,
        }
    }
    pub fn eval(batch_size: usize) -> Self {
        Self { shuffle: false, drop_last: false, seed: 0, ..Self::train(batch_size, 0) }
    }
}

impl LoaderConfig {
    /// Overrides the worker count when given (`--workers`).
    pub fn workers(mut self, workers: Option<usize>) -> Self {
        if let Some(w) = workers {
            self.workers = w;
        }
        self
    }

    /// Reads the shard of `rank` among `world_size` processes.
    pub fn shard(mut self, rank: usize, world_size: usize) -> Self {
        self.rank = rank;
        self.world_size = world_size.max(1);
        self
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2).clamp(1, 8)
}

/// SplitMix64 step, to derive independent seeds.
pub fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The sample indices of each batch of an epoch (of this rank's shard).
///
/// Several processes shard an epoch as `DistributedSampler(shuffle=True)` with `set_epoch`: the
/// same permutation of the epoch on every rank (it depends on the seed and the epoch only),
/// padded with its first indices to a multiple of the world size, and rank r takes every
/// world-size-th index from position r; the batches of that shard then drop their last
/// incomplete one (the train loaders' `drop_last`). The permutation is this loader's own (not
/// `torch.randperm`'s bits), so one process (world size 1) shuffles exactly as before.
pub fn epoch_batches(len: usize, cfg: &LoaderConfig, epoch: u64) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..len).collect();
    if cfg.shuffle {
        order.shuffle(&mut StdRng::seed_from_u64(mix(cfg.seed, epoch)));
    }
    let world = cfg.world_size.max(1);
    if world > 1 && len > 0 {
        let total = len.div_ceil(world) * world;
        while order.len() < total {
            let pad = (total - order.len()).min(len);
            order.extend_from_within(..pad);
        }
        order = order.into_iter().skip(cfg.rank).step_by(world).collect();
    }
    let mut batches: Vec<Vec<usize>> = order.chunks(cfg.batch_size.max(1)).map(|c| c.to_vec()).collect();
    if cfg.drop_last && batches.last().is_some_and(|b| b.len() < cfg.batch_size) {
        batches.pop();
    }
    batches
}

/// What the training loop draws an epoch's batches from: a random-access [`Dataset`] through a
/// [`Loader`], or a stream read in order (tar shards, `data::shards`). Both give every sample an
/// RNG seeded from (seed, epoch, position), so an epoch replays exactly.
pub trait BatchSource {
    type Item: Send + 'static;
    /// Batches in `epoch`. A stream knows it only from its sample counts, before images that fail to
    /// decode are dropped: the epoch ends when the stream does, and the count serves the α ramp
    /// and the progress bar.
    fn num_batches(&self, epoch: u64) -> usize;
    /// Examples per epoch (for errors).
    fn num_examples(&self) -> usize;
    fn batches(&self, epoch: u64) -> Result<BoxedBatches<'_, Self::Item>>;
}

pub type BoxedBatches<'a, T> = Box<dyn Iterator<Item = Result<Vec<T>>> + 'a>;

/// A task's training data: how it becomes a [`BatchSource`] under the run's loader settings.
/// Every [`Dataset`] is one (through a [`Loader`]).
pub trait TrainSet: Send + Sync + 'static {
    type Item: Send + 'static;
    fn source(self: Arc<Self>, cfg: LoaderConfig) -> Result<Box<dyn BatchSource<Item = Self::Item>>>;
}

impl<D: Dataset> TrainSet for D {
    type Item = D::Item;
    fn source(self: Arc<Self>, cfg: LoaderConfig) -> Result<Box<dyn BatchSource<Item = D::Item>>> {
        Ok(Box::new(Loader::new(self, cfg)))
    }
}

impl<D: Dataset> BatchSource for Loader<D> {
    type Item = D::Item;
    fn num_batches(&self, epoch: u64) -> usize {
        Loader::num_batches(self, epoch)
    }
    fn num_examples(&self) -> usize {
        self.dataset.len()
    }
    fn batches(&self, epoch: u64) -> Result<BoxedBatches<'_, D::Item>> {
        Ok(Box::new(self.epoch(epoch, 0)))
    }
}

pub struct Loader<D: Dataset> {
    dataset: Arc<D>,
    cfg: LoaderConfig,
}

impl<D: Dataset> Loader<D> {
    pub fn new(dataset: Arc<D>, cfg: LoaderConfig) -> Self {
        Self { dataset, cfg }
    }

    pub fn dataset(&self) -> &D {
        &self.dataset
    }

    pub fn num_batches(&self, epoch: u64) -> usize {
        epoch_batches(self.dataset.len(), &self.cfg, epoch).len()
    }

    /// Batches of `epoch`, starting at batch `skip` (earlier ones are not loaded).
    pub fn epoch(&self, epoch: u64, skip: usize) -> Batches<D::Item> {
        let batches: Arc<Vec<Vec<usize>>> =
            Arc::new(epoch_batches(self.dataset.len(), &self.cfg, epoch).into_iter().skip(skip).collect());
        let total = batches.len();
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1) * 2);
        let next = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let window = Arc::new((Mutex::new(0usize), Condvar::new()));
        for _ in 0..self.cfg.workers.max(1).min(total.max(1)) {
            let (dataset, batches, tx, next, stop, window) =
                (self.dataset.clone(), batches.clone(), tx.clone(), next.clone(), stop.clone(), window.clone());
            let (prefetch, seed) = (self.cfg.prefetch.max(1), mix(self.cfg.seed, epoch));
            std::thread::spawn(move || loop {
                let b = next.fetch_add(1, Ordering::SeqCst);
                if b >= batches.len() || stop.load(Ordering::SeqCst) {
                    return;
                }
                // Stay within `prefetch` batches of the consumer.
                {
                    let (lock, cv) = &*window;
                    let mut consumed = lock.lock().unwrap();
                    while b >= *consumed + prefetch && !stop.load(Ordering::SeqCst) {
                        consumed = cv.wait(consumed).unwrap();
                    }
                }
                let items: Result<Vec<D::Item>> = batches[b]
                    .iter()
                    .map(|&i| {
                        let mut rng = StdRng::seed_from_u64(mix(seed, i as u64));
                        dataset.get(i, &mut rng)
                    })
                    .collect();
                if tx.send((b, items)).is_err() {
                    return;
                }
            });
        }
        Batches { rx, pending: BTreeMap::new(), next: 0, total, stop, window }
    }
}

/// Iterator over one epoch's batches, in order.
pub struct Batches<T> {
    rx: Receiver<(usize, Result<Vec<T>>)>,
    pending: BTreeMap<usize, Result<Vec<T>>>,
    next: usize,
    total: usize,
    stop: Arc<AtomicBool>,
    window: Arc<(Mutex<usize>, Condvar)>,
}

impl<T> Batches<T> {
    pub fn len(&self) -> usize {
        self.total
    }
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

impl<T> Iterator for Batches<T> {
    type Item = Result<Vec<T>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.total {
            return None;
        }
        while !self.pending.contains_key(&self.next) {
            match self.rx.recv() {
                Ok((b, items)) => {
                    self.pending.insert(b, items);
                }
                Err(_) => return Some(Err(anyhow::anyhow!("data loader workers stopped unexpectedly"))),
            }
        }
        let out = self.pending.remove(&self.next);
        self.next += 1;
        let (lock, cv) = &*self.window;
        *lock.lock().unwrap() = self.next;
        cv.notify_all();
        out
    }
}

impl<T> Drop for Batches<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.window.1.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    struct Numbers(usize);
    impl Dataset for Numbers {
        type Item = (usize, u32);
        fn len(&self) -> usize {
            self.0
        }
        fn get(&self, index: usize, rng: &mut StdRng) -> Result<(usize, u32)> {
            if index == 999 {
                anyhow::bail!("broken sample {index}");
            }
            Ok((index, rng.random()))
        }
    }

    #[test]
    fn ordered_deterministic_and_complete() {
        let cfg = LoaderConfig { batch_size: 4, workers: 3, prefetch: 2, ..LoaderConfig::train(4, 7) };
        let loader = Loader::new(Arc::new(Numbers(23)), cfg.clone());
        let a: Vec<Vec<(usize, u32)>> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
        let b: Vec<Vec<(usize, u32)>> = loader.epoch(0, 0).map(|b| b.unwrap()).collect();
        assert_eq!(a, b, "same epoch, same batches and augmentations");
        assert_eq!(a.len(), 5, "drop_last drops the 3 leftover samples");
        let mut seen: Vec<usize> = a.iter().flatten().map(|x| x.0).collect();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 20);
        let c: Vec<Vec<(usize, u32)>> = loader.epoch(1, 0).map(|b| b.unwrap()).collect();
        assert_ne!(a, c, "another epoch, another order");
        let skipped: Vec<Vec<(usize, u32)>> = loader.epoch(0, 2).map(|b| b.unwrap()).collect();
        assert_eq!(skipped, a[2..].to_vec());
        let eval = Loader::new(Arc::new(Numbers(10)), LoaderConfig::eval(4));
        let sizes: Vec<usize> = eval.epoch(0, 0).map(|b| b.unwrap().len()).collect();
        assert_eq!(sizes, [4, 4, 2]);
    }

    #[test]
    fn distributed_shards_follow_the_distributed_sampler() {
        let base = LoaderConfig::train(2, 9);
        // Divisible: the ranks split one permutation into disjoint halves covering the epoch.
        let one: Vec<usize> = epoch_batches(12, &base.clone().shard(0, 1), 3).concat();
        let r0: Vec<usize> = epoch_batches(12, &base.clone().shard(0, 2), 3).concat();
        let r1: Vec<usize> = epoch_batches(12, &base.clone().shard(1, 2), 3).concat();
        assert_eq!(r0, one.iter().copied().step_by(2).collect::<Vec<_>>());
        assert_eq!(r1, one.iter().copied().skip(1).step_by(2).collect::<Vec<_>>());
        // Not divisible: 11 samples, padded with the permutation's first to 12, 6 per rank,
        // 3 batches of 2 each.
        let one: Vec<usize> = epoch_batches(11, &LoaderConfig { drop_last: false, ..base.clone() }, 0).concat();
        let r0 = epoch_batches(11, &base.clone().shard(0, 2), 0);
        let r1 = epoch_batches(11, &base.clone().shard(1, 2), 0);
        assert_eq!((r0.len(), r1.len()), (3, 3));
        assert_eq!(r1.concat().last(), Some(&one[0]), "the padding repeats the first index");
    }

    #[test]
    fn errors_reach_the_consumer() {
        let loader = Loader::new(Arc::new(Numbers(1000)), LoaderConfig::eval(100));
        let results: Vec<Result<Vec<(usize, u32)>>> = loader.epoch(0, 0).collect();
        assert!(results[9].as_ref().unwrap_err().to_string().contains("broken sample 999"));
    }
}
