//! Image-text retrieval (`Retrieval.py`): fine-tune with ITC + ITM, evaluate with the ITC top-k
//! re-ranked by ITM, on Flickr30K / COCO layouts; zero-shot is evaluating any checkpoint on
//! another dataset's config.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::RunOptions;
use crate::config::{RetrievalKeys, TrainTransform};
use crate::data::loader::{Loader, LoaderConfig};
use crate::data::retrieval::{ImageRef, RetrievalEval, RetrievalTrain, TrainSample};
use crate::data::{image_batch, Padding, Tokenizer};
use crate::dist::Communicator;
use crate::eval::retrieval::{itm_eval, score_matrices, score_matrices_sharded, EncodedSplit, Scores};
use crate::model::{ContrastiveModel, ModelConfig, Objective};
use crate::progress::Progress;
use crate::task::Task;
use crate::train::fit::{prefixed, print_metrics};
use crate::train::run::RunDir;
use crate::train::Losses;
use crate::util::{mem, Metrics};
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything `albef retrieval` takes.
#[derive(Clone, Debug)]
pub struct RetrievalOptions {
    pub run: RunOptions,
    /// Also write `scores_<split>.safetensors`.
    pub save_scores: bool,
}

/// Caption words kept and evaluation text length (Retrieval.py's `max_words`, tokenizer max_length).
pub const TEXT_MAX_WORDS: usize = 30;
pub const EVAL_TEXT_LEN: usize = 30;
const EVAL_TEXT_BATCH: usize = 256;

/// Encodes a split's texts and images as the evaluation does (`albef search` is checked against it).
pub fn encode_split(
    model: &ContrastiveModel,
    split: Arc<RetrievalEval>,
    tokenizer: &Tokenizer,
    batch_size: usize,
    workers: Option<usize>,
    name: &str,
) -> Result<EncodedSplit> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let (mut text_states, mut text_feats, mut text_masks) = (Vec::new(), Vec::new(), Vec::new());
    for chunk in split.texts.chunks(EVAL_TEXT_BATCH) {
        let (ids, mask) = tokenizer.encode_batch(chunk, Padding::MaxLength(EVAL_TEXT_LEN)).to_tensors(&dev)?;
        let (states, feat) = model.encode_text(&ids, &mask)?;
        text_states.push(states);
        text_feats.push(feat);
        text_masks.push(mask);
    }
    mem::stage("eval: encode texts");
    let cfg = LoaderConfig::eval(batch_size).workers(workers);
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new(&format!("Evaluation ({name}) images"), loader.num_batches(0));
    let (mut image_states, mut image_feats) = (Vec::new(), Vec::new());
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let images = image_batch(batch.iter().map(Vec::as_slice), res, &dev)?;
        let (states, feat) = model.encode_image(&images)?;
        image_states.push(states);
        image_feats.push(feat);
        progress.step(i, String::new);
    }
    progress.finish();
    mem::stage("eval: encode images");
    let enc = EncodedSplit {
        image_states: Tensor::cat(&image_states, 0)?,
        image_feat: Tensor::cat(&image_feats, 0)?,
        text_states: Tensor::cat(&text_states, 0)?,
        text_mask: Tensor::cat(&text_masks, 0)?,
        text_feat: Tensor::cat(&text_feats, 0)?,
    };
    mem::stage("eval: gather states");
    Ok(enc)
}

/// Encodes a split and scores it (§4); with `dist`, every rank encodes the whole split and
/// scores its share of the rows (Retrieval.py's split), and every rank gets the whole matrices.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_split(
    model: &ContrastiveModel,
    split: Arc<RetrievalEval>,
    tokenizer: &Tokenizer,
    batch_size: usize,
    k_test: usize,
    workers: Option<usize>,
    name: &str,
    dist: Option<&dyn Communicator>,
) -> Result<(Metrics, Scores, Scores)> {
    let enc = encode_split(model, split.clone(), tokenizer, batch_size, workers, name)?;
    let (i2t, t2i) = match dist {
        Some(comm) => score_matrices_sharded(model, &enc, k_test, comm)?,
        None => score_matrices(model, &enc, k_test)?,
    };
    mem::stage("eval: ITM scoring");
    let metrics = itm_eval(&i2t, &t2i, &split.txt2img, &split.img2txt);
    Ok((metrics, i2t, t2i))
}

fn save_scores(run: &RunDir, split: &str, i2t: &Scores, t2i: &Scores) -> Result<()> {
    let mut sd = crate::checkpoint::StateDict::new();
    sd.insert("score_i2t".into(), Tensor::new(i2t.clone(), &Device::Cpu)?);
    sd.insert("score_t2i".into(), Tensor::new(t2i.clone(), &Device::Cpu)?);
    crate::checkpoint::save_safetensors(&sd, &Default::default(), &run.file(&format!("scores_{split}.safetensors")))
}

pub fn run(opts: &RetrievalOptions) -> Result<serde_json::Value> {
    harness::run::<Retrieval>(&opts.run, opts.save_scores)
}

/// One ITC + ITM step of the retrieval model (`idx` marks captions of the same image), shared
/// with grounding, which fine-tunes the same model the same way (Grounding.py).
pub fn train_step(
    ctx: &Ctx<ContrastiveModel>,
    batch: Vec<TrainSample>,
    alpha: f64,
    rng: &mut StdRng,
) -> Result<Losses> {
    let dev = ctx.device;
    let image = image_batch(batch.iter().map(|s| s.pixels.as_slice()), ctx.model.cfg.vision.image_res, dev)?;
    let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
    // `padding='longest', max_length=30` without truncation: max_length has no effect.
    let (ids, mask) = ctx.tokenizer.encode_batch(&captions, Padding::Longest { truncate_to: None }).to_tensors(dev)?;
    let idx = Tensor::from_vec(batch.iter().map(|s| s.idx).collect::<Vec<i64>>(), batch.len(), dev)?;
    let l = ctx.model.forward_train(&image, &ids, &mask, Some(&idx), alpha, None, rng, true)?;
    Ok(vec![("loss_ita", l.ita), ("loss_itm", l.itm)])
}

pub struct Retrieval {
    save_scores: bool,
    val: Arc<RetrievalEval>,
    test: Arc<RetrievalEval>,
    train: Option<Arc<RetrievalTrain>>,
    batch_test: usize,
    k_test: usize,
}

impl Retrieval {
    fn evaluate(&self, ctx: &Ctx<ContrastiveModel>, split: &Arc<RetrievalEval>, name: &str) -> Result<Metrics> {
        let (m, i2t, t2i) = evaluate_split(
            ctx.model,
            split.clone(),
            ctx.tokenizer,
            self.batch_test,
            self.k_test,
            ctx.workers,
            name,
            ctx.dist(),
        )?;
        if self.save_scores && ctx.run.is_primary() {
            save_scores(ctx.run, name, &i2t, &t2i)?;
        }
        Ok(m)
    }
}

impl TaskSpec for Retrieval {
    const TASK: Task = Task::Retrieval;
    const SELECT: Option<&'static str> = Some("r_mean");
    type Keys = RetrievalKeys;
    /// `--save-scores`.
    type Options = bool;
    type Model = ContrastiveModel;
    type Train = RetrievalTrain;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<ContrastiveModel> {
        Ok(ContrastiveModel::new(cfg, Objective::Retrieval, device, seed)?)
    }

    fn new(save_scores: bool, s: &Setup<RetrievalKeys>) -> Result<Self> {
        let (data, keys) = (&s.cfg.data, &s.cfg.task);
        let res = s.model_cfg.vision.image_res;
        let root = PathBuf::from(&data.image_root);
        let eval = |file: &str| -> Result<Arc<RetrievalEval>> {
            Ok(Arc::new(RetrievalEval::new(&s.cfg.resolve(file)?, &root, res, TEXT_MAX_WORDS)?))
        };
        let (val, test) = (eval(&data.val_file)?, eval(&data.test_file)?);
        let train = match s.training {
            None => None,
            Some(t) => {
                let augment = keys.train_transform.unwrap_or_default() == TrainTransform::Reference;
                Some(Arc::new(
                    RetrievalTrain::new(&s.cfg.files(&t.train_file)?, &root, res, TEXT_MAX_WORDS)?
                        .with_augmentation(augment),
                ))
            }
        };
        Ok(Self { save_scores, val, test, train, batch_test: keys.batch_size_test, k_test: keys.k_test })
    }

    fn images(&self) -> Vec<&ImageRef> {
        let train = self.train.iter().flat_map(|t| t.images());
        self.val.images.iter().chain(&self.test.images).chain(train).collect()
    }

    fn train_set(&self) -> Option<Arc<RetrievalTrain>> {
        self.train.clone()
    }

    fn step(
        &self,
        ctx: &Ctx<ContrastiveModel>,
        batch: Vec<TrainSample>,
        alpha: f64,
        rng: &mut StdRng,
    ) -> Result<Losses> {
        train_step(ctx, batch, alpha, rng)
    }

    fn validate(&self, ctx: &Ctx<ContrastiveModel>) -> Result<Option<Metrics>> {
        let (m, _, _) = evaluate_split(
            ctx.model,
            self.val.clone(),
            ctx.tokenizer,
            self.batch_test,
            self.k_test,
            ctx.workers,
            "val",
            ctx.dist(),
        )?;
        Ok(Some(m))
    }

    fn finish(&self, ctx: &Ctx<ContrastiveModel>, outcome: Outcome) -> Result<Report> {
        match outcome {
            Outcome::Evaluate => {
                let (val, test) = (self.evaluate(ctx, &self.val, "val")?, self.evaluate(ctx, &self.test, "test")?);
                print_metrics("val", &val);
                print_metrics("test", &test);
                let mut record = prefixed("val", &val);
                record.extend(prefixed("test", &test));
                record.insert("epoch".into(), json!(0));
                Ok(Report { metrics: json!({"val": val, "test": test}), log: Some(record) })
            }
            Outcome::Trained { best_epoch, best_val } => {
                let test = self.evaluate(ctx, &self.test, "test")?;
                print_metrics("test (best epoch)", &test);
                let mut record = prefixed("test", &test);
                record.insert("best_epoch".into(), json!(best_epoch));
                let metrics = json!({"val": best_val, "test": test, "best_epoch": best_epoch});
                Ok(Report { metrics, log: Some(record) })
            }
        }
    }
}
