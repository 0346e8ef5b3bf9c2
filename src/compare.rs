//! `albef compare`: the paper's numbers (`resources/paper_results.json`, transcribed from the
//! reference doc §8 with the table each comes from) beside a run's `metrics.json`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::Path;

const PAPER: &str = include_str!("../resources/paper_results.json");

#[derive(Clone, Debug, Deserialize)]
struct PaperFile {
    source: String,
    rows: Vec<PaperRow>,
}

#[derive(Clone, Debug, Deserialize)]
struct PaperRow {
    task: String,
    pretrain: String,
    #[serde(default)]
    dataset: Option<String>,
    setting: String,
    table: String,
    cells: Vec<PaperCell>,
}

#[derive(Clone, Debug, Deserialize)]
struct PaperCell {
    name: String,
    /// The `metrics.json` section holding the figure (`None`: top level).
    split: Option<String>,
    key: String,
    /// Multiplies the run's figure (grounding writes fractions, the paper percentages).
    #[serde(default)]
    scale: Option<f64>,
    value: f64,
}

/// What to compare against.
#[derive(Clone, Debug, Default)]
pub struct CompareOptions {
    /// retrieval, vqa, nlvr, ve, grounding (`None`: guessed from `metrics.json`).
    pub task: Option<String>,
    /// 4M or 14M.
    pub pretrain: String,
    /// Retrieval: flickr or coco (`None`: from the run's `config.yaml`).
    pub dataset: Option<String>,
    /// Retrieval: the zero-shot Flickr30K table (a COCO-fine-tuned model evaluated on Flickr).
    pub zero_shot: bool,
    /// Grounding: itm (default) or itc.
    pub method: Option<String>,
}

/// One compared figure.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    pub metric: String,
    pub paper: f64,
    /// `None` when the run's `metrics.json` lacks it (or holds `null`).
    pub run: Option<f64>,
    pub diff: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Comparison {
    pub run_dir: String,
    pub task: String,
    pub pretrain: String,
    pub dataset: Option<String>,
    pub setting: String,
    pub table: String,
    pub source: String,
    pub lines: Vec<Line>,
}

fn paper() -> Result<PaperFile> {
    serde_json::from_str(PAPER).context("resources/paper_results.json is not valid")
}

/// The task a `metrics.json` was written by, where its keys tell.
fn guess_task(m: &Value) -> Result<String> {
    if m.get("val_d").is_some() || m.get("testA_d").is_some() {
        return Ok("grounding".into());
    }
    if m.pointer("/test/vqa_acc").is_some() {
        return Ok("vqa".into());
    }
    if m.pointer("/test/txt_r1").is_some() {
        return Ok("retrieval".into());
    }
    if m.pointer("/test/acc").is_some() {
        bail!("metrics.json holds an accuracy, which NLVR2 and SNLI-VE both write: give --task nlvr or --task ve");
    }
    bail!("cannot tell the task from metrics.json's keys: give --task retrieval|vqa|nlvr|ve|grounding")
}

/// Flickr or COCO, from the test file named in the run's `config.yaml`.
fn guess_dataset(run_dir: &Path) -> Result<String> {
    let path = run_dir.join("config.yaml");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: cannot read it to tell Flickr from COCO; give --dataset", path.display()))?;
    let test = text.lines().find(|l| l.trim_start().starts_with("test_file")).unwrap_or("").to_lowercase();
    if test.contains("coco") {
        Ok("coco".into())
    } else if test.contains("flickr") {
        Ok("flickr".into())
    } else {
        bail!("{}: its test_file names neither Flickr nor COCO; give --dataset flickr|coco", path.display())
    }
}

/// Compares `run_dir/metrics.json` with the paper's row for the task and setting.
pub fn compare(run_dir: &Path, opts: &CompareOptions) -> Result<Comparison> {
    let path = run_dir.join("metrics.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let metrics: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let task = match &opts.task {
        Some(t) => t.to_lowercase(),
        None => guess_task(&metrics).with_context(|| path.display().to_string())?,
    };
    if !["retrieval", "vqa", "nlvr", "ve", "grounding"].contains(&task.as_str()) {
        bail!("unknown --task {task:?} (retrieval, vqa, nlvr, ve, grounding)");
    }
    let pretrain = opts.pretrain.to_uppercase();
    if pretrain != "4M" && pretrain != "14M" {
        bail!("unknown --pretrain {:?} (4M or 14M)", opts.pretrain);
    }
    if opts.zero_shot && task != "retrieval" {
        bail!("--zero-shot is a setting of the retrieval tables only");
    }
    let (dataset, setting) = match task.as_str() {
        "retrieval" => {
            let d = match &opts.dataset {
                Some(d) => d.to_lowercase(),
                None => guess_dataset(run_dir)?,
            };
            if d != "flickr" && d != "coco" {
                bail!("unknown --dataset {d:?} (flickr or coco)");
            }
            if opts.zero_shot && d == "coco" {
                bail!("the paper reports no zero-shot COCO retrieval (only zero-shot Flickr30K from a COCO-fine-tuned model)");
            }
            (Some(d), if opts.zero_shot { "zero-shot" } else { "fine-tuned" }.to_string())
        }
        "grounding" => {
            let m = opts.method.clone().unwrap_or_else(|| "itm".into()).to_lowercase();
            if m != "itm" && m != "itc" {
                bail!("unknown --method {m:?} (itm or itc)");
            }
            if pretrain != "14M" {
                bail!("the paper reports grounding only for the 14M model (use --pretrain 14M)");
            }
            (None, m)
        }
        _ => (None, "fine-tuned".to_string()),
    };
    let paper = paper()?;
    let Some(row) = paper.rows.iter().find(|r| {
        r.task == task && r.pretrain == pretrain && r.setting == setting && r.dataset.as_deref() == dataset.as_deref()
    }) else {
        bail!("resources/paper_results.json has no row for {task} {pretrain} {setting} {dataset:?}");
    };
    let lines = row
        .cells
        .iter()
        .map(|c| {
            let section = match &c.split {
                Some(s) => metrics.get(s),
                None => Some(&metrics),
            };
            let run = section.and_then(|s| s.get(&c.key)).and_then(Value::as_f64).map(|v| v * c.scale.unwrap_or(1.0));
            Line { metric: c.name.clone(), paper: c.value, run, diff: run.map(|r| r - c.value) }
        })
        .collect::<Vec<_>>();
    if lines.iter().all(|l| l.run.is_none()) {
        let keys: Vec<String> = row
            .cells
            .iter()
            .map(|c| format!("{}{}", c.split.as_ref().map_or(String::new(), |s| format!("{s}.")), c.key))
            .collect();
        bail!("{} has none of the {task} figures ({})", path.display(), keys.join(", "));
    }
    Ok(Comparison {
        run_dir: run_dir.display().to_string(),
        task,
        pretrain,
        dataset,
        setting,
        table: row.table.clone(),
        source: paper.source,
        lines,
    })
}

impl Comparison {
    pub fn to_json(&self) -> Value {
        json!(self)
    }

    pub fn to_markdown(&self) -> String {
        let fmt = |v: Option<f64>, sign: bool| match v {
            Some(v) if sign => format!("{v:+.2}"),
            Some(v) => format!("{v:.2}"),
            None => "—".into(),
        };
        let mut out = format!(
            "## {} vs. the paper ({} pre-training{}, {})\n\nPaper table: {}  \nSource: {}\n\n| metric | paper | run | run − paper |\n|---|---|---|---|\n",
            self.run_dir,
            self.pretrain,
            self.dataset.as_ref().map_or(String::new(), |d| format!(", {d}")),
            self.setting,
            self.table,
            self.source
        );
        for l in &self.lines {
            out += &format!("| {} | {:.2} | {} | {} |\n", l.metric, l.paper, fmt(l.run, false), fmt(l.diff, true));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_dir(name: &str, metrics: Value, config: Option<&str>) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("albef-compare-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("metrics.json"), metrics.to_string()).unwrap();
        if let Some(c) = config {
            std::fs::write(dir.join("config.yaml"), c).unwrap();
        }
        dir
    }

    #[test]
    fn every_paper_row_parses_and_names_its_table() {
        let p = paper().unwrap();
        assert_eq!(p.rows.len(), 4 + 2 + 6 + 2);
        assert!(p.rows.iter().all(|r| !r.table.is_empty() && !r.cells.is_empty()));
    }

    #[test]
    fn retrieval_against_flickr_14m_and_zero_shot() {
        let m = json!({"val": {"txt_r1": 1.0}, "test": {"txt_r1": 95.0, "txt_r5": 99.8, "txt_r10": 100.0,
            "img_r1": 85.0, "img_r5": 97.5, "img_r10": 99.0}, "best_epoch": 3});
        let dir = run_dir("ret", m, Some("test_file: 'data/flickr30k_test.json'\n"));
        let opts = CompareOptions { pretrain: "14M".into(), ..Default::default() };
        let c = compare(&dir, &opts).unwrap();
        assert_eq!(
            (c.task.as_str(), c.dataset.as_deref(), c.setting.as_str()),
            ("retrieval", Some("flickr"), "fine-tuned")
        );
        assert_eq!(c.lines[0].metric, "TR@1");
        assert!((c.lines[0].diff.unwrap() - (95.0 - 95.9)).abs() < 1e-9);
        assert!((c.lines[3].paper - 85.6).abs() < 1e-9);
        let zs = compare(&dir, &CompareOptions { zero_shot: true, ..opts.clone() }).unwrap();
        assert!((zs.lines[0].paper - 94.1).abs() < 1e-9);
        let md = zs.to_markdown();
        assert!(md.contains("| TR@1 | 94.10 | 95.00 | +0.90 |"), "{md}");
        let coco = CompareOptions { zero_shot: true, dataset: Some("coco".into()), ..opts };
        assert!(format!("{:#}", compare(&dir, &coco).unwrap_err()).contains("no zero-shot COCO"));
    }

    #[test]
    fn grounding_fractions_are_scaled_and_classify_needs_a_task() {
        let dir = run_dir("gr", json!({"val_d": 0.5846, "testA_d": 0.6, "testB_d": null}), None);
        let c = compare(&dir, &CompareOptions { pretrain: "14M".into(), ..Default::default() }).unwrap();
        assert_eq!(c.setting, "itm");
        assert!((c.lines[0].run.unwrap() - 58.46).abs() < 1e-9);
        assert!(c.lines[0].diff.unwrap().abs() < 1e-9);
        assert_eq!(c.lines[2].run, None);
        let e = compare(&dir, &CompareOptions { pretrain: "4M".into(), ..Default::default() }).unwrap_err();
        assert!(format!("{e:#}").contains("only for the 14M"));

        let dir = run_dir("nlvr", json!({"val": {"acc": 80.0}, "test": {"acc": 81.0}}), None);
        let e = compare(&dir, &CompareOptions { pretrain: "4M".into(), ..Default::default() }).unwrap_err();
        assert!(format!("{e:#}").contains("--task nlvr or --task ve"));
        let opts = CompareOptions { pretrain: "4M".into(), task: Some("nlvr".into()), ..Default::default() };
        let c = compare(&dir, &opts).unwrap();
        assert_eq!(c.lines.iter().map(|l| l.paper).collect::<Vec<_>>(), [80.24, 80.50]);
        assert_eq!(c.to_json()["lines"][1]["run"], json!(81.0));
        let vqa = CompareOptions { task: Some("vqa".into()), ..opts };
        assert!(format!("{:#}", compare(&dir, &vqa).unwrap_err()).contains("none of the vqa figures"));
    }
}
