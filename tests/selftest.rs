//! `albef selftest --device cpu`: the command the GPU check runs passes on the CPU (fixture
//! parity in bf16, the fused ops, the training runs and the bench, from the binary alone).

#[test]
fn selftest_passes_on_the_cpu() {
    let dir = std::env::temp_dir().join(format!("albef-selftest-test-{}", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_albef"))
        .args(["selftest", "--device", "cpu", "--precision", "bf16", "--out"])
        .arg(&dir)
        // Run from elsewhere: the fixtures must come from the binary, not the checkout.
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "selftest failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for needed in [
        "retrieval bf16 recorded gradients",
        "pretrain bf16 loss_mlm",
        "layer norm BF16 backward",
        "training bf16",
        "demo run bf16",
        "retrieval training step",
    ] {
        assert!(stdout.contains(needed), "selftest output lacks {needed:?}:\n{stdout}");
    }
    assert!(stdout.contains(" 0 failed"), "{stdout}");
}
