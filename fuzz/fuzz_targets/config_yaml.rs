//! The task YAML: read and typed as every task's config (evaluation and training key sets), then
//! the model sizes it describes; and as the model-only file of `checkpoint inspect --config`.
#![no_main]
use albef::config::{
    model_config_from_file, Config, GroundingKeys, NlvrKeys, NlvrPretrainKeys, PretrainKeys, RetrievalKeys, TaskKeys,
    VeKeys, VqaKeys,
};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fn check<T: TaskKeys>(path: &Path) {
    for training in [false, true] {
        if let Ok(cfg) = Config::<T>::load(path, training) {
            let _ = cfg.model_config();
            let _ = cfg.training();
            let _ = cfg.to_yaml();
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let path = albef_fuzz::put("config.yaml", data);
    check::<RetrievalKeys>(&path);
    check::<VqaKeys>(&path);
    check::<VeKeys>(&path);
    check::<NlvrKeys>(&path);
    check::<NlvrPretrainKeys>(&path);
    check::<GroundingKeys>(&path);
    check::<PretrainKeys>(&path);
    let _ = model_config_from_file(&path);
});
