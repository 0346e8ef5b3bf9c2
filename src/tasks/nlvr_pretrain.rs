//! Text-assignment pre-training for NLVR2 (`Pretrain_nlvr.py`): from a pre-trained ALBEF, learn
//! which of two images a caption describes; its checkpoint initialises `albef nlvr`.

use super::harness::{self, Ctx, Outcome, Report, Setup, TaskSpec};
use super::RunOptions;
use crate::config::NlvrPretrainKeys;
use crate::data::pretrain::{CaptionSample, PretrainDataset};
use crate::data::retrieval::ImageRef;
use crate::data::{image_batch, Padding};
use crate::model::{ModelConfig, TextAssignModel};
use crate::task::Task;
use crate::train::run::LAST;
use crate::train::Losses;
use anyhow::{bail, Result};
use candle_core::Device;
use rand::rngs::StdRng;
use serde_json::json;
use std::path::PathBuf;
use std::sync::Arc;

pub fn run(opts: &RunOptions) -> Result<serde_json::Value> {
    if opts.evaluate {
        bail!("nlvr-pretrain has no evaluation; evaluate the NLVR2 model with `albef nlvr --evaluate`");
    }
    harness::run::<NlvrPretrain>(opts, ())
}

pub struct NlvrPretrain {
    train: Arc<PretrainDataset>,
}

impl TaskSpec for NlvrPretrain {
    const TASK: Task = Task::NlvrPretrain;
    const SELECT: Option<&'static str> = None;
    type Keys = NlvrPretrainKeys;
    type Options = ();
    type Model = TextAssignModel;
    type Train = PretrainDataset;

    fn build_model(cfg: &ModelConfig, device: &Device, seed: u64) -> Result<TextAssignModel> {
        Ok(TextAssignModel::new(cfg, device, seed)?)
    }

    fn new(_: (), s: &Setup<NlvrPretrainKeys>) -> Result<Self> {
        let Some(training) = s.training else { bail!("nlvr-pretrain only trains") };
        let root = s.cfg.data.image_root.as_ref().map(PathBuf::from);
        let res = s.model_cfg.vision.image_res;
        Ok(Self { train: Arc::new(PretrainDataset::new(&s.cfg.files(&training.train_file)?, root.as_deref(), res)?) })
    }

    fn images(&self) -> Vec<&ImageRef> {
        self.train.images().collect()
    }

    fn train_set(&self) -> Option<Arc<PretrainDataset>> {
        Some(self.train.clone())
    }

    /// The TA loss has no distillation: α is unused.
    fn step(&self, ctx: &Ctx<TextAssignModel>, batch: Vec<CaptionSample>, _: f64, rng: &mut StdRng) -> Result<Losses> {
        let dev = ctx.device;
        let image = image_batch(batch.iter().map(|s| s.pixels.as_slice()), ctx.model.cfg.vision.image_res, dev)?;
        let captions: Vec<&str> = batch.iter().map(|s| s.caption.as_str()).collect();
        let (ids, mask) =
            ctx.tokenizer.encode_batch(&captions, Padding::Longest { truncate_to: Some(25) }).to_tensors(dev)?;
        Ok(vec![("loss_ta", ctx.model.forward_train(&image, &ids, &mask, rng, true)?)])
    }

    fn finish(&self, ctx: &Ctx<TextAssignModel>, outcome: Outcome) -> Result<Report> {
        let best_epoch = match outcome {
            Outcome::Trained { best_epoch, .. } => best_epoch,
            Outcome::Evaluate => bail!("nlvr-pretrain has no evaluation"),
        };
        let epochs = best_epoch.map_or(0, |e| e + 1);
        let metrics = json!({"checkpoint": ctx.run.file(LAST).display().to_string(), "epochs": epochs});
        Ok(Report { metrics, log: None })
    }
}
