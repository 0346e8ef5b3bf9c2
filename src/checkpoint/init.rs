//! Pre-training's starting weights, from the files the reference starts from: the text encoder
//! from a Hugging Face `bert-base-uncased` folder (`BertForMaskedLM.from_pretrained`), the image
//! encoder from DeiT-B/16 (`deit_base_patch16_224-b5f2ef4d.pth`, its `model` key, `pos_embed`
//! interpolated to the model's grid). The key remaps live here, and each load reports what was
//! loaded, what stays at its fresh initialisation and what the file had that was ignored.

use super::io::{read_checkpoint, StateDict};
use super::load::{load_into, KeyReport};
use crate::nn::ParamStore;
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// The weight file of a Hugging Face BERT folder, if it has one (safetensors preferred).
pub fn bert_weights_file(folder: &Path) -> Option<PathBuf> {
    ["model.safetensors", "pytorch_model.bin"].iter().map(|n| folder.join(n)).find(|p| p.is_file())
}

/// A Hugging Face BERT key in ALBEF's pre-training layout (`text_encoder.bert.*`,
/// `text_encoder.cls.*`), or `None` for what pre-training has no place for (the pooler, the
/// next-sentence head, position-id buffers).
fn bert_key(key: &str) -> Option<String> {
    // Checkpoints saved by old transformers / the original TF conversion name LayerNorm
    // parameters gamma / beta; `from_pretrained` renames them.
    let key = key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias");
    if key.ends_with("position_ids") || key.contains("pooler.") || key.starts_with("cls.seq_relationship.") {
        return None;
    }
    if let Some(rest) = key.strip_prefix("bert.") {
        return Some(format!("text_encoder.bert.{rest}"));
    }
    if key.starts_with("cls.predictions.") {
        return Some(format!("text_encoder.{key}"));
    }
    // A bare BertModel file (`embeddings.*`, `encoder.*`).
    if key.starts_with("embeddings.") || key.starts_with("encoder.") {
        return Some(format!("text_encoder.bert.{key}"));
    }
    None
}

/// A DeiT / timm ViT key in ALBEF's layout (`visual_encoder.*`), or `None` for the
/// classification heads.
fn deit_key(key: &str) -> Option<String> {
    let key = key.strip_prefix("module.").unwrap_or(key);
    if key.starts_with("head") || key.starts_with("fc_norm.") || key.starts_with("pre_logits.") {
        return None;
    }
    if ["cls_token", "pos_embed", "dist_token"].contains(&key)
        || ["patch_embed.", "blocks.", "norm."].iter().any(|p| key.starts_with(p))
    {
        return Some(format!("visual_encoder.{key}"));
    }
    None
}

/// `model` shapes of `sd`'s keys that differ from the store's, as "key: file …, model …" lines.
/// `pos_embed` may differ in its token count only (it is interpolated).
fn shape_mismatches(store: &ParamStore, sd: &StateDict) -> Vec<String> {
    let mut out = Vec::new();
    for (key, t) in sd {
        let Some(var) = store.get(key) else { continue };
        let (file, model) = (t.dims(), var.dims());
        let fits = if key.ends_with("pos_embed") && file.len() == 3 && model.len() == 3 {
            file[0] == model[0] && file[2] == model[2]
        } else {
            file == model
        };
        if !fits {
            out.push(format!("{key}: file {file:?}, model {model:?}"));
        }
    }
    out
}

/// Loads `sd` (already in ALBEF naming) into the store, and reports under `prefix` only: the
/// online parameters there that the file did not provide stay as freshly initialised.
fn load_part(store: &ParamStore, sd: &StateDict, ignored: Vec<String>, prefix: &str) -> Result<KeyReport> {
    let mut report = load_into(store, sd)?;
    report.missing.retain(|k| k.starts_with(prefix));
    report.unexpected.extend(ignored);
    Ok(report)
}

fn refuse(path: &Path, what: &str, problems: &[String]) -> anyhow::Error {
    const SHOW: usize = 8;
    let mut lines: Vec<String> = problems.iter().take(SHOW).cloned().collect();
    if problems.len() > SHOW {
        lines.push(format!("… and {} more", problems.len() - SHOW));
    }
    anyhow::anyhow!(
        "{} does not fit the model's {what} ({} shape mismatch{}); is it the right file for this config?\n  {}",
        path.display(),
        problems.len(),
        if problems.len() == 1 { "" } else { "es" },
        lines.join("\n  ")
    )
}

/// The sizes a Hugging Face `config.json` declares, for the refusal message.
fn bert_sizes(folder: &Path) -> Result<String> {
    let path = folder.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let get = |k: &str| v.get(k).and_then(|x| x.as_u64()).map_or("?".to_string(), |x| x.to_string());
    Ok(format!(
        "{} declares hidden_size {}, num_hidden_layers {}, vocab_size {}",
        path.display(),
        get("hidden_size"),
        get("num_hidden_layers"),
        get("vocab_size")
    ))
}

/// `BertForMaskedLM.from_pretrained(folder)` into the pre-training model's `text_encoder`:
/// embeddings, every self-attention and feed-forward layer, the MLM head (its decoder tied to the
/// word embeddings). The fusion layers' cross-attention is not in BERT and keeps its fresh
/// initialisation, as `from_pretrained` leaves it. The teacher is not touched (copy it after).
pub fn init_text_from_bert(store: &ParamStore, folder: &Path) -> Result<KeyReport> {
    let sizes = bert_sizes(folder)?;
    let Some(file) = bert_weights_file(folder) else {
        bail!("{} holds no model.safetensors or pytorch_model.bin (the bert-base-uncased weights)", folder.display())
    };
    let ckpt = read_checkpoint(&file, store.device())?;
    let (mut sd, mut ignored) = (StateDict::new(), Vec::new());
    for (key, t) in ckpt.tensors {
        match bert_key(&key).filter(|k| store.get(k).is_some()) {
            Some(k) => {
                sd.insert(k, t);
            }
            None => ignored.push(key),
        }
    }
    if sd.is_empty() {
        bail!("{} has no BERT weights (no bert.* / cls.predictions.* tensors)", file.display());
    }
    let problems = shape_mismatches(store, &sd);
    if !problems.is_empty() {
        return Err(refuse(&file, "text encoder", &problems).context(sizes));
    }
    let mut report = load_part(store, &sd, ignored, "text_encoder.")?;
    report.notes.insert(0, format!("text encoder from {}", file.display()));
    if !report.missing.is_empty() {
        report.notes.push("the missing tensors (cross-attention of the fusion layers) keep their fresh initialisation, as from_pretrained leaves them".into());
    }
    Ok(report)
}

/// DeiT-B/16 (`checkpoint['model']`) into the pre-training model's `visual_encoder`, with
/// `pos_embed` interpolated from 197 tokens (224 px) to the model's grid (257 at 256 px); the
/// classification head is ignored (`strict=False` in the reference). The teacher is not touched.
pub fn init_vision_from_deit(store: &ParamStore, file: &Path) -> Result<KeyReport> {
    let ckpt = read_checkpoint(file, store.device())?;
    let (mut sd, mut ignored) = (StateDict::new(), Vec::new());
    for (key, t) in ckpt.tensors {
        match deit_key(&key).filter(|k| store.get(k).is_some() || k.ends_with("dist_token")) {
            Some(k) => {
                sd.insert(k, t);
            }
            None => ignored.push(key),
        }
    }
    if sd.is_empty() {
        bail!("{} has no ViT weights (no cls_token / pos_embed / blocks.* tensors)", file.display());
    }
    if sd.contains_key("visual_encoder.dist_token") {
        bail!(
            "{} is a distilled DeiT (it has dist_token and two extra position embeddings); ALBEF starts from \
             the plain deit_base_patch16_224-b5f2ef4d.pth",
            file.display()
        );
    }
    let problems = shape_mismatches(store, &sd);
    if !problems.is_empty() {
        return Err(refuse(file, "image encoder", &problems));
    }
    if let Some(pos) = sd.get("visual_encoder.pos_embed") {
        let grid = pos.dim(1)? - 1;
        let side = (grid as f64).sqrt().round() as usize;
        if side * side != grid {
            bail!("{}: pos_embed has {} tokens, which is not 1 + a square grid", file.display(), grid + 1);
        }
    }
    let mut report = load_part(store, &sd, ignored, "visual_encoder.")?;
    report.notes.insert(0, format!("image encoder from {}", file.display()));
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_remaps() {
        assert_eq!(
            bert_key("bert.embeddings.LayerNorm.gamma").unwrap(),
            "text_encoder.bert.embeddings.LayerNorm.weight"
        );
        assert_eq!(
            bert_key("encoder.layer.3.output.dense.bias").unwrap(),
            "text_encoder.bert.encoder.layer.3.output.dense.bias"
        );
        assert_eq!(bert_key("cls.predictions.bias").unwrap(), "text_encoder.cls.predictions.bias");
        for ignored in ["bert.pooler.dense.weight", "cls.seq_relationship.weight", "bert.embeddings.position_ids"] {
            assert_eq!(bert_key(ignored), None, "{ignored}");
        }
        assert_eq!(deit_key("blocks.0.attn.qkv.weight").unwrap(), "visual_encoder.blocks.0.attn.qkv.weight");
        assert_eq!(deit_key("pos_embed").unwrap(), "visual_encoder.pos_embed");
        assert_eq!(deit_key("head.weight"), None);
    }
}
