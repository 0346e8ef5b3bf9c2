//! JPEG / PNG through the image loader (format sniffing, the pixel limit, the truncated-JPEG
//! check, decoding to RGB), then the evaluation transform (Pillow's bicubic resize).
#![no_main]
use albef::data::transform::{eval_transform_host, RgbImage};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    albef_fuzz::scratch(); // sets the pixel limit
    if let Ok(img) = RgbImage::decode(data, "input") {
        let _ = eval_transform_host(&img, 32);
    }
});
