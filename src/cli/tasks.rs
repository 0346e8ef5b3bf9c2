//! The task commands (`pretrain`, `retrieval`, `vqa`, `nlvr-pretrain`, `nlvr`, `ve`), with the reference scripts' flags.

use albef::config::Overrides;
use albef::task::Task;
use albef::tasks::classify::{self, ClassifyOptions};
use albef::tasks::nlvr_pretrain;
use albef::tasks::pretrain::{self, PretrainOptions};
use albef::tasks::retrieval::{self, RetrievalOptions};
use albef::tasks::vqa;
use albef::tasks::RunOptions;
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Flags every task script of the reference takes.
#[derive(Args)]
pub struct CommonArgs {
    /// Task YAML (configs/*.yaml).
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long = "output_dir", alias = "output-dir")]
    output_dir: Option<PathBuf>,
    /// Local bert-base-uncased folder (vocab.txt or tokenizer.json).
    #[arg(long = "text_encoder", alias = "textencoder", alias = "text-encoder", default_value = "bert-base-uncased")]
    text_encoder: PathBuf,
    /// ALBEF.pth, a fine-tuned file, or a checkpoint albef wrote.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Evaluate only.
    #[arg(long)]
    evaluate: bool,
    /// Continue an interrupted run from output_dir/checkpoint_last.safetensors.
    #[arg(long)]
    resume: bool,
    /// Stop after this many epochs; continue later with --resume.
    #[arg(long = "stop-after-epoch")]
    stop_after_epoch: Option<usize>,
    #[arg(long, default_value = "cpu")]
    device: String,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Loader worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Training batch size, in place of the config's (NLVR2: its one `batch_size`).
    #[arg(long = "batch_size_train", alias = "batch-size-train")]
    batch_size_train: Option<usize>,
    /// Evaluation batch size, in place of the config's.
    #[arg(long = "batch_size_test", alias = "batch-size-test")]
    batch_size_test: Option<usize>,
    /// Image resolution, in place of the config's `image_res` (position embeddings of a
    /// checkpoint are interpolated to it).
    #[arg(long = "image_res", alias = "image-res")]
    image_res: Option<usize>,
    /// Numeric precision: fp32 (default, exact) or bf16 mixed precision (bf16 matmuls, f32
    /// master weights, optimizer state, LayerNorm, softmax and losses). Replaces `precision:`.
    #[arg(long)]
    precision: Option<albef::nn::Precision>,
    /// Gradient accumulation: average the gradients of N batches of --batch_size_train per
    /// optimizer step (each batch keeps its own ITC/ITM negatives and enqueues its own features).
    #[arg(long = "accum-steps", alias = "accum_steps", value_parser = clap::value_parser!(u64).range(1..))]
    accum_steps: Option<u64>,
    /// True (default): join the other processes of a data-parallel run when RANK/WORLD_SIZE
    /// (torchrun, `albef launch`) or SLURM_PROCID/SLURM_NTASKS are set; False: one process
    /// whatever the environment says.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    distributed: Option<String>,
    /// Tolerate up to N training steps with a non-finite loss or gradient norm (skipped, counted in
    /// log.txt); the next one stops the run. Default: the first one stops it.
    #[arg(long = "skip-nonfinite", default_value_t = 0)]
    skip_nonfinite: u64,
    /// Refuse images with more pixels than this before decoding them (Pillow's
    /// MAX_IMAGE_PIXELS; a guard against decompression bombs).
    #[arg(long = "max-image-pixels", alias = "max_image_pixels", default_value_t = albef::data::transform::DEFAULT_MAX_IMAGE_PIXELS, value_parser = clap::value_parser!(u64).range(1..))]
    max_image_pixels: u64,
    #[arg(long = "world_size", hide = true)]
    world_size: Option<usize>,
    #[arg(long = "dist_url", hide = true)]
    dist_url: Option<String>,
}

impl CommonArgs {
    /// The run options, with the task's default config and output folder.
    fn into_run(self, default_config: &str, default_out: &str) -> Result<RunOptions> {
        albef::data::transform::set_max_image_pixels(self.max_image_pixels);
        let world = albef::dist::World::from_env(albef::dist::parse_distributed_flag(self.distributed.as_deref())?)?;
        let device = super::device(&albef::dist::device_name(&self.device, world.as_ref()))?;
        let dist = match &world {
            None => None,
            Some(w) => {
                let comm = albef::dist::init(w, &device)?;
                eprintln!(
                    "rank {} of {} ({}): joined at {}, device {device:?}",
                    w.rank,
                    w.world_size,
                    w.source,
                    w.master()
                );
                Some(comm)
            }
        };
        Ok(RunOptions {
            config: self.config.unwrap_or_else(|| PathBuf::from(default_config)),
            output_dir: self.output_dir.unwrap_or_else(|| PathBuf::from(default_out)),
            text_encoder: self.text_encoder,
            checkpoint: self.checkpoint,
            evaluate: self.evaluate,
            resume: self.resume,
            seed: self.seed,
            device,
            workers: self.workers,
            stop_after_epoch: self.stop_after_epoch,
            skip_nonfinite: self.skip_nonfinite,
            overrides: Overrides {
                batch_size_train: self.batch_size_train,
                batch_size_test: self.batch_size_test,
                image_res: self.image_res,
                precision: self.precision,
                accum_steps: self.accum_steps.map(|n| n as usize),
            },
            dist,
        })
    }
}

#[derive(Args)]
pub struct RetrievalArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Also write output_dir/scores_<split>.safetensors (score_i2t, score_t2i).
    #[arg(long = "save-scores", alias = "save_scores")]
    save_scores: bool,
}

#[derive(Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// NLVR2: initialise the teacher from the loaded checkpoint (LAVIS's fix) instead of the
    /// reference's behaviour (teacher left at its pre-load weights).
    #[arg(long = "teacher-from-checkpoint")]
    teacher_from_checkpoint: bool,
}

fn print(metrics: &serde_json::Value) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(metrics)?);
    Ok(())
}

pub fn retrieval(a: RetrievalArgs) -> Result<()> {
    let run = a.common.into_run("./configs/Retrieval_flickr.yaml", "output/Retrieval_flickr")?;
    print(&retrieval::run(&RetrievalOptions { run, save_scores: a.save_scores })?)
}

pub fn classify(task: Task, a: ClassifyArgs) -> Result<()> {
    let run = match task {
        Task::Ve => a.common.into_run("./configs/VE.yaml", "output/VE")?,
        _ => a.common.into_run("./configs/NLVR.yaml", "output/NLVR")?,
    };
    print(&classify::run(&ClassifyOptions { task, run, teacher_from_checkpoint: a.teacher_from_checkpoint })?)
}

#[derive(Args)]
pub struct VqaArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// Accepted for compatibility (VQA.py's `--text_decoder`); the decoder shares the tokenizer.
    #[arg(long = "text_decoder", hide = true)]
    text_decoder: Option<PathBuf>,
}

pub fn vqa(a: VqaArgs) -> Result<()> {
    print(&vqa::run(&a.common.into_run("./configs/VQA.yaml", "output/vqa")?)?)
}

pub fn nlvr_pretrain(c: CommonArgs) -> Result<()> {
    print(&nlvr_pretrain::run(&c.into_run("./configs/NLVR_pretrain.yaml", "output/NLVR_pretrain")?)?)
}

// --- Grounding (Grounding.py) and Grad-CAM pictures (visualization.ipynb) ---

#[derive(Args)]
pub struct GroundingArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// itm: cross-attention of a BERT fusion layer and the ITM logit; itc: a ViT block's CLS
    /// self-attention and the ITC similarity.
    #[arg(long = "gradcam_mode", alias = "gradcam-mode", default_value = "itm")]
    gradcam_mode: albef::eval::grounding::GradcamMode,
    /// BERT layer (itm) or ViT block (itc) whose attention makes the map.
    #[arg(long = "block_num", alias = "block-num", default_value_t = 8)]
    block_num: usize,
    /// Also write output_dir/gradcam.safetensors (`maps`, [N, grid_h, grid_w], loader order).
    #[arg(long = "save-maps", alias = "save_maps")]
    save_maps: bool,
}

pub fn grounding(a: GroundingArgs) -> Result<()> {
    use albef::tasks::grounding::{self, GradcamSettings, GroundingOptions};
    let run = a.common.into_run("./configs/Grounding.yaml", "output/RefCOCO")?;
    let gradcam = GradcamSettings { mode: a.gradcam_mode, block_num: a.block_num, save_maps: a.save_maps };
    print(&grounding::run(&GroundingOptions { run, gradcam })?)
}

#[derive(Args)]
pub struct GradcamArgs {
    /// A YAML that sizes the model (configs/Grounding.yaml or any task config).
    #[arg(long, default_value = "./configs/Grounding.yaml")]
    config: PathBuf,
    /// refcoco.pth, another ALBEF checkpoint, or one albef wrote.
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long = "text_encoder", alias = "text-encoder", default_value = "bert-base-uncased")]
    text_encoder: PathBuf,
    #[arg(long = "output_dir", alias = "output-dir", default_value = "output/gradcam")]
    output_dir: PathBuf,
    /// The image, for every --text.
    #[arg(long)]
    image: Option<PathBuf>,
    /// An expression (repeat for several).
    #[arg(long)]
    text: Vec<String>,
    /// A JSON list of pairs: [{"image": ..., "text": ...}] or [[image, text]].
    #[arg(long)]
    pairs: Option<PathBuf>,
    /// BERT layer whose cross-attention makes the map (the notebook's 8).
    #[arg(long = "block_num", alias = "block-num", default_value_t = 8)]
    block_num: usize,
    /// Do not blur the displayed maps (the notebook blurs with σ = 0.02·max(H, W)).
    #[arg(long = "no-blur")]
    no_blur: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn gradcam(a: GradcamArgs) -> Result<()> {
    use albef::tasks::gradcam::{self, read_pairs, GradcamOptions};
    let mut pairs = Vec::new();
    match (&a.image, a.text.is_empty()) {
        (Some(image), false) => pairs.extend(a.text.iter().map(|t| (image.clone(), t.clone()))),
        (Some(_), true) => anyhow::bail!("--image needs at least one --text"),
        (None, false) => anyhow::bail!("--text needs --image"),
        (None, true) => {}
    }
    if let Some(p) = &a.pairs {
        pairs.extend(read_pairs(p)?);
    }
    let opts = GradcamOptions {
        config: a.config,
        checkpoint: a.checkpoint,
        text_encoder: a.text_encoder,
        output_dir: a.output_dir,
        pairs,
        block_num: a.block_num,
        blur: !a.no_blur,
        device: super::device(&a.device)?,
    };
    let index = gradcam::run(&opts)?;
    eprintln!("wrote {} pair(s) to {}", index.as_array().map_or(0, Vec::len), opts.output_dir.display());
    Ok(())
}

#[derive(Args)]
pub struct PretrainArgs {
    #[command(flatten)]
    common: CommonArgs,
    /// DeiT-B/16 weights (deit_base_patch16_224-b5f2ef4d.pth) for the image encoder; overrides
    /// the config's init_deit.
    #[arg(long = "init-deit", alias = "init_deit")]
    init_deit: Option<PathBuf>,
}

pub fn pretrain(a: PretrainArgs) -> Result<()> {
    let run = a.common.into_run("./configs/Pretrain.yaml", "output/Pretrain")?;
    print(&pretrain::run(&PretrainOptions { run, init_deit: a.init_deit })?)
}

/// `albef launch`: torchrun's flags (underscores, as torchrun; dashes accepted too).
#[derive(Args)]
pub struct LaunchArgs {
    /// Processes on this node (one per GPU).
    #[arg(long = "nproc_per_node", alias = "nproc-per-node", default_value_t = 1)]
    nproc_per_node: usize,
    /// Nodes in the run.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index, 0 … nnodes − 1 (node 0 holds rank 0).
    #[arg(long = "node_rank", alias = "node-rank", default_value_t = 0)]
    node_rank: usize,
    /// Host of node 0, reachable from every node (default 127.0.0.1 on one node).
    #[arg(long = "master_addr", alias = "master-addr")]
    master_addr: Option<String>,
    /// Port of the rendezvous on node 0.
    #[arg(long = "master_port", alias = "master-port", default_value_t = albef::dist::DEFAULT_MASTER_PORT)]
    master_port: u16,
    /// The albef subcommand and its flags, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

pub fn launch(a: LaunchArgs) -> Result<()> {
    let opts = albef::dist::launch::LaunchOptions {
        nproc_per_node: a.nproc_per_node,
        nnodes: a.nnodes,
        node_rank: a.node_rank,
        master_addr: a.master_addr,
        master_port: a.master_port,
        command: a.command,
    };
    albef::dist::launch::launch(&opts, &std::env::current_exe()?)
}
