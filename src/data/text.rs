//! Caption and question normalisation (`pre_caption`, `pre_question` in `dataset/utils.py`).

/// Characters the reference deletes: `, . ' ! ? " ( ) * # : ; ~`.
fn is_deleted(c: char) -> bool {
    matches!(c, ',' | '.' | '\'' | '!' | '?' | '"' | '(' | ')' | '*' | '#' | ':' | ';' | '~')
}

/// Python's `str.isspace` (what `\s` matches in a `re` str pattern).
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

fn clean(text: &str) -> String {
    text.to_lowercase()
        .chars()
        .filter(|&c| !is_deleted(c))
        .map(|c| if c == '-' || c == '/' { ' ' } else { c })
        .collect()
}

fn first_words(text: &str, max_words: usize) -> String {
    let words: Vec<&str> = text.split(' ').collect();
    if words.len() > max_words {
        words[..max_words].join(" ")
    } else {
        text.to_string()
    }
}

/// Lower-case, delete punctuation, `-`/`/` → space, `<person>` → `person`, collapse runs of two
/// or more whitespace characters to one space, strip, keep the first `max_words` words.
pub fn pre_caption(caption: &str, max_words: usize) -> String {
    let text = clean(caption).replace("<person>", "person");
    let mut out = String::with_capacity(text.len());
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if is_py_space(chars[i]) {
            let start = i;
            while i < chars.len() && is_py_space(chars[i]) {
                i += 1;
            }
            // `re.sub(r"\s{2,}", ' ', …)`: a single whitespace character stays as it is.
            if i - start >= 2 {
                out.push(' ');
            } else {
                out.push(chars[start]);
            }
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    let out = out.trim_end_matches('\n').trim_matches(' ');
    first_words(out, max_words)
}

/// As [`pre_caption`] but without `<person>`, without collapsing whitespace, and stripping
/// trailing spaces only.
pub fn pre_question(question: &str, max_words: usize) -> String {
    let text = clean(question);
    first_words(text.trim_end_matches(' '), max_words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_rules() {
        assert_eq!(pre_caption("A man, riding-a horse!", 30), "a man riding a horse");
        assert_eq!(pre_caption("  <person>  walks/runs  ", 30), "person walks runs");
        assert_eq!(pre_caption("one two three", 2), "one two");
        assert_eq!(pre_question("  What is it? ", 30), "  what is it");
    }
}
