//! The REFER `refs(<split_by>).p` pickle (serde-pickle), as `data prepare refcoco` converts it
//! and as grounding's evaluation reads it.
#![no_main]
use albef::data::grounding::Refer;
use albef::data::refcoco::from_refer;
use libfuzzer_sys::fuzz_target;

const INSTANCES: &str = r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
 "annotations": [{"id": 3, "bbox": [1, 2, 3, 4]}]}"#;

fuzz_target!(|data: &[u8]| {
    let refs = albef_fuzz::put("refs(unc).p", data);
    let instances = albef_fuzz::put("instances.json", INSTANCES.as_bytes());
    let _ = Refer::open(&refs, &instances);
    let _ = from_refer(&refs, &instances, "refcoco", "unc", &albef_fuzz::out_dir("out"), true);
});
