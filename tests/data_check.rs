//! `albef data check --config`: a good tree passes; a deleted image, a truncated image and a
//! malformed annotation are found.

use albef::data::check::check_config;
use albef::data::synth::{generate, SynthConfig};
use albef::task::Task;

#[test]
fn finds_missing_and_broken_images_and_bad_annotations() {
    let dir = std::env::temp_dir().join(format!("albef-check-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    generate(&data, &SynthConfig { seed: 1, train: 12, val: 4, test: 4, image_size: 16, max_shapes: 1 }).unwrap();
    let d = data.display();
    let write = |name: &str, text: String| {
        std::fs::write(dir.join(name), text).unwrap();
        dir.join(name)
    };
    let retrieval = write(
        "r.yaml",
        format!("train_file: ['{d}/retrieval_train.json']\nval_file: '{d}/retrieval_val.json'\ntest_file: '{d}/retrieval_test.json'\nimage_root: '{d}'\nk_test: 4\nimage_res: 16\n"),
    );
    let vqa = write(
        "v.yaml",
        format!("train_file: ['{d}/vqa_train.json']\ntest_file: ['{d}/vqa_test.json']\nanswer_list: '{d}/answer_list.json'\nvqa_root: '{d}'\nimage_res: 16\n"),
    );
    let nlvr = write(
        "n.yaml",
        format!("train_file: ['{d}/nlvr_train.json']\nval_file: ['{d}/nlvr_val.json']\ntest_file: ['{d}/nlvr_test.json']\nimage_root: '{d}'\nbatch_size: 4\nimage_res: 16\n"),
    );
    let ve = write(
        "e.yaml",
        format!("train_file: '{d}/ve_train.json'\nval_file: '{d}/ve_val.json'\ntest_file: '{d}/ve_test.json'\nimage_root: '{d}/ve_images'\nimage_res: 16\n"),
    );
    for (cfg, task) in [(&retrieval, Task::Retrieval), (&vqa, Task::Vqa), (&nlvr, Task::Nlvr), (&ve, Task::Ve)] {
        let r = check_config(cfg, task).unwrap();
        assert!(r.ok() && r.images > 0, "{}: {r:?}", cfg.display());
    }
    let r = check_config(&retrieval, Task::Retrieval).unwrap();
    assert_eq!(r.images, 20);
    assert_eq!(r.files.iter().map(|f| f.1).collect::<Vec<_>>(), [24, 4, 4]);

    std::fs::remove_file(data.join("images/train_00003.png")).unwrap();
    let png = std::fs::read(data.join("images/val_00001.png")).unwrap();
    std::fs::write(data.join("images/val_00001.png"), &png[..png.len() / 2]).unwrap();
    let r = check_config(&retrieval, Task::Retrieval).unwrap();
    assert!(!r.ok());
    assert_eq!(r.missing.len(), 1, "{r:?}");
    assert!(r.missing[0].contains("train_00003.png") && r.missing[0].contains("entry 6 of"), "{:?}", r.missing);
    assert_eq!(r.broken.len(), 1, "{r:?}");
    assert!(r.broken[0].contains("val_00001.png"), "{:?}", r.broken);

    std::fs::write(data.join("retrieval_test.json"), r#"[{"image": "images/test_00000.png"}]"#).unwrap();
    let e = format!("{:#}", check_config(&retrieval, Task::Retrieval).unwrap_err());
    assert!(e.contains("retrieval_test.json") && e.contains("entry 0") && e.contains("'caption'"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The command's exit status, over a tree in the standard layout (`--root`).
#[test]
fn command_exit_status_over_a_layout() {
    let root = std::env::temp_dir().join(format!("albef-check-root-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let flickr = root.join("flickr30k");
    generate(&flickr, &SynthConfig { seed: 2, train: 6, val: 3, test: 3, image_size: 16, max_shapes: 1 }).unwrap();
    for split in ["train", "val", "test"] {
        std::fs::rename(flickr.join(format!("retrieval_{split}.json")), flickr.join(format!("{split}.json"))).unwrap();
    }
    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let run = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_albef"))
            .args(["data", "check", "--root"])
            .arg(&root)
            .arg("--configs")
            .arg(&configs)
            .output()
            .unwrap()
    };
    let ok = run();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stdout));
    assert!(String::from_utf8_lossy(&ok.stdout).contains("== flickr30k"));
    std::fs::remove_file(flickr.join("images/test_00002.png")).unwrap();
    let bad = run();
    assert!(!bad.status.success());
    let text = String::from_utf8_lossy(&bad.stdout);
    assert!(text.contains("missing") && text.contains("test_00002.png"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}

/// A JPEG of noise (so its scan data is long), as the `image` crate encodes it.
fn noisy_jpeg(path: &std::path::Path, seed: u32) {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    let img = image::RgbImage::from_fn(40, 32, |_, _| {
        let mut px = [0u8; 3];
        for p in &mut px {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            *p = (s >> 24) as u8;
        }
        image::Rgb(px)
    });
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// Cuts a JPEG halfway through the entropy-coded data of its last scan (as a broken download
/// leaves it), checking first that the `image` crate alone still decodes the result.
fn cut_inside_scan(path: &std::path::Path) {
    let bytes = std::fs::read(path).unwrap();
    let sos = bytes.windows(2).rposition(|w| w == [0xFF, 0xDA]).unwrap();
    let start = sos + 2 + u16::from_be_bytes([bytes[sos + 2], bytes[sos + 3]]) as usize;
    let end = bytes.len() - 2;
    assert_eq!(&bytes[end..], [0xFF, 0xD9]);
    let cut = &bytes[..start + (end - start) * 3 / 4];
    assert!(image::load_from_memory(cut).is_ok(), "the decoder alone accepts the cut file (fills the rest)");
    std::fs::write(path, cut).unwrap();
}

/// A JPEG cut inside its scan data is unreadable for `data check` and for the training loader,
/// which must not train on the grey the decoder fills in.
#[test]
fn a_jpeg_cut_inside_its_scan_data_is_unreadable() {
    use albef::data::loader::Dataset;
    use albef::data::retrieval::RetrievalTrain;
    use rand::SeedableRng;
    let dir = std::env::temp_dir().join(format!("albef-check-jpeg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for i in 0..3 {
        noisy_jpeg(&dir.join(format!("images/{i}.jpg")), i);
    }
    let d = dir.display();
    std::fs::write(
        dir.join("train.json"),
        r#"[{"image": "images/0.jpg", "caption": "a", "image_id": 0}, {"image": "images/1.jpg", "caption": "b", "image_id": 1}]"#,
    )
    .unwrap();
    std::fs::write(dir.join("test.json"), r#"[{"image": "images/2.jpg", "caption": ["c"]}]"#).unwrap();
    let cfg = dir.join("r.yaml");
    std::fs::write(
        &cfg,
        format!("train_file: ['{d}/train.json']\nval_file: '{d}/test.json'\ntest_file: '{d}/test.json'\nimage_root: '{d}'\nk_test: 4\nimage_res: 16\n"),
    )
    .unwrap();
    let r = check_config(&cfg, Task::Retrieval).unwrap();
    assert!(r.ok() && r.images == 3, "{r:?}");

    cut_inside_scan(&dir.join("images/1.jpg"));
    let r = check_config(&cfg, Task::Retrieval).unwrap();
    assert!(!r.ok() && r.missing.is_empty(), "{r:?}");
    assert_eq!(r.broken.len(), 1, "{r:?}");
    assert!(r.broken[0].contains("1.jpg") && r.broken[0].contains("truncated"), "{:?}", r.broken);

    let train = RetrievalTrain::new(&[dir.join("train.json")], &dir, 16, 30).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    assert!(train.get(0, &mut rng).is_ok());
    let e = format!("{:#}", train.get(1, &mut rng).err().expect("a cut JPEG must not load"));
    assert!(e.contains("1.jpg") && e.contains("truncated"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Files laid out as the official releases unpack (Flickr30K's `flickr30k-images/`, SNLI-VE's
/// `Flikr30kID` JSON lines, NLVR2's `images/train/<n>/`, `dev/`, `test1/`), prepared with the
/// command: `data check --root` passes, then fails naming a JPEG cut mid-scan.
#[test]
fn official_layouts_prepare_and_check_then_a_cut_jpeg_fails() {
    let root = std::env::temp_dir().join(format!("albef-check-official-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let src = root.join("downloads");
    std::fs::create_dir_all(&src).unwrap();
    let albef = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_albef")).args(args).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let p = |path: &std::path::Path| path.display().to_string();

    // Flickr30K: flickr30k-images/<id>.jpg and Karpathy's split file.
    let ids = ["1000092795", "2677109430", "3416050480"];
    for (i, id) in ids.iter().enumerate() {
        noisy_jpeg(&root.join(format!("flickr30k/flickr30k-images/{id}.jpg")), i as u32);
    }
    let karpathy = serde_json::json!({"images": ids.iter().zip(["train", "val", "test"]).enumerate().map(|(i, (id, split))|
        serde_json::json!({"filename": format!("{id}.jpg"), "split": split, "imgid": i, "sentences": [{"raw": "a photo"}]})
    ).collect::<Vec<_>>()});
    std::fs::write(src.join("dataset_flickr30k.json"), karpathy.to_string()).unwrap();
    let (ok, text) = albef(&[
        "data",
        "prepare",
        "flickr30k",
        "--karpathy",
        &p(&src.join("dataset_flickr30k.json")),
        "--out",
        &p(&root.join("flickr30k")),
    ]);
    assert!(ok, "{text}");

    // SNLI-VE as released: Flikr30kID with the file name.
    for (split, id) in ["train", "dev", "test"].iter().zip(ids) {
        std::fs::write(
            src.join(format!("snli_ve_{split}.jsonl")),
            format!(
                r#"{{"Flikr30kID": "{id}.jpg", "gold_label": "neutral", "sentence1": "p", "sentence2": "A man.", "pairID": "{id}.jpg#0r1n"}}"#
            ),
        )
        .unwrap();
    }
    let jsonl = |s: &str| p(&src.join(format!("snli_ve_{s}.jsonl")));
    let (ok, text) = albef(&[
        "data",
        "prepare",
        "snli-ve",
        "--train",
        &jsonl("train"),
        "--dev",
        &jsonl("dev"),
        "--test",
        &jsonl("test"),
        "--out",
        &p(&root.join("snli_ve")),
    ]);
    assert!(ok, "{text}");

    // NLVR2: the archives unpacked in the dataset folder.
    let nlvr = root.join("nlvr2");
    let png = |rel: &str| {
        let f = nlvr.join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(8, 6, image::Rgb([9, 99, 199])).save(f).unwrap();
    };
    for rel in [
        "images/train/7/train-10171-0-img0.png",
        "images/train/7/train-10171-0-img1.png",
        "dev/dev-850-0-img0.png",
        "dev/dev-850-0-img1.png",
        "test1/test1-3-1-img0.png",
        "test1/test1-3-1-img1.png",
    ] {
        png(rel);
    }
    std::fs::write(
        src.join("train.json"),
        concat!(
            r#"{"identifier": "train-10171-0-0", "directory": 7, "sentence": "Two dogs.", "label": "True"}"#,
            "\n",
            r#"{"identifier": "train-10171-0-1", "directory": 7, "sentence": "No dogs.", "label": "False"}"#
        ),
    )
    .unwrap();
    std::fs::write(src.join("dev.json"), r#"{"identifier": "dev-850-0-2", "sentence": "A bird.", "label": "True"}"#)
        .unwrap();
    std::fs::write(src.join("test1.json"), r#"{"identifier": "test1-3-1-0", "sentence": "A cat.", "label": "False"}"#)
        .unwrap();
    let (ok, text) = albef(&[
        "data",
        "prepare",
        "nlvr2",
        "--train",
        &p(&src.join("train.json")),
        "--dev",
        &p(&src.join("dev.json")),
        "--test",
        &p(&src.join("test1.json")),
        "--out",
        &p(&nlvr),
    ]);
    assert!(ok, "{text}");

    let configs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
    let check = || albef(&["data", "check", "--root", &p(&root), "--configs", &p(&configs)]);
    let (ok, text) = check();
    assert!(ok, "{text}");
    for name in ["== flickr30k", "== snli_ve", "== nlvr2"] {
        assert!(text.contains(name), "{text}");
    }
    // NLVR2 files: entries and images both printed (two sentences share one pair here).
    assert!(text.contains("2 entries, 2 images") && text.contains("1 entries, 2 images"), "{text}");

    cut_inside_scan(&root.join("flickr30k/flickr30k-images/2677109430.jpg"));
    let (ok, text) = check();
    assert!(!ok, "{text}");
    assert!(text.contains("unreadable") && text.contains("2677109430.jpg") && text.contains("truncated"), "{text}");
    assert!(text.contains("incomplete: flickr30k, snli_ve"), "{text}");
    let _ = std::fs::remove_dir_all(&root);
}
