//! Annotation JSON of every task and the raw files `data prepare` converts (Karpathy splits, VQA
//! questions/annotations, NLVR2 and SNLI-VE JSON-lines), refs/instances/dets of grounding. The
//! first byte picks the reader, the rest is the file.
#![no_main]
use albef::data::classify::{ClassifyDataset, Format};
use albef::data::grounding::{Dets, GroundingEval, GroundingTrain, Refer};
use albef::data::prepare;
use albef::data::pretrain::{raw_entries, PretrainDataset};
use albef::data::retrieval::{RetrievalEval, RetrievalTrain};
use albef::data::vqa::{read_answer_list, VqaDataset};
use libfuzzer_sys::fuzz_target;

/// A small valid REFER pair, for the readers that take two files and fuzz one of them.
const REFS: &str = r#"[{"ref_id": 1, "image_id": 7, "ann_id": 3, "split": "val", "sentences": [{"sent": "the dog"}]}]"#;
const INSTANCES: &str = r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
 "annotations": [{"id": 3, "bbox": [1, 2, 3, 4]}]}"#;

fuzz_target!(|data: &[u8]| {
    let Some((reader, file)) = albef_fuzz::pick(data, 18) else { return };
    let f = albef_fuzz::put("annotations.json", file);
    let files = [f.clone()];
    let root = albef_fuzz::scratch().join("images");
    match reader {
        0 => drop(RetrievalTrain::new(&files, &root, 32, 30)),
        1 => drop(RetrievalEval::new(&f, &root, 32, 30)),
        2 => drop(VqaDataset::train(&files, &root, &root, 32, "[SEP]")),
        3 => drop(VqaDataset::test(&files, &root, &root, 32)),
        4 => drop(read_answer_list(&f)),
        5 => drop(ClassifyDataset::new(&files, &root, Format::SnliVe, 32, false)),
        6 => drop(ClassifyDataset::new(&files, &root, Format::Nlvr2, 32, false)),
        7 => drop(PretrainDataset::new(&files, Some(&root), 32)),
        8 => drop(raw_entries(&files, None)),
        9 => drop(GroundingTrain::new(&files, &root, 32)),
        10 => drop(GroundingEval::new(&files, &root, 32)),
        11 => drop(Refer::open(&f, &albef_fuzz::put("instances.json", INSTANCES.as_bytes()))),
        12 => drop(Refer::open(&albef_fuzz::put("refs.json", REFS.as_bytes()), &f)),
        13 => drop(Dets::open(&f)),
        14 => drop(prepare::flickr30k(&f, &albef_fuzz::out_dir("out"), true)),
        15 => drop(prepare::coco(&f, &albef_fuzz::out_dir("out"), true)),
        16 => {
            let (q, a) = (f.clone(), albef_fuzz::put("answers.json", file));
            let splits = [("train".to_string(), q.clone(), Some(a)), ("test".to_string(), q, None)];
            drop(prepare::vqa(&splits, &albef_fuzz::out_dir("out"), 10, true))
        }
        17 => {
            let out = albef_fuzz::out_dir("out");
            drop(prepare::nlvr2(&[("train".to_string(), f.clone())], &out, true));
            drop(prepare::snli_ve(&[("train".to_string(), f.clone())], &out, true));
        }
        _ => unreachable!(),
    }
});
