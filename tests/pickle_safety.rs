//! Pickle is data, never code: `.pth` pickles naming anything but what a state dict needs are
//! refused with the name, before candle parses them; hostile sizes are refused before allocating.

use albef::checkpoint::CheckpointFile;
use std::io::Write;
use std::path::PathBuf;

fn write_pth(name: &str, pickle: &[u8], storages: &[(&str, usize)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-pickle-safety-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.pth"));
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", opts).unwrap();
    zip.write_all(pickle).unwrap();
    for (key, len) in storages {
        zip.start_file(format!("archive/data/{key}"), opts).unwrap();
        zip.write_all(&vec![0u8; *len]).unwrap();
    }
    zip.finish().unwrap();
    path
}

fn unicode(out: &mut Vec<u8>, s: &str) {
    out.push(b'X');
    out.extend((s.len() as u32).to_le_bytes());
    out.extend(s.as_bytes());
}

/// `'<name>': torch._utils._rebuild_tensor_v2(storage '0' (f32), 0, shape, stride, False, OrderedDict())`.
fn tensor(out: &mut Vec<u8>, name: &str, shape: &[u32]) {
    tensor_in(out, name, "FloatStorage", "0", shape)
}

/// The same with another storage type and key.
fn tensor_in(out: &mut Vec<u8>, name: &str, storage: &str, key: &str, shape: &[u32]) {
    unicode(out, name);
    out.extend(b"ctorch._utils\n_rebuild_tensor_v2\nq\x01((");
    unicode(out, "storage");
    out.extend(format!("ctorch\n{storage}\n").as_bytes());
    unicode(out, key);
    unicode(out, "cpu");
    out.extend(b"K\x04tQK\x00(");
    for d in shape {
        out.push(b'J');
        out.extend(d.to_le_bytes());
    }
    out.extend(b"t(");
    for _ in shape {
        out.extend(b"K\x01");
    }
    out.extend(b"t\x89ccollections\nOrderedDict\n)RtR");
}

/// `{'model': {'w': <2×2 f32>, <extra key>: <payload>}}` with `payload` inserted as the value.
fn state_dict_with(payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x80, 2, b'}'];
    unicode(&mut p, "model");
    p.extend(b"}(");
    tensor(&mut p, "w", &[2, 2]);
    unicode(&mut p, "extra");
    p.extend(payload);
    p.extend(b"us.");
    p
}

fn open_err(name: &str, pickle: &[u8], storages: &[(&str, usize)]) -> String {
    let path = write_pth(name, pickle, storages);
    let err = CheckpointFile::open(&path).err().unwrap_or_else(|| panic!("{name}: a hostile pickle was accepted"));
    format!("{err:#}")
}

#[test]
fn a_clean_state_dict_still_opens() {
    let path = write_pth("clean", &state_dict_with(b"K\x07"), &[("0", 16)]);
    let f = CheckpointFile::open(&path).unwrap();
    assert_eq!(f.tensors()["w"].shape, vec![2, 2]);
}

/// candle skips tensors of these storage types (with an unlocated line on stderr); albef names them.
#[test]
fn tensors_candle_cannot_read_are_named_not_skipped() {
    for storage in ["IntStorage", "ShortStorage", "CharStorage", "BoolStorage"] {
        let mut p = vec![0x80, 2, b'}'];
        unicode(&mut p, "model");
        p.extend(b"}(");
        tensor(&mut p, "w", &[2, 2]);
        tensor_in(&mut p, "mask", storage, "1", &[2]);
        p.extend(b"us.");
        let err = open_err(storage, &p, &[("0", 16), ("1", 16)]);
        assert!(err.contains(&format!("model.mask ({storage})")), "{err}");
        assert!(err.contains("cannot read 1 tensor"), "{err}");
    }
}

#[test]
fn code_execution_globals_are_refused_by_name() {
    for (module, name) in [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("subprocess", "Popen")] {
        let mut payload = format!("c{module}\n{name}\n").into_bytes();
        payload.extend(b"(");
        unicode(&mut payload, "touch /tmp/albef-pwned");
        payload.extend(b"tR");
        let err = open_err(&format!("{module}-{name}"), &state_dict_with(&payload), &[("0", 16)]);
        assert!(err.contains(&format!("`{module}.{name}`")), "{err}");
        assert!(err.contains(".pth"), "error names the file: {err}");
    }
    assert!(!std::path::Path::new("/tmp/albef-pwned").exists());
}

#[test]
fn nested_and_memo_reused_payloads_are_refused() {
    // Deep inside a list inside a dict, the callable memoised and called twice through the memo.
    let mut payload = b"}(".to_vec();
    unicode(&mut payload, "config");
    payload.extend(b"](cbuiltins\nexec\nq\x09");
    unicode(&mut payload, "print(1)");
    payload.extend(b"\x85Rh\x09");
    unicode(&mut payload, "print(2)");
    payload.extend(b"\x85Reu");
    let err = open_err("nested", &state_dict_with(&payload), &[("0", 16)]);
    assert!(err.contains("`builtins.exec`"), "{err}");

    // The payload as the top-level object, before any state dict.
    let mut top = b"\x80\x02cnt\nsystem\n(".to_vec();
    unicode(&mut top, "calc.exe");
    top.extend(b"tR.");
    assert!(open_err("toplevel", &top, &[]).contains("`nt.system`"));

    // BUILD on an allowed class cannot smuggle a callable in either: the global is checked first.
    let mut build = b"\x80\x02ccollections\nOrderedDict\n)R}(".to_vec();
    unicode(&mut build, "__setstate__");
    build.extend(b"ccopyreg\n_reconstructor\nub.");
    assert!(open_err("build", &build, &[]).contains("`copyreg._reconstructor`"));
}

#[test]
fn protocol_4_stack_global_is_named_and_refused() {
    let mut p = b"\x80\x04\x95\x20\x00\x00\x00\x00\x00\x00\x00".to_vec();
    p.extend(b"\x8c\x05posix\x94\x8c\x06system\x94\x93\x94");
    p.extend(b"\x8c\x02id\x94\x85R.");
    assert!(open_err("stack-global", &p, &[]).contains("`posix.system`"));
    p = b"\x80\x02iposix\nsystem\n.".to_vec();
    assert!(open_err("inst", &p, &[]).contains("`posix.system`"));
}

#[test]
fn memo_bomb_and_deep_nesting_are_refused_before_candle_builds_them() {
    // Each round doubles the object: 40 rounds would be 2^40 nodes from ~300 bytes.
    let mut p = b"\x80\x02K\x01q\x00".to_vec();
    for _ in 0..40 {
        p.extend(b"h\x00h\x00\x86q\x00");
    }
    p.push(b'.');
    assert!(open_err("memo-bomb", &p, &[]).contains("expand"));

    let n = 100_000;
    let mut p = vec![0x80, 2];
    p.extend(std::iter::repeat_n(b']', n));
    p.extend(std::iter::repeat_n(b'a', n - 1));
    p.push(b'.');
    assert!(open_err("deep", &p, &[]).contains("nests deeper"));
}

#[test]
fn lengths_and_shapes_beyond_the_file_are_refused_before_allocating() {
    // A string claiming 4 GiB in a 20-byte pickle.
    let p = b"\x80\x02X\xff\xff\xff\xff.".to_vec();
    assert!(open_err("long-string", &p, &[]).contains("truncated"));

    // A 10^12-element tensor over a 16-byte storage.
    let mut p = vec![0x80, 2, b'}'];
    unicode(&mut p, "model");
    p.extend(b"}(");
    tensor(&mut p, "huge", &[1_000_000, 1_000_000]);
    p.extend(b"us.");
    let err = open_err("huge-tensor", &p, &[("0", 16)]);
    assert!(err.contains("tensor huge claims shape [1000000, 1000000]") && err.contains("holds 16 bytes"), "{err}");
}
