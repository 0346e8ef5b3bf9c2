//! safetensors: the header, dtypes, offsets and `aliases` metadata as `CheckpointFile` reads
//! them, then every tensor read (through candle, as loading does).
#![no_main]
use albef::checkpoint::{classify_file, source_kind, CheckpointFile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = albef_fuzz::put("input.safetensors", data);
    if let Ok(file) = CheckpointFile::open(&path) {
        // What `checkpoint inspect` and loading do with the names before reading data.
        let _ = classify_file(&file);
        let _ = source_kind(file.tensors());
        let _ = file.load_all(&candle_core::Device::Cpu);
    }
});
