//! A parquet file of the Hugging Face RefCOCO release, as `data prepare refcoco --parquet` reads it.
#![no_main]
use albef::data::refcoco::from_parquet;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let file = albef_fuzz::put("input.parquet", data);
    let _ = from_parquet(&[file], "refcoco", &albef_fuzz::out_dir("out"), true);
});
