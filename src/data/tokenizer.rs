//! ALBEF's tokenizer: HF's slow `BertTokenizer` (uncased WordPiece) with one change — a single
//! sentence is `[CLS] tokens`, with no trailing `[SEP]` (issue #75). Special-token strings in the
//! text (`"yes[SEP]"`) are kept whole, which is how VQA answers get their end token.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

pub const PAD: u32 = 0;
pub const UNK: u32 = 100;
pub const CLS: u32 = 101;
pub const SEP: u32 = 102;
pub const MASK: u32 = 103;

const SPECIAL: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
const MAX_CHARS_PER_WORD: usize = 100;

/// How a batch is padded, as the reference's `tokenizer(…)` calls (§6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Padding {
    /// `padding='longest'`, optionally with `truncation=True, max_length=m`.
    Longest { truncate_to: Option<usize> },
    /// `padding='max_length', truncation=True, max_length=m`.
    MaxLength(usize),
}

/// A padded batch: ids and 0/1 attention mask, both (B, L) i64.
#[derive(Clone, Debug)]
pub struct TokenBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub attention_mask: Vec<Vec<u32>>,
}

impl TokenBatch {
    pub fn to_tensors(&self, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let b = self.input_ids.len();
        let l = self.input_ids.first().map_or(0, |r| r.len());
        let flat = |rows: &Vec<Vec<u32>>| rows.iter().flatten().map(|&x| x as i64).collect::<Vec<i64>>();
        Ok((
            Tensor::from_vec(flat(&self.input_ids), (b, l), device)?,
            Tensor::from_vec(flat(&self.attention_mask), (b, l), device)?,
        ))
    }
}

#[derive(Clone, Debug)]
pub struct Tokenizer {
    vocab: HashMap<String, u32>,
    inverse: Vec<String>,
    lowercase: bool,
}

fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || c.general_category() == GeneralCategory::SpaceSeparator
}

fn is_control(c: char) -> bool {
    if matches!(c, '\t' | '\n' | '\r') {
        return false;
    }
    c.general_category_group() == GeneralCategoryGroup::Other
}

fn is_punctuation(c: char) -> bool {
    let cp = c as u32;
    (33..=47).contains(&cp)
        || (58..=64).contains(&cp)
        || (91..=96).contains(&cp)
        || (123..=126).contains(&cp)
        || c.general_category_group() == GeneralCategoryGroup::Punctuation
}

fn is_cjk(c: char) -> bool {
    let cp = c as u32;
    (0x4E00..=0x9FFF).contains(&cp)
        || (0x3400..=0x4DBF).contains(&cp)
        || (0x20000..=0x2A6DF).contains(&cp)
        || (0x2A700..=0x2B73F).contains(&cp)
        || (0x2B740..=0x2B81F).contains(&cp)
        || (0x2B820..=0x2CEAF).contains(&cp)
        || (0xF900..=0xFAFF).contains(&cp)
        || (0x2F800..=0x2FA1F).contains(&cp)
}

impl Tokenizer {
    /// Reads a local `bert-base-uncased` folder (`vocab.txt`, else `tokenizer.json`), or a vocab
    /// file given directly. Never touches the network.
    pub fn from_path(path: &Path) -> Result<Self> {
        let (file, lowercase) = if path.is_dir() {
            let lowercase = read_lowercase_flag(&path.join("tokenizer_config.json"))?;
            if path.join("vocab.txt").is_file() {
                (path.join("vocab.txt"), lowercase)
            } else if path.join("tokenizer.json").is_file() {
                (path.join("tokenizer.json"), lowercase)
            } else {
                bail!(
                    "{} has neither vocab.txt nor tokenizer.json (expected a local bert-base-uncased folder)",
                    path.display()
                )
            }
        } else if path.is_file() {
            (path.to_path_buf(), true)
        } else {
            bail!(
                "text encoder folder {} does not exist (give --text_encoder the local bert-base-uncased folder)",
                path.display()
            )
        };
        let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
        let tokens: Vec<String> = if file.extension().is_some_and(|e| e == "json") {
            vocab_from_tokenizer_json(&text)
                .with_context(|| format!("{} is not a WordPiece tokenizer.json", file.display()))?
        } else {
            text.lines().map(|l| l.trim_end_matches('\r').to_string()).collect()
        };
        let tok = Self::from_tokens(tokens, lowercase);
        for s in SPECIAL {
            if !tok.vocab.contains_key(s) {
                bail!("vocabulary {} lacks the special token {s}", file.display());
            }
        }
        Ok(tok)
    }

    /// A tokenizer over the given vocabulary (line i = id i).
    pub fn from_tokens(tokens: Vec<String>, lowercase: bool) -> Self {
        let vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        Self { vocab, inverse: tokens, lowercase }
    }

    pub fn vocab_size(&self) -> usize {
        self.inverse.len()
    }

    pub fn id(&self, token: &str) -> Option<u32> {
        self.vocab.get(token).copied()
    }

    pub fn token(&self, id: u32) -> Option<&str> {
        self.inverse.get(id as usize).map(|s| s.as_str())
    }

    /// Word pieces of `text` (no [CLS]).
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for (chunk, special) in split_special(text) {
            if special {
                out.push(chunk.to_string());
                continue;
            }
            for word in self.basic_tokens(chunk) {
                self.wordpiece(&word, &mut out);
            }
        }
        out
    }

    /// `[CLS]` + ids of `text`, truncated to `max_len` ids in all when given.
    pub fn encode(&self, text: &str, max_len: Option<usize>) -> Vec<u32> {
        let mut ids = vec![CLS];
        ids.extend(self.tokenize(text).iter().map(|t| self.vocab.get(t).copied().unwrap_or(UNK)));
        if let Some(m) = max_len {
            ids.truncate(m.max(1));
        }
        ids
    }

    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S], padding: Padding) -> TokenBatch {
        let (truncate, pad_to) = match padding {
            Padding::Longest { truncate_to } => (truncate_to, None),
            Padding::MaxLength(m) => (Some(m), Some(m)),
        };
        let rows: Vec<Vec<u32>> = texts.iter().map(|t| self.encode(t.as_ref(), truncate)).collect();
        let len = pad_to.unwrap_or_else(|| rows.iter().map(|r| r.len()).max().unwrap_or(1));
        let mut input_ids = Vec::with_capacity(rows.len());
        let mut attention_mask = Vec::with_capacity(rows.len());
        for r in rows {
            let mut mask = vec![1u32; r.len()];
            let mut ids = r;
            mask.resize(len, 0);
            ids.resize(len, PAD);
            input_ids.push(ids);
            attention_mask.push(mask);
        }
        TokenBatch { input_ids, attention_mask }
    }

    /// HF `BasicTokenizer`: clean, split CJK, lower-case and strip accents, split punctuation.
    fn basic_tokens(&self, text: &str) -> Vec<String> {
        let mut cleaned = String::with_capacity(text.len());
        for c in text.chars() {
            if c == '\0' || c == '\u{fffd}' || is_control(c) {
                continue;
            }
            if is_cjk(c) {
                cleaned.push(' ');
                cleaned.push(c);
                cleaned.push(' ');
            } else if is_whitespace(c) {
                cleaned.push(' ');
            } else {
                cleaned.push(c);
            }
        }
        let cleaned: String = cleaned.nfc().collect();
        let mut out = Vec::new();
        for word in cleaned.split(is_whitespace).filter(|w| !w.is_empty()) {
            let word = if self.lowercase {
                word.to_lowercase().nfd().filter(|c| c.general_category() != GeneralCategory::NonspacingMark).collect()
            } else {
                word.to_string()
            };
            let mut current = String::new();
            for c in word.chars() {
                if is_punctuation(c) {
                    if !current.is_empty() {
                        out.push(std::mem::take(&mut current));
                    }
                    out.push(c.to_string());
                } else {
                    current.push(c);
                }
            }
            if !current.is_empty() {
                out.push(current);
            }
        }
        out
    }

    /// Greedy longest-match-first WordPiece with `##` continuations.
    fn wordpiece(&self, word: &str, out: &mut Vec<String>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > MAX_CHARS_PER_WORD {
            out.push("[UNK]".into());
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = None;
            while start < end {
                let mut sub: String = chars[start..end].iter().collect();
                if start > 0 {
                    sub = format!("##{sub}");
                }
                if self.vocab.contains_key(&sub) {
                    found = Some(sub);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(p) => {
                    pieces.push(p);
                    start = end;
                }
                None => {
                    out.push("[UNK]".into());
                    return;
                }
            }
        }
        out.extend(pieces);
    }
}

/// Splits `text` around special-token strings: (piece, is_special).
fn split_special(text: &str) -> Vec<(&str, bool)> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let next = SPECIAL
            .iter()
            .filter_map(|s| rest.find(s).map(|i| (i, *s)))
            .min_by_key(|&(i, s)| (i, std::cmp::Reverse(s.len())));
        match next {
            Some((i, s)) => {
                if i > 0 {
                    out.push((&rest[..i], false));
                }
                out.push((&rest[i..i + s.len()], true));
                rest = &rest[i + s.len()..];
            }
            None => {
                out.push((rest, false));
                break;
            }
        }
    }
    out
}

fn read_lowercase_flag(path: &Path) -> Result<bool> {
    if !path.is_file() {
        return Ok(true);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    Ok(v.get("do_lower_case").and_then(|x| x.as_bool()).unwrap_or(true))
}

fn vocab_from_tokenizer_json(text: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(text)?;
    let vocab =
        v.pointer("/model/vocab").and_then(|x| x.as_object()).ok_or_else(|| anyhow!("no model.vocab object"))?;
    let mut tokens = vec![String::new(); vocab.len()];
    for (tok, id) in vocab {
        let id = id.as_u64().ok_or_else(|| anyhow!("vocab id of {tok:?} is not an integer"))? as usize;
        let slot = tokens.get_mut(id).ok_or_else(|| anyhow!("vocab id {id} of {tok:?} is out of range"))?;
        *slot = tok.clone();
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab() -> Vec<String> {
        [
            "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "runn", "##ing", ",", "cafe",
            "hello", "汉",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    #[test]
    fn wordpiece_punctuation_accents_and_specials() {
        let t = Tokenizer::from_tokens(vocab(), true);
        assert_eq!(t.tokenize("UNaffable, running"), ["un", "##aff", "##able", ",", "runn", "##ing"]);
        assert_eq!(t.tokenize("Café xyz"), ["cafe", "[UNK]"]);
        assert_eq!(t.tokenize("hello[SEP]汉字"), ["hello", "[SEP]", "汉", "[UNK]"]);
        // No trailing [SEP]; ids of this toy vocab put [CLS] at 2.
        assert_eq!(t.encode("hello", None).len(), 2);
    }

    #[test]
    fn reads_tokenizer_json_folder() {
        let dir = std::env::temp_dir().join(format!("albef-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut vocab = serde_json::Map::new();
        let mut tokens: Vec<String> = (0..104).map(|i| format!("[unused{i}]")).collect();
        tokens[0] = "[PAD]".into();
        tokens[100] = "[UNK]".into();
        tokens[101] = "[CLS]".into();
        tokens[102] = "[SEP]".into();
        tokens[103] = "[MASK]".into();
        tokens.push("dog".into());
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), serde_json::json!(i));
        }
        let json = serde_json::json!({"model": {"type": "WordPiece", "vocab": vocab}});
        std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
        let t = Tokenizer::from_path(&dir).unwrap();
        assert_eq!(t.encode("Dog", None), vec![CLS, 104]);
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let e = Tokenizer::from_path(&dir).unwrap_err().to_string();
        assert!(e.contains("neither vocab.txt nor tokenizer.json"), "{e}");
    }
}
