//! Loading a state dict into a model's [`ParamStore`], with a report instead of the
//! reference's silent `strict=False`.

use super::interpolate::interpolate_pos_embed;
use super::io::StateDict;
use crate::nn::ParamStore;
use crate::util::mem;
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What loading a checkpoint into a model did.
#[derive(Clone, Debug, Default)]
pub struct KeyReport {
    pub loaded: usize,
    /// Model tensors the checkpoint does not have (they keep their initial values).
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for (ignored).
    pub unexpected: Vec<String>,
    /// `pos_embed` keys resized: (key, old tokens, new tokens).
    pub interpolated: Vec<(String, usize, usize)>,
    pub notes: Vec<String>,
}

impl KeyReport {
    /// True when no teacher (`*_m.*`) tensor came from the checkpoint.
    pub fn teacher_missing(&self, store: &ParamStore) -> bool {
        let has_teacher = store.params().iter().any(|p| !p.trainable);
        has_teacher && store.params().iter().filter(|p| !p.trainable).all(|p| self.missing.contains(&p.name))
    }
}

fn group(keys: &[String]) -> String {
    const SHOW: usize = 12;
    let mut s: Vec<String> = keys.iter().take(SHOW).cloned().collect();
    if keys.len() > SHOW {
        s.push(format!("… and {} more", keys.len() - SHOW));
    }
    s.join("\n    ")
}

impl fmt::Display for KeyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "loaded {} tensors", self.loaded)?;
        for (k, a, b) in &self.interpolated {
            writeln!(f, "interpolated {k}: {a} → {b} tokens (bicubic)")?;
        }
        if !self.missing.is_empty() {
            writeln!(
                f,
                "missing ({}), left at their initial values:\n    {}",
                self.missing.len(),
                group(&self.missing)
            )?;
        }
        if !self.unexpected.is_empty() {
            writeln!(f, "warning: unexpected ({}), ignored:\n    {}", self.unexpected.len(), group(&self.unexpected))?;
        }
        for n in &self.notes {
            writeln!(f, "note: {n}")?;
        }
        Ok(())
    }
}

/// Keys that are buffers of the reference with no counterpart here (values are derivable).
fn is_ignorable(key: &str) -> bool {
    key.ends_with("embeddings.position_ids")
}

/// Copies every tensor of `sd` into the parameter or buffer of the same name (see [`load_with`]).
pub fn load_into(store: &ParamStore, sd: &StateDict) -> Result<KeyReport> {
    let shapes: BTreeMap<String, Vec<usize>> = sd.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
    load_with(store, &shapes, Some(&mut |key: &str| Ok(sd[key].clone())))
}

/// Reads the tensor that goes under a model name.
pub type Fetch<'a> = &'a mut dyn FnMut(&str) -> Result<Tensor>;

/// Whether `key` belongs to a momentum (teacher) copy: `visual_encoder_m.…`, `cls_head_m.…`.
fn is_teacher_key(key: &str) -> bool {
    key.split('.').next().is_some_and(|head| head.ends_with("_m"))
}

/// Loads the tensors named in `shapes` (name in the model → shape in the file), reading each
/// with `fetch` only when its place in the model is known and dropping it once copied, so that
/// no more than one source tensor is held at a time. Aliased names (tied weights, NLVR2's shared
/// cross-attention K/V) count as loaded when they name a known tensor. `pos_embed` tensors of
/// another grid size are interpolated; any other shape mismatch is an error naming the key and
/// both shapes, raised before anything is loaded. Teacher tensors are skipped (with a note) by an
/// evaluation-only model, which has no teacher. `fetch: None` computes the report only.
pub fn load_with(store: &ParamStore, shapes: &BTreeMap<String, Vec<usize>>, fetch: Option<Fetch>) -> Result<KeyReport> {
    let mut report = KeyReport::default();
    let aliases: std::collections::HashMap<String, String> = store.aliases().into_iter().collect();
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    let mut plan = Vec::new();
    let mut teacher_skipped = 0usize;
    for (key, dims) in shapes {
        if is_ignorable(key) {
            continue;
        }
        let canonical = aliases.get(key).cloned().unwrap_or_else(|| key.clone());
        if canonical != *key && shapes.contains_key(&canonical) {
            // The canonical name is in the file too and wins; the alias is a second copy.
            seen.insert(canonical);
            continue;
        }
        let Some(var) = store.get(&canonical) else {
            if store.mode().inference && is_teacher_key(key) {
                teacher_skipped += 1;
            } else {
                report.unexpected.push(key.clone());
            }
            continue;
        };
        let mut interpolate = false;
        if dims.as_slice() != var.dims() && key.ends_with("pos_embed") && dims.len() == 3 && var.rank() == 3 {
            let (old, new) = (dims[1], var.dim(1)?);
            let g = ((old - 1) as f64).sqrt() as usize;
            if g * g + 1 == old && dims[0] == var.dim(0)? && dims[2] == var.dim(2)? {
                report.interpolated.push((key.clone(), old, new));
                interpolate = true;
            }
        }
        if !interpolate && dims.as_slice() != var.dims() {
            errors.push(format!("{key}: checkpoint has shape {dims:?}, model expects {:?}", var.dims()));
            continue;
        }
        plan.push((key, var, interpolate));
        seen.insert(canonical);
        report.loaded += 1;
    }
    if !errors.is_empty() {
        bail!(
            "checkpoint does not fit this model ({} shape mismatch{}); is the config (image_res, bert_config, vision) the one it was trained with?\n  {}",
            errors.len(),
            if errors.len() == 1 { "" } else { "es" },
            errors.join("\n  ")
        );
    }
    if let Some(fetch) = fetch {
        for (key, var, interpolate) in plan {
            let mut value = fetch(key)?;
            if interpolate {
                mem::stage("load (up to pos_embed)");
                value = interpolate_pos_embed(&value, var.dim(1)? - 1, 1)?;
                mem::stage("interpolate pos_embed");
            }
            var.set(&value.to_dtype(var.dtype())?.contiguous()?)?;
        }
    }
    if teacher_skipped > 0 {
        report.notes.push(format!(
            "{teacher_skipped} momentum (teacher) tensors not read: the model is built for evaluation, which does not use the teacher"
        ));
    }
    for (name, _) in store.named_tensors() {
        if !seen.contains(&name) {
            report.missing.push(name);
        }
    }
    Ok(report)
}
