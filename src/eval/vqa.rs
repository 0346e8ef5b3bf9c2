//! The standard VQA accuracy (the official `vqaEval.py`): answers normalised (punctuation, digit
//! words, articles, contractions); a prediction scores min(#annotators who gave it / 3, 1),
//! averaged over the ten leave-one-annotator-out subsets.

const PUNCT: [char; 19] =
    [';', ':', '/', '\'', '[', ']', '"', '(', ')', '=', '+', '\\', '_', '>', '<', '@', '`', ',', '?'];
const ARTICLES: [&str; 3] = ["a", "an", "the"];

fn number_word(w: &str) -> Option<&'static str> {
    Some(match w {
        "none" | "zero" => "0",
        "one" => "1",
        "two" => "2",
        "three" => "3",
        "four" => "4",
        "five" => "5",
        "six" => "6",
        "seven" => "7",
        "eight" => "8",
        "nine" => "9",
        "ten" => "10",
        _ => return None,
    })
}

/// The official table of contractions written without apostrophes (values as the official tool
/// writes them, typographic apostrophes included).
fn contraction(w: &str) -> Option<&'static str> {
    Some(match w {
        "aint" => "ain't",
        "arent" => "aren't",
        "cant" => "can't",
        "couldve" => "could've",
        "couldnt" => "couldn't",
        "couldn'tve" | "couldnt’ve" => "couldn’t’ve",
        "didnt" => "didn’t",
        "doesnt" => "doesn’t",
        "dont" => "don’t",
        "hadnt" => "hadn’t",
        "hadnt’ve" | "hadn'tve" => "hadn’t’ve",
        "hasnt" => "hasn’t",
        "havent" => "haven’t",
        "hed" => "he’d",
        "hed’ve" | "he’dve" => "he’d’ve",
        "hes" => "he’s",
        "howd" => "how’d",
        "howll" => "how’ll",
        "hows" => "how’s",
        "Id’ve" | "I’dve" => "I’d’ve",
        "Im" => "I’m",
        "Ive" => "I’ve",
        "isnt" => "isn’t",
        "itd" => "it’d",
        "itd’ve" | "it’dve" => "it’d’ve",
        "itll" => "it’ll",
        "let’s" => "let’s",
        "maam" => "ma’am",
        "mightnt" => "mightn’t",
        "mightnt’ve" | "mightn’tve" => "mightn’t’ve",
        "mightve" => "might’ve",
        "mustnt" => "mustn’t",
        "mustve" => "must’ve",
        "neednt" => "needn’t",
        "notve" => "not’ve",
        "oclock" => "o’clock",
        "oughtnt" => "oughtn’t",
        "ow’s’at" | "’ows’at" | "’ow’sat" => "’ow’s’at",
        "shant" => "shan’t",
        "shed’ve" | "she’dve" => "she’d’ve",
        "she’s" => "she’s",
        "shouldve" => "should’ve",
        "shouldnt" => "shouldn’t",
        "shouldnt’ve" | "shouldn’tve" => "shouldn’t’ve",
        "somebody’d" => "somebodyd",
        "somebodyd’ve" | "somebody’dve" => "somebody’d’ve",
        "somebodyll" => "somebody’ll",
        "somebodys" => "somebody’s",
        "someoned" => "someone’d",
        "someoned’ve" | "someone’dve" => "someone’d’ve",
        "someonell" => "someone’ll",
        "someones" => "someone’s",
        "somethingd" => "something’d",
        "somethingd’ve" | "something’dve" => "something’d’ve",
        "somethingll" => "something’ll",
        "thats" => "that’s",
        "thered" => "there’d",
        "thered’ve" | "there’dve" => "there’d’ve",
        "therere" => "there’re",
        "theres" => "there’s",
        "theyd" => "they’d",
        "theyd’ve" | "they’dve" => "they’d’ve",
        "theyll" => "they’ll",
        "theyre" => "they’re",
        "theyve" => "they’ve",
        "twas" => "’twas",
        "wasnt" => "wasn’t",
        "wed’ve" | "we’dve" => "we’d’ve",
        "weve" => "we've",
        "werent" => "weren’t",
        "whatll" => "what’ll",
        "whatre" => "what’re",
        "whats" => "what’s",
        "whatve" => "what’ve",
        "whens" => "when’s",
        "whered" => "where’d",
        "wheres" => "where's",
        "whereve" => "where’ve",
        "whod" => "who’d",
        "whod’ve" | "who’dve" => "who’d’ve",
        "wholl" => "who’ll",
        "whos" => "who’s",
        "whove" => "who've",
        "whyll" => "why’ll",
        "whyre" => "why’re",
        "whys" => "why’s",
        "wont" => "won’t",
        "wouldve" => "would’ve",
        "wouldnt" => "wouldn’t",
        "wouldnt’ve" | "wouldn’tve" => "wouldn’t’ve",
        "yall" => "y’all",
        "yall’ll" | "y’allll" => "y’all’ll",
        "yall’d’ve" | "y’alld’ve" | "y’all’dve" => "y’all’d’ve",
        "youd" => "you’d",
        "youd’ve" | "you’dve" => "you’d’ve",
        "youll" => "you’ll",
        "youre" => "you’re",
        "youve" => "you’ve",
        _ => return None,
    })
}

/// `processPunctuation`: a punctuation mark next to a space (or any text with a digit-comma-digit)
/// is deleted, otherwise replaced by a space; a period not followed by a digit is deleted.
pub fn process_punctuation(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let digit_comma_digit = chars.windows(3).any(|w| w[0].is_ascii_digit() && w[1] == ',' && w[2].is_ascii_digit());
    let mut out = text.to_string();
    for p in PUNCT {
        let spaced = text.contains(&format!("{p} ")) || text.contains(&format!(" {p}"));
        out = out.replace(p, if spaced || digit_comma_digit { "" } else { " " });
    }
    let chars: Vec<char> = out.chars().collect();
    chars
        .iter()
        .enumerate()
        .filter(|&(i, &c)| c != '.' || chars.get(i + 1).is_some_and(|n| n.is_ascii_digit()))
        .map(|(_, &c)| c)
        .collect()
}

/// `processDigitArticle`: lower-case, number words to digits, drop articles, restore contractions.
pub fn process_digit_article(text: &str) -> String {
    let lower = text.to_lowercase();
    let words: Vec<&str> =
        lower.split_whitespace().map(|w| number_word(w).unwrap_or(w)).filter(|w| !ARTICLES.contains(w)).collect();
    words.iter().map(|w| contraction(w).unwrap_or(w)).collect::<Vec<_>>().join(" ")
}

/// Normalises a predicted answer as the official tool does.
pub fn normalize_prediction(answer: &str) -> String {
    let a = answer.replace(['\n', '\t'], " ");
    process_digit_article(&process_punctuation(a.trim()))
}

/// Accuracy (0–1) of one prediction against the annotators' answers (ten in VQA v2).
pub fn vqa_accuracy(prediction: &str, gt: &[String]) -> f64 {
    if gt.is_empty() {
        return 0.0;
    }
    let pred = normalize_prediction(prediction);
    // The official tool normalises ground truth (punctuation only) when annotators disagree.
    let distinct: std::collections::HashSet<&String> = gt.iter().collect();
    let gt: Vec<String> =
        if distinct.len() > 1 { gt.iter().map(|a| process_punctuation(a)).collect() } else { gt.to_vec() };
    let total: f64 = (0..gt.len())
        .map(|leave_out| {
            let matches = gt.iter().enumerate().filter(|&(i, a)| i != leave_out && *a == pred).count();
            (matches as f64 / 3.0).min(1.0)
        })
        .sum();
    total / gt.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ten(answers: &[(&str, usize)]) -> Vec<String> {
        answers.iter().flat_map(|(a, n)| std::iter::repeat_n(a.to_string(), *n)).collect()
    }

    #[test]
    fn leave_one_out_accuracy() {
        // All ten agree: 1.
        assert_eq!(vqa_accuracy("yes", &ten(&[("yes", 10)])), 1.0);
        // Two annotators said "2": leaving out one of them leaves 1 match (1/3), leaving out any
        // of the other eight leaves 2 (2/3): (2·1/3 + 8·2/3)/10 = 0.6.
        assert!((vqa_accuracy("2", &ten(&[("2", 2), ("3", 8)])) - 0.6).abs() < 1e-12);
        // Three said it: (3·2/3 + 7·1)/10 = 0.9. Four or more: 1.
        assert!((vqa_accuracy("red", &ten(&[("red", 3), ("blue", 7)])) - 0.9).abs() < 1e-12);
        assert_eq!(vqa_accuracy("red", &ten(&[("red", 4), ("blue", 6)])), 1.0);
        assert_eq!(vqa_accuracy("green", &ten(&[("red", 4), ("blue", 6)])), 0.0);
    }

    #[test]
    fn official_normalisation() {
        // Number words become digits, articles go, case folds.
        assert_eq!(normalize_prediction("Two"), "2");
        assert_eq!(normalize_prediction("the dog"), "dog");
        assert_eq!(normalize_prediction("A Red Car"), "red car");
        // A period is deleted unless a digit follows.
        assert_eq!(normalize_prediction("yes."), "yes");
        assert_eq!(normalize_prediction("3.5"), "3.5");
        // Punctuation without neighbouring spaces becomes a space; next to a space it is deleted.
        assert_eq!(process_punctuation("black/white"), "black white");
        assert_eq!(process_punctuation("yes , no"), "yes  no");
        // A digit-comma-digit anywhere deletes every mark.
        assert_eq!(process_punctuation("1,000"), "1000");
        // Contractions written without apostrophe are restored (as the official tool spells them).
        assert_eq!(normalize_prediction("dont"), "don’t");
        assert_eq!(normalize_prediction("cant"), "can't");
        // A prediction "two" matches annotators who typed "2".
        assert_eq!(vqa_accuracy("two", &ten(&[("2", 10)])), 1.0);
        // Ground truth is punctuation-normalised only when annotators disagree.
        assert!((vqa_accuracy("black white", &ten(&[("black/white", 3), ("gray", 7)])) - 0.9).abs() < 1e-12);
        assert_eq!(vqa_accuracy("black white", &ten(&[("black/white", 10)])), 0.0);
    }
}
