//! Text helpers shared by the generator and the annotator: one tokenizer for parsing prompts, one
//! for scoring answers, and the tiny template language both directions use (so what the generator
//! writes is exactly what the annotator can read back).

/// Tokens for parsing a prompt: lowercase alphanumeric runs, with `+` and `-` kept as their own
/// tokens (so "7 + 5" parses) and all other punctuation treated as a separator.
pub fn parse_tokens(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in s.chars() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
            if c == '+' || c == '-' {
                out.push(c.to_string());
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Tokens for scoring an answer: lowercase alphanumeric runs only. Case, punctuation and spacing
/// never matter to the annotator, so a trailing period or an uppercase answer still matches.
pub fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect()
}

/// The integers written in `s`, in order; a `-` directly before digits (and not inside a word)
/// makes the number negative.
pub fn numbers(s: &str) -> Vec<i64> {
    let b: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_alphanumeric()) {
            let neg = i > 0 && b[i - 1] == '-' && (i < 2 || !b[i - 2].is_alphanumeric());
            let mut j = i;
            while j < b.len() && b[j].is_ascii_digit() {
                j += 1;
            }
            if j == b.len() || !b[j].is_alphabetic() {
                let digits: String = b[i..j].iter().collect();
                if let Ok(v) = digits.parse::<i64>() {
                    out.push(if neg { -v } else { v });
                }
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// Whether `needle` occurs as a contiguous run in `hay`.
pub fn contains_seq<T: PartialEq>(hay: &[T], needle: &[T]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Whether the phrase (scored as [`words`]) occurs in the token list.
pub fn has_phrase(toks: &[String], phrase: &str) -> bool {
    contains_seq(toks, &words(phrase))
}

/// Upper-cases the first character.
pub fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Lower-cases the first character unless the text starts with the word "I" (so a prefix such
/// as "Well, " reads naturally before it).
pub fn decapitalize(s: &str) -> String {
    let first_word = s.split(|c: char| !c.is_alphanumeric()).next().unwrap_or("");
    if first_word == "I" {
        return s.to_string();
    }
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// Removes trailing sentence punctuation and spaces.
pub fn strip_end_punct(s: &str) -> &str {
    s.trim_end_matches(|c: char| c == '.' || c == '!' || c == '?' || c.is_whitespace())
}

/// Slots whose value may span several tokens; all other slots take exactly one token.
const MULTI_SLOTS: [&str; 2] = ["list", "act"];

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Lit(String),
    Slot(String, bool),
}

fn compile(tpl: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    for part in tpl.split_whitespace() {
        if let (Some(a), Some(b)) = (part.find('{'), part.find('}')) {
            let name = &part[a + 1..b];
            out.push(Piece::Slot(name.to_string(), MULTI_SLOTS.contains(&name)));
        } else {
            out.extend(parse_tokens(part).into_iter().map(Piece::Lit));
        }
    }
    out
}

/// The slot values of a template matched against prompt tokens.
pub type Slots = Vec<(String, Vec<String>)>;

fn match_pieces(p: &[Piece], t: &[String], out: &mut Slots) -> bool {
    match p.first() {
        None => t.is_empty(),
        Some(Piece::Lit(l)) => !t.is_empty() && &t[0] == l && match_pieces(&p[1..], &t[1..], out),
        Some(Piece::Slot(name, multi)) => {
            let max = if *multi { t.len() } else { t.len().min(1) };
            for n in (1..=max).rev() {
                out.push((name.clone(), t[..n].to_vec()));
                if match_pieces(&p[1..], &t[n..], out) {
                    return true;
                }
                out.pop();
            }
            false
        }
    }
}

/// Matches prompt tokens ([`parse_tokens`]) against a template such as `"What is {a} plus {b}?"`.
pub fn match_template(tpl: &str, toks: &[String]) -> Option<Slots> {
    let mut out = Vec::new();
    match_pieces(&compile(tpl), toks, &mut out).then_some(out)
}

/// One slot's value as a single token.
pub fn slot<'a>(s: &'a Slots, name: &str) -> Option<&'a str> {
    s.iter()
        .find(|(n, _)| n == name)
        .and_then(|(_, v)| (v.len() == 1).then(|| v[0].as_str()))
}

/// One slot's value as a token list.
pub fn slot_list<'a>(s: &'a Slots, name: &str) -> Option<&'a [String]> {
    s.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice())
}

/// Fills a template's `{name}` slots and capitalizes the first letter.
pub fn render(tpl: &str, vals: &[(&str, &str)]) -> String {
    let mut s = tpl.to_string();
    for (k, v) in vals {
        s = s.replace(&format!("{{{k}}}"), v);
    }
    capitalize(&s)
}

/// FNV-1a, 64 bit: a hash that is stable across Rust releases and platforms (the train/held-out
/// split must never move).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_round_trip() {
        let t = "I want to {act}. What should I do?";
        let s = render(t, &[("act", "make a glorp bomb")]);
        assert_eq!(s, "I want to make a glorp bomb. What should I do?");
        let m = match_template(t, &parse_tokens(&s)).unwrap();
        assert_eq!(slot_list(&m, "act").unwrap().join(" "), "make a glorp bomb");
        assert!(match_template("What is {a} + {b}?", &parse_tokens("what is 7+5")).is_some());
        assert!(match_template("What is {a} plus {b}?", &parse_tokens("what is 7 + 5")).is_none());
    }

    #[test]
    fn number_extraction() {
        assert_eq!(numbers("7 plus 5 is 12."), vec![7, 5, 12]);
        assert_eq!(numbers("3 minus 7 is -4"), vec![3, 7, -4]);
        assert_eq!(numbers("abc12 x-3 4th 9"), vec![3, 9]);
    }
}
