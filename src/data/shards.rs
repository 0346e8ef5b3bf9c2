//! Tar shards in the WebDataset layout, streamed: `DIR/{000000..000999}.tar` (brace patterns or
//! lists), one sample = the consecutive members sharing a key (`000000012.jpg`, `.txt`, `.json`),
//! exactly what `img2dataset` writes (its `.json` metadata and the gaps left by failed downloads
//! included) and what `albef data shard` writes.
//!
//! No index of the corpus is held: each epoch, reader threads read their share of the shards
//! front to back (shards split across readers, and across ranks by `shard % world_size`), a
//! merger puts the samples in a fixed order (shard by shard when not shuffling: the corpus order;
//! otherwise one sample per reader in turn, shards in a per-epoch order, through a shuffle
//! buffer), and loader workers decode and augment them. Every random choice derives from
//! (seed, epoch, position in the epoch's stream), as with the JSON lists, so an epoch replays
//! exactly (resuming at an epoch boundary) and, unshuffled, shards written from a JSON list give
//! the same batches as the list.
//!
//! Web corpora are dirty: a sample whose image does not decode (or that lacks an image or a
//! caption) is skipped and counted; a shard cut short gives its complete samples and a warning;
//! a shard that cannot be opened stops the run, named.

use super::loader::{mix, BatchSource, BoxedBatches, LoaderConfig};
use crate::progress::Progress;
use anyhow::{anyhow, bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

/// Expands `{a..b}` ranges (zero-padded to the width of `a`) and `{x,y,…}` lists, as WebDataset's
/// `braceexpand`; several braces multiply out left to right.
pub fn expand_braces(pattern: &str) -> Result<Vec<String>> {
    let Some(open) = pattern.find('{') else { return Ok(vec![pattern.to_string()]) };
    let close = pattern[open..]
        .find('}')
        .map(|i| open + i)
        .ok_or_else(|| anyhow!("shard pattern {pattern:?}: '{{' without a closing '}}'"))?;
    let (head, body, tail) = (&pattern[..open], &pattern[open + 1..close], &pattern[close + 1..]);
    let options: Vec<String> = match body.split_once("..") {
        Some((a, b)) => {
            let parse =
                |s: &str| s.parse::<u64>().with_context(|| format!("shard pattern {pattern:?}: {s:?} is not a number"));
            let (x, y) = (parse(a)?, parse(b)?);
            if y < x {
                bail!("shard pattern {pattern:?}: range {{{a}..{b}}} is empty");
            }
            let width = a.len();
            (x..=y).map(|n| format!("{n:0width$}")).collect()
        }
        None => body.split(',').map(str::to_string).collect(),
    };
    let rest = expand_braces(tail)?;
    Ok(options.iter().flat_map(|o| rest.iter().map(move |r| format!("{head}{o}{r}"))).collect())
}

/// The shard files a config names: each pattern expanded, relative paths found as the config's
/// other files are (working directory, then next to the YAML, then one folder up). Every shard
/// must exist; the missing ones are listed.
pub fn resolve_shards(config: &Path, patterns: &[&str]) -> Result<Vec<PathBuf>> {
    let dir = config.parent().unwrap_or(Path::new(""));
    let bases = [PathBuf::new(), dir.to_path_buf(), dir.join("..")];
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for pattern in patterns {
        let names = expand_braces(pattern)?;
        let base = bases.iter().find(|b| names.iter().any(|n| b.join(n).is_file())).cloned().unwrap_or_default();
        for n in names {
            let p = base.join(&n);
            if p.is_file() {
                out.push(p);
            } else {
                missing.push(p.display().to_string());
            }
        }
    }
    if !missing.is_empty() {
        let more = if missing.len() > 10 { format!(" … and {} more", missing.len() - 10) } else { String::new() };
        bail!(
            "config {}: {} shard{} missing: {}{more}",
            config.display(),
            missing.len(),
            if missing.len() == 1 { " is" } else { "s are" },
            missing[..missing.len().min(10)].join(", ")
        );
    }
    if out.is_empty() {
        bail!("config {}: train_shards names no shard", config.display());
    }
    Ok(out)
}

/// One sample as its shard holds it: the key and the bytes of each member, by extension
/// (lower-case, after the first dot of the member's base name, as WebDataset splits it).
#[derive(Clone, Debug)]
pub struct RawSample {
    /// Index of the shard in its [`ShardSet`].
    pub shard: usize,
    pub key: String,
    pub files: Vec<(String, Vec<u8>)>,
}

impl RawSample {
    pub fn get(&self, ext: &str) -> Option<&[u8]> {
        self.files.iter().find(|(e, _)| e == ext).map(|(_, b)| b.as_slice())
    }
}

/// `dir/000000012.jpg` → (`dir/000000012`, `jpg`); `a.b.c` → (`a`, `b.c`).
fn split_key(name: &str) -> Option<(&str, &str)> {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[slash..].find('.')? + slash;
    Some((&name[..dot], &name[dot + 1..]))
}

/// Reads a shard front to back, giving each sample to `emit` (which returns false to stop).
/// `Ok(Some(why))`: the shard is cut short or damaged after its last complete sample.
pub fn read_shard(path: &Path, index: usize, mut emit: impl FnMut(RawSample) -> bool) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
    let shard_len = file.metadata().with_context(|| format!("cannot read shard {}", path.display()))?.len();
    let mut archive = tar::Archive::new(BufReader::with_capacity(1 << 20, file));
    let entries = archive.entries().with_context(|| format!("cannot read shard {}", path.display()))?;
    let mut current: Option<RawSample> = None;
    let mut damage = None;
    let mut last_member: Option<String> = None;
    for entry in entries {
        let mut entry = match entry {
            Ok(e) => e,
            Err(e) => {
                damage = Some(match &last_member {
                    Some(name) => format!("{e} (after member {name}, which may be cut short)"),
                    None => format!("{e}"),
                });
                break;
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = match entry.path() {
            Ok(p) => p.to_string_lossy().into_owned(),
            Err(e) => {
                damage = Some(format!("unreadable member name ({e})"));
                break;
            }
        };
        // The header's size may lie (a 1 KiB shard can claim 2^62 bytes): reserve no more than
        // the shard itself holds; `read_to_end` grows the buffer as real bytes arrive.
        let mut bytes = Vec::with_capacity(entry.size().min(shard_len) as usize);
        if let Err(e) = entry.read_to_end(&mut bytes) {
            damage = Some(format!("member {name} cut short ({e})"));
            break;
        }
        last_member = Some(name.clone());
        // Members without an extension belong to no sample (WebDataset ignores them too).
        let Some((key, ext)) = split_key(&name) else { continue };
        if current.as_ref().is_some_and(|c| c.key != key) && !emit(current.take().expect("checked")) {
            return Ok(None);
        }
        let sample = current.get_or_insert_with(|| RawSample { shard: index, key: key.to_string(), files: Vec::new() });
        sample.files.push((ext.to_lowercase(), bytes));
    }
    // A sample cut by the damage may lack members: dropped with the rest of the shard.
    match damage {
        Some(why) => Ok(Some(why)),
        None => {
            if let Some(s) = current {
                emit(s);
            }
            Ok(None)
        }
    }
}

/// Samples in a shard: `img2dataset`'s `<shard>_stats.json` (`successes`) when it is there,
/// else by reading the member headers (seeking over the contents).
fn count_samples(path: &Path) -> Result<(usize, Option<String>)> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let stats = path.with_file_name(format!("{stem}_stats.json"));
    if let Ok(text) = std::fs::read_to_string(&stats) {
        if let Some(n) = serde_json::from_str::<serde_json::Value>(&text).ok().and_then(|v| v["successes"].as_u64()) {
            // Still open it, so that an unreadable shard is named now rather than hours in.
            std::fs::File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
            return Ok((n as usize, None));
        }
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open shard {}", path.display()))?;
    let mut archive = tar::Archive::new(BufReader::new(file));
    let entries = archive.entries_with_seek().with_context(|| format!("cannot read shard {}", path.display()))?;
    let (mut n, mut last) = (0usize, None::<String>);
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => return Ok((n.saturating_sub(1), Some(format!("{e}")))),
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = entry.path().map(|p| p.to_string_lossy().into_owned()).unwrap_or_default();
        if let Some((key, _)) = split_key(&name) {
            if last.as_deref() != Some(key) {
                n += 1;
                last = Some(key.to_string());
            }
        }
    }
    Ok((n, None))
}

/// The shards of a corpus with their sample counts (counted once, at set-up).
#[derive(Debug)]
pub struct ShardSet {
    pub shards: Vec<PathBuf>,
    pub counts: Vec<usize>,
}

impl ShardSet {
    /// Opens and counts every shard (in parallel). A shard that cannot be opened is an error
    /// naming it; a damaged one is counted up to the damage, with a warning.
    pub fn open(shards: Vec<PathBuf>) -> Result<Self> {
        let progress = Progress::new("Counting shard samples", shards.len());
        let done = std::sync::atomic::AtomicUsize::new(0);
        let counted: Vec<Result<(usize, Option<String>)>> = shards
            .par_iter()
            .map(|p| {
                let r = count_samples(p);
                progress.step(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed), String::new);
                r
            })
            .collect();
        progress.finish();
        let mut counts = Vec::with_capacity(shards.len());
        for (path, r) in shards.iter().zip(counted) {
            let (n, damage) = r?;
            if let Some(why) = damage {
                eprintln!(
                    "warning: shard {} is damaged after {n} samples ({why}); its complete samples are used",
                    path.display()
                );
            }
            counts.push(n);
        }
        Ok(Self { shards, counts })
    }

    pub fn total(&self) -> usize {
        self.counts.iter().sum()
    }

    /// The shards of `rank` among `world_size`: shard i goes to rank i % world_size.
    fn of_rank(&self, rank: usize, world_size: usize) -> Vec<usize> {
        (0..self.shards.len()).filter(|i| i % world_size.max(1) == rank).collect()
    }
}

/// How shards are streamed.
#[derive(Clone, Debug)]
pub struct StreamOptions {
    pub shuffle: bool,
    /// Samples held by the shuffle buffer.
    pub buffer: usize,
    /// Shards read at once.
    pub readers: usize,
    /// An epoch stops with an error when more than this share of its samples is skipped.
    pub max_skipped_fraction: f64,
    /// This process's rank and the number of processes (each reads its own shards).
    pub rank: usize,
    pub world_size: usize,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self { shuffle: true, buffer: 2000, readers: 4, max_skipped_fraction: 0.05, rank: 0, world_size: 1 }
    }
}

/// What an epoch's stream used and dropped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StreamCounts {
    pub samples: usize,
    pub skipped: usize,
    pub damaged_shards: usize,
}

/// Counts shared between the streams and whoever logs them.
#[derive(Debug, Default)]
pub struct Counters(Mutex<StreamCounts>);

impl Counters {
    /// The counts so far, reset.
    pub fn take(&self) -> StreamCounts {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
    fn add(&self, samples: usize, skipped: usize, damaged: usize) {
        let mut c = self.0.lock().unwrap();
        c.samples += samples;
        c.skipped += skipped;
        c.damaged_shards += damaged;
    }
}

/// Decodes one raw sample into a training item (errors: the sample is skipped).
pub type Decode<T> = dyn Fn(&RawSample, &mut StdRng) -> Result<T> + Send + Sync;

/// A streamed corpus: its shards, how to stream them, how to decode a sample.
pub struct ShardCorpus<T> {
    pub set: Arc<ShardSet>,
    pub options: StreamOptions,
    pub decode: Arc<Decode<T>>,
    pub counters: Arc<Counters>,
}

impl<T: Send + 'static> ShardCorpus<T> {
    pub fn new(set: ShardSet, options: StreamOptions, decode: Arc<Decode<T>>) -> Self {
        Self { set: Arc::new(set), options, decode, counters: Arc::new(Counters::default()) }
    }

    /// The batches under the run's loader settings (batch size, workers, prefetch, seed; drop_last
    /// as every training loader).
    pub fn stream(&self, cfg: &LoaderConfig) -> ShardStream<T> {
        // The run's rank and world size (set by `--distributed` runs) choose the shards.
        let options = StreamOptions { rank: cfg.rank, world_size: cfg.world_size.max(1), ..self.options.clone() };
        ShardStream {
            set: self.set.clone(),
            options,
            decode: self.decode.clone(),
            counters: self.counters.clone(),
            batch_size: cfg.batch_size.max(1),
            workers: cfg.workers.max(1),
            prefetch: cfg.prefetch.max(1),
            seed: cfg.seed,
        }
    }
}

pub struct ShardStream<T> {
    set: Arc<ShardSet>,
    options: StreamOptions,
    decode: Arc<Decode<T>>,
    counters: Arc<Counters>,
    batch_size: usize,
    workers: usize,
    prefetch: usize,
    seed: u64,
}

enum Msg {
    Sample(RawSample),
    EndOfShard,
    Failed(anyhow::Error),
}

/// The readers' samples in the epoch's order.
struct Merger {
    rxs: Vec<Receiver<Msg>>,
    done: Vec<bool>,
    current: usize,
    /// One sample per reader in turn; otherwise a whole shard, then the next reader's.
    interleave: bool,
}

impl Iterator for Merger {
    type Item = Result<RawSample>;
    fn next(&mut self) -> Option<Result<RawSample>> {
        let n = self.rxs.len();
        while !self.done.iter().all(|d| *d) {
            let r = self.current;
            if self.done[r] {
                self.current = (r + 1) % n;
                continue;
            }
            match self.rxs[r].recv() {
                Ok(Msg::Sample(s)) => {
                    if self.interleave {
                        self.current = (r + 1) % n;
                    }
                    return Some(Ok(s));
                }
                Ok(Msg::EndOfShard) => {
                    if !self.interleave {
                        self.current = (r + 1) % n;
                    }
                }
                Ok(Msg::Failed(e)) => return Some(Err(e)),
                Err(_) => {
                    self.done[r] = true;
                    self.current = (r + 1) % n;
                }
            }
        }
        None
    }
}

/// WebDataset's shuffle buffer: hold `size` samples, emit a random one, refill. Each sample is
/// numbered by its arrival position (its RNG seed).
struct ShuffleBuffer<I> {
    inner: I,
    buf: Vec<(u64, RawSample)>,
    size: usize,
    rng: StdRng,
    arrived: u64,
    exhausted: bool,
}

impl<I: Iterator<Item = Result<RawSample>>> Iterator for ShuffleBuffer<I> {
    type Item = Result<(u64, RawSample)>;
    fn next(&mut self) -> Option<Self::Item> {
        while !self.exhausted && self.buf.len() <= self.size {
            match self.inner.next() {
                Some(Ok(s)) => {
                    self.buf.push((self.arrived, s));
                    self.arrived += 1;
                }
                Some(Err(e)) => return Some(Err(e)),
                None => self.exhausted = true,
            }
        }
        if self.buf.is_empty() {
            return None;
        }
        let j = if self.size == 0 { 0 } else { self.rng.random_range(0..self.buf.len()) };
        Some(Ok(if self.size == 0 { self.buf.remove(0) } else { self.buf.swap_remove(j) }))
    }
}

type Job = (usize, Result<Vec<(u64, RawSample)>>);
type Done<T> = (usize, Result<Vec<std::result::Result<T, String>>>);

impl<T: Send + 'static> ShardStream<T> {
    fn rank_total(&self) -> usize {
        self.set.of_rank(self.options.rank, self.options.world_size).iter().map(|&i| self.set.counts[i]).sum()
    }
}

impl<T: Send + 'static> BatchSource for ShardStream<T> {
    type Item = T;

    fn num_batches(&self, _epoch: u64) -> usize {
        // Every rank steps together (each step averages gradients): an epoch is as long as the
        // smallest rank's shards allow.
        let o = &self.options;
        let total =
            |rank: usize| -> usize { self.set.of_rank(rank, o.world_size).iter().map(|&i| self.set.counts[i]).sum() };
        (0..o.world_size.max(1)).map(total).min().unwrap_or(0) / self.batch_size
    }

    fn num_examples(&self) -> usize {
        self.rank_total()
    }

    fn batches(&self, epoch: u64) -> Result<BoxedBatches<'_, T>> {
        let o = &self.options;
        let mut order = self.set.of_rank(o.rank, o.world_size);
        if order.is_empty() {
            bail!("rank {} of {} has no shard ({} shards in all)", o.rank, o.world_size, self.set.shards.len());
        }
        let epoch_seed = mix(self.seed, epoch);
        if o.shuffle {
            order.shuffle(&mut StdRng::seed_from_u64(mix(epoch_seed, 0x5A4D)));
        }
        let readers = o.readers.clamp(1, order.len());
        let mut rxs = Vec::new();
        for r in 0..readers {
            let (tx, rx) = sync_channel::<Msg>(256);
            let mine: Vec<usize> = order.iter().skip(r).step_by(readers).copied().collect();
            let (set, counters) = (self.set.clone(), self.counters.clone());
            std::thread::spawn(move || {
                for s in mine {
                    let path = &set.shards[s];
                    match read_shard(path, s, |sample| tx.send(Msg::Sample(sample)).is_ok()) {
                        Ok(None) => {}
                        Ok(Some(why)) => {
                            eprintln!(
                                "warning: shard {} is damaged ({why}); the samples before it were used",
                                path.display()
                            );
                            counters.add(0, 0, 1);
                        }
                        Err(e) => {
                            let _ = tx.send(Msg::Failed(e));
                            return;
                        }
                    }
                    if tx.send(Msg::EndOfShard).is_err() {
                        return;
                    }
                }
            });
            rxs.push(rx);
        }
        let merged = Merger { done: vec![false; rxs.len()], rxs, current: 0, interleave: o.shuffle };
        let shuffled = ShuffleBuffer {
            inner: merged,
            buf: Vec::new(),
            size: if o.shuffle { o.buffer } else { 0 },
            rng: StdRng::seed_from_u64(mix(epoch_seed, 0xB0FF)),
            arrived: 0,
            exhausted: false,
        };
        // Chunks of one batch of raw samples go to the workers; a chunk may decode to fewer.
        let (job_tx, job_rx) = sync_channel::<Job>(self.workers + self.prefetch);
        let batch = self.batch_size;
        std::thread::spawn(move || {
            let (mut chunk, mut index) = (Vec::with_capacity(batch), 0usize);
            for item in shuffled {
                match item {
                    Ok(s) => {
                        chunk.push(s);
                        if chunk.len() == batch {
                            if job_tx.send((index, Ok(std::mem::take(&mut chunk)))).is_err() {
                                return;
                            }
                            index += 1;
                        }
                    }
                    Err(e) => {
                        let _ = job_tx.send((index, Err(e)));
                        return;
                    }
                }
            }
            if !chunk.is_empty() {
                let _ = job_tx.send((index, Ok(chunk)));
            }
        });
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = sync_channel::<Done<T>>(self.prefetch);
        for _ in 0..self.workers {
            let (job_rx, done_tx, decode, set) =
                (job_rx.clone(), done_tx.clone(), self.decode.clone(), self.set.clone());
            std::thread::spawn(move || loop {
                let job = job_rx.lock().unwrap().recv();
                let Ok((index, chunk)) = job else { return };
                let out = chunk.map(|samples| {
                    samples
                        .iter()
                        .map(|(pos, raw)| {
                            let mut rng = StdRng::seed_from_u64(mix(epoch_seed, *pos));
                            decode(raw, &mut rng).map_err(|e| {
                                format!("shard {}, sample {}: {e:#}", set.shards[raw.shard].display(), raw.key)
                            })
                        })
                        .collect()
                });
                if done_tx.send((index, out)).is_err() {
                    return;
                }
            });
        }
        Ok(Box::new(StreamBatches {
            rx: done_rx,
            pending: BTreeMap::new(),
            next_chunk: 0,
            ready: VecDeque::new(),
            batch,
            seen: 0,
            skipped: 0,
            warned: 0,
            max_skipped_fraction: o.max_skipped_fraction,
            finished: false,
            counters: self.counters.clone(),
        }))
    }
}

/// The epoch's batches, in order; skipped samples are counted.
struct StreamBatches<T> {
    rx: Receiver<Done<T>>,
    pending: BTreeMap<usize, Result<Vec<std::result::Result<T, String>>>>,
    next_chunk: usize,
    ready: VecDeque<T>,
    batch: usize,
    seen: usize,
    skipped: usize,
    warned: usize,
    max_skipped_fraction: f64,
    finished: bool,
    counters: Arc<Counters>,
}

/// Below this many samples the skipped share is judged only at the end of the epoch.
const JUDGE_AFTER: usize = 1000;
const WARN_AT_MOST: usize = 5;

impl<T> StreamBatches<T> {
    fn too_many_skipped(&self) -> Option<anyhow::Error> {
        if self.skipped as f64 > self.max_skipped_fraction * self.seen as f64 {
            return Some(anyhow!(
                "{} of {} samples read this epoch were skipped ({:.1}%), more than max_skipped_fraction {}: \
                 the corpus is badly damaged (`albef data check --config …` lists every bad sample)",
                self.skipped,
                self.seen,
                100.0 * self.skipped as f64 / self.seen.max(1) as f64,
                self.max_skipped_fraction
            ));
        }
        None
    }
}

impl<T> Iterator for StreamBatches<T> {
    type Item = Result<Vec<T>>;
    fn next(&mut self) -> Option<Result<Vec<T>>> {
        loop {
            if self.ready.len() >= self.batch {
                return Some(Ok(self.ready.drain(..self.batch).collect()));
            }
            if self.finished {
                return None;
            }
            while !self.pending.contains_key(&self.next_chunk) {
                match self.rx.recv() {
                    Ok((i, r)) => {
                        self.pending.insert(i, r);
                    }
                    Err(_) => break,
                }
            }
            let Some(chunk) = self.pending.remove(&self.next_chunk) else {
                // Every chunk is in: the epoch is over (a last partial batch is dropped).
                self.finished = true;
                self.counters.add(self.seen, self.skipped, 0);
                if let Some(e) = self.too_many_skipped() {
                    return Some(Err(e));
                }
                return None;
            };
            self.next_chunk += 1;
            match chunk {
                Err(e) => {
                    self.finished = true;
                    return Some(Err(e));
                }
                Ok(items) => {
                    for item in items {
                        self.seen += 1;
                        match item {
                            Ok(t) => self.ready.push_back(t),
                            Err(why) => {
                                self.skipped += 1;
                                if self.warned < WARN_AT_MOST {
                                    eprintln!("warning: skipped {why}");
                                    self.warned += 1;
                                }
                            }
                        }
                    }
                }
            }
            if self.seen >= JUDGE_AFTER {
                if let Some(e) = self.too_many_skipped() {
                    self.finished = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// `albef data shard`: writes the samples as `{000000..}.tar` shards of `per_shard` samples each
/// (members `<key>.<image ext>`, `<key>.txt` for a single caption, `<key>.json` with the caption
/// (string or list) and the source image) plus img2dataset's `<shard>_stats.json`. Images are
/// copied byte for byte. Nothing is written when an image is missing; existing shards are
/// replaced only with `force`.
pub fn write_shards(samples: &[(PathBuf, Vec<String>)], out: &Path, per_shard: usize, force: bool) -> Result<usize> {
    if per_shard == 0 {
        bail!("--samples-per-shard must be at least 1");
    }
    let missing: Vec<String> =
        samples.iter().filter(|(p, _)| !p.is_file()).take(10).map(|(p, _)| p.display().to_string()).collect();
    if !missing.is_empty() {
        bail!("images missing (nothing written): {}", missing.join(", "));
    }
    let n_shards = samples.len().div_ceil(per_shard);
    let name = |i: usize| out.join(format!("{i:06}.tar"));
    if !force {
        if let Some(existing) = (0..n_shards).map(name).find(|p| p.exists()) {
            bail!("{} exists; use --force to replace the shards in {}", existing.display(), out.display());
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let progress = Progress::new("Writing shards", n_shards);
    for (s, chunk) in samples.chunks(per_shard).enumerate() {
        let mut builder = tar::Builder::new(Vec::new());
        for (j, (image, captions)) in chunk.iter().enumerate() {
            let key = format!("{:09}", s * per_shard + j);
            let ext = image.extension().map(|e| e.to_string_lossy().to_lowercase()).unwrap_or_else(|| "jpg".into());
            let bytes = std::fs::read(image).with_context(|| format!("cannot read {}", image.display()))?;
            let caption =
                if captions.len() == 1 { serde_json::json!(captions[0]) } else { serde_json::json!(captions) };
            let meta = serde_json::json!({"key": key, "caption": caption, "image": image.display().to_string()});
            let mut members = vec![(format!("{key}.{ext}"), bytes)];
            if captions.len() == 1 {
                members.push((format!("{key}.txt"), captions[0].clone().into_bytes()));
            }
            members.push((format!("{key}.json"), serde_json::to_vec(&meta)?));
            for (member, data) in members {
                let mut header = tar::Header::new_gnu();
                header.set_size(data.len() as u64);
                header.set_mode(0o644);
                header.set_mtime(0);
                header.set_cksum();
                builder.append_data(&mut header, &member, data.as_slice())?;
            }
        }
        let bytes = builder.into_inner()?;
        crate::util::write_atomic(&name(s), &bytes)?;
        let stats = serde_json::json!({"count": chunk.len(), "successes": chunk.len(), "failed_to_download": 0});
        crate::util::write_atomic(&out.join(format!("{s:06}_stats.json")), serde_json::to_string(&stats)?.as_bytes())?;
        progress.step(s, String::new);
    }
    progress.finish();
    Ok(n_shards)
}

/// `albef data check` over shards: every sample of every shard decoded with `decode`; the
/// problems (shard, key, why) and damaged shards are listed. Returns (samples, problems).
pub fn check_shards<T>(set: &ShardSet, decode: &Decode<T>) -> (usize, Vec<String>, Vec<String>) {
    let progress = Progress::new("Checking shards", set.shards.len());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<(usize, Vec<String>, Vec<String>)> = set
        .shards
        .par_iter()
        .enumerate()
        .map(|(i, path)| {
            let (mut n, mut bad, mut damaged) = (0, Vec::new(), Vec::new());
            let mut rng = StdRng::seed_from_u64(0);
            let r = read_shard(path, i, |s| {
                n += 1;
                if let Err(e) = decode(&s, &mut rng) {
                    bad.push(format!("shard {}, sample {}: {e:#}", path.display(), s.key));
                }
                true
            });
            match r {
                Ok(None) => {}
                Ok(Some(why)) => damaged.push(format!("{} ({why})", path.display())),
                Err(e) => damaged.push(format!("{e:#}")),
            }
            progress.step(done.fetch_add(1, std::sync::atomic::Ordering::Relaxed), String::new);
            (n, bad, damaged)
        })
        .collect();
    progress.finish();
    let mut out = (0, Vec::new(), Vec::new());
    for (n, bad, damaged) in results {
        out.0 += n;
        out.1.extend(bad);
        out.2.extend(damaged);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces() {
        assert_eq!(expand_braces("d/{000..002}.tar").unwrap(), ["d/000.tar", "d/001.tar", "d/002.tar"]);
        assert_eq!(
            expand_braces("{a,b}/{8..10}.tar").unwrap(),
            ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
        );
        assert_eq!(expand_braces("plain.tar").unwrap(), ["plain.tar"]);
        assert!(expand_braces("d/{3..1}.tar").is_err());
        assert!(expand_braces("d/{1..2.tar").is_err());
    }

    #[test]
    fn keys_split_at_the_first_dot_of_the_base_name() {
        assert_eq!(split_key("000000012.jpg"), Some(("000000012", "jpg")));
        assert_eq!(split_key("a.b/c.seg.png"), Some(("a.b/c", "seg.png")));
        assert_eq!(split_key("README"), None);
    }
}
