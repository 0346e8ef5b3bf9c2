//! Writes the small seed inputs of the fuzz targets (`fuzz/seeds/<target>/`), made with albef's
//! own writers and the crates its readers use: `cargo run --release --example make_fuzz_seeds`.
//! The seeds are committed; rerun this only to change them. `tools/fuzz.sh` adds the repo's
//! fixtures (`configs/`, `tests/fixtures`) to them.

use albef::checkpoint::{save_pth, save_safetensors, StateDict};
use anyhow::Result;
use arrow_array::builder::{Float64Builder, ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn dir(target: &str) -> Result<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").join(target);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// A seed whose first byte picks the reader of a multi-reader target.
fn with_selector(reader: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![reader];
    v.extend_from_slice(body);
    v
}

fn png(w: u32, h: u32, color: image::ColorType) -> Result<Vec<u8>> {
    let channels = color.bytes_per_pixel() as usize;
    let data: Vec<u8> = (0..w as usize * h as usize * channels).map(|i| (i * 37 % 251) as u8).collect();
    let mut out = Vec::new();
    image::ImageEncoder::write_image(image::codecs::png::PngEncoder::new(&mut out), &data, w, h, color.into())?;
    Ok(out)
}

fn jpeg(w: u32, h: u32) -> Result<Vec<u8>> {
    let data: Vec<u8> = (0..w as usize * h as usize * 3).map(|i| (i * 13 % 256) as u8).collect();
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 80).encode(
        &data,
        w,
        h,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(out)
}

fn state_dict() -> Result<StateDict> {
    let mut sd = StateDict::new();
    sd.insert("visual_encoder.pos_embed".into(), Tensor::arange(0f32, 6., &Device::Cpu)?.reshape((1, 2, 3))?);
    sd.insert("text_encoder.embeddings.position_ids".into(), Tensor::arange(0i64, 4, &Device::Cpu)?.reshape((1, 4))?);
    sd.insert("temp".into(), Tensor::new(&[0.07f32], &Device::Cpu)?);
    Ok(sd)
}

fn main() -> Result<()> {
    // Checkpoints: our .pth writer (torch.save's layout) and safetensors with aliases.
    let sd = state_dict()?;
    save_pth(&sd, &dir("pth")?.join("state_dict.pth"))?;
    let one: StateDict = sd.iter().take(1).map(|(k, v)| (k.clone(), v.clone())).collect();
    save_pth(&one, &dir("pth")?.join("one_tensor.pth"))?;
    let mut meta = BTreeMap::new();
    meta.insert("aliases".to_string(), r#"{"temp_m": "temp"}"#.to_string());
    meta.insert("albef_kind".to_string(), "retrieval".to_string());
    save_safetensors(&sd, &meta, &dir("safetensors")?.join("aliases.safetensors"))?;
    save_safetensors(&one, &BTreeMap::new(), &dir("safetensors")?.join("one_tensor.safetensors"))?;

    // Images: PNG of every colour type the loader converts, and a baseline JPEG.
    let d = dir("image")?;
    std::fs::write(d.join("rgb.png"), png(7, 5, image::ColorType::Rgb8)?)?;
    std::fs::write(d.join("grey.png"), png(4, 4, image::ColorType::L8)?)?;
    std::fs::write(d.join("grey_alpha.png"), png(3, 2, image::ColorType::La8)?)?;
    std::fs::write(d.join("rgba16.png"), png(2, 3, image::ColorType::Rgba16)?)?;
    std::fs::write(d.join("rgb.jpg"), jpeg(9, 6)?)?;
    std::fs::write(d.join("grey.jpg"), {
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut out).encode(&[128u8; 64], 8, 8, image::ExtendedColorType::L8)?;
        out
    })?;

    // A WebDataset shard: .jpg + .txt, .png + .json (caption list), a member without extension.
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        tar.append_data(&mut h, name, bytes)?;
        Ok(())
    };
    add("000000000.jpg", &jpeg(8, 8)?)?;
    add("000000000.txt", b"A dog runs on the beach.")?;
    add("sub/000000001.png", &png(4, 3, image::ColorType::Rgb8)?)?;
    add("sub/000000001.json", br#"{"caption": ["two cats", "a pair of cats"], "url": "x"}"#)?;
    add("README", b"no extension: ignored")?;
    std::fs::write(dir("shards")?.join("shard.tar"), tar.into_inner()?)?;

    // REFER refs pickle (a list of refs, as refs(unc).p).
    let refs = serde_pickle::Value::List(vec![serde_pickle::Value::Dict(BTreeMap::from([
        (serde_pickle::HashableValue::String("ref_id".into()), serde_pickle::Value::I64(1)),
        (serde_pickle::HashableValue::String("image_id".into()), serde_pickle::Value::I64(7)),
        (serde_pickle::HashableValue::String("ann_id".into()), serde_pickle::Value::I64(3)),
        (serde_pickle::HashableValue::String("split".into()), serde_pickle::Value::String("val".into())),
        (
            serde_pickle::HashableValue::String("sentences".into()),
            serde_pickle::Value::List(vec![serde_pickle::Value::Dict(BTreeMap::from([(
                serde_pickle::HashableValue::String("sent".into()),
                serde_pickle::Value::Bytes(b"the dog on the left".to_vec()),
            )]))]),
        ),
    ]))]);
    let d = dir("refer_pickle")?;
    std::fs::write(d.join("refs2.p"), serde_pickle::value_to_vec(&refs, serde_pickle::SerOptions::new().proto_v2())?)?;
    std::fs::write(d.join("refs3.p"), serde_pickle::value_to_vec(&refs, serde_pickle::SerOptions::new())?)?;

    // The Hugging Face RefCOCO parquet layout.
    let mut bbox = ListBuilder::new(Float64Builder::new());
    let mut captions = ListBuilder::new(StringBuilder::new());
    for (b, caps) in [([1.0, 2.0, 4.5, 6.0], vec!["left dog"]), ([0.5, 0.5, 9.0, 9.25], vec!["man", "a man"])] {
        bbox.values().append_slice(&b);
        bbox.append(true);
        for c in caps {
            captions.values().append_value(c);
        }
        captions.append(true);
    }
    let batch = RecordBatch::try_from_iter([
        ("ref_id", Arc::new(Int64Array::from(vec![1, 2])) as ArrayRef),
        ("image_id", Arc::new(Int64Array::from(vec![7, 8])) as ArrayRef),
        ("split", Arc::new(StringArray::from(vec!["val", "testA"])) as ArrayRef),
        ("bbox", Arc::new(bbox.finish()) as ArrayRef),
        ("captions", Arc::new(captions.finish()) as ArrayRef),
    ])?;
    let mut buf = Vec::new();
    let mut w = parquet::arrow::ArrowWriter::try_new(&mut buf, batch.schema(), None)?;
    w.write(&batch)?;
    w.close()?;
    std::fs::write(dir("parquet")?.join("refcoco.parquet"), buf)?;

    // Tokenizer files: vocab.txt, tokenizer.json (WordPiece), tokenizer_config.json, text.
    let vocab: Vec<String> = (0..104)
        .map(|i| match i {
            0 => "[PAD]".into(),
            100 => "[UNK]".into(),
            101 => "[CLS]".into(),
            102 => "[SEP]".into(),
            103 => "[MASK]".into(),
            _ => format!("[unused{i}]"),
        })
        .chain(["the", "dog", "##s", "run", "."].map(String::from))
        .collect();
    let d = dir("tokenizer")?;
    std::fs::write(d.join("vocab.txt"), with_selector(0, vocab.join("\n").as_bytes()))?;
    let tj = serde_json::json!({"version": "1.0", "model": {"type": "WordPiece", "unk_token": "[UNK]",
        "vocab": vocab.iter().enumerate().map(|(i, t)| (t.clone(), serde_json::json!(i))).collect::<serde_json::Map<_, _>>()}});
    std::fs::write(d.join("tokenizer.json"), with_selector(1, tj.to_string().as_bytes()))?;
    std::fs::write(d.join("tokenizer_config.json"), with_selector(2, br#"{"do_lower_case": false}"#))?;
    std::fs::write(d.join("text.txt"), with_selector(3, "A dog's running, on the [SEP] grass?! 北京 café".as_bytes()))?;

    // Annotation files, one per reader of the `annotations` target (the first byte).
    let d = dir("annotations")?;
    let karpathy = r#"{"images": [{"filepath": "val2014", "filename": "a.jpg", "split": "test",
        "sentences": [{"raw": "A dog."}, {"raw": "A cat."}]}, {"filepath": "train2014", "filename": "b.jpg",
        "split": "restval", "sentences": [{"raw": "Two men."}]}]}"#;
    let vqa_q = r#"{"questions": [{"question_id": 1, "image_id": 7, "question": "What is it?"}],
        "annotations": [{"question_id": 1, "image_id": 7, "multiple_choice_answer": "dog",
        "answers": [{"answer": "dog"}, {"answer": "cat"}]}]}"#;
    let seeds: [&str; 18] = [
        r#"[{"image": "a.jpg", "caption": "A dog runs.", "image_id": 0}, {"image": "b.jpg", "caption": ["x", "y"], "image_id": 1}]"#,
        r#"[{"image": "a.jpg", "caption": ["A dog runs.", "A brown dog."]}]"#,
        r#"[{"question_id": 1, "question": "What colour?", "answer": ["red", "red", "blue"], "image": "coco/a.jpg", "dataset": "vqa"},
            {"question_id": 2, "question": "Why?", "answer": ["x"], "image": "vg/b.jpg", "dataset": "vg"}]"#,
        r#"[{"question_id": 1, "question": "What colour?", "image": "coco/a.jpg"}]"#,
        r#"["yes", "no", "2", "red"]"#,
        r#"[{"image": "123", "sentence": "A man sleeps.", "label": "entailment"}]"#,
        r#"[{"images": ["a.png", "b.png"], "sentence": "Two dogs.", "label": "True"}]"#,
        r#"[{"image": "a.jpg", "caption": "a dog"}, {"image": "b.jpg", "caption": ["one", "two"]}]"#,
        r#"[{"image": "/abs/a.jpg", "caption": ["one", "two"]}]"#,
        r#"[{"image": "a.jpg", "text": "the dog on the left", "ref_id": 1, "image_id": 7, "bbox": [1, 2, 3, 4]}]"#,
        r#"[{"image": "a.jpg", "text": "the dog", "ref_id": 1}]"#,
        r#"[{"ref_id": 1, "image_id": 7, "ann_id": 3, "split": "val", "sentences": [{"sent": "a"}]}]"#,
        r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}], "annotations": [{"id": 3, "bbox": [1, 2, 3, 4]}]}"#,
        r#"{"7": [[1, 2, 3, 4, 0.9, 1], [0, 0, 5, 5]], "8": []}"#,
        karpathy,
        karpathy,
        vqa_q,
        "{\"identifier\": \"train-1-0-0\", \"directory\": 3, \"sentence\": \"Two dogs.\", \"label\": \"True\"}\n\n{\"pairID\": \"1\", \"Flickr30K_ID\": \"2\", \"sentence2\": \"A man.\", \"gold_label\": \"neutral\"}\n",
    ];
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(d.join(format!("reader{i:02}.json")), with_selector(i as u8, s.as_bytes()))?;
    }

    // YAML and bert_config seeds beyond the repo's configs/: anchors, aliases, odd scalars.
    std::fs::write(
        dir("config_yaml")?.join("anchors.yaml"),
        "train_file: &f ['a.json', 'b.json']\nval_file: *f\ntest_file: c.json\nimage_root: img\nimage_res: 32\n\
         batch_size_train: 2\nbatch_size_test: 2\nvision: {patch_size: 16, embed_dim: 32, depth: 1, num_heads: 2}\n\
         optimizer: {opt: adamW, lr: 1e-4, weight_decay: 0.02}\nschedular: {sched: cosine, lr: 1e-4, epochs: 1, \
         min_lr: 1e-6, decay_rate: 1, warmup_lr: 1e-5, warmup_epochs: 1, cooldown_epochs: 0}\n",
    )?;
    std::fs::write(
        dir("bert_config")?.join("tiny.json"),
        r#"{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
            "vocab_size": 110, "fusion_layer": 1, "encoder_width": 768, "layer_norm_eps": 1e-12}"#,
    )?;
    println!("seeds written under {}", Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds").display());
    Ok(())
}
