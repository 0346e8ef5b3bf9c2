//! A tiny retrieval model and a tiny VQA model trained on generated data, an index of the test
//! images, and an `albef serve` process on a loopback port (for the HTTP and browser tests).
#![allow(dead_code)]

use albef::data::synth::{generate, vocab_size, SynthConfig};
use albef::tasks::search::{index, IndexOptions, ModelFiles};
use albef::tasks::RunOptions;
use candle_core::Device;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Models {
    pub dir: PathBuf,
    pub vocab: PathBuf,
    pub retrieval_config: PathBuf,
    pub retrieval: PathBuf,
    pub vqa_config: PathBuf,
    pub vqa: PathBuf,
    /// An index of the 8 test images (copied into `photos/`).
    pub index: PathBuf,
    pub photos: PathBuf,
    pub answer_list: PathBuf,
}

fn bert(dir: &Path) -> PathBuf {
    let p = dir.join("bert.json");
    let text = format!(
        r#"{{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "max_position_embeddings": 40, "vocab_size": {}, "fusion_layer": 1, "encoder_width": 32}}"#,
        vocab_size()
    );
    std::fs::write(&p, text).unwrap();
    p
}

const MODEL: &str = "init_std: 0.1\nvision: {patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2, mlp_ratio: 2}\n\
    optimizer: {opt: adamW, lr: 1e-3, weight_decay: 0.02}\n";

fn schedule(epochs: usize) -> String {
    format!("schedular: {{sched: cosine, lr: 1e-3, epochs: {epochs}, min_lr: 1e-4, decay_rate: 1, warmup_lr: 1e-3, warmup_epochs: 1, cooldown_epochs: 0}}\n")
}

/// Trains both models (a few seconds each) under a fresh temporary folder named after `name`.
pub fn models(name: &str) -> Models {
    let dir = std::env::temp_dir().join(format!("albef-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    generate(&dir.join("data"), &SynthConfig { seed: 7, train: 96, val: 8, test: 8, image_size: 96, max_shapes: 1 })
        .unwrap();
    let b = bert(&dir);
    let d = dir.display();
    let vocab = dir.join("data/vocab.txt");

    let retrieval_config = dir.join("retrieval.yaml");
    std::fs::write(
        &retrieval_config,
        format!(
            "train_file: ['{d}/data/retrieval_train.json']\nval_file: '{d}/data/retrieval_val.json'\ntest_file: '{d}/data/retrieval_test.json'\n\
             image_root: '{d}/data'\nbert_config: '{}'\nimage_res: 32\nbatch_size_train: 16\nbatch_size_test: 8\n\
             queue_size: 32\nmomentum: 0.9\nvision_width: 32\nembed_dim: 16\ntemp: 0.07\nk_test: 8\nalpha: 0.4\ndistill: True\nwarm_up: True\n{MODEL}{}",
            b.display(),
            schedule(4)
        ),
    )
    .unwrap();
    let run =
        RunOptions { seed: 3, workers: Some(2), ..RunOptions::new(&retrieval_config, dir.join("retrieval"), &vocab) };
    albef::tasks::retrieval::run(&albef::tasks::retrieval::RetrievalOptions { run, save_scores: false }).unwrap();

    let vqa_config = dir.join("vqa.yaml");
    std::fs::write(
        &vqa_config,
        format!(
            "train_file: ['{d}/data/vqa_train.json']\ntest_file: ['{d}/data/vqa_test.json']\nanswer_list: '{d}/data/answer_list.json'\n\
             vqa_root: '{d}/data/'\nvg_root: '{d}/data/'\nimage_res: 32\nbatch_size_train: 16\nbatch_size_test: 8\nk_test: 8\n\
             alpha: 0.4\ndistill: True\nwarm_up: True\neos: '[SEP]'\nbert_config: '{}'\ndecoder_layers: 1\n{MODEL}{}",
            b.display(),
            schedule(4)
        ),
    )
    .unwrap();
    let run = RunOptions { seed: 2, workers: Some(2), ..RunOptions::new(&vqa_config, dir.join("vqa"), &vocab) };
    albef::tasks::vqa::run(&run).unwrap();

    // The test images, half in a sub-folder.
    let photos = dir.join("photos");
    std::fs::create_dir_all(photos.join("sub")).unwrap();
    let test: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("data/retrieval_test.json")).unwrap()).unwrap();
    for (i, e) in test.iter().enumerate() {
        let from = dir.join("data").join(e["image"].as_str().unwrap());
        let to = if i % 2 == 0 { photos.join("sub") } else { photos.clone() };
        std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
    }
    let retrieval = dir.join("retrieval/checkpoint_best.safetensors");
    let index_file = dir.join("photos.sqlite");
    let model = ModelFiles {
        checkpoint: retrieval.clone(),
        config: retrieval_config.clone(),
        text_encoder: vocab.clone(),
        device: Device::Cpu,
    };
    let s = index(&IndexOptions { model, images: photos.clone(), index: index_file.clone(), batch_size: 4 }).unwrap();
    assert_eq!((s.total, s.failed.len()), (8, 0));
    Models {
        vqa: dir.join("vqa/checkpoint_best.safetensors"),
        answer_list: dir.join("data/answer_list.json"),
        index: index_file,
        dir,
        vocab,
        retrieval_config,
        retrieval,
        vqa_config,
        photos,
    }
}

/// An `albef serve` process, killed when dropped.
pub struct Server {
    child: Child,
    /// `127.0.0.1:PORT`
    pub addr: String,
}

impl Server {
    /// Starts `albef serve --port 0 ARGS…` and waits for the address it prints.
    pub fn start(args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_albef"))
            .arg("serve")
            .args(["--port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line
            .split("http://")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or_else(|| panic!("albef serve printed {line:?}, not its address"))
            .to_string();
        Server { child, addr }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response: status, headers (lower-case names) and body.
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!("status {}: body is not JSON ({e}): {}", self.status, String::from_utf8_lossy(&self.body))
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The `error` message of a JSON error answer.
    pub fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or_else(|| panic!("no error message in {}", self.json())).to_string()
    }
}

/// One HTTP/1.1 request written byte for byte (a client library would normalise `..` out of the
/// path, which is what these tests must send), read to the end (`Connection: close`).
pub fn request(addr: &str, method: &str, target: &str, body: Option<(&str, &[u8])>) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some((content_type, b)) = body {
        head += &format!("Content-Type: {content_type}\r\nContent-Length: {}\r\n", b.len());
    }
    head += "\r\n";
    s.write_all(head.as_bytes()).unwrap();
    if let Some((_, b)) = body {
        // The server may answer 413 and close before reading it all.
        let _ = s.write_all(b);
    }
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| panic!("no HTTP answer to {method} {target}"));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.lines();
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = raw[split + 4..].to_vec();
    let r = Response { status, headers, body };
    assert_ne!(r.header("transfer-encoding"), Some("chunked"), "chunked answers are not decoded here");
    r
}

pub fn get(addr: &str, target: &str) -> Response {
    request(addr, "GET", target, None)
}

pub fn post_json(addr: &str, target: &str, body: &serde_json::Value) -> Response {
    request(addr, "POST", target, Some(("application/json", body.to_string().as_bytes())))
}
