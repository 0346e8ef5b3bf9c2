//! Loading a state dict into a model's [`ParamStore`], with a report instead of the
//! reference's silent `strict=False`.

use super::interpolate::interpolate_pos_embed;
use super::io::StateDict;
use crate::nn::ParamStore;
use anyhow::{bail, Result};
use std::collections::BTreeSet;
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

/// Copies every tensor of `sd` into the parameter or buffer of the same name. Aliased names (tied
/// weights, NLVR2's shared cross-attention K/V) count as loaded when they name a known tensor.
/// `pos_embed` tensors of another grid size are interpolated; any other shape mismatch is an
/// error naming the key and both shapes.
pub fn load_into(store: &ParamStore, sd: &StateDict) -> Result<KeyReport> {
    let mut report = KeyReport::default();
    let aliases: std::collections::HashMap<String, String> = store.aliases().into_iter().collect();
    let mut seen = BTreeSet::new();
    let mut errors = Vec::new();
    for (key, value) in sd {
        if is_ignorable(key) {
            continue;
        }
        let canonical = aliases.get(key).cloned().unwrap_or_else(|| key.clone());
        if canonical != *key && sd.contains_key(&canonical) {
            // The canonical name is in the file too and wins; the alias is a second copy.
            seen.insert(canonical);
            continue;
        }
        let Some(var) = store.get(&canonical) else {
            report.unexpected.push(key.clone());
            continue;
        };
        let mut value = value.clone();
        if value.dims() != var.dims() && key.ends_with("pos_embed") && value.rank() == 3 && var.rank() == 3 {
            let (old, new) = (value.dim(1)?, var.dim(1)?);
            value = interpolate_pos_embed(&value, new - 1, 1)?;
            report.interpolated.push((key.clone(), old, new));
        }
        if value.dims() != var.dims() {
            errors.push(format!("{key}: checkpoint has shape {:?}, model expects {:?}", value.dims(), var.dims()));
            continue;
        }
        var.set(&value.to_dtype(var.dtype())?.contiguous()?)?;
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
    for (name, _) in store.named_tensors() {
        if !seen.contains(&name) {
            report.missing.push(name);
        }
    }
    Ok(report)
}
