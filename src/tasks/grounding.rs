//! Weakly-supervised grounding on RefCOCO+ (`Grounding.py`): fine-tune the retrieval model with
//! ITC + ITM on the training expressions, evaluate by ranking MAttNet proposals with a Grad-CAM
//! map (`val` + `grounding_eval`); `checkpoint_best` by `val_d`.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::RunOptions;
use crate::config::GroundingKeys;
use crate::data::grounding::{check_coverage, find_refer, Dets, GroundingEval, GroundingTrain, Refer};
use crate::data::loader::{epoch_batches, Dataset, Loader, LoaderConfig};
use crate::data::retrieval::{ImageRef, TrainSample};
use crate::data::{image_batch, Padding};
use crate::dist::comm::merge_by_index;
use crate::eval::grounding::{
    attention_and_gradient, choose_box, compute_iou, gradcam_maps, upsample, Chooser, GradcamMode,
};
use crate::model::{ContrastiveModel, ModelConfig, Objective};
use crate::progress::Progress;
use crate::task::Task;
use crate::train::Losses;
use crate::util::Metrics;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// The reference's splits, in its metric order.
pub const SPLITS: [&str; 3] = ["val", "testA", "testB"];

/// `--gradcam_mode`, `--block_num`, `--save-maps`.
#[derive(Clone, Copy, Debug)]
pub struct GradcamSettings {
    pub mode: GradcamMode,
    /// BERT layer (`itm`) or ViT block (`itc`); the reference's default is 8.
    pub block_num: usize,
    /// Also write `gradcam.safetensors`.
    pub save_maps: bool,
}

impl Default for GradcamSettings {
    fn default() -> Self {
        Self { mode: GradcamMode::Itm, block_num: 8, save_maps: false }
    }
}

/// Everything `albef grounding` takes.
#[derive(Clone, Debug)]
pub struct GroundingOptions {
    pub run: RunOptions,
    pub gradcam: GradcamSettings,
}

pub fn run(opts: &GroundingOptions) -> Result<Value> {
    harness::run::<Grounding>(&opts.run, opts.gradcam)
}

/// One expression's outcome (`predictions.json`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Prediction {
    pub ref_id: i64,
    pub split: String,
    pub text: String,
    /// [x, y, w, h] of the chosen proposal; `null` when none scored above 0 and no earlier
    /// expression left one (see [`Chooser`]).
    pub chosen_box: Option<[f64; 4]>,
    pub iou: f64,
    pub correct: bool,
}

/// A full evaluation: predictions, the maps (N × grid) in loader order, and the accuracies.
pub struct Evaluation {
    pub predictions: Vec<Prediction>,
    pub maps: Vec<f32>,
    pub grid: (usize, usize),
    /// Per split: (expressions, correct).
    pub counts: Vec<(&'static str, usize, usize)>,
}

impl Evaluation {
    /// `val_d`, `testA_d`, `testB_d` as fractions (splits without expressions left out).
    pub fn metrics(&self) -> Metrics {
        self.counts.iter().filter(|c| c.1 > 0).map(|&(s, n, k)| (format!("{s}_d"), k as f64 / n as f64)).collect()
    }

    /// `metrics.json`: the fractions (`null` for a split without expressions, where the
    /// reference divides by zero) plus per-split `n` and `n_correct`.
    pub fn metrics_json(&self) -> Value {
        let mut out = serde_json::Map::new();
        for &(s, n, k) in &self.counts {
            out.insert(format!("{s}_d"), if n > 0 { json!(k as f64 / n as f64) } else { Value::Null });
        }
        out.insert("n".into(), self.counts.iter().map(|&(s, n, _)| (s.to_string(), json!(n))).collect());
        out.insert("n_correct".into(), self.counts.iter().map(|&(s, _, k)| (s.to_string(), json!(k))).collect());
        Value::Object(out)
    }
}

pub struct Grounding {
    settings: GradcamSettings,
    train: Option<Arc<GroundingTrain>>,
    test: Arc<GroundingEval>,
    refer: Refer,
    dets: Dets,
    batch: usize,
}

impl Grounding {
    /// Grad-CAM maps of every evaluation expression, batch by batch as the reference's test
    /// loader (`batch_size`, no shuffle), then proposal ranking and IoU.
    pub fn evaluate(&self, ctx: &Ctx<ContrastiveModel>) -> Result<Evaluation> {
        let model = ctx.model;
        let dev = model.store.device().clone();
        let v = &model.cfg.vision;
        // The grid comes from the model (the reference hard-codes 24 = 384 / 16).
        let grid = (v.image_res / v.patch_size, v.image_res / v.patch_size);
        // Several ranks: each maps its shard of the expressions (a padded DistributedSampler, as
        // the reference) and the maps are merged in expression order.
        let (rank, world) = ctx.dist().map_or((0, 1), |c| (c.rank(), c.world_size()));
        let cfg = LoaderConfig::eval(self.batch).workers(ctx.workers).shard(rank, world);
        let order = epoch_batches(self.test.len(), &cfg, 0).concat();
        let loader = Loader::new(self.test.clone(), cfg);
        let progress = Progress::new("Evaluation:", loader.num_batches(0));
        let cells = grid.0 * grid.1;
        // (expression index, its map's f32 bits: exact through the merge).
        let mut local: Vec<(usize, Vec<u32>)> = Vec::with_capacity(order.len());
        for (i, batch) in loader.epoch(0, 0).enumerate() {
            let batch = batch?;
            let n = batch.len();
            let images = image_batch(batch.iter().map(Vec::as_slice), v.image_res, &dev)?;
            let texts: Vec<&str> =
                order[local.len()..local.len() + n].iter().map(|&e| self.test.expressions[e].text.as_str()).collect();
            // `tokenizer(text, padding='longest')`: no truncation in evaluation.
            let (ids, mask) =
                ctx.tokenizer.encode_batch(&texts, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
            let attn =
                attention_and_gradient(model, &images, &ids, &mask, self.settings.mode, self.settings.block_num)?;
            let m = gradcam_maps(&attn, &mask, self.settings.mode)?;
            if m.dim(1)? != cells {
                bail!("the attention has {} image cells, the {}x{} grid wants {}", m.dim(1)?, grid.0, grid.1, cells);
            }
            let flat = m.flatten_all()?.to_vec1::<f32>()?;
            for map in flat.chunks(cells) {
                local.push((order[local.len()], map.iter().map(|x| x.to_bits()).collect()));
            }
            progress.step(i, String::new);
        }
        progress.finish();
        let merged = match ctx.dist() {
            Some(comm) => merge_by_index(comm, local, self.test.len())?,
            None => local.into_iter().map(|(_, m)| m).collect(),
        };
        let maps: Vec<f32> = merged.into_iter().flatten().map(f32::from_bits).collect();
        Ok(self.score(maps, grid))
    }

    /// `grounding_eval` on maps (N × grid) in expression order.
    pub fn score(&self, maps: Vec<f32>, grid: (usize, usize)) -> Evaluation {
        let cells = grid.0 * grid.1;
        let exprs = &self.test.expressions;
        // Checked at set-up: every ref is known and its image has proposals.
        let picks: Vec<Option<[f64; 4]>> = exprs
            .par_iter()
            .enumerate()
            .map(|(i, e)| {
                let r = &self.refer.refs[&e.ref_id];
                let dets = self.dets.get(r.image_id).expect("proposals checked at set-up");
                let up = upsample(&maps[i * cells..(i + 1) * cells], grid.0, grid.1, r.height, r.width);
                choose_box(&up, r.height, r.width, dets).map(|j| dets[j])
            })
            .collect();
        let mut chooser = Chooser::default();
        let mut counts: Vec<(&'static str, usize, usize)> = SPLITS.iter().map(|&s| (s, 0, 0)).collect();
        let mut predictions = Vec::with_capacity(exprs.len());
        for (e, pick) in exprs.iter().zip(picks) {
            let r = &self.refer.refs[&e.ref_id];
            let chosen = chooser.next(pick);
            let iou = chosen.map_or(0.0, |b| compute_iou(&r.bbox, &b));
            let correct = chosen.is_some() && iou >= 0.5;
            if let Some(c) = counts.iter_mut().find(|c| c.0 == r.split) {
                c.1 += 1;
                c.2 += correct as usize;
            }
            predictions.push(Prediction {
                ref_id: e.ref_id,
                split: r.split.clone(),
                text: e.text.clone(),
                chosen_box: chosen,
                iou,
                correct,
            });
        }
        Evaluation { predictions, maps, grid, counts }
    }

    fn write_outputs(&self, ctx: &Ctx<ContrastiveModel>, eval: &Evaluation) -> Result<()> {
        ctx.run.write_json("predictions.json", &serde_json::to_value(&eval.predictions)?)?;
        if self.settings.save_maps {
            let n = eval.predictions.len();
            let mut sd = crate::checkpoint::StateDict::new();
            sd.insert("maps".into(), Tensor::from_vec(eval.maps.clone(), (n, eval.grid.0, eval.grid.1), &Device::Cpu)?);
            let ids: Vec<i64> = eval.predictions.iter().map(|p| p.ref_id).collect();
            sd.insert("ref_ids".into(), Tensor::from_vec(ids, n, &Device::Cpu)?);
            let meta = [
                ("gradcam_mode".to_string(), format!("{:?}", self.settings.mode).to_lowercase()),
                ("block_num".to_string(), self.settings.block_num.to_string()),
            ]
            .into_iter()
            .collect();
            if ctx.run.is_primary() {
                crate::checkpoint::save_safetensors(&sd, &meta, &ctx.run.file("gradcam.safetensors"))?;
            }
        }
        Ok(())
    }
}

fn print(m: &Metrics) {
    for (k, v) in m {
        eprintln!("{k}: {v:.3}");
    }
}

impl TaskSpec for Grounding {
    const TASK: Task = Task::Grounding;
    const SELECT: Option<&'static str> = Some("val_d");
    // The reference logs `val_d`, `testA_d`, `testB_d` as they are.
    const VAL_LOG_PREFIX: &'static str = "";
    type Keys = GroundingKeys;
    type Options = GradcamSettings;
    type Model = ContrastiveModel;
    type Train = GroundingTrain;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<ContrastiveModel> {
        Ok(ContrastiveModel::new(cfg, Objective::Retrieval, device, seed)?)
    }

    fn new(settings: GradcamSettings, s: &Setup<GroundingKeys>) -> Result<Self> {
        let (data, m) = (&s.cfg.data, s.model_cfg);
        let block = settings.block_num;
        match settings.mode {
            GradcamMode::Itm if block < m.bert.fusion_layer || block >= m.bert.num_hidden_layers => bail!(
                "--block_num {block}: in itm mode it names a BERT layer with cross-attention, {}..={} for this model",
                m.bert.fusion_layer,
                m.bert.num_hidden_layers.saturating_sub(1)
            ),
            GradcamMode::Itc if block >= m.vision.depth => bail!(
                "--block_num {block}: in itc mode it names a ViT block, 0..={} for this model",
                m.vision.depth.saturating_sub(1)
            ),
            _ => {}
        }
        let res = m.vision.image_res;
        let root = PathBuf::from(&data.image_root);
        let test = Arc::new(GroundingEval::new(&s.cfg.files(&data.test_file)?, &root, res)?);
        let (refs, instances) = find_refer(&s.cfg.resolve(&data.refcoco_data)?)?;
        let refer = Refer::open(&refs, &instances)?;
        let dets = Dets::open(&s.cfg.resolve(&data.det_file)?)?;
        if let Some(c) = &data.coco_file {
            // Grounding.py loads it and never reads it: only its presence is checked.
            s.cfg.resolve(c)?;
        }
        check_coverage(&test, &refer, &dets)?;
        let train = match s.training {
            None => None,
            Some(t) => {
                if !test.expressions.iter().any(|e| refer.refs[&e.ref_id].split == "val") {
                    bail!("training keeps checkpoint_best by val_d, but no test_file expression is in the val split");
                }
                Some(Arc::new(GroundingTrain::new(&s.cfg.files(&t.train_file)?, &root, res)?))
            }
        };
        Ok(Self { settings, train, test, refer, dets, batch: s.cfg.task.batch_size })
    }

    fn images(&self) -> Vec<&ImageRef> {
        let train = self.train.iter().flat_map(|t| t.images());
        self.test.expressions.iter().map(|e| &e.image).chain(train).collect()
    }

    fn train_set(&self) -> Option<Arc<GroundingTrain>> {
        self.train.clone()
    }

    fn step(
        &self,
        ctx: &Ctx<ContrastiveModel>,
        batch: Vec<TrainSample>,
        alpha: f64,
        rng: &mut StdRng,
    ) -> Result<Losses> {
        super::retrieval::train_step(ctx, batch, alpha, rng)
    }

    fn validate(&self, ctx: &Ctx<ContrastiveModel>) -> Result<Option<Metrics>> {
        let m = self.evaluate(ctx)?.metrics();
        print(&m);
        Ok(Some(m))
    }

    fn finish(&self, ctx: &Ctx<ContrastiveModel>, outcome: Outcome) -> Result<Report> {
        let eval = self.evaluate(ctx)?;
        self.write_outputs(ctx, &eval)?;
        let m = eval.metrics();
        print(&m);
        let mut metrics = eval.metrics_json();
        match outcome {
            Outcome::Evaluate => {
                let mut record: serde_json::Map<String, Value> = m.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
                record.insert("epoch".into(), json!(0));
                Ok(Report { metrics, log: Some(record) })
            }
            // The reference logs nothing after its last epoch; the best epoch's evaluation is
            // repeated here (with checkpoint_best loaded) for predictions.json and metrics.json.
            Outcome::Trained { best_epoch, .. } => {
                metrics["best_epoch"] = json!(best_epoch);
                Ok(Report { metrics, log: None })
            }
        }
    }
}
