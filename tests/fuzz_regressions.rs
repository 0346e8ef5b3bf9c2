//! Every input the fuzzers (`tools/fuzz.sh`, `fuzz/`) made crash, hang or over-allocate, replayed
//! through the same library calls as its fuzz target: each must now end in a clear error.
//! Inputs: `tests/fixtures/fuzz-regressions/<target>/`.

use albef::checkpoint::CheckpointFile;
use albef::data::grounding::Refer;
use albef::data::pretrain::shard_sample;
use albef::data::refcoco::{from_parquet, from_refer};
use albef::data::shards::read_shard;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

fn input(target: &str, name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-regressions").join(target).join(name)
}

/// A copy of the input in a fresh folder, named as the fuzz target names it.
fn staged(target: &str, name: &str, as_name: &str) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("albef-fuzz-regression-{}-{target}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(as_name);
    std::fs::copy(input(target, name), &path).unwrap();
    (dir, path)
}

/// The `parquet` target: `data prepare refcoco --parquet` on the input. Returns the error, which
/// must come (no output written) instead of a panic or a hang.
fn refused_parquet(name: &str) -> String {
    let (dir, file) = staged("parquet", name, "input.parquet");
    let out = dir.join("out");
    let err = format!("{:#}", from_parquet(std::slice::from_ref(&file), "refcoco", &out, true).expect_err("refused"));
    assert!(!out.exists(), "nothing is written for a refused file");
    std::fs::remove_dir_all(dir).unwrap();
    err
}

/// The `shards` target: every sample read and decoded. Returns the damage report.
fn replay_shard(path: &Path) -> anyhow::Result<Option<String>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut errors = Vec::new();
    let damage = read_shard(path, 0, |sample| {
        if let Err(e) = shard_sample(&sample, 32, true, &mut rng) {
            errors.push(e.to_string());
        }
        true
    })?;
    Ok(damage)
}

/// Not found by the fuzzer (tar checksums hide it) but by the review its allocation limit asked
/// for: a 1 KiB shard whose member header claims 2^62 bytes made `read_shard` reserve them up
/// front (an allocation failure aborts the process). Now it reads the bytes there are and reports
/// the shard as damaged after that member (whose sample is dropped).
#[test]
fn shard_member_claiming_2e62_bytes_is_damage_not_an_abort() {
    let (dir, path) = staged("shards", "member_claims_2e62_bytes.tar", "shard-000000.tar");
    let damage = replay_shard(&path).unwrap();
    let why = damage.expect("the shard must be reported as damaged");
    assert!(why.contains("after member 000000000.jpg"), "{why}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The `pth` target: open (allow-list scan, candle's pickle reader, extent checks), every tensor.
fn replay_checkpoint(path: &Path) -> anyhow::Result<()> {
    let file = CheckpointFile::open(path)?;
    let _ = albef::checkpoint::classify_file(&file);
    file.load_all(&candle_core::Device::Cpu)?;
    Ok(())
}

/// Found by review of candle's pickle reader while writing the `pth` target (the fuzzer had not
/// reached them in 379k inputs): candle takes the arguments of the tensor rebuild functions and
/// the storage id apart by position, `Vec::remove` on tuples it never measures, so a short one
/// panicked inside `CheckpointFile::open`. The allow-list scan now checks those arities first.
#[test]
fn short_tensor_records_are_refused_before_candle_indexes_them() {
    for (name, expected) in [
        ("rebuild_tensor_without_args.pth", "_rebuild_tensor_v2 gets 0 arguments"),
        ("short_persistent_id.pth", "a storage id of 2 items"),
        ("rebuild_from_type_with_short_inner_args.pth", "_rebuild_from_type_v2's tensor arguments are 0 items"),
        ("rebuild_parameter_without_args.pth", "_rebuild_parameter gets no arguments"),
    ] {
        let (dir, path) = staged("pth", name, "input.pth");
        let err = replay_checkpoint(&path).expect_err(name).to_string();
        assert!(err.contains("malformed tensor record") && err.contains(expected), "{name}: {err}");
        assert!(err.contains("input.pth"), "{name}: the error names the file: {err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

/// Found by review while writing the `refer_pickle` target: serde-pickle (and the conversion to
/// JSON) recurse once per nesting level, so 60 kB of `]`…`a` (30,000 nested lists) overflowed the
/// stack. REFER files are now pre-scanned like `.pth` pickles: no globals, nesting ≤ 256.
#[test]
fn deeply_nested_refer_pickle_is_refused_not_a_stack_overflow() {
    let (dir, refs) = staged("refer_pickle", "nested_30000_lists.p", "refs(unc).p");
    let instances = dir.join("instances.json");
    std::fs::write(&instances, r#"{"images": [], "annotations": []}"#).unwrap();
    let err = Refer::open(&refs, &instances).err().expect("refused").to_string();
    assert!(err.contains("refs(unc).p") && err.contains("nests deeper than 256"), "{err}");
    let out = dir.join("out");
    let err = from_refer(&refs, &instances, "refcoco", "unc", &out, true).expect_err("refused").to_string();
    assert!(err.contains("nests deeper than 256"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

/// The pre-scan lets real REFER files through: Python's protocol 0 (text, as Python 2 wrote the
/// released files) and protocol 2 pickles of refs (the `refer_pickle` fuzz seeds).
#[test]
fn python_refer_pickles_of_protocols_0_and_2_still_open() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/refer_pickle");
    let dir = std::env::temp_dir().join(format!("albef-fuzz-regression-{}-refer-ok", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let instances = dir.join("instances.json");
    std::fs::write(
        &instances,
        r#"{"images": [{"id": 7, "file_name": "a.jpg", "width": 64, "height": 48}],
            "annotations": [{"id": 3, "bbox": [1, 2, 3, 4]}]}"#,
    )
    .unwrap();
    for proto in [0, 2] {
        let refs = dir.join("refs(unc).p");
        std::fs::copy(seeds.join(format!("python_proto{proto}.p")), &refs).unwrap();
        let refer = Refer::open(&refs, &instances).unwrap_or_else(|e| panic!("protocol {proto}: {e:#}"));
        assert_eq!(refer.refs.len(), 2, "protocol {proto}");
        assert_eq!(refer.refs[&2].split, "testA");
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Found by the `parquet` target (a timeout: 12 s under the fuzzer's instrumentation). An unknown
/// footer field claims a list of 2³¹ booleans, which the parquet crate's thrift `skip` counts as
/// zero bytes each; albef's walk of the footer (`data::parquet_guard`) refuses it first (it
/// refuses every collection of booleans, and any count larger than the bytes left).
#[test]
fn slow_parquet_footer_is_refused_before_the_parquet_crate_parses_it() {
    let err = refused_parquet("slow_thrift_skip.parquet");
    assert!(err.contains("input.parquet is not a readable parquet file"), "{err}");
    assert!(err.contains("footer") && err.contains("a collection of booleans"), "{err}");
}

/// Found by the `parquet` target (a panic: "Decoder for dict should have been set", in the parquet
/// crate, for a data page in dictionary encoding with no dictionary page before it). The crate's
/// decoding runs under `util::contain_panics`: the file is refused, naming it and the row.
#[test]
fn parquet_page_without_its_dictionary_is_an_error_not_a_panic() {
    albef::util::install_panic_hook();
    let err = refused_parquet("dictionary_page_missing.parquet");
    assert!(err.contains("input.parquet: cannot decode rows after row 0"), "{err}");
    assert!(err.contains("damaged part of the file (Decoder for dict should have been set)"), "{err}");
}

/// Found by the `image` target (a panic: an index out of bounds in zune-jpeg's 1×1 IDCT, the
/// `image` crate's JPEG decoder, on a 701-byte baseline JPEG). Decoding runs under
/// `util::contain_panics`: the image is refused with its name.
#[test]
fn jpeg_that_panics_the_decoder_is_an_error_naming_the_image() {
    albef::util::install_panic_hook();
    let bytes = std::fs::read(input("image", "idct_out_of_bounds.jpg")).unwrap();
    let err = match albef::data::transform::RgbImage::decode(&bytes, "photo.jpg") {
        Ok(_) => panic!("a damaged JPEG was decoded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("cannot decode image photo.jpg"), "{err}");
    assert!(err.contains("damaged part of the file"), "{err}");
}

/// Found by the `image` target as a timeout, but not a slow input: it decodes (a 58,114 × 6 JPEG)
/// in 1 s under the fuzzer's instrumentation and 34 ms in release; the alarm went off while the
/// fuzzer (at nice 19) waited for the cores behind a test build. Kept: a very wide image decodes
/// and resizes.
#[test]
fn very_wide_jpeg_decodes_and_resizes() {
    let bytes = std::fs::read(input("image", "wide.jpg")).unwrap();
    let img = albef::data::transform::RgbImage::decode(&bytes, "photo.jpg").unwrap();
    assert_eq!((img.width, img.height), (58114, 6));
    assert_eq!(albef::data::transform::eval_transform_host(&img, 32).len(), 3 * 32 * 32);
}

/// Found by the `parquet` target (a timeout: 116 s under the fuzzer, 2 s in release, for a 3.9 kB
/// file). A page header held a short list of booleans, which the parquet crate's `skip` reads as
/// zero bytes, so that it read the bytes after it as a list of 2³¹ values; albef's walk of the
/// page headers now refuses collections of booleans first.
#[test]
fn parquet_page_header_with_a_list_of_booleans_is_refused_first() {
    let err = refused_parquet("slow_page_header.parquet");
    assert!(err.contains("input.parquet is not a readable parquet file"), "{err}");
    assert!(err.contains("page header") && err.contains("a collection of booleans"), "{err}");
}
