//! `bert_config` JSON: parsed, then checked against the task YAML that names it, as a config's
//! `model_config()` does.
#![no_main]
use albef::config::{Config, RetrievalKeys};
use albef::model::config::BertConfig;
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = "bert_config: bert_config.json\nimage_res: 32\nvision: {patch_size: 16, embed_dim: 768}\n";

fuzz_target!(|data: &[u8]| {
    let json = albef_fuzz::put("bert_config.json", data);
    let _ = BertConfig::from_json_file(&json);
    let yaml = albef_fuzz::put("config.yaml", CONFIG.as_bytes());
    if let Ok(cfg) = Config::<RetrievalKeys>::load(&yaml, false) {
        let _ = cfg.model_config();
    }
});
