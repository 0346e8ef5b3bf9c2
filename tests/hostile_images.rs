//! Hostile images: decompression bombs are refused before decoding, with a limit the user can
//! raise; truncated and corrupt files give the file name.

use albef::data::transform::{max_image_pixels, set_max_image_pixels, RgbImage, DEFAULT_MAX_IMAGE_PIXELS};
use std::path::PathBuf;

fn crc32(bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xedb8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
    out.extend((data.len() as u32).to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    out.extend(&body);
    out.extend(crc32(&body).to_be_bytes());
}

/// A 57-byte PNG whose header claims `w × h` RGB pixels (no pixel data).
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut p = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend(h.to_be_bytes());
    ihdr.extend([8, 2, 0, 0, 0]);
    chunk(&mut p, b"IHDR", &ihdr);
    chunk(&mut p, b"IDAT", &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01]);
    chunk(&mut p, b"IEND", &[]);
    p
}

/// A real 8×8 JPEG with its frame header patched to claim `w × h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8 * 30, 7]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Jpeg).unwrap();
    let sof = bytes.windows(2).position(|m| m == [0xff, 0xc0]).expect("baseline SOF0");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("albef-hostile-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn rss_kb() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .map_or(0, |v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
}

// One test: the limit is process-wide.
#[test]
fn bombs_are_refused_before_decoding_and_the_limit_can_be_raised() {
    assert_eq!(max_image_pixels(), DEFAULT_MAX_IMAGE_PIXELS);
    let before = rss_kb();
    let png = write("bomb.png", &png_claiming(100_000, 100_000));
    assert!(std::fs::metadata(&png).unwrap().len() < 100);
    let err = format!("{:#}", RgbImage::open(&png).unwrap_err());
    assert!(err.contains("bomb.png") && err.contains("100000 × 100000") && err.contains("89478485"), "{err}");
    assert!(err.contains("--max-image-pixels"), "{err}");

    let jpg = write("bomb.jpg", &jpeg_claiming(60_000, 60_000));
    let err = format!("{:#}", RgbImage::open(&jpg).unwrap_err());
    assert!(err.contains("bomb.jpg") && err.contains("60000 × 60000"), "{err}");
    // Nothing near the claimed size (30 GB, 10.8 GB) was allocated.
    assert!(rss_kb() < before + 100_000, "peak RSS grew from {before} kB to {} kB", rss_kb());

    // Just over a lowered limit: refused; raised: the small image decodes.
    let small = write("small.jpg", &jpeg_claiming(8, 8));
    set_max_image_pixels(63);
    let err = format!("{:#}", RgbImage::open(&small).unwrap_err());
    assert!(err.contains("small.jpg") && err.contains("limit of 63"), "{err}");
    set_max_image_pixels(64);
    assert_eq!(RgbImage::open(&small).unwrap().width, 8);

    // Raised above a bomb's claim, the decoder still fails cleanly (no data), naming the file.
    set_max_image_pixels(20_000_000_000);
    let err = format!("{:#}", RgbImage::open(&png).unwrap_err());
    assert!(err.contains("bomb.png"), "{err}");
    assert!(rss_kb() < before + 1_000_000, "peak RSS grew from {before} kB to {} kB", rss_kb());
    set_max_image_pixels(DEFAULT_MAX_IMAGE_PIXELS);

    // Truncated and corrupt files name themselves.
    let good = jpeg_claiming(8, 8);
    for (name, bytes) in [
        ("cut.jpg", &good[..good.len() / 2]),
        ("garbage.png", &b"\x89PNG\r\n\x1a\nnot really a png"[..]),
        ("empty.jpg", &b""[..]),
    ] {
        let err = format!("{:#}", RgbImage::open(&write(name, bytes)).unwrap_err());
        assert!(err.contains(name), "{err}");
    }
}
