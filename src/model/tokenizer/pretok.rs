//! Pre-tokenizers: split raw text into the "words" that BPE merges never cross.
//!
//! The regexes of the byte-level BPE family are implemented as hand-written scanners, as
//! llama.cpp does (`unicode_regex_split_custom_gpt2` / `_llama3`): one pass over the code
//! points, no backtracking, and the `\s+(?!\S)` lookahead (which the `regex` crate cannot
//! express) is a two-line rule. The Unicode classes `\p{L}` and `\p{N}` are the exact general
//! categories, taken from `regex-syntax`'s tables, because `char::is_alphabetic` is a different
//! property (it includes combining marks and letter numbers) and would split words differently
//! from the reference tokenizers.

use std::sync::OnceLock;

/// How a BPE vocabulary splits text before merging (llama.cpp's `tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// Every `\p{N}` code point alone first, then the GPT-2 regex inside each piece
    /// (`smollm`, `refact`, `starcoder`, ...; Hugging Face: `Digits(individual)` + `ByteLevel`).
    DigitsThenGpt2,
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    Llama3,
    /// Qwen2: the Llama 3 regex with `\p{N}` (one digit per word) instead of `\p{N}{1,3}`.
    Qwen2,
}

impl PreTokenizer {
    /// The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` name; `None` for names whose
    /// splitting rules this crate does not implement.
    pub fn from_gguf_name(name: &str) -> Option<Self> {
        Some(match name {
            "gpt-2" | "gpt2" | "phi-2" | "mpt" | "olmo" | "jais" | "trillion" => PreTokenizer::Gpt2,
            "smollm" | "refact" | "starcoder" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => PreTokenizer::DigitsThenGpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => PreTokenizer::Llama3,
            "qwen2" | "deepseek-r1-qwen" => PreTokenizer::Qwen2,
            _ => return None,
        })
    }

    /// The llama.cpp `tokenizer.ggml.pre` name that [`PreTokenizer::from_gguf_name`] maps back
    /// to this pre-tokenizer (and llama.cpp splits the same way).
    pub fn gguf_name(self) -> &'static str {
        match self {
            PreTokenizer::Gpt2 => "gpt-2",
            PreTokenizer::DigitsThenGpt2 => "smollm",
            PreTokenizer::Llama3 => "llama-bpe",
            PreTokenizer::Qwen2 => "qwen2",
        }
    }

    /// Appends the byte ranges of the words of `text` to `out`, in order; together they cover
    /// `text` exactly.
    pub fn split(self, text: &str, out: &mut Vec<(usize, usize)>) {
        match self {
            PreTokenizer::Gpt2 => split_gpt2(text, 0, out),
            PreTokenizer::DigitsThenGpt2 => {
                // Each number code point is a word of its own; the GPT-2 rules run on the
                // stretches between them (so " 1" gives " " and "1", as Hugging Face's
                // Digits(individual_digits) pre-tokenizer does).
                let mut start = 0;
                for (i, c) in text.char_indices() {
                    if is_number(c) {
                        if start < i {
                            split_gpt2(&text[start..i], start, out);
                        }
                        out.push((i, i + c.len_utf8()));
                        start = i + c.len_utf8();
                    }
                }
                if start < text.len() {
                    split_gpt2(&text[start..], start, out);
                }
            }
            PreTokenizer::Llama3 => split_llama3(text, 3, out),
            PreTokenizer::Qwen2 => split_llama3(text, 1, out),
        }
    }
}

/// Sorted, disjoint inclusive code point ranges of one Unicode class.
struct Class(Vec<(u32, u32)>);

impl Class {
    /// The ranges of a `\p{..}` class from regex-syntax's Unicode tables.
    fn from_regex(pattern: &str) -> Class {
        use regex_syntax::hir::{Class as HirClass, HirKind};
        // The patterns are compile-time constants that regex-syntax always accepts; an empty
        // class (never reached) would only make every code point "other".
        let ranges = regex_syntax::Parser::new()
            .parse(pattern)
            .ok()
            .and_then(|hir| match hir.kind() {
                HirKind::Class(HirClass::Unicode(cls)) => Some(
                    cls.ranges()
                        .iter()
                        .map(|r| (r.start() as u32, r.end() as u32))
                        .collect(),
                ),
                _ => None,
            })
            .unwrap_or_default();
        Class(ranges)
    }

    fn contains(&self, c: char) -> bool {
        let c = c as u32;
        self.0
            .binary_search_by(|&(lo, hi)| {
                if hi < c {
                    std::cmp::Ordering::Less
                } else if lo > c {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Equal
                }
            })
            .is_ok()
    }
}

fn letters() -> &'static Class {
    static L: OnceLock<Class> = OnceLock::new();
    L.get_or_init(|| Class::from_regex(r"\p{L}"))
}

fn numbers() -> &'static Class {
    static N: OnceLock<Class> = OnceLock::new();
    N.get_or_init(|| Class::from_regex(r"\p{N}"))
}

/// `\p{L}`: a letter (general categories Lu, Ll, Lt, Lm, Lo).
pub fn is_letter(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphabetic()
    } else {
        letters().contains(c)
    }
}

/// `\p{N}`: a number (Nd, Nl, No).
pub fn is_number(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_digit()
    } else {
        numbers().contains(c)
    }
}

/// `\s`: Unicode White_Space, which is what both Rust's `char::is_whitespace` and the
/// reference regex engines use.
pub fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// Which of the regex's classes a code point is in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cls {
    Letter,
    Number,
    Space,
    Other,
}

fn cls(c: char) -> Cls {
    if is_letter(c) {
        Cls::Letter
    } else if is_number(c) {
        Cls::Number
    } else if is_space(c) {
        Cls::Space
    } else {
        Cls::Other
    }
}

/// The decoded code points of `text` with their byte offsets, plus an end sentinel offset.
fn code_points(text: &str) -> (Vec<char>, Vec<usize>) {
    let mut chars = Vec::with_capacity(text.len());
    let mut offs = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        chars.push(c);
        offs.push(i);
    }
    offs.push(text.len());
    (chars, offs)
}

/// Length (in code points) of a contraction `'s|'t|'re|'ve|'m|'ll|'d` at `pos`, 0 if none.
/// `fold` lowercases the letters first (Llama 3's `(?i:...)`).
fn contraction(chars: &[char], pos: usize, fold: bool) -> usize {
    if chars.get(pos) != Some(&'\'') {
        return 0;
    }
    let at = |i: usize| {
        chars.get(pos + i).map(|&c| {
            if fold {
                c.to_lowercase().next().unwrap_or(c)
            } else {
                c
            }
        })
    };
    match at(1) {
        Some('s' | 't' | 'm' | 'd') => 2,
        Some(a @ ('r' | 'v' | 'l')) => match (a, at(2)) {
            ('r', Some('e')) | ('v', Some('e')) | ('l', Some('l')) => 3,
            _ => 0,
        },
        _ => 0,
    }
}

/// Length of the whitespace run starting at `pos`.
fn space_run(chars: &[char], pos: usize) -> usize {
    chars[pos..].iter().take_while(|&&c| is_space(c)).count()
}

/// The GPT-2 regex over `text`, pushing byte ranges shifted by `base`.
fn split_gpt2(text: &str, base: usize, out: &mut Vec<(usize, usize)>) {
    let (chars, offs) = code_points(text);
    let n = chars.len();
    let mut push = |a: usize, b: usize| out.push((base + offs[a], base + offs[b]));
    let mut pos = 0;
    while pos < n {
        let k = contraction(&chars, pos, false);
        if k > 0 {
            push(pos, pos + k);
            pos += k;
            continue;
        }
        // ` ?X+` for X in letters, numbers, "other": an optional single space joins the run.
        let lead = usize::from(chars[pos] == ' ' && pos + 1 < n);
        let c2 = cls(chars[pos + lead]);
        if c2 != Cls::Space {
            let mut end = pos + lead + 1;
            while end < n && cls(chars[end]) == c2 {
                end += 1;
            }
            push(pos, end);
            pos = end;
            continue;
        }
        let ws = space_run(&chars, pos);
        // `\s+(?!\S)`: before a non-space, the run gives up its last space to the next word.
        let end = if ws > 1 && pos + ws < n {
            pos + ws - 1
        } else {
            pos + ws
        };
        push(pos, end);
        pos = end;
    }
}

/// The Llama 3 / Qwen2 regex over `text`; `max_digits` is 3 (Llama 3) or 1 (Qwen2).
fn split_llama3(text: &str, max_digits: usize, out: &mut Vec<(usize, usize)>) {
    let (chars, offs) = code_points(text);
    let n = chars.len();
    let mut push = |a: usize, b: usize| out.push((offs[a], offs[b]));
    let is_nl = |c: char| c == '\r' || c == '\n';
    let mut pos = 0;
    while pos < n {
        let k = contraction(&chars, pos, true);
        if k > 0 {
            push(pos, pos + k);
            pos += k;
            continue;
        }
        let c = chars[pos];
        let cc = cls(c);
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !is_nl(c) && cc != Cls::Number {
            let first_letter = if cc == Cls::Letter {
                Some(pos)
            } else if pos + 1 < n && is_letter(chars[pos + 1]) {
                Some(pos + 1)
            } else {
                None
            };
            if let Some(f) = first_letter {
                let mut end = f + 1;
                while end < n && is_letter(chars[end]) {
                    end += 1;
                }
                push(pos, end);
                pos = end;
                continue;
            }
        }
        // `\p{N}{1,max}`
        if cc == Cls::Number {
            let mut end = pos;
            while end < n && end - pos < max_digits && is_number(chars[end]) {
                end += 1;
            }
            push(pos, end);
            pos = end;
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let lead = usize::from(c == ' ' && pos + 1 < n);
        if cls(chars[pos + lead]) == Cls::Other {
            let mut end = pos + lead + 1;
            while end < n && cls(chars[end]) == Cls::Other {
                end += 1;
            }
            while end < n && is_nl(chars[end]) {
                end += 1;
            }
            push(pos, end);
            pos = end;
            continue;
        }
        let ws = space_run(&chars, pos);
        // `\s*[\r\n]+`: the run up to and including its last newline.
        if let Some(last_nl) = (pos..pos + ws).rev().find(|&i| is_nl(chars[i])) {
            push(pos, last_nl + 1);
            pos = last_nl + 1;
            continue;
        }
        let end = if ws > 1 && pos + ws < n {
            pos + ws - 1
        } else {
            pos + ws.max(1)
        };
        push(pos, end);
        pos = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: PreTokenizer, text: &str) -> Vec<&str> {
        let mut v = Vec::new();
        p.split(text, &mut v);
        v.into_iter().map(|(a, b)| &text[a..b]).collect()
    }

    #[test]
    fn gpt2_words_follow_the_regex() {
        // Expected splits worked out by hand from the GPT-2 regex.
        assert_eq!(
            words(PreTokenizer::Gpt2, "Hello world's  end!!\n\n x"),
            ["Hello", " world", "'s", " ", " end", "!!", "\n\n", " x"]
        );
        assert_eq!(words(PreTokenizer::Gpt2, "a   "), ["a", "   "]);
        assert_eq!(words(PreTokenizer::Gpt2, "\tb"), ["\t", "b"]);
        assert_eq!(words(PreTokenizer::Gpt2, "x 12ab"), ["x", " 12", "ab"]);
    }

    #[test]
    fn digits_are_split_one_by_one_first() {
        assert_eq!(
            words(PreTokenizer::DigitsThenGpt2, "ab 123 3.14"),
            ["ab", " ", "1", "2", "3", " ", "3", ".", "1", "4"]
        );
    }

    #[test]
    fn llama3_groups_three_digits_and_newlines() {
        assert_eq!(
            words(PreTokenizer::Llama3, "12345 x\n\n  y"),
            ["123", "45", " x", "\n\n", " ", " y"]
        );
        assert_eq!(words(PreTokenizer::Qwen2, "123"), ["1", "2", "3"]);
    }

    #[test]
    fn unicode_classes_are_general_categories() {
        assert!(is_letter('é') && is_letter('日') && !is_letter('\u{301}'));
        assert!(is_number('½') && is_number('٣') && !is_number('a'));
    }
}
