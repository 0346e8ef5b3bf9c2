//! `vocab.txt` / `tokenizer.json` (+ `tokenizer_config.json`) as `Tokenizer::from_path` reads a
//! text-encoder folder, then caption/question normalisation and WordPiece on text from the input.
//! The first byte picks the file; the input is also the text.
#![no_main]
use albef::data::text::{pre_caption, pre_question};
use albef::data::{Padding, Tokenizer};
use libfuzzer_sys::fuzz_target;

/// Enough of a vocab to tokenise with (ids 0–103 are where BERT's special tokens sit).
fn small_vocab() -> Vec<String> {
    let mut v: Vec<String> = (0..104).map(|i| format!("[unused{i}]")).collect();
    for (id, s) in [(0, "[PAD]"), (100, "[UNK]"), (101, "[CLS]"), (102, "[SEP]"), (103, "[MASK]")] {
        v[id] = s.to_string();
    }
    v.extend(["the", "dog", "a", "##s", "cat", "on", "##ing", "run", ".", ",", "?", "[", "]"].map(String::from));
    v
}

fuzz_target!(|data: &[u8]| {
    let Some((which, file)) = albef_fuzz::pick(data, 4) else { return };
    let dir = albef_fuzz::out_dir("text_encoder");
    let tok = match which {
        0 => {
            std::fs::write(dir.join("vocab.txt"), file).unwrap();
            Tokenizer::from_path(&dir)
        }
        1 => {
            std::fs::write(dir.join("tokenizer.json"), file).unwrap();
            Tokenizer::from_path(&dir)
        }
        2 => {
            std::fs::write(dir.join("vocab.txt"), small_vocab().join("\n")).unwrap();
            std::fs::write(dir.join("tokenizer_config.json"), file).unwrap();
            Tokenizer::from_path(&dir)
        }
        _ => Ok(Tokenizer::from_tokens(small_vocab(), true)),
    };
    let Ok(tok) = tok else { return };
    let text = String::from_utf8_lossy(file);
    let caption = pre_caption(&text, 30);
    let question = pre_question(&text, 30);
    let _ = tok.encode(&text, Some(64));
    let _ = tok.encode_batch(&[caption, question], Padding::Longest { truncate_to: Some(40) });
    let _ = tok.encode_batch(&[text.as_ref()], Padding::MaxLength(8));
});
