//! Pre-training (`Pretrain.py` with `models/model_pretrain.py`): ITC + ITM + MLM with momentum
//! distillation, from BERT and DeiT weights (or a checkpoint), on the reference's JSON lists or on
//! streamed tar shards. Its checkpoints start every other task as `ALBEF.pth` does.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::RunOptions;
use crate::checkpoint::init::{bert_weights_file, init_text_from_bert, init_vision_from_deit};
use crate::config::{PretrainKeys, TrainTransform};
use crate::data::pretrain::{shard_sample, CaptionSample, PretrainCorpus, PretrainDataset};
use crate::data::retrieval::ImageRef;
use crate::data::shards::{resolve_shards, ShardCorpus, ShardSet, StreamOptions};
use crate::data::{image_batch, Padding};
use crate::model::contrastive_model::Replay;
use crate::model::{ContrastiveModel, ModelConfig, Objective, TaskModel};
use crate::task::Task;
use crate::train::run::LAST;
use crate::train::Losses;
use crate::util::Metrics;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use serde_json::json;
use std::cell::Cell;
use std::path::PathBuf;
use std::sync::Arc;

/// Everything `albef pretrain` takes.
#[derive(Clone, Debug)]
pub struct PretrainOptions {
    pub run: RunOptions,
    /// DeiT-B/16 weights for the image encoder (overrides the config's `init_deit`).
    pub init_deit: Option<PathBuf>,
}

pub fn run(opts: &PretrainOptions) -> Result<serde_json::Value> {
    if opts.run.evaluate {
        bail!(
            "pretrain has no evaluation of its own; evaluate its checkpoint zero-shot with \
             `albef retrieval --evaluate --checkpoint OUTPUT_DIR/checkpoint_best.safetensors`"
        );
    }
    harness::run::<Pretrain>(&opts.run, opts.init_deit.clone())
}

/// Captions are tokenized `padding='longest', truncation=True, max_length=25`.
const TEXT_LEN: usize = 25;

/// The losses of one pre-training step as the reference logs them (`loss_mlm`, `loss_ita`,
/// `loss_itm`; summed with equal weights), and the MLM (hits, masked tokens). `replay` gives
/// recorded negatives and masks (fixture tests); without it they are drawn from `rng`.
#[allow(clippy::too_many_arguments)]
pub fn losses(
    model: &ContrastiveModel,
    image: &Tensor,
    ids: &Tensor,
    mask: &Tensor,
    alpha: f64,
    replay: Option<&Replay>,
    rng: &mut StdRng,
    train: bool,
) -> Result<(Losses, (usize, usize))> {
    let l = model.forward_train(image, ids, mask, None, alpha, replay, rng, train)?;
    let Some(mlm) = l.mlm else { bail!("the pre-training model computed no MLM loss") };
    let hits = l.mlm_hits.unwrap_or_default();
    Ok((vec![("loss_mlm", mlm), ("loss_ita", l.ita), ("loss_itm", l.itm)], hits))
}

/// Where the starting weights come from when no checkpoint is given.
struct Init {
    deit: Option<PathBuf>,
    bert: Option<PathBuf>,
}

pub struct Pretrain {
    train: Arc<PretrainCorpus>,
    init: Init,
    /// MLM (hits, masked tokens) of the epoch so far.
    mlm: Cell<(usize, usize)>,
}

impl TaskSpec for Pretrain {
    const TASK: Task = Task::Pretrain;
    const SELECT: Option<&'static str> = None;
    type Keys = PretrainKeys;
    /// `--init-deit`.
    type Options = Option<PathBuf>;
    type Model = ContrastiveModel;
    type Train = PretrainCorpus;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<ContrastiveModel> {
        Ok(ContrastiveModel::new(cfg, Objective::Pretrain, device, seed)?)
    }

    fn new(init_deit: Option<PathBuf>, s: &Setup<PretrainKeys>) -> Result<Self> {
        let Some(_) = s.training else { bail!("pretrain only trains") };
        let (data, keys) = (&s.cfg.data, &s.cfg.task);
        let res = s.model_cfg.vision.image_res;
        let augment = keys.train_transform.unwrap_or_default() == TrainTransform::Reference;
        let shuffle = keys.shuffle.unwrap_or(true);
        let train = match (&data.train_file, &data.train_shards) {
            (Some(_), Some(_)) => bail!(
                "config {}: give train_file (JSON lists) or train_shards (tar shards), not both",
                s.cfg.path.display()
            ),
            (None, None) => bail!("config {}: give train_file or train_shards", s.cfg.path.display()),
            (Some(files), None) => {
                let root = data.image_root.as_ref().map(PathBuf::from);
                let d = PretrainDataset::new(&s.cfg.files(files)?, root.as_deref(), res)?.with_augmentation(augment);
                PretrainCorpus::Json { data: Arc::new(d), shuffle }
            }
            (None, Some(patterns)) => {
                let set = ShardSet::open(resolve_shards(&s.cfg.path, &patterns.names())?)?;
                let d = StreamOptions::default();
                let options = StreamOptions {
                    shuffle,
                    buffer: keys.shuffle_buffer.unwrap_or(d.buffer),
                    readers: keys.shard_readers.unwrap_or(d.readers),
                    max_skipped_fraction: keys.max_skipped_fraction.unwrap_or(d.max_skipped_fraction),
                    ..d
                };
                eprintln!("{} shards, {} samples", set.shards.len(), set.total());
                PretrainCorpus::Shards(ShardCorpus::new(
                    set,
                    options,
                    Arc::new(move |raw, rng| shard_sample(raw, res, augment, rng)),
                ))
            }
        };
        // The starting files are checked now, before anything is written.
        let starts_fresh = s.opts.checkpoint.is_none() && !s.opts.resume;
        let deit = init_deit.or_else(|| keys.init_deit.as_ref().map(PathBuf::from));
        let deit = match deit {
            Some(p) if starts_fresh => {
                if !p.is_file() {
                    bail!(
                        "the DeiT weights {} do not exist (download deit_base_patch16_224-b5f2ef4d.pth from \
                         https://dl.fbaipublicfiles.com/deit/, or remove init_deit to start the image encoder from random weights)",
                        p.display()
                    );
                }
                Some(p)
            }
            _ => None,
        };
        let bert = if starts_fresh && keys.init_bert.unwrap_or(true) {
            let folder = &s.opts.text_encoder;
            if !folder.is_dir() || bert_weights_file(folder).is_none() || !folder.join("config.json").is_file() {
                bail!(
                    "--text_encoder {} holds no BERT weights (config.json + model.safetensors or pytorch_model.bin; \
                     download the bert-base-uncased folder from https://huggingface.co/bert-base-uncased), or set \
                     init_bert: False in the config to start the text encoder from random weights",
                    folder.display()
                );
            }
            Some(folder.clone())
        } else {
            None
        };
        Ok(Self { train: Arc::new(train), init: Init { deit, bert }, mlm: Cell::new((0, 0)) })
    }

    fn initialise(&self, model: &ContrastiveModel) -> Result<()> {
        let store = model.store();
        match &self.init.bert {
            Some(folder) => eprint!("{}", init_text_from_bert(store, folder)?),
            None => eprintln!("note: the text encoder starts from random weights (init_bert: False)"),
        }
        match &self.init.deit {
            Some(file) => eprint!("{}", init_vision_from_deit(store, file)?),
            None => eprintln!("note: the image encoder starts from random weights (no init_deit)"),
        }
        // The reference builds the momentum copies after loading BERT and DeiT.
        model.copy_teacher()?;
        Ok(())
    }

    fn images(&self) -> Vec<&ImageRef> {
        match &*self.train {
            PretrainCorpus::Json { data, .. } => data.images().collect(),
            PretrainCorpus::Shards(_) => Vec::new(),
        }
    }

    fn train_set(&self) -> Option<Arc<PretrainCorpus>> {
        Some(self.train.clone())
    }

    fn step(
        &self,
        ctx: &Ctx<ContrastiveModel>,
        batch: Vec<CaptionSample>,
        alpha: f64,
        rng: &mut StdRng,
    ) -> Result<Losses> {
        let dev = ctx.device;
        let image = image_batch(batch.iter().map(|s| s.pixels.as_slice()), ctx.model.cfg.vision.image_res, dev)?;
        let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
        let (ids, mask) =
            ctx.tokenizer.encode_batch(&captions, Padding::Longest { truncate_to: Some(TEXT_LEN) }).to_tensors(dev)?;
        let (l, (hits, masked)) = losses(ctx.model, &image, &ids, &mask, alpha, None, rng, true)?;
        let (h, m) = self.mlm.get();
        self.mlm.set((h + hits, m + masked));
        Ok(l)
    }

    /// `mlm_acc`: share (%) of masked tokens the student predicts; for shards, the samples
    /// skipped and the shards found damaged.
    fn epoch_stats(&self) -> Result<Metrics> {
        let (hits, masked) = self.mlm.replace((0, 0));
        let mut m = Metrics::new();
        m.insert("mlm_acc".into(), 100.0 * hits as f64 / masked.max(1) as f64);
        if let Some(c) = self.train.take_counts() {
            m.insert("samples".into(), c.samples as f64);
            m.insert("images_skipped".into(), c.skipped as f64);
            m.insert("shards_damaged".into(), c.damaged_shards as f64);
            if c.skipped > 0 {
                eprintln!("{} of {} samples skipped this epoch", c.skipped, c.samples);
            }
        }
        Ok(m)
    }

    fn finish(&self, ctx: &Ctx<ContrastiveModel>, outcome: Outcome) -> Result<Report> {
        let best_epoch = match outcome {
            Outcome::Trained { best_epoch, .. } => best_epoch,
            Outcome::Evaluate => bail!("pretrain has no evaluation"),
        };
        let epochs = best_epoch.map_or(0, |e| e + 1);
        let metrics = json!({"checkpoint": ctx.run.file(LAST).display().to_string(), "epochs": epochs});
        Ok(Report { metrics, log: None })
    }
}
