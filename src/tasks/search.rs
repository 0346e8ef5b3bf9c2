//! `albef index` and `albef search`: a folder of photos encoded once into a SQLite index of
//! normalised ITC image features, then searched by text (or by image), optionally re-ranked by
//! the ITM head as `Retrieval.py` does.
//!
//! The index holds one row per image (path, size, mtime, content hash, feature) and the
//! identity of the checkpoint and config that made the features; a query with another
//! checkpoint is refused. Rows are committed one batch per transaction, so a killed run loses at
//! most the batch in flight and the next run continues from there.

use super::retrieval::{EVAL_TEXT_LEN, TEXT_MAX_WORDS};
use super::{load_checkpoint, TeacherInit};
use crate::config::model_config_from_file;
use crate::data::text::pre_caption;
use crate::data::transform::{eval_transform_host, RgbImage};
use crate::data::{image_batch, Padding, Tokenizer};
use crate::model::{ContrastiveModel, Objective};
use crate::progress::Progress;
use crate::task::Task;
use anyhow::{bail, Context, Result};
use candle_core::{Device, IndexOp, Tensor};
use rayon::prelude::*;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

/// The schema version written in `meta`; an index of another version is refused.
const SCHEMA: &str = "1";

/// The model an index is made with: files and the device to run on.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    pub checkpoint: PathBuf,
    /// A task YAML that sizes the model (the retrieval config it was trained with).
    pub config: PathBuf,
    /// Local `bert-base-uncased` folder or vocab file.
    pub text_encoder: PathBuf,
    pub device: Device,
}

/// A loaded retrieval model for encoding images and queries.
pub struct Encoder {
    pub model: ContrastiveModel,
    pub tokenizer: Tokenizer,
    pub res: usize,
    /// `checkpoint_identity` of the loaded checkpoint.
    pub identity: String,
}

/// Size, and a SHA-256 of the size and the first and last MiB: tells checkpoint files apart
/// without reading gigabytes.
pub fn checkpoint_identity(path: &Path) -> Result<String> {
    const MIB: u64 = 1 << 20;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; MIB.min(len) as usize];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    if len > MIB {
        let start = len.saturating_sub(MIB).max(MIB);
        f.seek(SeekFrom::Start(start))?;
        let mut tail = Vec::new();
        f.read_to_end(&mut tail)?;
        h.update(&tail);
    }
    Ok(format!("{len}:{:x}", h.finalize()))
}

impl Encoder {
    pub fn load(files: &ModelFiles) -> Result<Self> {
        let mut cfg = model_config_from_file(&files.config)?;
        let tokenizer = Tokenizer::from_path(&files.text_encoder)?;
        if tokenizer.vocab_size() != cfg.bert.vocab_size {
            bail!(
                "the tokenizer in {} has {} tokens but {} says vocab_size {}",
                files.text_encoder.display(),
                tokenizer.vocab_size(),
                files.config.display(),
                cfg.bert.vocab_size
            );
        }
        // Evaluation only: no teacher, no autograd graph (as `--evaluate`).
        cfg.mode.inference = true;
        let model = ContrastiveModel::new(&cfg, Objective::Retrieval, &files.device, 0)?;
        load_checkpoint(&model, Task::Retrieval, &files.checkpoint, true, TeacherInit::FromLoaded)?;
        let identity = checkpoint_identity(&files.checkpoint)?;
        Ok(Self { res: cfg.vision.image_res, model, tokenizer, identity })
    }

    fn device(&self) -> Device {
        self.model.store.device().clone()
    }

    /// Image states and normalised ITC features of transformed images.
    fn encode_images(&self, images: &[Vec<f32>]) -> Result<(Tensor, Tensor)> {
        let batch = image_batch(images.iter().map(Vec::as_slice), self.res, &self.device())?;
        Ok(self.model.encode_image(&batch)?)
    }

    /// Text states, mask and normalised ITC feature of a query, prepared as the retrieval
    /// evaluation prepares captions (`pre_caption`, padded to 30 tokens).
    fn encode_query(&self, text: &str) -> Result<(Tensor, Tensor, Vec<f32>)> {
        let caption = pre_caption(text, TEXT_MAX_WORDS);
        let (ids, mask) =
            self.tokenizer.encode_batch(&[caption], Padding::MaxLength(EVAL_TEXT_LEN)).to_tensors(&self.device())?;
        let (states, feat) = self.model.encode_text(&ids, &mask)?;
        Ok((states, mask, feat.i(0)?.to_vec1::<f32>()?))
    }

    /// Normalised ITC features of texts, prepared as [`Encoder::encode_query`] prepares a query.
    fn encode_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(64) {
            let captions: Vec<String> = chunk.iter().map(|t| pre_caption(t, TEXT_MAX_WORDS)).collect();
            let (ids, mask) =
                self.tokenizer.encode_batch(&captions, Padding::MaxLength(EVAL_TEXT_LEN)).to_tensors(&self.device())?;
            out.extend(self.model.encode_text(&ids, &mask)?.1.to_vec2::<f32>()?);
        }
        Ok(out)
    }
}

/// A text → text result: a line of the texts searched.
#[derive(Clone, Debug, Serialize)]
pub struct TextHit {
    pub rank: usize,
    /// 1-based position in the list searched.
    pub line: usize,
    pub text: String,
    /// Cosine of the ITC text features.
    pub score: f32,
}

/// Reads the texts of `albef search --texts`: a JSON list of strings, or one text per line
/// (blank lines skipped, their numbers kept).
pub fn read_texts(path: &Path) -> Result<Vec<(usize, String)>> {
    let raw = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    if raw.trim_start().starts_with('[') {
        let list: Vec<String> = serde_json::from_str(&raw)
            .with_context(|| format!("{}: expected a JSON list of strings", path.display()))?;
        return Ok(list.into_iter().enumerate().map(|(i, t)| (i + 1, t)).collect());
    }
    Ok(raw.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).map(|(i, l)| (i + 1, l.to_string())).collect())
}

fn is_image(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        let e = e.to_ascii_lowercase();
        e == "jpg" || e == "jpeg" || e == "png"
    })
}

fn mtime_ns(meta: &std::fs::Metadata) -> i64 {
    meta.modified().ok().and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos() as i64)
}

fn file_hash(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

fn to_blob(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn from_blob(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Opens (creating) the index database.
fn open_db(path: &Path) -> Result<Connection> {
    let db = Connection::open(path).with_context(|| format!("cannot open index {}", path.display()))?;
    // WAL: a killed writer leaves the last committed batch readable and the rest rolled back.
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.pragma_update(None, "synchronous", "NORMAL")?;
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
         CREATE TABLE IF NOT EXISTS images (path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
             hash TEXT NOT NULL, dim INTEGER NOT NULL, feature BLOB NOT NULL);",
    )
    .with_context(|| format!("{} is not an albef index", path.display()))?;
    Ok(db)
}

fn meta(db: &Connection, key: &str) -> Result<Option<String>> {
    Ok(db.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0)).optional()?)
}

/// The model files and checkpoint identity an index was built with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexMeta {
    pub checkpoint: PathBuf,
    pub config: PathBuf,
    pub text_encoder: PathBuf,
    pub identity: String,
}

fn read_meta(db: &Connection, index: &Path) -> Result<Option<IndexMeta>> {
    let Some(identity) = meta(db, "checkpoint_identity")? else { return Ok(None) };
    let schema = meta(db, "schema")?.unwrap_or_default();
    if schema != SCHEMA {
        bail!("{}: index schema {schema:?}, this albef reads {SCHEMA:?}; rebuild it", index.display());
    }
    let get = |k: &str| -> Result<PathBuf> {
        Ok(PathBuf::from(meta(db, k)?.with_context(|| format!("{}: meta lacks {k}", index.display()))?))
    };
    Ok(Some(IndexMeta {
        checkpoint: get("checkpoint")?,
        config: get("config")?,
        text_encoder: get("text_encoder")?,
        identity,
    }))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::fs::canonicalize(p).with_context(|| format!("{} does not exist", p.display()))
}

/// What an `albef index` run did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct IndexSummary {
    /// Images in the index after the run (under every folder indexed into it).
    pub total: usize,
    pub encoded: usize,
    pub unchanged: usize,
    /// Rows whose file changed in size or time but not in content (only the row's stat updated).
    pub touched: usize,
    pub removed: usize,
    /// Images that could not be read or decoded, with the reason; not in the index.
    pub failed: Vec<(String, String)>,
    pub seconds: f64,
}

/// A file read for indexing: its content hash, and its transformed pixels unless its content is
/// already indexed.
type Prepared = (String, Option<Vec<f32>>);

/// Options of `albef index`.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    pub model: ModelFiles,
    pub images: PathBuf,
    pub index: PathBuf,
    /// Images per batch (and per transaction).
    pub batch_size: usize,
}

/// Builds or updates the index of every JPEG / PNG under `images`.
pub fn index(opts: &IndexOptions) -> Result<IndexSummary> {
    let start = std::time::Instant::now();
    let root = absolute(&opts.images)?;
    if !root.is_dir() {
        bail!("--images {} is not a folder", opts.images.display());
    }
    let db = open_db(&opts.index)?;
    let identity = checkpoint_identity(&opts.model.checkpoint)?;
    if let Some(m) = read_meta(&db, &opts.index)? {
        if m.identity != identity {
            bail!(
                "{} was built with checkpoint {} (identity {}); {} is another checkpoint: index into a new --index",
                opts.index.display(),
                m.checkpoint.display(),
                m.identity,
                opts.model.checkpoint.display()
            );
        }
    }
    let encoder = Encoder::load(&opts.model)?;
    {
        let abs = |p: &Path| absolute(p).map(|p| p.display().to_string());
        let tx = db.unchecked_transaction()?;
        for (k, v) in [
            ("schema", SCHEMA.to_string()),
            ("checkpoint_identity", identity.clone()),
            ("checkpoint", abs(&opts.model.checkpoint)?),
            ("config", abs(&opts.model.config)?),
            ("text_encoder", abs(&opts.model.text_encoder)?),
        ] {
            tx.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)", params![k, v])?;
        }
        tx.commit()?;
    }

    // What is there now, sorted so that runs (and their batches) are reproducible.
    let mut found = BTreeMap::new();
    for entry in walkdir::WalkDir::new(&root).follow_links(true).sort_by_file_name() {
        let entry = entry.with_context(|| format!("cannot walk {}", root.display()))?;
        if entry.file_type().is_file() && is_image(entry.path()) {
            let meta = entry.metadata()?;
            found.insert(entry.path().display().to_string(), (meta.len() as i64, mtime_ns(&meta)));
        }
    }
    let mut known: BTreeMap<String, (i64, i64, String)> = BTreeMap::new();
    {
        let mut st = db.prepare("SELECT path, size, mtime_ns, hash FROM images")?;
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, (r.get(1)?, r.get(2)?, r.get(3)?))))? {
            let (p, v) = row?;
            known.insert(p, v);
        }
    }
    let mut summary = IndexSummary::default();
    // Deleted files (under this folder only: an index may hold several).
    let prefix = format!("{}{}", root.display(), std::path::MAIN_SEPARATOR);
    let gone: Vec<&String> = known.keys().filter(|p| p.starts_with(&prefix) && !found.contains_key(*p)).collect();
    {
        let tx = db.unchecked_transaction()?;
        for p in &gone {
            tx.execute("DELETE FROM images WHERE path = ?1", [p])?;
        }
        tx.commit()?;
    }
    summary.removed = gone.len();

    let mut todo = Vec::new();
    for (path, &(size, mtime)) in &found {
        match known.get(path) {
            Some(&(s, m, _)) if s == size && m == mtime => summary.unchanged += 1,
            _ => todo.push((path.clone(), size, mtime)),
        }
    }
    let res = encoder.res;
    let progress = Progress::new("Indexing images", todo.len().div_ceil(opts.batch_size.max(1)));
    for (bi, batch) in todo.chunks(opts.batch_size.max(1)).enumerate() {
        // Read, hash and transform in parallel; a file that fails is listed, not fatal.
        let prepared: Vec<(usize, Result<Prepared>)> = batch
            .par_iter()
            .enumerate()
            .map(|(i, (path, _, _))| {
                let p = Path::new(path);
                let r = (|| {
                    let hash = file_hash(p)?;
                    if known.get(path).is_some_and(|k| k.2 == hash) {
                        return Ok((hash, None));
                    }
                    let bytes = std::fs::read(p)?;
                    let img = RgbImage::decode(&bytes, path)?;
                    Ok((hash, Some(eval_transform_host(&img, res))))
                })();
                (i, r)
            })
            .collect();
        let mut pixels = Vec::new();
        let mut rows = Vec::new();
        let tx = db.unchecked_transaction()?;
        for (i, r) in prepared {
            let (path, size, mtime) = &batch[i];
            match r {
                Ok((_, None)) => {
                    tx.execute(
                        "UPDATE images SET size = ?2, mtime_ns = ?3 WHERE path = ?1",
                        params![path, size, mtime],
                    )?;
                    summary.touched += 1;
                }
                Ok((hash, Some(px))) => {
                    pixels.push(px);
                    rows.push((path, size, mtime, hash));
                }
                Err(e) => {
                    // A changed file that no longer decodes leaves the index.
                    tx.execute("DELETE FROM images WHERE path = ?1", [path])?;
                    summary.failed.push((path.clone(), format!("{e:#}")));
                }
            }
        }
        if !pixels.is_empty() {
            let (_, feats) = encoder.encode_images(&pixels)?;
            let feats = feats.to_vec2::<f32>()?;
            for ((path, size, mtime, hash), f) in rows.iter().zip(&feats) {
                tx.execute(
                    "INSERT OR REPLACE INTO images (path, size, mtime_ns, hash, dim, feature) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![path, size, mtime, hash, f.len() as i64, to_blob(f)],
                )?;
            }
            summary.encoded += rows.len();
        }
        tx.commit().with_context(|| format!("cannot write {}", opts.index.display()))?;
        progress.step(bi, || format!("{} encoded", summary.encoded));
    }
    progress.finish();
    summary.total = db.query_row("SELECT COUNT(*) FROM images", [], |r| r.get::<_, i64>(0))? as usize;
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

/// An index read for searching: the paths and the (N, E) feature matrix, row-major.
pub struct Index {
    pub meta: IndexMeta,
    pub paths: Vec<String>,
    pub dim: usize,
    pub features: Vec<f32>,
}

impl Index {
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_file() {
            bail!("no index at {} (build one with `albef index`)", path.display());
        }
        let db = open_db(path)?;
        let meta =
            read_meta(&db, path)?.with_context(|| format!("{} is empty: run `albef index` first", path.display()))?;
        let mut st = db.prepare("SELECT path, dim, feature FROM images ORDER BY path")?;
        let (mut paths, mut features, mut dim) = (Vec::new(), Vec::new(), 0usize);
        for row in st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, Vec<u8>>(2)?)))? {
            let (p, d, blob) = row?;
            if dim != 0 && d as usize != dim || blob.len() != 4 * d as usize {
                bail!("{}: the row of {p} has a feature of another size", path.display());
            }
            dim = d as usize;
            paths.push(p);
            features.extend(from_blob(&blob));
        }
        Ok(Self { meta, paths, dim, features })
    }

    /// Cosine scores of a normalised query against every row (the features are normalised).
    pub fn scores(&self, query: &[f32]) -> Vec<f32> {
        if self.dim == 0 {
            return Vec::new();
        }
        self.features.par_chunks(self.dim).map(|row| row.iter().zip(query).map(|(a, b)| a * b).sum()).collect()
    }
}

/// The `k` best rows, best first (ties by row order).
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    let k = k.min(order.len());
    let cmp = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
    if k < order.len() && k > 0 {
        order.select_nth_unstable_by(k - 1, cmp);
        order.truncate(k);
    }
    order.sort_by(cmp);
    order.truncate(k);
    order
}

/// A row of the index as a point of the HNSW graph: unit vectors, so 1 − cosine orders them as
/// the exact scan's cosine does.
#[derive(Clone)]
struct UnitVector(Vec<f32>);

impl instant_distance::Point for UnitVector {
    fn distance(&self, other: &Self) -> f32 {
        1.0 - self.0.iter().zip(&other.0).map(|(a, b)| a * b).sum::<f32>()
    }
}

/// An approximate nearest-neighbour index (HNSW, `instant-distance`) over an index's features,
/// built in memory when opened with `--ann`.
pub struct Ann {
    map: instant_distance::HnswMap<UnitVector, usize>,
    /// Candidates kept per search (HNSW's `ef`); at most this many results.
    pub ef: usize,
}

impl Ann {
    /// Builds the graph over the rows of the row-major (N, `dim`) `features`, keeping `ef`
    /// candidates per search (at least 100, the crate's default: recall falls quickly below it).
    /// Seeded: the same features give the same graph.
    pub fn build(features: &[f32], dim: usize, ef: usize) -> Self {
        let ef = ef.max(100);
        let points: Vec<UnitVector> = features.chunks(dim.max(1)).map(|r| UnitVector(r.to_vec())).collect();
        let rows: Vec<usize> = (0..points.len()).collect();
        let map = instant_distance::Builder::default().ef_construction(ef).ef_search(ef).seed(0).build(points, rows);
        Self { map, ef }
    }

    /// The rows of (about) the `k` nearest to the unit vector `query`, nearest first.
    pub fn top_k(&self, query: &[f32], k: usize) -> Vec<usize> {
        let mut search = instant_distance::Search::default();
        self.map.search(&UnitVector(query.to_vec()), &mut search).take(k).map(|item| *item.value).collect()
    }
}

/// A search result.
#[derive(Clone, Debug, Serialize)]
pub struct Hit {
    pub rank: usize,
    /// The image's row in [`Index::paths`] (its id in `albef serve`).
    #[serde(skip)]
    pub row: usize,
    pub path: String,
    /// The ranking score: the ITM logit for re-ranked hits, else the ITC cosine.
    pub score: f32,
    pub itc: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm: Option<f32>,
}

/// A query: text or an image.
#[derive(Clone, Debug)]
pub enum Query {
    Text(String),
    Image(PathBuf),
}

#[derive(Clone, Debug)]
pub struct SearchOptions {
    pub index: PathBuf,
    /// In place of the index's checkpoint (must be the same file content).
    pub checkpoint: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub text_encoder: Option<PathBuf>,
    pub device: Device,
    pub top: usize,
    /// Re-rank the ITC top-K by the ITM head (text queries).
    pub rerank: Option<usize>,
}

/// An open index with its model, for many queries.
pub struct Searcher {
    pub index: Index,
    pub encoder: Encoder,
    /// Approximate search in place of the exact scan ([`Searcher::build_ann`]).
    pub ann: Option<Ann>,
}

impl Searcher {
    pub fn open(opts: &SearchOptions) -> Result<Self> {
        let index = Index::open(&opts.index)?;
        let m = &index.meta;
        let checkpoint = opts.checkpoint.clone().unwrap_or_else(|| m.checkpoint.clone());
        let identity = checkpoint_identity(&checkpoint)?;
        if identity != m.identity {
            bail!(
                "{} was built with checkpoint {} (identity {}), but {} is another (identity {identity}): \
                 query with the index's checkpoint or rebuild the index",
                opts.index.display(),
                m.checkpoint.display(),
                m.identity,
                checkpoint.display()
            );
        }
        let files = ModelFiles {
            checkpoint,
            config: opts.config.clone().unwrap_or_else(|| m.config.clone()),
            text_encoder: opts.text_encoder.clone().unwrap_or_else(|| m.text_encoder.clone()),
            device: opts.device.clone(),
        };
        let encoder = Encoder::load(&files)?;
        Ok(Self { index, encoder, ann: None })
    }

    /// Searches approximately from now on: builds an HNSW graph over the index's features, for
    /// queries of up to `max_results` results (top and re-rank).
    pub fn build_ann(&mut self, max_results: usize) {
        let n = self.index.paths.len();
        eprintln!("building the approximate nearest-neighbour graph over {n} vectors");
        let start = std::time::Instant::now();
        self.ann = Some(Ann::build(&self.index.features, self.index.dim, max_results));
        eprintln!("built in {:.1}s", start.elapsed().as_secs_f64());
    }

    pub fn search(&self, query: &Query, top: usize, rerank: Option<usize>) -> Result<Vec<Hit>> {
        let (feat, text) = match query {
            Query::Text(t) => {
                if t.trim().is_empty() {
                    bail!("the query is empty");
                }
                let (states, mask, feat) = self.encoder.encode_query(t)?;
                (feat, Some((states, mask)))
            }
            Query::Image(p) => {
                let img = RgbImage::open(p)?;
                let (_, feat) = self.encoder.encode_images(&[eval_transform_host(&img, self.encoder.res)])?;
                (feat.i(0)?.to_vec1::<f32>()?, None)
            }
        };
        let k = rerank.unwrap_or(0);
        let (order, itc) = match &self.ann {
            None => {
                let itc = self.index.scores(&feat);
                (top_k(&itc, top.max(k)), itc)
            }
            Some(ann) => {
                if top.max(k) > ann.ef {
                    bail!("--ann keeps {} candidates: ask for at most that many results", ann.ef);
                }
                let order = ann.top_k(&feat, top.max(k));
                // Only the found rows' cosines (the rest are never read).
                let mut itc = vec![f32::NAN; self.index.paths.len()];
                let d = self.index.dim;
                for &i in &order {
                    itc[i] = self.index.features[i * d..(i + 1) * d].iter().zip(&feat).map(|(a, b)| a * b).sum();
                }
                (order, itc)
            }
        };
        let mut hits: Vec<Hit> = order
            .iter()
            .map(|&i| Hit { rank: 0, row: i, path: self.index.paths[i].clone(), score: itc[i], itc: itc[i], itm: None })
            .collect();
        if k > 0 {
            let Some((states, mask)) = text else {
                bail!("--rerank needs a text query (the ITM head scores text-image pairs)")
            };
            let k = k.min(hits.len());
            let itm = self.itm(&states, &mask, &hits[..k])?;
            for (h, s) in hits.iter_mut().zip(itm) {
                h.itm = Some(s);
                h.score = s;
            }
            // As Retrieval.py's t2i: the top-k by ITC re-ordered by the ITM logit; the rest after them.
            hits[..k].sort_by(|a, b| b.score.total_cmp(&a.score));
        }
        hits.truncate(top);
        for (r, h) in hits.iter_mut().enumerate() {
            h.rank = r + 1;
        }
        Ok(hits)
    }

    /// Text → text: `texts` (line number, text) ranked by the cosine of their ITC text features
    /// with the query's.
    pub fn search_texts(&self, query: &str, texts: &[(usize, String)], top: usize) -> Result<Vec<TextHit>> {
        if query.trim().is_empty() {
            bail!("the query is empty");
        }
        let (_, _, q) = self.encoder.encode_query(query)?;
        let owned: Vec<String> = texts.iter().map(|(_, t)| t.clone()).collect();
        let feats = self.encoder.encode_texts(&owned)?;
        let scores: Vec<f32> = feats.iter().map(|f| f.iter().zip(&q).map(|(a, b)| a * b).sum()).collect();
        Ok(top_k(&scores, top)
            .into_iter()
            .enumerate()
            .map(|(r, i)| TextHit { rank: r + 1, line: texts[i].0, text: texts[i].1.clone(), score: scores[i] })
            .collect())
    }

    /// ITM class-1 logits of the query against the hits' images (re-read from their files).
    fn itm(&self, states: &Tensor, mask: &Tensor, hits: &[Hit]) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(hits.len());
        for chunk in hits.chunks(16) {
            let res = self.encoder.res;
            let pixels = chunk
                .par_iter()
                .map(|h| Ok(eval_transform_host(&RgbImage::open(Path::new(&h.path))?, res)))
                .collect::<Result<Vec<_>>>()?;
            let (image_states, _) = self.encoder.encode_images(&pixels)?;
            let n = chunk.len();
            let (l, d) = (states.dim(1)?, states.dim(2)?);
            let text = states.broadcast_as((n, l, d))?.contiguous()?;
            let m = mask.broadcast_as((n, l))?.contiguous()?;
            let fused = self.encoder.model.fuse(&text, &m, &image_states)?;
            out.extend(self.encoder.model.itm_logits(&fused)?.i((.., 1))?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Paths and features of an index, for comparing two indexes (tests) or exporting.
pub fn dump(path: &Path) -> Result<Vec<(String, String, Vec<f32>)>> {
    let db = open_db(path)?;
    let mut st = db.prepare("SELECT path, hash, feature FROM images ORDER BY path")?;
    let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?, from_blob(&r.get::<_, Vec<u8>>(2)?))))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_and_breaks_ties_by_row() {
        let s = [0.1, 0.9, 0.5, 0.9, -1.0];
        assert_eq!(top_k(&s, 3), [1, 3, 2]);
        assert_eq!(top_k(&s, 10), [1, 3, 2, 0, 4]);
        assert!(top_k(&s, 0).is_empty());
    }

    #[test]
    fn blobs_round_trip() {
        let v = [1.5f32, -0.25, f32::MIN_POSITIVE];
        assert_eq!(from_blob(&to_blob(&v)), v);
    }
}
