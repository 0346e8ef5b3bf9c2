//! Reading and writing checkpoint files: PyTorch `.pth` (zip + pickle) and safetensors.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

/// A flat `name → tensor` map, as a PyTorch `state_dict`.
pub type StateDict = BTreeMap<String, Tensor>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// `torch.save` zip archive; `wrapped` when the state dict sits under the key `model`.
    Pth {
        wrapped: bool,
    },
    Safetensors,
}

/// A checkpoint file's tensors and what we learnt while reading it.
#[derive(Debug)]
pub struct Checkpoint {
    pub tensors: StateDict,
    pub format: FileFormat,
    /// Safetensors metadata (`aliases` resolved already; `albef_*` keys mark our own files).
    pub metadata: BTreeMap<String, String>,
}

/// Reads `.pth` or safetensors, telling them apart by content, not extension.
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let len = file.metadata()?.len();
    if len == 0 {
        bail!("checkpoint {} is empty (0 bytes): the download or copy did not finish", path.display());
    }
    let mut magic = [0u8; 8];
    let n = file.read(&mut magic)?;
    drop(file);
    if n >= 4 && &magic[..4] == b"PK\x03\x04" {
        read_pth(path, device)
    } else if n == 8 && u64::from_le_bytes(magic) < len && u64::from_le_bytes(magic) < 100_000_000 {
        read_safetensors(path, device)
    } else if n >= 2 && magic[0] == 0x80 && magic[1] <= 5 {
        bail!(
            "checkpoint {} is a legacy (pre-1.6, non-zip) torch.save file; re-save it with a recent PyTorch \
             (torch.save(torch.load(p), p)) to load it",
            path.display()
        )
    } else {
        bail!(
            "{} is neither a PyTorch .pth (zip) nor a safetensors checkpoint (first bytes {:02x?})",
            path.display(),
            &magic[..n]
        )
    }
}

fn read_pth(path: &Path, device: &Device) -> Result<Checkpoint> {
    // candle's errors may carry a backtrace after the first line; the first line says it all.
    let corrupt = |e: &dyn std::fmt::Display| {
        let msg = e.to_string();
        let e = msg.lines().next().unwrap_or_default();
        anyhow!("checkpoint {} is truncated or corrupt ({e}); download it again", path.display())
    };
    // `{'model': state_dict}` (pre-training and our training checkpoints) or a raw state dict
    // (the released fine-tuned files).
    let (pth, wrapped) = match candle_core::pickle::PthTensors::new(path, Some("model")) {
        Ok(p) => (p, true),
        Err(e) if e.to_string().contains("key model not found") => {
            (candle_core::pickle::PthTensors::new(path, None).map_err(|e| corrupt(&e))?, false)
        }
        Err(e) => return Err(corrupt(&e)),
    };
    let mut tensors = StateDict::new();
    let mut names: Vec<&String> = pth.tensor_infos().keys().collect();
    names.sort();
    for name in names {
        let t = pth.get(name).map_err(|e| corrupt(&format!("tensor {name}: {e}")))?;
        if let Some(t) = t {
            tensors.insert(name.clone(), t.to_device(device)?);
        }
    }
    if tensors.is_empty() {
        bail!("{} holds no tensors: it is a .pth file but not a model state dict", path.display());
    }
    Ok(Checkpoint { tensors, format: FileFormat::Pth { wrapped }, metadata: BTreeMap::new() })
}

fn read_safetensors(path: &Path, device: &Device) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow!("{} is not a valid safetensors file ({e}); truncated download?", path.display()))?;
    let metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let mut tensors = StateDict::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .with_context(|| format!("{}: tensor {name}", path.display()))?;
        tensors.insert(name, t);
    }
    // Tensors stored once but known under several names (tied or momentum copies).
    if let Some(aliases) = metadata.get("aliases") {
        let aliases: BTreeMap<String, String> = serde_json::from_str(aliases)
            .with_context(|| format!("{}: metadata 'aliases' is not a JSON object", path.display()))?;
        for (alias, target) in aliases {
            let t = tensors
                .get(&target)
                .ok_or_else(|| anyhow!("{}: alias {alias} points to missing tensor {target}", path.display()))?
                .clone();
            tensors.insert(alias, t);
        }
    }
    Ok(Checkpoint { tensors, format: FileFormat::Safetensors, metadata })
}

/// Writes tensors as safetensors, atomically (temporary file, then rename), so an interrupted
/// write never leaves a half-written checkpoint under the final name.
pub fn save_safetensors(tensors: &StateDict, metadata: &BTreeMap<String, String>, path: &Path) -> Result<()> {
    let data: Vec<(&str, Tensor)> =
        tensors.iter().map(|(k, v)| (k.as_str(), v.contiguous().unwrap_or_else(|_| v.clone()))).collect();
    let meta: std::collections::HashMap<String, String> = metadata.clone().into_iter().collect();
    let bytes =
        safetensors::tensor::serialize(data, Some(meta)).map_err(|e| anyhow!("serialising {}: {e}", path.display()))?;
    crate::util::write_atomic(path, &bytes)
}
