//! Data-parallel runs at world size 2 on the CPU (the TCP backend), checked against one process:
//! (a) the ranks read disjoint shards covering the epoch; (b) after k steps both ranks hold the
//! same weights, optimizer state and queues; (c) those equal one process doing the reference's
//! 2-GPU step by hand (a forward per rank on its shard, the queue update with both ranks'
//! features, the mean of the two gradients); (d) distributed retrieval evaluation gives the
//! one-process metrics and score matrices; (e) a rank that dies, or never comes, ends the others
//! with an error naming it, in bounded time; (f) a 2-rank run resumed in 1 rank continues from its
//! state; and `albef launch --nproc_per_node 2 -- retrieval …` end to end.

use albef::checkpoint::{read_checkpoint, StateDict};
use albef::config::{Config, Overrides, RetrievalKeys};
use albef::data::loader::{epoch_batches, mix, Dataset, Loader, LoaderConfig};
use albef::data::retrieval::RetrievalTrain;
use albef::data::synth::{generate, SynthConfig};
use albef::data::Tokenizer;
use albef::dist::tcp::local_group;
use albef::dist::{Comm, Timeouts};
use albef::model::{ContrastiveModel, Objective, TaskModel};
use albef::tasks::harness::Ctx;
use albef::tasks::retrieval::{run, train_step, RetrievalOptions};
use albef::tasks::RunOptions;
use albef::train::optim::AdamW;
use albef::train::run::RunDir;
use albef::train::schedule::alpha;
use albef::train::{train_epoch, LoopConfig};
use candle_core::{Device, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SEED: u64 = 3;
const BATCH: usize = 4;

struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("albef-dist-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = SynthConfig { seed: 5, train: 48, val: 8, test: 8, image_size: 32, max_shapes: 1 };
        generate(&dir.join("data"), &cfg).unwrap();
        // No dropout: the by-hand reference step of (c) runs both ranks on one thread, which has
        // one dropout generator.
        std::fs::write(
            dir.join("bert.json"),
            r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                "max_position_embeddings": 40, "vocab_size": 150, "fusion_layer": 1, "encoder_width": 32,
                "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}"#,
        )
        .unwrap();
        let f = Self { dir };
        f.write_config("config.yaml", 2);
        f
    }

    fn write_config(&self, name: &str, epochs: usize) -> PathBuf {
        let d = self.dir.display();
        // queue_size 32: a multiple of the batch over 1 rank (4) and over 2 (8).
        let text = format!(
            "train_file: ['{d}/data/retrieval_train.json']\nval_file: '{d}/data/retrieval_val.json'\ntest_file: '{d}/data/retrieval_test.json'\n\
             image_root: '{d}/data'\nbert_config: '{d}/bert.json'\nimage_res: 32\nbatch_size_train: {BATCH}\nbatch_size_test: 8\n\
             queue_size: 32\nmomentum: 0.9\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\nk_test: 4\nalpha: 0.4\ndistill: True\nwarm_up: True\n\
             init_std: 0.1\nvision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
             optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
             schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
        );
        let path = self.dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.yaml")
    }

    fn vocab(&self) -> PathBuf {
        self.dir.join("data/vocab.txt")
    }

    fn options(&self, config: &Path, out: &str, dist: Option<Comm>) -> RetrievalOptions {
        let run = RunOptions {
            seed: SEED,
            workers: Some(1),
            dist,
            ..RunOptions::new(config, self.dir.join(out), self.vocab())
        };
        RetrievalOptions { run, save_scores: true }
    }
}

fn timeouts() -> Timeouts {
    Timeouts { rendezvous: Duration::from_secs(60), op: Duration::from_secs(120) }
}

fn group() -> Vec<Comm> {
    local_group(2, timeouts()).unwrap().into_iter().map(|c| Arc::new(c) as Comm).collect()
}

/// Runs `f(rank, comm)` on one thread per rank and returns the results in rank order.
fn per_rank<T: Send + 'static>(comms: Vec<Comm>, f: impl Fn(usize, Comm) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = Arc::new(f);
    let handles: Vec<_> = comms
        .into_iter()
        .enumerate()
        .map(|(rank, comm)| {
            let f = f.clone();
            std::thread::spawn(move || f(rank, comm))
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("a rank panicked")).collect()
}

/// What a rank's training leaves: model tensors (parameters, teacher, queues) and optimizer state.
struct Trained {
    model: BTreeMap<String, Vec<f32>>,
    optimizer: BTreeMap<String, Vec<f32>>,
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1::<f32>().unwrap()
}

fn snapshot(model: &ContrastiveModel, optimizer: &AdamW) -> Trained {
    Trained {
        model: model.store.named_tensors().iter().map(|(k, t)| (k.clone(), values(t))).collect(),
        optimizer: optimizer.state().unwrap().iter().map(|(k, t)| (k.clone(), values(t))).collect(),
    }
}

/// The pieces every rank (and the by-hand reference) builds the same way.
struct Parts {
    model: ContrastiveModel,
    optimizer: AdamW,
    tokenizer: Tokenizer,
    train: Arc<RetrievalTrain>,
    cfg: Config<RetrievalKeys>,
}

fn parts(f: &Fixture) -> Parts {
    let cfg = Config::<RetrievalKeys>::load_with(&f.config(), true, &Overrides::default()).unwrap();
    let model_cfg = cfg.model_config().unwrap();
    let training = cfg.training().unwrap();
    let model = ContrastiveModel::new(&model_cfg, Objective::Retrieval, &Device::Cpu, SEED).unwrap();
    let optimizer = AdamW::new(&model.store, training.optimizer.weight_decay).unwrap();
    let train = Arc::new(
        RetrievalTrain::new(
            &cfg.files(&training.train_file).unwrap(),
            Path::new(&cfg.data.image_root),
            model_cfg.vision.image_res,
            30,
        )
        .unwrap(),
    );
    let tokenizer = Tokenizer::from_path(&f.vocab()).unwrap();
    Parts { model, optimizer, tokenizer, train, cfg }
}

fn loader(p: &Parts, rank: usize, world: usize) -> Loader<RetrievalTrain> {
    Loader::new(p.train.clone(), LoaderConfig::train(BATCH, SEED).workers(Some(1)).shard(rank, world))
}

/// `epochs` epochs of this rank of a 2-rank run, through the training loop itself.
fn train_rank(f: &Fixture, rank: usize, comm: Comm, epochs: usize) -> Trained {
    let mut p = parts(f);
    p.model.queues.gather_with(comm.clone());
    albef::train::distributed::sync_model(comm.as_ref(), &p.model.store).unwrap();
    let training = p.cfg.training().unwrap();
    let loop_cfg = LoopConfig { dist: Some(comm.clone()), ..LoopConfig::new(&training, SEED + rank as u64) };
    let run = RunDir::secondary(&f.dir.join("unused"));
    let ctx = Ctx {
        model: &p.model,
        tokenizer: &p.tokenizer,
        device: &Device::Cpu,
        workers: Some(1),
        run: &run,
        comm: Some(&comm),
    };
    let loader = loader(&p, rank, 2);
    let mut skipped = 0;
    for epoch in 0..epochs {
        let n = loader.num_batches(epoch as u64);
        train_epoch(
            &loop_cfg,
            &mut p.optimizer,
            &mut skipped,
            epoch,
            loader.epoch(epoch as u64, 0),
            n,
            |b, a, rng| train_step(&ctx, b, a, rng),
            |_, _, _, _| Ok(()),
        )
        .unwrap();
    }
    snapshot(&p.model, &p.optimizer)
}

/// The same epochs as one process computes the reference's 2-GPU step: each rank's forward on
/// its own shard against the same queue, then the queue written with rank 0's then rank 1's
/// momentum features, and the optimizer step with the mean of the two gradients.
fn reference_two_gpu_step(f: &Fixture, epochs: usize) -> Trained {
    reference_step(f, epochs, true)
}

/// [`reference_two_gpu_step`], or with `both` false, a wrong variant: rank 0's gradient alone and
/// its own features only in the queue.
fn reference_step(f: &Fixture, epochs: usize, both: bool) -> Trained {
    let mut ranks = [parts(f), parts(f)];
    let training = ranks[0].cfg.training().unwrap();
    let loop_cfg = LoopConfig::new(&training, SEED);
    let run = RunDir::secondary(&f.dir.join("unused"));
    for epoch in 0..epochs {
        let loaders = [loader(&ranks[0], 0, 2), loader(&ranks[1], 1, 2)];
        let mut batches = [loaders[0].epoch(epoch as u64, 0), loaders[1].epoch(epoch as u64, 0)];
        let mut rngs = [0u64, 1].map(|r| StdRng::seed_from_u64(mix(SEED + r, 2 * epoch as u64)));
        let n = loaders[0].num_batches(epoch as u64);
        assert_eq!(n, loaders[1].num_batches(epoch as u64));
        for i in 0..n {
            let lr = loop_cfg.schedule.lr(epoch, i);
            let a = alpha(loop_cfg.alpha, loop_cfg.warm_up, epoch, i, n);
            let ptr = ranks[0].model.queues.ptr.as_tensor().to_vec1::<i64>().unwrap()[0] as usize;
            let mut grads = Vec::new();
            for (r, p) in ranks.iter().enumerate() {
                let ctx = Ctx {
                    model: &p.model,
                    tokenizer: &p.tokenizer,
                    device: &Device::Cpu,
                    workers: Some(1),
                    run: &run,
                    comm: None,
                };
                let batch = batches[r].next().unwrap().unwrap();
                let losses = train_step(&ctx, batch, a, &mut rngs[r]).unwrap();
                let total = (&losses[0].1 + &losses[1].1).unwrap();
                grads.push(total.backward().unwrap());
            }
            // Each model enqueued only its own features at `ptr`; the gathered update puts rank
            // 0's there and rank 1's after them, in both models.
            let q0 = &ranks[0].model.queues;
            let q1 = &ranks[1].model.queues;
            let gathered = |a: &Tensor, b: &Tensor| -> Tensor {
                let size = a.dim(1).unwrap();
                let mut parts = Vec::new();
                if ptr > 0 {
                    parts.push(a.narrow(1, 0, ptr).unwrap());
                }
                parts.push(a.narrow(1, ptr, BATCH).unwrap());
                parts.push(if both { b } else { a }.narrow(1, ptr, BATCH).unwrap());
                if ptr + 2 * BATCH < size {
                    parts.push(a.narrow(1, ptr + 2 * BATCH, size - ptr - 2 * BATCH).unwrap());
                }
                Tensor::cat(&parts, 1).unwrap()
            };
            let image = gathered(q0.image.as_tensor(), q1.image.as_tensor());
            let text = gathered(q0.text.as_tensor(), q1.text.as_tensor());
            let idx = gathered(q0.idx.as_ref().unwrap().as_tensor(), q1.idx.as_ref().unwrap().as_tensor());
            q0.image.set(&image).unwrap();
            q0.text.set(&text).unwrap();
            q0.idx.as_ref().unwrap().set(&idx).unwrap();
            q0.ptr.set(&Tensor::new(&[((ptr + 2 * BATCH) % 32) as i64], &Device::Cpu).unwrap()).unwrap();
            // The queues keep their pointer on the host once they have enqueued: re-read it.
            q0.reload_ptr();
            // The mean gradient of each parameter (rank 1's matched by name).
            let (g0, g1) = grads[0..2].split_at_mut(1);
            let online1: BTreeMap<String, candle_core::Var> =
                ranks[1].model.store.trainable().into_iter().map(|p| (p.name, p.var)).collect();
            for p in ranks[0].model.store.trainable() {
                let a = g0[0].get(&p.var).cloned();
                let b = g1[0].get(&online1[&p.name]).cloned();
                let b = if both { b } else { a.clone() };
                let mean = match (a, b) {
                    (Some(a), Some(b)) => ((a + b).unwrap() / 2.0).unwrap(),
                    (Some(a), None) => (a / 2.0).unwrap(),
                    (None, Some(b)) => (b / 2.0).unwrap(),
                    (None, None) => continue,
                };
                g0[0].insert(p.var.as_tensor(), mean);
            }
            let [p0, p1] = &mut ranks;
            p0.optimizer.step(&g0[0], lr).unwrap();
            // Rank 1 holds what rank 0 holds (weights, teacher, queues).
            let all1: BTreeMap<String, candle_core::Var> =
                p1.model.store.params().into_iter().map(|p| (p.name, p.var)).chain(p1.model.store.buffers()).collect();
            for (name, t) in p0.model.store.named_tensors() {
                all1[&name].set(&t.copy().unwrap()).unwrap();
            }
            p1.model.queues.reload_ptr();
        }
    }
    snapshot(&ranks[0].model, &ranks[0].optimizer)
}

fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f32, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = (0f32, String::new());
    for (k, va) in a {
        for (x, y) in va.iter().zip(&b[k]) {
            let d = (x - y).abs();
            if d > worst.0 || d.is_nan() {
                worst = (d, k.clone());
            }
        }
    }
    worst
}

#[test]
fn a_the_ranks_read_disjoint_shards_covering_the_epoch() {
    for (len, world) in [(48, 2), (47, 2), (50, 3)] {
        for epoch in 0..3 {
            let cfg = |r| LoaderConfig { drop_last: false, ..LoaderConfig::train(BATCH, SEED).shard(r, world) };
            let shards: Vec<Vec<usize>> = (0..world).map(|r| epoch_batches(len, &cfg(r), epoch).concat()).collect();
            let per_rank = len.div_ceil(world);
            assert!(shards.iter().all(|s| s.len() == per_rank), "{len}/{world}: equal shards (padded)");
            let mut all: Vec<usize> = shards.concat();
            all.sort();
            let padding = per_rank * world - len;
            let mut distinct = all.clone();
            distinct.dedup();
            assert_eq!(distinct, (0..len).collect::<Vec<_>>(), "{len}/{world}: every sample is read");
            assert_eq!(all.len() - distinct.len(), padding, "{len}/{world}: only the padding repeats");
            if padding == 0 {
                for a in 0..world {
                    for b in a + 1..world {
                        assert!(shards[a].iter().all(|i| !shards[b].contains(i)), "ranks {a} and {b} overlap");
                    }
                }
            }
            // The same permutation on every rank (one process's order, dealt out).
            let one = epoch_batches(len, &LoaderConfig { drop_last: false, ..LoaderConfig::train(BATCH, SEED) }, epoch)
                .concat();
            assert_eq!(shards[0][0], one[0]);
            assert_eq!(shards[world - 1][0], one[world - 1]);
            // The train loader drops each rank's last incomplete batch.
            let kept: usize =
                epoch_batches(len, &LoaderConfig::train(BATCH, SEED).shard(0, world), epoch).concat().len();
            assert_eq!(kept, per_rank / BATCH * BATCH);
        }
    }
}

#[test]
fn b_c_two_ranks_stay_identical_and_equal_the_reference_two_gpu_step() {
    let f = Fixture::new("steps");
    let fa = Arc::new(Fixture { dir: f.dir.clone() });
    let epochs = 2;
    let steps = parts(&f).train.len() / 2 / BATCH;
    let trained = per_rank(group(), move |rank, comm| train_rank(&fa, rank, comm, epochs));
    // (b) bit-identical ranks: weights, teacher, queues, queue_ptr, optimizer moments.
    assert_eq!(trained[0].model, trained[1].model, "the ranks' model tensors differ");
    assert_eq!(trained[0].optimizer, trained[1].optimizer, "the ranks' optimizer states differ");
    assert_eq!(trained[0].model["queue_ptr"], [((epochs * steps * 2 * BATCH) % 32) as f32]);
    // (c) the by-hand reference step.
    let reference = reference_two_gpu_step(&f, epochs);
    let (d, at) = max_diff(&trained[0].model, &reference.model);
    eprintln!("largest difference to the reference 2-GPU step: {d:e} ({at})");
    assert!(d <= 1e-5, "model differs from the reference 2-GPU step by {d} at {at}");
    let (d, at) = max_diff(&trained[0].optimizer, &reference.optimizer);
    assert!(d <= 1e-5, "optimizer state differs from the reference 2-GPU step by {d} at {at}");
    // A step that only looks like it (rank 0's gradient alone, the queue as one rank writes it)
    // is far from it: the comparison tells the two apart.
    let wrong = reference_step(&f, epochs, false);
    let weights = |t: &Trained| -> BTreeMap<String, Vec<f32>> {
        t.model.iter().filter(|(k, _)| !k.contains("queue")).map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    let (d, at) = max_diff(&weights(&trained[0]), &weights(&wrong));
    eprintln!("difference to a step with rank 0's gradient and queue only: {d:e} ({at})");
    assert!(d > 1e-3, "the check cannot tell a one-rank step from the 2-GPU step ({d})");
    // And training moved the weights (the comparison is not between two untouched models).
    let start = parts(&f);
    let (moved, _) = max_diff(
        &trained[0].model,
        &start.model.store.named_tensors().iter().map(|(k, t)| (k.clone(), values(t))).collect(),
    );
    assert!(moved > 1e-3, "training did not change the weights ({moved})");
}

fn scores(dir: &Path, split: &str) -> StateDict {
    read_checkpoint(&dir.join(format!("scores_{split}.safetensors")), &Device::Cpu).unwrap().tensors
}

#[test]
fn d_distributed_retrieval_evaluation_equals_one_process() {
    let f = Arc::new(Fixture::new("eval"));
    let mut single = f.options(&f.config(), "single", None);
    single.run.evaluate = true;
    let want = run(&single).unwrap();
    let fa = f.clone();
    let got = per_rank(group(), move |_, comm| {
        let mut o = fa.options(&fa.config(), "dist", Some(comm));
        o.run.evaluate = true;
        run(&o).unwrap()
    });
    assert_eq!(got[0], want, "rank 0's metrics");
    assert_eq!(got[1], want, "rank 1's metrics");
    for split in ["val", "test"] {
        let (a, b) = (scores(&single.run.output_dir, split), scores(&f.dir.join("dist"), split));
        for m in ["score_i2t", "score_t2i"] {
            assert_eq!(values(&a[m]), values(&b[m]), "{split} {m}");
        }
        // Not a matrix of fill values: ITM scores were written into it.
        assert!(values(&a["score_i2t"]).iter().any(|&v| v != -100.0));
    }
    // Only rank 0 wrote: one log line for the evaluation.
    let log = std::fs::read_to_string(f.dir.join("dist/log.txt")).unwrap();
    assert_eq!(log.lines().count(), 1);
}

#[test]
fn d_sharded_classification_evaluation_equals_one_process() {
    use albef::task::Task;
    use albef::tasks::classify::{run as classify, ClassifyOptions};
    let f = Arc::new(Fixture::new("ve"));
    let d = f.dir.display();
    // batch_size_test 3: shards of uneven batches, and padding when the split is odd.
    let yaml = format!(
        "train_file: '{d}/data/ve_train.json'\nval_file: '{d}/data/ve_val.json'\ntest_file: '{d}/data/ve_test.json'\n\
         image_root: '{d}/data/ve_images'\nbert_config: '{d}/bert.json'\nimage_res: 32\nalpha: 0.4\ndistill: True\n\
         batch_size_train: 16\nbatch_size_test: 3\nwarm_up: False\ninit_std: 0.1\n\
         vision: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}}\n\
         optimizer: {{opt: adamW, lr: 1e-3, weight_decay: 0.02}}\n\
         schedular: {{sched: cosine, lr: 1e-3, epochs: 1, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n"
    );
    std::fs::write(f.dir.join("ve.yaml"), yaml).unwrap();
    let options = move |f: &Fixture, out: &str, dist: Option<Comm>| {
        let run = RunOptions {
            seed: SEED,
            workers: Some(1),
            evaluate: true,
            dist,
            ..RunOptions::new(f.dir.join("ve.yaml"), f.dir.join(out), f.vocab())
        };
        ClassifyOptions { task: Task::Ve, run, teacher_from_checkpoint: false }
    };
    let want = classify(&options(&f, "single", None)).unwrap();
    let fa = f.clone();
    let got = per_rank(group(), move |_, comm| classify(&options(&fa, "dist", Some(comm))).unwrap());
    assert_eq!(got[0], want);
    assert_eq!(got[1], want);
    for split in ["val", "test"] {
        let read =
            |out: &str| std::fs::read_to_string(f.dir.join(out).join(format!("predictions_{split}.json"))).unwrap();
        let (a, b) = (read("single"), read("dist"));
        assert_eq!(a, b, "{split} predictions");
        let n = serde_json::from_str::<serde_json::Value>(&a).unwrap().as_array().unwrap().len();
        assert!(n > 0, "{split}: no predictions");
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn rank_process(f: &Fixture, config: &Path, out: &str, rank: usize, port: u16) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_albef"));
    c.args(["retrieval", "--config"])
        .arg(config)
        .arg("--output_dir")
        .arg(f.dir.join(out))
        .arg("--text_encoder")
        .arg(f.vocab())
        .args(["--workers", "1", "--seed", "3"])
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", "2")
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port.to_string())
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

#[test]
fn e_a_rank_that_dies_or_never_comes_ends_the_others() {
    use std::io::{BufRead, BufReader};
    let f = Fixture::new("dies");
    let config = f.write_config("long.yaml", 200);
    let port = free_port();
    let mut zero = rank_process(&f, &config, "run", 0, port).spawn().unwrap();
    let mut one = rank_process(&f, &config, "run", 1, port).spawn().unwrap();
    // Kill rank 1 (SIGKILL, no goodbye) once it trains.
    let stderr = one.stderr.take().unwrap();
    for line in BufReader::new(stderr).lines() {
        if line.unwrap().contains("Train Epoch") {
            break;
        }
    }
    one.kill().unwrap();
    one.wait().unwrap();
    let killed = Instant::now();
    let mut zero_err = zero.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut zero_err, &mut err).unwrap();
        err
    });
    let status = loop {
        if let Some(s) = zero.try_wait().unwrap() {
            break s;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "rank 0 still runs 60 s after rank 1 died");
        std::thread::sleep(Duration::from_millis(50));
    };
    let err = reader.join().unwrap();
    assert!(!status.success());
    assert!(err.contains("rank 1 closed its connection"), "{err}");
    eprintln!("rank 0 stopped {:?} after rank 1 was killed", killed.elapsed());

    // Rank 1 never starts: rank 0 gives up after ALBEF_RENDEZVOUS_TIMEOUT, naming host:port.
    let port = free_port();
    let start = Instant::now();
    let out = rank_process(&f, &config, "alone", 0, port).env("ALBEF_RENDEZVOUS_TIMEOUT", "2").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("rendezvous at 127.0.0.1:{port}: rank(s) 1 of world size 2 did not join")), "{err}");
    assert!(start.elapsed() < Duration::from_secs(30));
    assert!(!f.dir.join("alone/log.txt").exists());
}

fn train_state(dir: &Path) -> serde_json::Value {
    let ckpt = read_checkpoint(&dir.join("checkpoint_last.safetensors"), &Device::Cpu).unwrap();
    serde_json::from_str(&ckpt.metadata["albef_train_state"]).unwrap()
}

#[test]
fn f_a_two_rank_run_resumes_in_one_rank() {
    let f = Arc::new(Fixture::new("resume"));
    let fa = f.clone();
    // Epoch 0 over 2 ranks (steps of 2 × 4 samples), then stop.
    per_rank(group(), move |_, comm| {
        let mut o = fa.options(&fa.config(), "run", Some(comm));
        o.run.stop_after_epoch = Some(1);
        run(&o).unwrap()
    });
    let out = f.dir.join("run");
    let len = parts(&f).train.len();
    let (steps2, steps1) = (len / 2 / BATCH, len / BATCH);
    assert_eq!(train_state(&out)["optimizer_step"], steps2);
    let after0 = read_checkpoint(&out.join("checkpoint_last.safetensors"), &Device::Cpu).unwrap().tensors;
    let ptr0 = steps2 * 2 * BATCH % 32;
    assert_eq!(after0["queue_ptr"].to_vec1::<i64>().unwrap(), [ptr0 as i64]);
    // Epoch 1 in one process: steps of 4 samples over the whole set, from the 2-rank state.
    let mut rest = f.options(&f.config(), "run", None);
    rest.run.resume = true;
    let metrics = run(&rest).unwrap();
    assert!(metrics["test"]["r_mean"].as_f64().is_some());
    let state = train_state(&out);
    assert_eq!(state["optimizer_step"], steps2 + steps1);
    assert_eq!(state["epochs_done"], 2);
    let end = read_checkpoint(&out.join("checkpoint_last.safetensors"), &Device::Cpu).unwrap().tensors;
    assert_eq!(end["queue_ptr"].to_vec1::<i64>().unwrap(), [((ptr0 + steps1 * BATCH) % 32) as i64]);
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    let epochs: Vec<u64> =
        log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?.get("epoch")?.as_u64()).collect();
    assert_eq!(epochs, [0, 1], "one log line per epoch, the 2-rank one kept: {log}");
    // The checkpoint holds the model and both optimizer moments of every trainable parameter.
    let model = ContrastiveModel::new(
        &Config::<RetrievalKeys>::load_with(&f.config(), true, &Overrides::default()).unwrap().model_config().unwrap(),
        Objective::Retrieval,
        &Device::Cpu,
        SEED,
    )
    .unwrap();
    assert_eq!(model.store().named_tensors().len() + 2 * model.store().trainable().len(), end.len());
}

#[test]
fn launch_runs_the_tiny_retrieval_on_two_ranks() {
    let f = Fixture::new("launch");
    let port = free_port();
    let out = f.dir.join("run");
    let res = Command::new(env!("CARGO_BIN_EXE_albef"))
        .args(["launch", "--nproc_per_node", "2", "--master_port", &port.to_string(), "--", "retrieval", "--config"])
        .arg(f.config())
        .arg("--output_dir")
        .arg(&out)
        .arg("--text_encoder")
        .arg(f.vocab())
        .args(["--workers", "1", "--seed", "3"])
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&res.stdout), String::from_utf8_lossy(&res.stderr));
    assert!(res.status.success(), "{stderr}");
    assert!(stderr.contains("[rank 0] rank 0 of 2") && stderr.contains("[rank 1] rank 1 of 2"), "{stderr}");
    // Both ranks print the metrics; rank 0 alone writes them.
    assert!(stdout.contains("[rank 0] ") && stdout.contains("[rank 1] "), "{stdout}");
    let log = std::fs::read_to_string(out.join("log.txt")).unwrap();
    assert_eq!(log.lines().count(), 3, "2 epochs + the test record, once each: {log}");
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["test"]["r_mean"].as_f64().is_some());
    assert_eq!(train_state(&out)["optimizer_step"], 2 * parts(&f).train.len() / 2 / BATCH);

    // A failing rank fails the launch, naming it.
    let res = Command::new(env!("CARGO_BIN_EXE_albef"))
        .args(["launch", "--nproc_per_node", "2", "--master_port", &free_port().to_string(), "--", "retrieval"])
        .args(["--config", "/nonexistent.yaml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert!(!res.status.success());
    assert!(stderr.contains("exited with status 1"), "{stderr}");
}
