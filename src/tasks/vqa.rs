//! VQA (`VQA.py`): fine-tune the answer decoder with distillation, then rank the answer list for
//! every test question; `vqa_result.json` is the file the evaluation server takes, and when the
//! questions have annotator answers, `metrics.json` has the VQA accuracy.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::RunOptions;
use crate::config::VqaKeys;
use crate::data::loader::{epoch_batches, Dataset, Loader, LoaderConfig};
use crate::data::retrieval::ImageRef;
use crate::data::vqa::{read_answer_list, VqaDataset, VqaSample};
use crate::data::{image_batch, Padding, Tokenizer};
use crate::dist::comm::merge_by_index;
use crate::dist::Communicator;
use crate::eval::vqa::vqa_accuracy;
use crate::model::{ModelConfig, VqaModel};
use crate::progress::Progress;
use crate::task::Task;
use crate::train::fit::print_metrics;
use crate::train::Losses;
use crate::util::Metrics;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

/// Ranks the answer list for every question; returns `[{question_id, answer}]` and, when
/// annotator answers exist, the accuracy.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &VqaModel,
    split: Arc<VqaDataset>,
    tokenizer: &Tokenizer,
    answer_list: &[String],
    eos: &str,
    k_test: usize,
    batch_size: usize,
    workers: Option<usize>,
    dist: Option<&dyn Communicator>,
) -> Result<(Vec<serde_json::Value>, Option<Metrics>)> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let with_eos: Vec<String> = answer_list.iter().map(|a| format!("{a}{eos}")).collect();
    let (answer_ids, answer_mask) =
        tokenizer.encode_batch(&with_eos, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
    // Several ranks: each answers its shard (a padded DistributedSampler, as the reference) and
    // the answers are merged in question order.
    let (rank, world) = dist.map_or((0, 1), |c| (c.rank(), c.world_size()));
    let cfg = LoaderConfig::eval(batch_size).workers(workers).shard(rank, world);
    let order = epoch_batches(split.len(), &cfg, 0).concat();
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new("Generate VQA test result", loader.num_batches(0));
    // (example index, (result, accuracy where the example has answers)).
    let mut local: Vec<(usize, (serde_json::Value, Option<f64>))> = Vec::new();
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let questions: Vec<&str> = batch.iter().map(|s| s.question.as_str()).collect();
        let (q_ids, q_mask) =
            tokenizer.encode_batch(&questions, Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
        let images = image_batch(batch.iter().map(|s| s.pixels.as_slice()), res, &dev)?;
        let states = model.question_states(&images, &q_ids, &q_mask)?;
        let ranking = model.rank_answers(&states, &q_mask, &answer_ids, &answer_mask, k_test)?;
        for (s, ids) in batch.iter().zip(&ranking.ids) {
            let answer = &answer_list[ids[0]];
            let acc = (!s.answers.is_empty()).then(|| vqa_accuracy(answer, &s.answers));
            local.push((order[local.len()], (json!({"question_id": s.question_id, "answer": answer}), acc)));
        }
        progress.step(i, String::new);
    }
    progress.finish();
    let merged = match dist {
        Some(comm) => merge_by_index(comm, local, split.len())?,
        None => local.into_iter().map(|(_, r)| r).collect(),
    };
    let scores: Vec<f64> = merged.iter().filter_map(|(_, acc)| *acc).collect();
    let results: Vec<serde_json::Value> = merged.into_iter().map(|(r, _)| r).collect();
    let metrics = (!scores.is_empty()).then(|| {
        let mut m = Metrics::new();
        m.insert("vqa_acc".into(), 100.0 * scores.iter().sum::<f64>() / scores.len() as f64);
        m.insert("questions".into(), scores.len() as f64);
        m
    });
    Ok((results, metrics))
}

pub fn run(opts: &RunOptions) -> Result<serde_json::Value> {
    harness::run::<Vqa>(opts, ())
}

pub struct Vqa {
    answer_list: Vec<String>,
    eos: String,
    test: Arc<VqaDataset>,
    train: Option<Arc<VqaDataset>>,
    batch_test: usize,
    k_test: usize,
}

impl TaskSpec for Vqa {
    const TASK: Task = Task::Vqa;
    /// VQA has no validation split: every epoch is checkpointed, the last one is used.
    const SELECT: Option<&'static str> = None;
    type Keys = VqaKeys;
    type Options = ();
    type Model = VqaModel;
    type Train = VqaDataset;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<VqaModel> {
        Ok(VqaModel::new(cfg, device, seed)?)
    }

    fn new(_: (), s: &Setup<VqaKeys>) -> Result<Self> {
        let (data, keys) = (&s.cfg.data, &s.cfg.task);
        let res = s.model_cfg.vision.image_res;
        let vqa_root = PathBuf::from(&data.vqa_root);
        let vg_root = data.vg_root.as_ref().map_or_else(|| vqa_root.clone(), PathBuf::from);
        let eos = keys.eos.clone().unwrap_or_else(|| "[SEP]".into());
        let answer_list = read_answer_list(&s.cfg.resolve(&data.answer_list)?)?;
        let test = Arc::new(VqaDataset::test(&s.cfg.files(&data.test_file)?, &vqa_root, &vg_root, res)?);
        let train = match s.training {
            None => None,
            Some(t) => Some(Arc::new(VqaDataset::train(&s.cfg.files(&t.train_file)?, &vqa_root, &vg_root, res, &eos)?)),
        };
        Ok(Self { answer_list, eos, test, train, batch_test: keys.batch_size_test, k_test: keys.k_test })
    }

    fn images(&self) -> Vec<&ImageRef> {
        self.test.images().chain(self.train.iter().flat_map(|t| t.images())).collect()
    }

    fn train_set(&self) -> Option<Arc<VqaDataset>> {
        self.train.clone()
    }

    fn step(&self, ctx: &Ctx<VqaModel>, batch: Vec<VqaSample>, alpha: f64, _rng: &mut StdRng) -> Result<Losses> {
        let (dev, tokenizer) = (ctx.device, ctx.tokenizer);
        let questions: Vec<&str> = batch.iter().map(|s| s.question.as_str()).collect();
        let (q_ids, q_mask) =
            tokenizer.encode_batch(&questions, Padding::Longest { truncate_to: Some(25) }).to_tensors(dev)?;
        let answers: Vec<&str> = batch.iter().flat_map(|s| s.answers.iter().map(String::as_str)).collect();
        let (a_ids, a_mask) =
            tokenizer.encode_batch(&answers, Padding::Longest { truncate_to: None }).to_tensors(dev)?;
        let weights: Vec<f32> = batch.iter().flat_map(|s| s.weights.iter().copied()).collect();
        let weights = Tensor::from_vec(weights, answers.len(), dev)?;
        let counts: Vec<usize> = batch.iter().map(|s| s.answers.len()).collect();
        let images = image_batch(batch.iter().map(|s| s.pixels.as_slice()), ctx.model.cfg.vision.image_res, dev)?;
        let loss =
            ctx.model.forward_train(&images, &q_ids, &q_mask, &a_ids, &a_mask, &weights, &counts, alpha, true)?;
        Ok(vec![("loss", loss)])
    }

    fn finish(&self, ctx: &Ctx<VqaModel>, outcome: Outcome) -> Result<Report> {
        let epoch = match outcome {
            Outcome::Evaluate => None,
            Outcome::Trained { best_epoch, .. } => best_epoch,
        };
        let (results, metrics) = evaluate(
            ctx.model,
            self.test.clone(),
            ctx.tokenizer,
            &self.answer_list,
            &self.eos,
            self.k_test,
            self.batch_test,
            ctx.workers,
            ctx.dist(),
        )?;
        ctx.run.write_json("vqa_result.json", &serde_json::Value::Array(results))?;
        let mut out = json!({"result_file": ctx.run.file("vqa_result.json").display().to_string(), "epoch": epoch});
        let mut log = None;
        if let Some(m) = &metrics {
            print_metrics("test", m);
            out["test"] = json!(m);
            log = json!({"test_vqa_acc": m["vqa_acc"], "epoch": epoch}).as_object().cloned();
        }
        Ok(Report { metrics: out, log })
    }
}

/// A VQA model loaded for questions one at a time (`albef serve`): the answer list encoded once,
/// each question ranked as [`evaluate`] ranks the test set (`pre_question`, `rank_answer` over
/// the config's `k_test` candidates).
pub struct Answerer {
    model: VqaModel,
    tokenizer: Tokenizer,
    answers: Vec<String>,
    answer_ids: Tensor,
    answer_mask: Tensor,
    k_test: usize,
}

/// One ranked answer and its probability (softmax over the `k_test` re-ranked candidates).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Answer {
    pub answer: String,
    pub probability: f32,
}

impl Answerer {
    /// `config`: the VQA YAML the checkpoint was trained with (it sizes the model and names the
    /// answer list).
    pub fn load(
        config: &std::path::Path,
        checkpoint: &std::path::Path,
        text_encoder: &std::path::Path,
        device: &Device,
    ) -> Result<Self> {
        let cfg = crate::config::Config::<VqaKeys>::load(config, false)?;
        let mut model_cfg = cfg.model_config()?;
        model_cfg.mode.inference = true;
        let tokenizer = Tokenizer::from_path(text_encoder)?;
        if tokenizer.vocab_size() != model_cfg.bert.vocab_size {
            anyhow::bail!(
                "the tokenizer in {} has {} tokens but {} says vocab_size {}",
                text_encoder.display(),
                tokenizer.vocab_size(),
                config.display(),
                model_cfg.bert.vocab_size
            );
        }
        let answers = read_answer_list(&cfg.resolve(&cfg.data.answer_list)?)?;
        let eos = cfg.task.eos.clone().unwrap_or_else(|| "[SEP]".into());
        let model = VqaModel::new(&model_cfg, device, 0)?;
        super::load_checkpoint(&model, Task::Vqa, checkpoint, true, super::TeacherInit::FromLoaded)?;
        let with_eos: Vec<String> = answers.iter().map(|a| format!("{a}{eos}")).collect();
        let (answer_ids, answer_mask) =
            tokenizer.encode_batch(&with_eos, Padding::Longest { truncate_to: None }).to_tensors(device)?;
        Ok(Self { model, tokenizer, answers, answer_ids, answer_mask, k_test: cfg.task.k_test })
    }

    /// The `top` best answers to `question` about `image`, best first.
    pub fn answer(&self, image: &crate::data::transform::RgbImage, question: &str, top: usize) -> Result<Vec<Answer>> {
        let question = crate::data::text::pre_question(question, 50);
        if question.is_empty() {
            anyhow::bail!("the question is empty");
        }
        let dev = self.model.store.device().clone();
        let res = self.model.cfg.vision.image_res;
        let pixels = crate::data::transform::eval_transform_host(image, res);
        let images = image_batch(std::iter::once(pixels.as_slice()), res, &dev)?;
        let (q_ids, q_mask) =
            self.tokenizer.encode_batch(&[question], Padding::Longest { truncate_to: None }).to_tensors(&dev)?;
        let states = self.model.question_states(&images, &q_ids, &q_mask)?;
        let ranking = self.model.rank_answers(&states, &q_mask, &self.answer_ids, &self.answer_mask, self.k_test)?;
        Ok(ranking.ids[0]
            .iter()
            .zip(&ranking.probs[0])
            .take(top)
            .map(|(&i, &p)| Answer { answer: self.answers[i].clone(), probability: p })
            .collect())
    }
}
