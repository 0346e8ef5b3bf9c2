//! Small helpers shared across layers.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` via a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        match slow_writes() {
            // Fault injection for the kill -9 test: half the file, a pause, the rest, so that a
            // kill can land inside the write.
            Some(pause) => {
                f.write_all(&bytes[..bytes.len() / 2])?;
                std::thread::sleep(pause);
                f.write_all(&bytes[bytes.len() / 2..])?;
            }
            None => f.write_all(bytes)?,
        }
        f.sync_all()
    })();
    if let Err(e) = written {
        // Disk full or similar: the previous file is untouched; leave no partial temp file.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| {
            format!(
                "cannot write {} ({} bytes; disk full?); the previous file is unchanged",
                path.display(),
                bytes.len()
            )
        });
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    sync_dir(dir)
}

/// `ALBEF_FAULT_SLOW_WRITES=<ms>`: pause inside every atomic write (for the kill -9 test only).
fn slow_writes() -> Option<std::time::Duration> {
    let ms: u64 = std::env::var("ALBEF_FAULT_SLOW_WRITES").ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// Makes a rename in `dir` durable (fsync of the folder), so that a crash after it cannot bring
/// back the old file or lose the new one.
pub fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync folder {}", dir.display()))?;
    Ok(())
}

/// Named metrics in the reference's order (`r_mean`, `acc`, …).
pub type Metrics = indexmap::IndexMap<String, f64>;

/// Indices of the k largest values, largest first (ties: lower index first, as torch.topk on CPU
/// usually returns).
pub fn topk_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].partial_cmp(&values[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Resident-memory figures of this process (Linux `/proc`), for `albef bench` and for the
/// per-stage trace that `ALBEF_MEMTRACE=1` prints to stderr.
pub mod mem {
    /// (current RSS, peak RSS since start or the last [`reset_peak`]) in bytes; `None` where
    /// `/proc/self/status` is not available.
    pub fn rss() -> Option<(u64, u64)> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            Some(line[key.len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok()? * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// Resets the peak to the current RSS (Linux ≥ 4.0: `5 > /proc/self/clear_refs`), so that
    /// the next reading is the peak of what ran in between. False where that is not possible.
    pub fn reset_peak() -> bool {
        std::fs::write("/proc/self/clear_refs", "5").is_ok()
    }

    fn gb(bytes: u64) -> f64 {
        bytes as f64 / 1e9
    }

    /// With `ALBEF_MEMTRACE` set, prints the peak RSS of the stage that just ended and the RSS
    /// now, then starts the next stage's peak.
    pub fn stage(name: &str) {
        if std::env::var_os("ALBEF_MEMTRACE").is_none() {
            return;
        }
        if let Some((now, peak)) = rss() {
            eprintln!("memory: {name:<28} peak {:6.2} GB, after {:6.2} GB", gb(peak), gb(now));
            reset_peak();
        }
    }
}

thread_local! {
    /// Set while `contain_panics` runs its closure on this thread.
    static CONTAINING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs third-party decoding of an untrusted file that may panic on hostile input (the parquet
/// crate `expect`s what a damaged file need not hold) and turns a panic into an error. What `f`
/// touches is dropped with it, so no broken state outlives the panic.
pub fn contain_panics<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    let outer = CONTAINING.with(|c| c.replace(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    CONTAINING.with(|c| c.set(outer));
    result.unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "no message".into());
        Err(anyhow::anyhow!("the reader gave up on a damaged part of the file ({message})"))
    })
}

/// Keeps panics that `contain_panics` turns into errors off stderr; every other panic goes to the
/// hook that was installed before (the default one, or the fuzzer's, which aborts). Installed
/// once per process however often it is called (each test that needs it calls it).
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let next = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CONTAINING.with(|c| c.get()) {
                next(info)
            }
        }));
    });
}
