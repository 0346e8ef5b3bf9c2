//! What every target shares: a scratch folder (tmpfs where there is one) to put the input in,
//! since albef's readers take paths, as the CLI gives them.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// `$ALBEF_FUZZ_SCRATCH` (set by `tools/fuzz.sh`, which removes it afterwards), else a folder
/// under /dev/shm or the temp dir named after this process.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = std::env::var_os("ALBEF_FUZZ_SCRATCH").map(PathBuf::from).unwrap_or_else(|| {
            let shm = Path::new("/dev/shm");
            let root = if shm.is_dir() { shm.to_path_buf() } else { std::env::temp_dir() };
            root.join(format!("albef-fuzz-{}", std::process::id()))
        });
        std::fs::create_dir_all(&base).expect("cannot create the fuzz scratch folder");
        // As the binary does: a panic inside `util::contain_panics` (third-party decoders of
        // untrusted files) is an error; any other still reaches the fuzzer's hook, which aborts.
        albef::util::install_panic_hook();
        // The pixel limit the image targets run under: large enough for any seed, small enough
        // that an image the limit lets through decodes fast under instrumentation (at 4 million,
        // the corpus filled with images 58,000 pixels wide that took a second each, and the rate
        // fell to 130 inputs/s; larger images only repeat the same loops).
        albef::data::transform::set_max_image_pixels(MAX_PIXELS);
        base
    })
}

pub const MAX_PIXELS: u64 = 262_144;

/// Writes `data` to `name` in the scratch folder and returns its path.
pub fn put(name: &str, data: &[u8]) -> PathBuf {
    let path = scratch().join(name);
    std::fs::write(&path, data).expect("cannot write to the fuzz scratch folder");
    path
}

/// A fresh, empty output folder (for readers that convert into files).
pub fn out_dir(name: &str) -> PathBuf {
    let path = scratch().join(name);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("cannot create an output folder in the fuzz scratch folder");
    path
}

/// The input's first byte picks one of `n` readers; the rest is the file.
pub fn pick(data: &[u8], n: u8) -> Option<(u8, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((first % n, rest))
}
