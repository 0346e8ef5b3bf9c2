//! Disk full while writing a checkpoint, an output or a log line: a clear error, and the previous
//! files intact. The "disk" fills at a file-size limit (RLIMIT_FSIZE, which makes writes past it
//! fail as ENOSPC would, without root); one test only, as the limit is process-wide.

use albef::nn::{Init, ParamStore};
use albef::task::Task;
use albef::train::run::{RunDir, TrainState, LAST};
use albef::util::write_atomic;
use candle_core::Device;

fn limit_file_size(bytes: u64) {
    // SAFETY: plain libc calls; ignoring SIGXFSZ turns the signal into an EFBIG write error.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let lim = libc::rlimit { rlim_cur: bytes, rlim_max: libc::RLIM_INFINITY };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

fn leftovers(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

#[test]
fn a_full_disk_gives_an_error_and_leaves_previous_files_intact() {
    let dir = std::env::temp_dir().join(format!("albef-disk-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let run = RunDir::create(&dir).unwrap();
    let store = ParamStore::new(&Device::Cpu, 0);
    store.root(true).get((64, 64), "w", Init::Const(0.25)).unwrap();
    let state = TrainState { epochs_done: 1, ..Default::default() };
    run.save_checkpoint(LAST, Task::Retrieval, &store, None, &state).unwrap();
    run.write_text("config.yaml", "old config\n").unwrap();
    run.log(&serde_json::json!({"epoch": 0})).unwrap();
    let before = leftovers(&dir);
    let ckpt_before = std::fs::read(dir.join(LAST)).unwrap();

    limit_file_size(4096);
    let big = store.root(true).get((128, 128), "v", Init::Const(0.5)).unwrap();
    assert_eq!(big.dims(), [128, 128]);
    let err = format!("{:#}", run.save_checkpoint(LAST, Task::Retrieval, &store, None, &state).unwrap_err());
    assert!(err.contains("checkpoint_last.safetensors") && err.contains("disk full"), "{err}");
    let err = format!("{:#}", write_atomic(&dir.join("config.yaml"), &[b'x'; 10_000]).unwrap_err());
    assert!(err.contains("config.yaml") && err.contains("previous file is unchanged"), "{err}");
    let long = "x".repeat(8000);
    let err = format!("{:#}", run.log(&serde_json::json!({"epoch": 1, "note": long})).unwrap_err());
    assert!(err.contains("log.txt"), "{err}");
    limit_file_size(libc::RLIM_INFINITY);

    assert_eq!(std::fs::read(dir.join(LAST)).unwrap(), ckpt_before, "checkpoint changed");
    assert_eq!(std::fs::read_to_string(dir.join("config.yaml")).unwrap(), "old config\n");
    assert_eq!(std::fs::read_to_string(dir.join("log.txt")).unwrap(), "{\"epoch\":0}\n", "torn log line");
    assert_eq!(leftovers(&dir), before, "temporary files left behind");
}
