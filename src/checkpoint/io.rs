//! Reading and writing checkpoint files: PyTorch `.pth` (zip + pickle) and safetensors.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

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

/// A tensor's dtype and shape, known without reading its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMeta {
    pub dtype: DType,
    pub shape: Vec<usize>,
}

enum Backend {
    /// The pickle's tensor descriptors; each tensor is its own zip entry, read when asked for.
    Pth(candle_core::pickle::PthTensors),
    /// The file mapped into memory: a tensor is copied out of the page cache when asked for.
    Safetensors { mmap: memmap2::Mmap, data_start: usize, offsets: BTreeMap<String, (usize, usize)> },
}

/// An open checkpoint: names, dtypes and shapes read from the pickle or the safetensors header,
/// tensor data read one tensor at a time by [`CheckpointFile::load`], so a loader never holds
/// more than one tensor of the file besides the model.
pub struct CheckpointFile {
    path: PathBuf,
    pub format: FileFormat,
    /// Safetensors metadata (`albef_*` keys mark our own files).
    pub metadata: BTreeMap<String, String>,
    tensors: BTreeMap<String, TensorMeta>,
    /// Safetensors aliases: names stored once under another name (tied or momentum copies).
    aliases: BTreeMap<String, String>,
    backend: Backend,
}

impl std::fmt::Debug for CheckpointFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointFile").field("path", &self.path).field("format", &self.format).finish()
    }
}

impl CheckpointFile {
    /// Opens `.pth` or safetensors, telling them apart by content, not extension. Reads no
    /// tensor data.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file =
            std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
        let len = file.metadata()?.len();
        if len == 0 {
            bail!("checkpoint {} is empty (0 bytes): the download or copy did not finish", path.display());
        }
        let mut magic = [0u8; 8];
        let n = file.read(&mut magic)?;
        drop(file);
        if n >= 4 && &magic[..4] == b"PK\x03\x04" {
            open_pth(path)
        } else if n == 8 && u64::from_le_bytes(magic) < len && u64::from_le_bytes(magic) < 100_000_000 {
            open_safetensors(path)
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor name (aliases included) with its dtype and shape, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorMeta> {
        &self.tensors
    }

    /// Reads one tensor from the file.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let stored = self.aliases.get(name).map_or(name, String::as_str);
        let t = match &self.backend {
            Backend::Pth(pth) => pth
                .get(stored)
                .map_err(|e| corrupt(&self.path, &format!("tensor {name}: {e}")))?
                .ok_or_else(|| anyhow!("{}: no tensor {name}", self.path.display()))?,
            Backend::Safetensors { mmap, data_start, offsets } => {
                let (&(start, end), meta) = offsets
                    .get(stored)
                    .zip(self.tensors.get(stored))
                    .ok_or_else(|| anyhow!("{}: no tensor {name}", self.path.display()))?;
                let dtype = safetensors_dtype(meta.dtype);
                let view = safetensors::tensor::TensorView::new(
                    dtype,
                    meta.shape.clone(),
                    &mmap[data_start + start..data_start + end],
                )
                .map_err(|e| anyhow!("{}: tensor {name}: {e}", self.path.display()))?;
                let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                    .with_context(|| format!("{}: tensor {name}", self.path.display()))?;
                // The bytes are copied out: let the kernel drop the mapped pages from this
                // process, so that the file does not stay resident on top of the model.
                #[cfg(unix)]
                // SAFETY: a read-only file mapping; dropped pages are read again from the file if
                // touched, and nothing borrows this range any more.
                unsafe {
                    let _ = mmap.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        data_start + start,
                        end - start,
                    );
                }
                t
            }
        };
        Ok(t.to_device(device)?)
    }

    /// Reads every tensor (the whole file in memory: for small files and tests).
    pub fn load_all(&self, device: &Device) -> Result<Checkpoint> {
        let mut tensors = StateDict::new();
        for name in self.tensors.keys() {
            tensors.insert(name.clone(), self.load(name, device)?);
        }
        Ok(Checkpoint { tensors, format: self.format, metadata: self.metadata.clone() })
    }
}

/// Reads a whole checkpoint into memory ([`CheckpointFile::open`] + `load_all`).
pub fn read_checkpoint(path: &Path, device: &Device) -> Result<Checkpoint> {
    CheckpointFile::open(path)?.load_all(device)
}

/// candle's errors may carry a backtrace after the first line; the first line says it all.
fn corrupt(path: &Path, e: &dyn std::fmt::Display) -> anyhow::Error {
    let msg = e.to_string();
    let e = msg.lines().next().unwrap_or_default();
    anyhow!("checkpoint {} is truncated or corrupt ({e}); download it again", path.display())
}

/// A `data.pkl` larger than this is not a state dict (a ViT-B/BERT-base one is ~100 kB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Checks every pickle of the archive against the allow-list before candle parses it (see
/// `pickle_guard`), and returns the uncompressed size of every zip entry, to check tensor extents.
fn scan_pth(path: &Path) -> Result<BTreeMap<String, u64>> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open checkpoint {}", path.display()))?;
    let file_len = file.metadata().with_context(|| format!("cannot read checkpoint {}", path.display()))?.len();
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| corrupt(path, &e))?;
    let mut sizes = BTreeMap::new();
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| corrupt(path, &e))?;
        let name = entry.name().map_err(|e| corrupt(path, &e))?.into_owned();
        sizes.insert(name.clone(), entry.size());
        if !name.ends_with("data.pkl") {
            continue;
        }
        let what = format!("checkpoint {} ({name})", path.display());
        if entry.size() > MAX_PICKLE_BYTES {
            bail!("{what}: the pickle is {} bytes, more than any state dict needs", entry.size());
        }
        // Reserve what the zip header claims only up to the file's size: the claim may lie.
        let mut data = Vec::with_capacity(entry.size().min(file_len) as usize);
        // `take`: the size in the zip header may lie; never read more than the limit.
        (&mut entry).take(MAX_PICKLE_BYTES + 1).read_to_end(&mut data).map_err(|e| corrupt(path, &e))?;
        if data.len() as u64 > MAX_PICKLE_BYTES {
            bail!("{what}: the pickle is larger than {MAX_PICKLE_BYTES} bytes");
        }
        super::pickle_guard::check_pickle(&data, &what)?;
        refuse_unreadable_storages(&data, &what)?;
    }
    Ok(sizes)
}

/// Storage types the allow-list lets through but candle cannot read: it skips such a tensor with
/// an unlocated line on stderr, and the key would then look merely missing.
const UNREADABLE_STORAGES: [&str; 4] = ["IntStorage", "ShortStorage", "CharStorage", "BoolStorage"];

/// Names every tensor (key and storage type) that candle would skip. The pickle is parsed only
/// when it names one of those types, and only after `pickle_guard` has bounded it.
fn refuse_unreadable_storages(data: &[u8], what: &str) -> Result<()> {
    let named = |s: &str| data.windows(s.len()).any(|w| w == s.as_bytes());
    if !UNREADABLE_STORAGES.iter().any(|s| named(s)) {
        return Ok(());
    }
    let mut stack = candle_core::pickle::Stack::empty();
    stack.read_loop(&mut std::io::Cursor::new(data)).with_context(|| format!("{what}: cannot parse the pickle"))?;
    let root = stack.finalize().with_context(|| format!("{what}: cannot parse the pickle"))?;
    let mut unreadable = Vec::new();
    collect_unreadable(root, "", &mut unreadable);
    if unreadable.is_empty() {
        return Ok(());
    }
    bail!(
        "{what}: albef cannot read {} tensor(s): {} (it reads float32, float64, float16, bfloat16, uint8 and int64 \
         tensors; convert these in PyTorch, e.g. with .long() or .float(), and save again)",
        unreadable.len(),
        unreadable.join(", ")
    )
}

/// Walks the state dict (and a dict such as `{'model': state_dict}` around it) as candle does.
fn collect_unreadable(obj: candle_core::pickle::Object, prefix: &str, out: &mut Vec<String>) {
    use candle_core::pickle::Object;
    let Object::Dict(items) = obj else { return };
    for (key, value) in items {
        let Object::Unicode(name) = &key else { continue };
        let name = format!("{prefix}{name}");
        if matches!(value, Object::Dict(_)) {
            collect_unreadable(value, &format!("{name}."), out);
        } else if let Err(e) = value.into_tensor_info(key, Path::new("")) {
            let e = e.to_string();
            match UNREADABLE_STORAGES.iter().find(|s| e.contains(*s)) {
                Some(storage) => out.push(format!("{name} ({storage})")),
                None => out.push(format!("{name} ({})", e.lines().next().unwrap_or_default())),
            }
        }
    }
}

fn open_pth(path: &Path) -> Result<CheckpointFile> {
    let sizes = scan_pth(path)?;
    // `{'model': state_dict}` (pre-training and our training checkpoints) or a raw state dict
    // (the released fine-tuned files). Only the pickle is parsed here.
    let (pth, wrapped) = match candle_core::pickle::PthTensors::new(path, Some("model")) {
        Ok(p) => (p, true),
        Err(e) if e.to_string().contains("key model not found") => {
            (candle_core::pickle::PthTensors::new(path, None).map_err(|e| corrupt(path, &e))?, false)
        }
        Err(e) => return Err(corrupt(path, &e)),
    };
    let tensors: BTreeMap<String, TensorMeta> = pth
        .tensor_infos()
        .iter()
        .map(|(name, info)| {
            (name.clone(), TensorMeta { dtype: info.dtype, shape: info.layout.shape().dims().to_vec() })
        })
        .collect();
    if tensors.is_empty() {
        bail!("{} holds no tensors: it is a .pth file but not a model state dict", path.display());
    }
    // A tensor must fit in its storage entry: candle allocates the claimed shape before reading.
    for (name, info) in pth.tensor_infos() {
        let need = info
            .layout
            .shape()
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes() as u64, |acc, &d| acc.checked_mul(d as u64))
            .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
        let have = sizes.get(&info.path).copied();
        match (need, have) {
            (Some(need), Some(have)) if need <= have => {}
            (_, None) => bail!("checkpoint {}: tensor {name}: storage {} is missing", path.display(), info.path),
            (need, Some(have)) => bail!(
                "checkpoint {}: tensor {name} claims shape {:?} ({} bytes) but its storage {} holds {have} bytes",
                path.display(),
                info.layout.shape().dims(),
                need.map_or("more than 2^64".to_string(), |n| n.to_string()),
                info.path
            ),
        }
    }
    Ok(CheckpointFile {
        path: path.to_path_buf(),
        format: FileFormat::Pth { wrapped },
        metadata: BTreeMap::new(),
        tensors,
        aliases: BTreeMap::new(),
        backend: Backend::Pth(pth),
    })
}

fn safetensors_dtype(dtype: DType) -> safetensors::Dtype {
    use safetensors::Dtype as S;
    match dtype {
        DType::U8 => S::U8,
        DType::U32 => S::U32,
        DType::I16 => S::I16,
        DType::I32 => S::I32,
        DType::I64 => S::I64,
        DType::BF16 => S::BF16,
        DType::F16 => S::F16,
        DType::F32 => S::F32,
        DType::F64 => S::F64,
        DType::F8E4M3 => S::F8_E4M3,
        // Not produced by `open_safetensors` (it refuses other dtypes).
        _ => S::U8,
    }
}

fn open_safetensors(path: &Path) -> Result<CheckpointFile> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    // SAFETY: the map is read-only; a file changed while mapped may give wrong values, as it
    // would when read, but never unsoundness in safe code here (slices are bounds-checked).
    let mmap = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(&mmap)
        .map_err(|e| anyhow!("{} is not a valid safetensors file ({e}); truncated download?", path.display()))?;
    let metadata: BTreeMap<String, String> = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    let mut tensors = BTreeMap::new();
    let mut offsets = BTreeMap::new();
    for (name, info) in meta.tensors() {
        let dtype = DType::try_from(info.dtype)
            .map_err(|e| anyhow!("{}: tensor {name} has an unsupported dtype ({e})", path.display()))?;
        tensors.insert(name.clone(), TensorMeta { dtype, shape: info.shape.clone() });
        offsets.insert(name, info.data_offsets);
    }
    // Tensors stored once but known under several names (tied or momentum copies).
    let mut aliases = BTreeMap::new();
    if let Some(text) = metadata.get("aliases") {
        let map: BTreeMap<String, String> = serde_json::from_str(text)
            .with_context(|| format!("{}: metadata 'aliases' is not a JSON object", path.display()))?;
        for (alias, target) in map {
            let meta = tensors
                .get(&target)
                .ok_or_else(|| anyhow!("{}: alias {alias} points to missing tensor {target}", path.display()))?
                .clone();
            tensors.insert(alias.clone(), meta);
            aliases.insert(alias, target);
        }
    }
    Ok(CheckpointFile {
        path: path.to_path_buf(),
        format: FileFormat::Safetensors,
        metadata,
        tensors,
        aliases,
        backend: Backend::Safetensors { mmap, data_start: 8 + header_len, offsets },
    })
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

/// The pickle of `{'model': state_dict}` as `torch.save` writes it (protocol 2, every tensor a
/// `torch._utils._rebuild_tensor_v2` of its own storage `archive/data/<i>`), without memo opcodes.
fn pth_pickle(entries: &[(&str, &str, &[usize])]) -> Vec<u8> {
    fn unicode(out: &mut Vec<u8>, s: &str) {
        out.push(b'X');
        out.extend((s.len() as u32).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn int(out: &mut Vec<u8>, v: usize) {
        out.push(b'J');
        out.extend((v as i32).to_le_bytes());
    }
    fn tuple(out: &mut Vec<u8>, v: &[usize]) {
        out.push(b'(');
        for &x in v {
            int(out, x);
        }
        out.push(b't');
    }
    let mut out = vec![0x80, 2, b'}'];
    unicode(&mut out, "model");
    out.extend(b"}(");
    for (i, (name, storage, shape)) in entries.iter().enumerate() {
        unicode(&mut out, name);
        out.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
        // persistent id ('storage', torch.<T>Storage, key, 'cpu', numel)
        out.push(b'(');
        unicode(&mut out, "storage");
        out.extend(format!("ctorch\n{storage}\n").as_bytes());
        unicode(&mut out, &i.to_string());
        unicode(&mut out, "cpu");
        int(&mut out, shape.iter().product());
        out.extend(b"tQ");
        int(&mut out, 0);
        tuple(&mut out, shape);
        let mut stride = vec![1usize; shape.len()];
        for d in (0..shape.len().saturating_sub(1)).rev() {
            stride[d] = stride[d + 1] * shape[d + 1];
        }
        tuple(&mut out, &stride);
        out.push(0x89); // requires_grad = False
        out.extend(b"ccollections\nOrderedDict\n)R"); // backward hooks
        out.extend(b"tR");
    }
    out.extend(b"us.");
    out
}

/// Writes f32 / i64 tensors as a PyTorch `.pth` (`{'model': state_dict}`, each tensor its own
/// storage), atomically. For `albef bench` and tests: albef's own checkpoints are safetensors.
pub fn save_pth(tensors: &StateDict, path: &Path) -> Result<()> {
    use std::io::Write;
    let mut entries = Vec::new();
    for (name, t) in tensors {
        let storage = match t.dtype() {
            DType::F32 => "FloatStorage",
            DType::I64 => "LongStorage",
            other => bail!("cannot write {name} ({other:?}) to .pth: only f32 and i64 are supported"),
        };
        entries.push((name.as_str(), storage, t.dims()));
    }
    let tmp = path.with_extension("pth.partial");
    let file = std::fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(file));
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored).large_file(true);
    let err = |e: zip::result::ZipError| anyhow!("writing {}: {e}", tmp.display());
    zip.start_file("archive/data.pkl", opts).map_err(err)?;
    zip.write_all(&pth_pickle(&entries))?;
    zip.start_file("archive/byteorder", opts).map_err(err)?;
    zip.write_all(b"little")?;
    for (i, t) in tensors.values().enumerate() {
        zip.start_file(format!("archive/data/{i}"), opts).map_err(err)?;
        let t = t.flatten_all()?;
        let bytes: Vec<u8> = match t.dtype() {
            DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            _ => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        };
        zip.write_all(&bytes)?;
    }
    zip.start_file("archive/version", opts).map_err(err)?;
    zip.write_all(b"3\n")?;
    zip.finish().map_err(err)?.flush()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} into place", tmp.display()))?;
    Ok(())
}
