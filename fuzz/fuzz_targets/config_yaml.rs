//! The task YAML: read and typed as every task's config (evaluation and training key sets), then
//! the model sizes it describes; and as the model-only file of `checkpoint inspect --config`.
#![no_main]
use albef::config::{
    model_config_from_file, read_yaml, Config, GroundingKeys, NlvrKeys, NlvrPretrainKeys, PretrainKeys, RetrievalKeys,
    TaskKeys, VeKeys, VqaKeys,
};
use libfuzzer_sys::fuzz_target;
use serde_norway::Value;
use std::path::Path;

/// `Config::<T>::load` is `read_yaml` + `from_value`: the file is parsed once for all tasks.
fn check<T: TaskKeys>(value: &Value, path: &Path) {
    for training in [false, true] {
        if let Ok(cfg) = Config::<T>::from_value(value.clone(), path, training) {
            let _ = cfg.model_config();
            let _ = cfg.training();
            let _ = cfg.to_yaml();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let path = albef_fuzz::put("config.yaml", data);
    let _ = model_config_from_file(&path);
    let Ok(value) = read_yaml(&path) else { return };
    check::<RetrievalKeys>(&value, &path);
    check::<VqaKeys>(&value, &path);
    check::<VeKeys>(&value, &path);
    check::<NlvrKeys>(&value, &path);
    check::<NlvrPretrainKeys>(&value, &path);
    check::<GroundingKeys>(&value, &path);
    check::<PretrainKeys>(&value, &path);
});
