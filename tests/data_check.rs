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
