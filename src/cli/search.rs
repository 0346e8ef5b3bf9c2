//! `albef index` and `albef search`: search a photo folder by text or by image.

use albef::tasks::search::{index, read_texts, IndexOptions, ModelFiles, Query, SearchOptions, Searcher};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

#[derive(Args)]
pub struct IndexArgs {
    /// A retrieval checkpoint (fine-tuned, ALBEF.pth, or one `albef retrieval` wrote).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The task YAML that sizes the model (the retrieval config).
    #[arg(long, default_value = "./configs/Retrieval_flickr.yaml")]
    config: PathBuf,
    /// Local bert-base-uncased folder (vocab.txt or tokenizer.json).
    #[arg(long = "text_encoder", alias = "text-encoder", default_value = "bert-base-uncased")]
    text_encoder: PathBuf,
    /// The photo folder (searched recursively for .jpg, .jpeg, .png).
    #[arg(long)]
    images: PathBuf,
    /// The index file (SQLite), created when missing, updated otherwise.
    #[arg(long)]
    index: PathBuf,
    /// Images per batch and per committed transaction.
    #[arg(long = "batch-size", default_value_t = 32)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn index_cmd(a: IndexArgs) -> Result<()> {
    let opts = IndexOptions {
        model: ModelFiles {
            checkpoint: a.checkpoint,
            config: a.config,
            text_encoder: a.text_encoder,
            device: super::device(&a.device)?,
        },
        images: a.images,
        index: a.index,
        batch_size: a.batch_size,
    };
    let s = index(&opts)?;
    let rate = if s.seconds > 0.0 { s.encoded as f64 / s.seconds } else { 0.0 };
    println!(
        "{}: {} images ({} encoded, {} unchanged, {} with new times only, {} removed, {} unreadable) in {:.1}s ({rate:.1} images/s)",
        opts.index.display(),
        s.total,
        s.encoded,
        s.unchanged,
        s.touched,
        s.removed,
        s.failed.len(),
        s.seconds
    );
    for (path, why) in &s.failed {
        println!("skipped {path}: {why}");
    }
    Ok(())
}

/// Where the model of an index comes from, when not from the files the index names
/// (`albef search` and `albef serve`).
#[derive(Args, Clone)]
pub struct IndexModelArgs {
    /// In place of the checkpoint the index names (it must be the same file content).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// In place of the config the index names.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// In place of the text encoder folder the index names.
    #[arg(long = "text_encoder", alias = "text-encoder")]
    pub text_encoder: Option<PathBuf>,
}

#[derive(Args)]
pub struct SearchArgs {
    /// The index `albef index` wrote.
    #[arg(long)]
    index: PathBuf,
    /// The text query (or give --image).
    #[arg(required_unless_present = "image", conflicts_with = "image")]
    query: Option<String>,
    /// Image → image: find photos like this one.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Text → text: rank these texts (one a line, or a JSON list of strings) by the query
    /// instead of the photos (the index gives the model).
    #[arg(long, conflicts_with_all = ["image", "rerank"])]
    texts: Option<PathBuf>,
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Re-rank the ITC top K by the ITM head, as Retrieval.py's k_test.
    #[arg(long)]
    rerank: Option<usize>,
    #[command(flatten)]
    model: IndexModelArgs,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Approximate search (an HNSW graph built in memory over the index's vectors) in place of
    /// the exact scan: for large collections; at most 100 results (or --top + --rerank if more).
    #[arg(long, conflicts_with = "texts")]
    ann: bool,
}

pub fn search_cmd(a: SearchArgs) -> Result<()> {
    let opts = SearchOptions {
        index: a.index,
        checkpoint: a.model.checkpoint,
        config: a.model.config,
        text_encoder: a.model.text_encoder,
        device: super::device(&a.device)?,
        top: a.top,
        rerank: a.rerank,
    };
    let mut searcher = Searcher::open(&opts)?;
    if a.ann {
        searcher.build_ann(opts.top.max(opts.rerank.unwrap_or(0)));
    }
    if let Some(file) = &a.texts {
        let query = a.query.unwrap_or_default();
        let hits = searcher.search_texts(&query, &read_texts(file)?, opts.top)?;
        if a.json {
            let out =
                serde_json::json!({"query": {"text": query}, "texts": file.display().to_string(), "results": hits});
            println!("{}", serde_json::to_string_pretty(&out)?);
        } else {
            for h in &hits {
                println!("{:>4}  {:>9.4}  line {:<6} {}", h.rank, h.score, h.line, h.text);
            }
        }
        return Ok(());
    }
    let query = match (a.query, a.image) {
        (_, Some(p)) => Query::Image(p),
        (Some(q), None) => Query::Text(q),
        (None, None) => anyhow::bail!("give a text query or --image QUERY.jpg"),
    };
    let hits = searcher.search(&query, opts.top, opts.rerank)?;
    if a.json {
        let q = match &query {
            Query::Text(t) => serde_json::json!({"text": t}),
            Query::Image(p) => serde_json::json!({"image": p.display().to_string()}),
        };
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({"query": q, "results": hits}))?);
    } else {
        if hits.is_empty() {
            println!("the index holds no images");
        }
        for h in &hits {
            let itm = h.itm.map_or(String::new(), |s| format!(" (itm {s:.4}, itc {:.4})", h.itc));
            println!("{:>4}  {:>9.4}  {}{itm}", h.rank, h.score, h.path);
        }
    }
    Ok(())
}
