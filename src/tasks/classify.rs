//! SNLI-VE (`VE.py`) and NLVR2 (`NLVR.py`): fine-tune a classifier over fused image-text states
//! and report accuracy per split, with per-example predictions.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::{default_teacher_init, RunOptions, TeacherInit};
use crate::config::{ClassifyData, NlvrKeys, TaskKeys, VeKeys};
use crate::data::classify::{ClassifyDataset, ClassifySample, Format};
use crate::data::loader::{epoch_batches, Dataset, Loader, LoaderConfig};
use crate::data::retrieval::ImageRef;
use crate::data::{image_batch, Padding, Tokenizer};
use crate::dist::comm::merge_by_index;
use crate::dist::Communicator;
use crate::model::{ClassifierKind, ClassifierModel, ModelConfig};
use crate::progress::Progress;
use crate::task::Task;
use crate::train::fit::{prefixed, print_metrics};
use crate::train::run::RunDir;
use crate::train::Losses;
use crate::util::Metrics;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use serde_json::json;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;

/// The options of `albef ve` / `albef nlvr` (the reference scripts' flags).
#[derive(Clone, Debug)]
pub struct ClassifyOptions {
    pub task: Task,
    pub run: RunOptions,
    /// NLVR2: initialise the teacher from the loaded weights instead of the reference's quirk.
    pub teacher_from_checkpoint: bool,
}

/// Images of a batch as the model takes them: (B, 3, R, R), or for NLVR2 all first images then
/// all second images (2B, 3, R, R).
fn batch_images(batch: &[ClassifySample], res: usize, dev: &Device) -> Result<Tensor> {
    let per = batch.first().map_or(1, |s| s.pixels.len());
    image_batch((0..per).flat_map(|slot| batch.iter().map(move |s| s.pixels[slot].as_slice())), res, dev)
}

fn batch_text(tokenizer: &Tokenizer, batch: &[ClassifySample], dev: &Device) -> Result<(Tensor, Tensor)> {
    let sentences: Vec<&str> = batch.iter().map(|s| s.sentence.as_str()).collect();
    Ok(tokenizer.encode_batch(&sentences, Padding::Longest { truncate_to: None }).to_tensors(dev)?)
}

/// Accuracy on a split and the predicted class of every example; with `dist`, each rank
/// predicts its shard of the split (a padded `DistributedSampler(shuffle=False)`, as the
/// reference) and every rank gets all the predictions.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    model: &ClassifierModel,
    split: Arc<ClassifyDataset>,
    tokenizer: &Tokenizer,
    batch_size: usize,
    workers: Option<usize>,
    name: &str,
    dist: Option<&dyn Communicator>,
) -> Result<(Metrics, Vec<i64>)> {
    let dev = model.store.device().clone();
    let res = model.cfg.vision.image_res;
    let (rank, world) = dist.map_or((0, 1), |c| (c.rank(), c.world_size()));
    let cfg = LoaderConfig::eval(batch_size).workers(workers).shard(rank, world);
    let order = epoch_batches(split.len(), &cfg, 0).concat();
    let loader = Loader::new(split.clone(), cfg);
    let progress = Progress::new(&format!("Evaluation ({name})"), loader.num_batches(0));
    let mut local: Vec<(usize, i64)> = Vec::with_capacity(order.len());
    for (i, batch) in loader.epoch(0, 0).enumerate() {
        let batch = batch?;
        let (ids, mask) = batch_text(tokenizer, &batch, &dev)?;
        let logits = model.logits(&batch_images(&batch, res, &dev)?, &ids, &mask)?;
        for p in logits.argmax(1)?.to_vec1::<u32>()? {
            local.push((order[local.len()], p as i64));
        }
        progress.step(i, String::new);
    }
    progress.finish();
    let preds: Vec<i64> = match dist {
        Some(comm) => merge_by_index(comm, local, split.len())?,
        None => local.into_iter().map(|(_, p)| p).collect(),
    };
    let correct = preds.iter().zip(&split.examples).filter(|(&p, e)| p == e.label).count();
    let mut m = Metrics::new();
    m.insert("acc".into(), 100.0 * correct as f64 / split.len().max(1) as f64);
    Ok((m, preds))
}

fn write_predictions(run: &RunDir, name: &str, split: &ClassifyDataset, preds: &[i64], format: Format) -> Result<()> {
    let classes = format.class_names();
    let rows: Vec<serde_json::Value> = split
        .examples
        .iter()
        .zip(preds)
        .enumerate()
        .map(|(i, (e, &p))| {
            json!({"index": i, "images": e.images.iter().map(|im| im.path.display().to_string()).collect::<Vec<_>>(),
                   "sentence": e.sentence, "label": classes[e.label as usize], "prediction": classes[p as usize]})
        })
        .collect();
    run.write_json(&format!("predictions_{name}.json"), &serde_json::Value::Array(rows))
}

pub fn run(opts: &ClassifyOptions) -> Result<serde_json::Value> {
    match opts.task {
        Task::Ve => harness::run::<Classify<Ve>>(&opts.run, opts.teacher_from_checkpoint),
        Task::Nlvr => harness::run::<Classify<Nlvr>>(&opts.run, opts.teacher_from_checkpoint),
        other => bail!("{other} is not a classification task"),
    }
}

/// What differs between the two classification tasks.
pub trait Variant {
    const TASK: Task;
    const KIND: ClassifierKind;
    const FORMAT: Format;
    type Keys: TaskKeys<Data = ClassifyData>;
    fn test_batch(keys: &Self::Keys) -> usize;
}

pub struct Ve;
pub struct Nlvr;

impl Variant for Ve {
    const TASK: Task = Task::Ve;
    const KIND: ClassifierKind = ClassifierKind::VisualEntailment;
    const FORMAT: Format = Format::SnliVe;
    type Keys = VeKeys;
    fn test_batch(keys: &VeKeys) -> usize {
        keys.batch_size_test
    }
}

impl Variant for Nlvr {
    const TASK: Task = Task::Nlvr;
    const KIND: ClassifierKind = ClassifierKind::Nlvr2;
    const FORMAT: Format = Format::Nlvr2;
    type Keys = NlvrKeys;
    /// NLVR.yaml's one `batch_size` serves every loader.
    fn test_batch(keys: &NlvrKeys) -> usize {
        keys.batch_size
    }
}

pub struct Classify<V> {
    val: Arc<ClassifyDataset>,
    test: Arc<ClassifyDataset>,
    train: Option<Arc<ClassifyDataset>>,
    batch_test: usize,
    variant: PhantomData<V>,
}

impl<V: Variant> Classify<V> {
    fn evaluate(&self, ctx: &Ctx<ClassifierModel>, split: &Arc<ClassifyDataset>, name: &str) -> Result<Metrics> {
        let (m, preds) =
            evaluate(ctx.model, split.clone(), ctx.tokenizer, self.batch_test, ctx.workers, name, ctx.dist())?;
        print_metrics(name, &m);
        write_predictions(ctx.run, name, split, &preds, V::FORMAT)?;
        Ok(m)
    }
}

impl<V: Variant> TaskSpec for Classify<V> {
    const TASK: Task = V::TASK;
    const SELECT: Option<&'static str> = Some("acc");
    type Keys = V::Keys;
    /// `--teacher-from-checkpoint`.
    type Options = bool;
    type Model = ClassifierModel;
    type Train = ClassifyDataset;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<ClassifierModel> {
        Ok(ClassifierModel::new(cfg, V::KIND, device, seed)?)
    }

    fn teacher_init(teacher_from_checkpoint: &bool) -> TeacherInit {
        if *teacher_from_checkpoint {
            TeacherInit::FromLoaded
        } else {
            default_teacher_init(V::TASK)
        }
    }

    fn new(_: bool, s: &Setup<V::Keys>) -> Result<Self> {
        let data = &s.cfg.data;
        let res = s.model_cfg.vision.image_res;
        let root = PathBuf::from(&data.image_root);
        let read = |files: &[PathBuf], augment: bool| -> Result<Arc<ClassifyDataset>> {
            Ok(Arc::new(ClassifyDataset::new(files, &root, V::FORMAT, res, augment)?))
        };
        let val = read(&s.cfg.files(&data.val_file)?, false)?;
        let test = read(&s.cfg.files(&data.test_file)?, false)?;
        let train = s.training.map(|t| read(&s.cfg.files(&t.train_file)?, true)).transpose()?;
        Ok(Self { val, test, train, batch_test: V::test_batch(&s.cfg.task), variant: PhantomData })
    }

    fn images(&self) -> Vec<&ImageRef> {
        self.val.images().chain(self.test.images()).chain(self.train.iter().flat_map(|t| t.images())).collect()
    }

    fn train_set(&self) -> Option<Arc<ClassifyDataset>> {
        self.train.clone()
    }

    fn step(
        &self,
        ctx: &Ctx<ClassifierModel>,
        batch: Vec<ClassifySample>,
        alpha: f64,
        _: &mut StdRng,
    ) -> Result<Losses> {
        let dev = ctx.device;
        let (ids, mask) = batch_text(ctx.tokenizer, &batch, dev)?;
        let targets = Tensor::from_vec(batch.iter().map(|s| s.label).collect::<Vec<i64>>(), batch.len(), dev)?;
        let images = batch_images(&batch, ctx.model.cfg.vision.image_res, dev)?;
        Ok(vec![("loss", ctx.model.forward_train(&images, &ids, &mask, &targets, alpha, true)?)])
    }

    fn validate(&self, ctx: &Ctx<ClassifierModel>) -> Result<Option<Metrics>> {
        Ok(Some(
            evaluate(ctx.model, self.val.clone(), ctx.tokenizer, self.batch_test, ctx.workers, "val", ctx.dist())?.0,
        ))
    }

    fn finish(&self, ctx: &Ctx<ClassifierModel>, outcome: Outcome) -> Result<Report> {
        let (val, best_epoch) = match outcome {
            Outcome::Evaluate => (self.evaluate(ctx, &self.val, "val")?, None),
            Outcome::Trained { best_epoch, best_val } => match best_val {
                Some(v) => (v, best_epoch),
                None => bail!("no validation result after training"),
            },
        };
        let test = self.evaluate(ctx, &self.test, "test")?;
        let mut record = prefixed("val", &val);
        record.extend(prefixed("test", &test));
        if let Some(e) = best_epoch {
            record.insert("best_epoch".into(), json!(e));
        }
        Ok(Report { metrics: json!({"val": val, "test": test}), log: Some(record) })
    }
}
