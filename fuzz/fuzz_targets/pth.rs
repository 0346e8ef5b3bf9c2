//! `.pth` (zip + pickle): the allow-list scan, candle's pickle reader as `CheckpointFile` uses
//! it, the tensor-extent checks, then every tensor read.
#![no_main]
use albef::checkpoint::{classify_file, source_kind, CheckpointFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = albef_fuzz::put("input.pth", data);
    if let Ok(file) = CheckpointFile::open(&path) {
        // What `checkpoint inspect` and loading do with the names before reading data.
        let _ = classify_file(&file);
        let _ = source_kind(file.tensors());
        let _ = file.load_all(&candle_core::Device::Cpu);
    }
});
