//! `albef data prepare`: small inputs in each official format, converted and checked field by
//! field; malformed inputs name the file and record; outputs are not overwritten unless forced.

use albef::data::prepare::{coco, flickr30k, nlvr2, snli_ve, vqa};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("albef-prepare-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn load(p: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn karpathy_doc(coco_style: bool) -> Value {
    let img = |split: &str, name: &str, id: i64, caps: &[&str]| {
        let mut v = json!({"filename": name, "split": split, "imgid": id,
                           "sentences": caps.iter().map(|c| json!({"raw": c, "tokens": []})).collect::<Vec<_>>()});
        if coco_style {
            v["filepath"] = json!(if split == "train" { "train2014" } else { "val2014" });
            v["cocoid"] = json!(1000 + id);
        }
        v
    };
    json!({"dataset": "x", "images": [
        img("train", "a.jpg", 0, &["A dog.", "A brown dog runs."]),
        img("restval", "b.jpg", 1, &["A cat."]),
        img("val", "c.jpg", 2, &["Two birds.", "Birds fly."]),
        img("test", "d.jpg", 3, &["A car."]),
    ]})
}

#[test]
fn flickr30k_and_coco_from_karpathy() {
    let d = tmp("karpathy");
    std::fs::write(d.join("dataset_flickr30k.json"), karpathy_doc(false).to_string()).unwrap();
    let out = d.join("flickr30k");
    let w = flickr30k(&d.join("dataset_flickr30k.json"), &out, false).unwrap();
    assert_eq!(w.iter().map(|x| x.1).collect::<Vec<_>>(), [3, 1, 1]);
    let train = load(&out.join("train.json"));
    assert_eq!(train[0], json!({"image": "images/a.jpg", "caption": "A dog.", "image_id": 0}));
    assert_eq!(train[2], json!({"image": "images/b.jpg", "caption": "A cat.", "image_id": 1}));
    assert_eq!(
        load(&out.join("val.json")),
        json!([{"image": "images/c.jpg", "caption": ["Two birds.", "Birds fly."]}])
    );
    assert_eq!(load(&out.join("test.json")), json!([{"image": "images/d.jpg", "caption": ["A car."]}]));
    // Existing outputs are kept unless forced.
    let e = flickr30k(&d.join("dataset_flickr30k.json"), &out, false).unwrap_err().to_string();
    assert!(e.contains("refusing to overwrite") && e.contains("train.json"), "{e}");
    flickr30k(&d.join("dataset_flickr30k.json"), &out, true).unwrap();

    std::fs::write(d.join("dataset_coco.json"), karpathy_doc(true).to_string()).unwrap();
    let out = d.join("coco");
    coco(&d.join("dataset_coco.json"), &out, false).unwrap();
    let train = load(&out.join("annotations/retrieval_train.json"));
    assert_eq!(train[0], json!({"image": "train2014/a.jpg", "caption": "A dog.", "image_id": 1000}));
    let test = load(&out.join("annotations/retrieval_test.json"));
    assert_eq!(test, json!([{"image": "val2014/d.jpg", "caption": ["A car."]}]));

    // Malformed: a sentence without 'raw'.
    let mut bad = karpathy_doc(false);
    bad["images"][2]["sentences"][1] = json!({"tokens": []});
    std::fs::write(d.join("bad.json"), bad.to_string()).unwrap();
    let e = format!("{:#}", flickr30k(&d.join("bad.json"), &d.join("o"), false).unwrap_err());
    assert!(e.contains("bad.json") && e.contains("image 2") && e.contains("'raw'"), "{e}");
    std::fs::write(d.join("trunc.json"), &karpathy_doc(false).to_string()[..40]).unwrap();
    let e = format!("{:#}", flickr30k(&d.join("trunc.json"), &d.join("o"), false).unwrap_err());
    assert!(e.contains("trunc.json") && e.contains("not valid JSON"), "{e}");
}

#[test]
fn vqa_joins_questions_answers_and_images() {
    let d = tmp("vqa");
    let answers = |a: &str, b: &str| {
        (0..10).map(|i| json!({"answer": if i < 7 { a } else { b }, "answer_id": i + 1})).collect::<Vec<_>>()
    };
    std::fs::write(
        d.join("q_train.json"),
        json!({"questions": [
        {"image_id": 9, "question": "What color?", "question_id": 90},
        {"image_id": 12, "question": "How many?", "question_id": 120}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("a_train.json"),
        json!({"annotations": [
        {"question_id": 90, "image_id": 9, "multiple_choice_answer": "red", "answers": answers("red", "pink")},
        {"question_id": 120, "image_id": 12, "multiple_choice_answer": "2", "answers": answers("2", "3")}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("q_val.json"),
        json!({"questions": [{"image_id": 5, "question": "Is it?", "question_id": 50}]}).to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("a_val.json"),
        json!({"annotations": [
        {"question_id": 50, "image_id": 5, "multiple_choice_answer": "red", "answers": answers("red", "no")}]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        d.join("q_test.json"),
        json!({"questions": [{"image_id": 7, "question": "Why?", "question_id": 70}]}).to_string(),
    )
    .unwrap();
    let out = d.join("vqa");
    let splits = vec![
        ("train".to_string(), d.join("q_train.json"), Some(d.join("a_train.json"))),
        ("val".to_string(), d.join("q_val.json"), Some(d.join("a_val.json"))),
        ("test".to_string(), d.join("q_test.json"), None),
    ];
    vqa(&splits, &out, 3128, false).unwrap();
    let train = load(&out.join("vqa_train.json"));
    assert_eq!(train[0]["image"], "train2014/COCO_train2014_000000000009.jpg");
    assert_eq!(train[0]["dataset"], "vqa");
    assert_eq!(train[0]["question"], "What color?");
    assert_eq!(train[0]["question_id"], 90);
    assert_eq!(train[0]["answer"].as_array().unwrap().len(), 10);
    assert_eq!(train[1]["answer"][9], "3");
    assert_eq!(load(&out.join("vqa_val.json"))[0]["image"], "val2014/COCO_val2014_000000000005.jpg");
    let test = load(&out.join("vqa_test.json"));
    assert_eq!(test[0]["image"], "test2015/COCO_test2015_000000000007.jpg");
    assert!(test[0].get("answer").is_none());
    // Most frequent first ("red" twice), then ties by name.
    assert_eq!(load(&out.join("answer_list.json")), json!(["red", "2"]));
    vqa(&splits, &d.join("vqa1"), 1, false).unwrap();
    assert_eq!(load(&d.join("vqa1/answer_list.json")), json!(["red"]));
    // A wrong type is named with file and record.
    std::fs::write(
        d.join("q_bad.json"),
        json!({"questions": [{"image_id": "nine", "question": "?", "question_id": 1}]}).to_string(),
    )
    .unwrap();
    let e = format!(
        "{:#}",
        vqa(&[("test".to_string(), d.join("q_bad.json"), None)], &d.join("vqa3"), 10, false).unwrap_err()
    );
    assert!(e.contains("q_bad.json") && e.contains("question 0") && e.contains("'image_id' must be an integer"), "{e}");
    // A question without annotation is named.
    std::fs::write(d.join("a_val.json"), json!({"annotations": []}).to_string()).unwrap();
    let e = format!("{:#}", vqa(&splits, &d.join("vqa2"), 10, false).unwrap_err());
    assert!(e.contains("q_val.json") && e.contains("question_id 50"), "{e}");
}

#[test]
fn nlvr2_and_snli_ve_from_json_lines() {
    let d = tmp("jsonl");
    std::fs::write(
        d.join("train.json"),
        concat!(
            r#"{"identifier": "train-10171-0-0", "directory": 7, "sentence": "Two dogs.", "label": "True"}"#,
            "\n",
            r#"{"identifier": "train-10171-0-1", "directory": 7, "sentence": "No dogs.", "label": "False"}"#,
            "\n"
        ),
    )
    .unwrap();
    std::fs::write(d.join("dev.json"), r#"{"identifier": "dev-850-0-2", "sentence": "A bird.", "label": "True"}"#)
        .unwrap();
    let out = d.join("nlvr2");
    nlvr2(&[("train".into(), d.join("train.json")), ("val".into(), d.join("dev.json"))], &out, false).unwrap();
    assert_eq!(
        load(&out.join("train.json"))[1],
        json!({"images": ["train/7/train-10171-0-img0.png", "train/7/train-10171-0-img1.png"], "sentence": "No dogs.", "label": "False"})
    );
    // Relative to images/: dev/ sits beside it in the official layout.
    assert_eq!(
        load(&out.join("val.json"))[0]["images"],
        json!(["../dev/dev-850-0-img0.png", "../dev/dev-850-0-img1.png"])
    );
    std::fs::write(d.join("badlabel.json"), r#"{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}"#)
        .unwrap();
    let e = format!("{:#}", nlvr2(&[("val".into(), d.join("badlabel.json"))], &d.join("o"), false).unwrap_err());
    assert!(e.contains("badlabel.json") && e.contains("line 1") && e.contains("maybe"), "{e}");

    std::fs::write(d.join("ve_train.jsonl"), concat!(
        r#"{"Flickr30K_ID": "3416050480", "sentence1": "p", "sentence2": "A man sleeps.", "gold_label": "contradiction"}"#, "\n",
        r#"{"Flickr30K_ID": 1000092795, "sentence1": "p", "sentence2": "Two men.", "gold_label": "entailment"}"#, "\n",
        "{\"Flickr30K_ID\": \"1\", \"sentence2\": \n")).unwrap();
    let e = format!("{:#}", snli_ve(&[("train".into(), d.join("ve_train.jsonl"))], &d.join("ve"), false).unwrap_err());
    assert!(e.contains("ve_train.jsonl") && e.contains("line 3"), "{e}");
    let text = std::fs::read_to_string(d.join("ve_train.jsonl")).unwrap();
    std::fs::write(d.join("ve_train.jsonl"), text.lines().take(2).collect::<Vec<_>>().join("\n")).unwrap();
    snli_ve(&[("train".into(), d.join("ve_train.jsonl"))], &d.join("ve"), false).unwrap();
    assert_eq!(
        load(&d.join("ve/ve_train.json")),
        json!([
        {"image": "3416050480", "sentence": "A man sleeps.", "label": "contradiction"},
        {"image": "1000092795", "sentence": "Two men.", "label": "entailment"}])
    );
}

/// A large file converts completely (its speed is measured with the command, not here).
#[test]
fn a_hundred_thousand_captions_convert() {
    let d = tmp("big");
    let images: Vec<Value> = (0..20_000)
        .map(|i| json!({"filename": format!("{i}.jpg"), "split": if i % 10 == 0 { "test" } else { "train" }, "imgid": i,
                        "sentences": (0..5).map(|k| json!({"raw": format!("caption {k} of image {i}")})).collect::<Vec<_>>()}))
        .collect();
    std::fs::write(d.join("k.json"), json!({"images": images}).to_string()).unwrap();
    let w = flickr30k(&d.join("k.json"), &d.join("out"), false).unwrap();
    assert_eq!(w[0].1 + w[2].1 * 5, 100_000);
    assert_eq!(load(&d.join("out/test.json"))[1999]["image"], "images/19990.jpg");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn refcoco_from_refer_pickle_and_from_parquet() {
    use albef::data::refcoco::{from_parquet, from_refer};
    use arrow_array::builder::{Float64Builder, ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let d = tmp("refcoco");
    // A REFER pickle written the way Python writes a list of dicts (serde-pickle here).
    let refs = json!([
        {"ref_id": 0, "ann_id": 7, "image_id": 581857, "split": "train", "file_name": "COCO_train2014_000000581857_7.jpg",
         "sentences": [{"sent": "the lady with the blue shirt", "raw": "The lady with the blue shirt", "sent_id": 0, "tokens": []},
                       {"sent": "woman in back", "raw": "woman in back", "sent_id": 1, "tokens": []}], "category_id": 1},
        {"ref_id": 1, "ann_id": 8, "image_id": 1000, "split": "testA", "file_name": "COCO_train2014_000000001000_8.jpg",
         "sentences": [{"sent": "left man", "raw": "left man", "sent_id": 2, "tokens": []}], "category_id": 1}
    ]);
    std::fs::write(d.join("refs(unc).p"), serde_pickle::to_vec(&refs, serde_pickle::SerOptions::new()).unwrap())
        .unwrap();
    std::fs::write(d.join("instances.json"), json!({
        "images": [{"id": 581857, "file_name": "COCO_train2014_000000581857.jpg"}, {"id": 1000, "file_name": "COCO_train2014_000000001000.jpg"}],
        "annotations": [{"id": 7, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42]}, {"id": 8, "image_id": 1000, "bbox": [1.0, 2.0, 3.0, 4.0]}],
        "categories": []}).to_string()).unwrap();
    let out = d.join("refcoco");
    from_refer(&d.join("refs(unc).p"), &d.join("instances.json"), "refcoco+", "unc+", &out, false).unwrap();
    let train = load(&out.join("refcoco+_train.json"));
    assert_eq!(
        train[1],
        json!({"image": "train2014/COCO_train2014_000000581857.jpg", "text": "woman in back", "ref_id": 0, "image_id": 581857, "bbox": [103.93, 299.99, 134.22, 177.42]})
    );
    assert_eq!(load(&out.join("refcoco+_testA.json"))[0]["bbox"], json!([1.0, 2.0, 3.0, 4.0]));
    assert_eq!(load(&out.join("refs(unc+).json")), refs);
    // A ref whose annotation is missing from instances.json is named.
    std::fs::write(d.join("instances2.json"), json!({"images": [{"id": 581857, "file_name": "x.jpg"}, {"id": 1000, "file_name": "y.jpg"}], "annotations": []}).to_string()).unwrap();
    let e = format!(
        "{:#}",
        from_refer(&d.join("refs(unc).p"), &d.join("instances2.json"), "refcoco", "unc", &d.join("o"), false)
            .unwrap_err()
    );
    assert!(e.contains("ref 0") && e.contains("annotation 7"), "{e}");
    std::fs::write(d.join("bad.p"), b"\x80\x02]q\x00(").unwrap();
    let e = format!(
        "{:#}",
        from_refer(&d.join("bad.p"), &d.join("instances.json"), "refcoco", "unc", &d.join("o"), false).unwrap_err()
    );
    assert!(e.contains("bad.p"), "{e}");

    // The parquet release (boxes as corners x1, y1, x2, y2).
    let mut bbox = ListBuilder::new(Float64Builder::new());
    let mut caps = ListBuilder::new(StringBuilder::new());
    for (b, c) in [([1.0, 2.0, 3.0, 4.0], vec!["a dog", "the brown dog"]), ([5.0, 6.0, 7.0, 8.0], vec!["cat on left"])]
    {
        bbox.values().append_slice(&b);
        bbox.append(true);
        for s in c {
            caps.values().append_value(s);
        }
        caps.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        ("ref_id", Arc::new(Int64Array::from(vec![10, 11])) as ArrayRef),
        ("image_id", Arc::new(Int64Array::from(vec![42, 43])) as ArrayRef),
        ("split", Arc::new(StringArray::from(vec!["val", "testB"])) as ArrayRef),
        ("bbox", Arc::new(bbox.finish()) as ArrayRef),
        ("captions", Arc::new(caps.finish()) as ArrayRef),
    ])
    .unwrap();
    let pq = d.join("validation-00000-of-00001.parquet");
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(&pq).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let out = d.join("hf");
    from_parquet(std::slice::from_ref(&pq), "refcoco", &out, false).unwrap();
    assert_eq!(
        load(&out.join("refcoco_val.json")),
        json!([
        {"image": "train2014/COCO_train2014_000000000042.jpg", "text": "a dog", "ref_id": 10, "image_id": 42, "bbox": [1.0, 2.0, 2.0, 2.0]},
        {"image": "train2014/COCO_train2014_000000000042.jpg", "text": "the brown dog", "ref_id": 10, "image_id": 42, "bbox": [1.0, 2.0, 2.0, 2.0]}])
    );
    assert_eq!(load(&out.join("refcoco_testB.json"))[0]["text"], "cat on left");
    let bytes = std::fs::read(&pq).unwrap();
    std::fs::write(d.join("cut.parquet"), &bytes[..bytes.len() / 2]).unwrap();
    let e = format!("{:#}", from_parquet(&[d.join("cut.parquet")], "refcoco", &d.join("o2"), false).unwrap_err());
    assert!(e.contains("cut.parquet"), "{e}");
}

/// A parquet row: (ref_id, image_id, split, bbox, captions).
type ParquetRow<'a> = (i64, i64, &'a str, [f64; 4], Vec<&'a str>);

/// Writes a parquet file shaped like the `jxu124/refcoco*` release (the columns albef reads).
fn write_refcoco_parquet(path: &Path, rows: &[ParquetRow]) {
    use arrow_array::builder::{Float64Builder, ListBuilder, StringBuilder};
    use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
    use std::sync::Arc;
    let mut bbox = ListBuilder::new(Float64Builder::new());
    let mut caps = ListBuilder::new(StringBuilder::new());
    for (_, _, _, b, c) in rows {
        bbox.values().append_slice(b);
        bbox.append(true);
        for s in c {
            caps.values().append_value(s);
        }
        caps.append(true);
    }
    let batch = RecordBatch::try_from_iter(vec![
        ("ref_id", Arc::new(Int64Array::from(rows.iter().map(|r| r.0).collect::<Vec<_>>())) as ArrayRef),
        ("image_id", Arc::new(Int64Array::from(rows.iter().map(|r| r.1).collect::<Vec<_>>())) as ArrayRef),
        ("split", Arc::new(StringArray::from(rows.iter().map(|r| r.2).collect::<Vec<_>>())) as ArrayRef),
        ("bbox", Arc::new(bbox.finish()) as ArrayRef),
        ("captions", Arc::new(caps.finish()) as ArrayRef),
    ])
    .unwrap();
    let mut w =
        parquet::arrow::ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

/// The parquet release stores boxes as corners (x1, y1, x2, y2, computed in float64 from COCO's
/// [x, y, w, h]); the same refs read from the REFER pickle and from the parquet give identical files.
#[test]
fn refcoco_parquet_corner_boxes_give_the_refer_outputs() {
    use albef::data::refcoco::{from_parquet, from_refer};
    let d = tmp("refcoco-boxes");
    // (ref_id, ann_id, image_id, split, COCO bbox [x, y, w, h], sentences)
    type Ref<'a> = (i64, i64, i64, &'a str, [f64; 4], Vec<&'a str>);
    let refs: [Ref; 3] = [
        (5, 50, 9, "train", [4.5, 6.0, 30.25, 52.0], vec!["man on left", "guy in red"]),
        (6, 51, 9, "val", [103.93, 299.99, 134.22, 177.42], vec!["the lady with the blue shirt"]),
        (7, 52, 31, "testA", [103.08, 230.15, 7.94, 60.01], vec!["bottom car"]),
    ];
    let pickle: Vec<Value> = refs
        .iter()
        .map(|(r, a, i, s, _, sents)| {
            json!({"ref_id": r, "ann_id": a, "image_id": i, "split": s, "category_id": 1,
                   "sentences": sents.iter().map(|t| json!({"sent": t, "raw": t, "tokens": []})).collect::<Vec<_>>()})
        })
        .collect();
    std::fs::write(d.join("refs(unc).p"), serde_pickle::to_vec(&pickle, serde_pickle::SerOptions::new()).unwrap())
        .unwrap();
    std::fs::write(
        d.join("instances.json"),
        json!({"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg"},
                          {"id": 31, "file_name": "COCO_train2014_000000000031.jpg"}],
               "annotations": refs.iter().map(|r| json!({"id": r.1, "image_id": r.2, "bbox": r.4})).collect::<Vec<_>>()})
        .to_string(),
    )
    .unwrap();
    from_refer(&d.join("refs(unc).p"), &d.join("instances.json"), "refcoco", "unc", &d.join("refer"), false).unwrap();
    let rows: Vec<ParquetRow> = refs
        .iter()
        .map(|(r, _, i, s, [x, y, w, h], sents)| (*r, *i, *s, [*x, *y, x + w, y + h], sents.clone()))
        .collect();
    assert_eq!(rows[0].3, [4.5, 6.0, 34.75, 58.0], "the issue's example");
    write_refcoco_parquet(&d.join("train-00000-of-00001.parquet"), &rows);
    from_parquet(&[d.join("train-00000-of-00001.parquet")], "refcoco", &d.join("hf"), false).unwrap();
    for split in ["train", "val", "testA"] {
        let name = format!("refcoco_{split}.json");
        assert_eq!(load(&d.join("hf").join(&name)), load(&d.join("refer").join(&name)), "{name}");
    }
    assert_eq!(load(&d.join("hf/refcoco_train.json"))[0]["bbox"], json!([4.5, 6.0, 30.25, 52.0]));
    // A box whose corners are out of order is not x1, y1, x2, y2: named, nothing written.
    write_refcoco_parquet(&d.join("xywh.parquet"), &[(1, 2, "val", [50.0, 60.0, 10.0, 20.0], vec!["a"])]);
    let e = format!("{:#}", from_parquet(&[d.join("xywh.parquet")], "refcoco", &d.join("o"), false).unwrap_err());
    assert!(e.contains("xywh.parquet") && e.contains("row 0") && e.contains("x2"), "{e}");
    assert!(!d.join("o").exists());
}

/// The originally released SNLI-VE files spell the image key `Flikr30kID` and give file names.
#[test]
fn snli_ve_original_flikr30kid_files() {
    let d = tmp("snli-original");
    std::fs::write(
        d.join("snli_ve_dev.jsonl"),
        concat!(
            r#"{"annotator_labels": ["neutral"], "captionID": "2677109430.jpg#1", "gold_label": "neutral", "pairID": "2677109430.jpg#1r1n", "sentence1": "This church choir sings to the masses.", "sentence2": "The church has cracks in the ceiling.", "Flikr30kID": "2677109430.jpg"}"#,
            "\n",
            r#"{"annotator_labels": ["entailment"], "captionID": "2677109430.jpg#1", "gold_label": "entailment", "pairID": "2677109430.jpg#1r1e", "sentence1": "This church choir sings to the masses.", "sentence2": "The church is filled with song.", "Flikr30kID": "2677109430.jpg"}"#,
            "\n"
        ),
    )
    .unwrap();
    snli_ve(&[("dev".into(), d.join("snli_ve_dev.jsonl"))], &d.join("ve"), false).unwrap();
    assert_eq!(
        load(&d.join("ve/ve_dev.json")),
        json!([
        {"image": "2677109430", "sentence": "The church has cracks in the ceiling.", "label": "neutral"},
        {"image": "2677109430", "sentence": "The church is filled with song.", "label": "entailment"}])
    );
    std::fs::write(d.join("nokey.jsonl"), r#"{"gold_label": "neutral", "sentence2": "x"}"#).unwrap();
    let e = format!("{:#}", snli_ve(&[("dev".into(), d.join("nokey.jsonl"))], &d.join("o"), false).unwrap_err());
    assert!(e.contains("nokey.jsonl") && e.contains("line 1") && e.contains("Flikr30kID"), "{e}");
}

/// NLVR2 as the official archives unpack into the dataset folder: `images/train/<n>/`, and `dev/`,
/// `test1/` beside `images/`. Every path resolves from `<out>/images/` (NLVR.yaml's image_root).
#[test]
fn nlvr2_paths_resolve_in_the_official_archive_layout() {
    let d = tmp("nlvr2-layout");
    let out = d.join("nlvr2");
    std::fs::write(
        d.join("train.json"),
        r#"{"identifier": "train-10171-0-0", "directory": 7, "sentence": "Two dogs.", "label": "True"}"#,
    )
    .unwrap();
    std::fs::write(d.join("dev.json"), r#"{"identifier": "dev-850-0-2", "sentence": "A bird.", "label": "True"}"#)
        .unwrap();
    std::fs::write(d.join("test1.json"), r#"{"identifier": "test1-3-1-0", "sentence": "A cat.", "label": "False"}"#)
        .unwrap();
    let splits = [
        ("train".into(), d.join("train.json")),
        ("val".into(), d.join("dev.json")),
        ("test".into(), d.join("test1.json")),
    ];
    nlvr2(&splits, &out, false).unwrap();
    let images = |split: &str| -> Vec<String> {
        load(&out.join(format!("{split}.json")))[0]["images"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    };
    // Written before the images are there: the official layout is assumed.
    assert_eq!(images("train"), ["train/7/train-10171-0-img0.png", "train/7/train-10171-0-img1.png"]);
    assert_eq!(images("val"), ["../dev/dev-850-0-img0.png", "../dev/dev-850-0-img1.png"]);
    assert_eq!(images("test"), ["../test1/test1-3-1-img0.png", "../test1/test1-3-1-img1.png"]);
    for split in ["train", "val", "test"] {
        for p in images(split) {
            let f = out.join("images").join(p);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, b"x").unwrap();
        }
    }
    assert!(out.join("images/train/7/train-10171-0-img0.png").is_file());
    assert!(out.join("dev/dev-850-0-img1.png").is_file() && out.join("test1/test1-3-1-img0.png").is_file());
    // A tree where dev was moved under images/ is found where it is.
    std::fs::create_dir_all(out.join("images/dev")).unwrap();
    nlvr2(&splits, &out, true).unwrap();
    assert_eq!(images("val"), ["dev/dev-850-0-img0.png", "dev/dev-850-0-img1.png"]);
    assert_eq!(images("test")[0], "../test1/test1-3-1-img0.png");
}

/// Flickr30K's archive unpacks to `flickr30k-images/`; `images` (what the Flickr30K and SNLI-VE
/// configs read) is linked to it instead of asking for the files to be moved.
#[cfg(unix)]
#[test]
fn flickr30k_official_image_folder_is_linked() {
    let d = tmp("flickr-images");
    std::fs::write(d.join("dataset_flickr30k.json"), karpathy_doc(false).to_string()).unwrap();
    let out = d.join("flickr30k");
    std::fs::create_dir_all(out.join("flickr30k-images")).unwrap();
    std::fs::write(out.join("flickr30k-images/a.jpg"), b"x").unwrap();
    flickr30k(&d.join("dataset_flickr30k.json"), &out, false).unwrap();
    assert_eq!(load(&out.join("train.json"))[0]["image"], "images/a.jpg");
    assert_eq!(std::fs::read_link(out.join("images")).unwrap(), Path::new("flickr30k-images"));
    assert!(out.join("images/a.jpg").is_file());
    // An existing images/ is left alone.
    flickr30k(&d.join("dataset_flickr30k.json"), &out, true).unwrap();
    assert_eq!(std::fs::read_link(out.join("images")).unwrap(), Path::new("flickr30k-images"));
    // Bad input writes nothing, not even the link.
    let out2 = d.join("f2");
    std::fs::create_dir_all(out2.join("flickr30k-images")).unwrap();
    std::fs::write(d.join("bad.json"), "{}").unwrap();
    assert!(flickr30k(&d.join("bad.json"), &out2, false).is_err());
    assert!(std::fs::symlink_metadata(out2.join("images")).is_err());
}
