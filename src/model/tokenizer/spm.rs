//! SentencePiece-style BPE over a scored vocabulary (GGUF `tokenizer.ggml.model = "llama"`), as
//! llama.cpp's `llm_tokenizer_spm`: start from UTF-8 characters, repeatedly merge the adjacent
//! pair whose concatenation is the vocabulary entry with the highest score (leftmost on ties),
//! then emit each final piece as its token, or as `<0xNN>` byte tokens when it is not one.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// A candidate merge of the symbols at `left` and `right`.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the concatenation, to detect stale entries.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost.
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .total_cmp(&other.score)
            .then_with(|| other.left.cmp(&self.left))
    }
}

/// One symbol: a byte range of the text, and its neighbours in the live list.
#[derive(Clone, Copy)]
struct Sym {
    start: usize,
    len: usize,
    prev: usize,
    next: usize,
}

const NONE: usize = usize::MAX;

/// What the SPM merge needs from the vocabulary.
pub struct SpmVocab<'a> {
    /// Token text -> id.
    pub token_to_id: &'a HashMap<String, u32>,
    /// Score of each token id.
    pub scores: &'a [f32],
    /// The `<0xNN>` token of each byte, if the vocabulary has it.
    pub byte_tokens: &'a [Option<u32>; 256],
    /// Emitted for a byte that has no `<0xNN>` token.
    pub unk: Option<u32>,
}

/// Tokenizes `text` (already whitespace-escaped with `▁`) and appends the ids to `out`.
pub fn tokenize(text: &str, vocab: &SpmVocab<'_>, out: &mut Vec<u32>) {
    let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
    for (i, c) in text.char_indices() {
        let idx = syms.len();
        syms.push(Sym {
            start: i,
            len: c.len_utf8(),
            prev: if idx == 0 { NONE } else { idx - 1 },
            next: if i + c.len_utf8() == text.len() {
                NONE
            } else {
                idx + 1
            },
        });
    }
    if syms.is_empty() {
        return;
    }
    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, syms: &[Sym], left: usize, right: usize| {
        if left == NONE || right == NONE {
            return;
        }
        let (a, b) = (syms[left], syms[right]);
        let piece = &text[a.start..b.start + b.len];
        if let Some(&id) = vocab.token_to_id.get(piece) {
            if let Some(&score) = vocab.scores.get(id as usize) {
                heap.push(Bigram {
                    score,
                    left,
                    right,
                    size: piece.len(),
                });
            }
        }
    };
    for i in 1..syms.len() {
        try_add(&mut heap, &syms, i - 1, i);
    }
    while let Some(bg) = heap.pop() {
        let (l, r) = (syms[bg.left], syms[bg.right]);
        // Stale when either side has been merged away or grown since the entry was made.
        if l.len == 0 || r.len == 0 || l.len + r.len != bg.size || l.next != bg.right {
            continue;
        }
        syms[bg.left].len += r.len;
        syms[bg.right].len = 0;
        syms[bg.left].next = r.next;
        if r.next != NONE {
            syms[r.next].prev = bg.left;
        }
        let prev = syms[bg.left].prev;
        let next = syms[bg.left].next;
        try_add(&mut heap, &syms, prev, bg.left);
        try_add(&mut heap, &syms, bg.left, next);
    }
    let mut i = 0;
    while i != NONE {
        let s = syms[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.token_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                // Byte fallback: a piece that is no token is spelled byte by byte.
                for &b in piece.as_bytes() {
                    if let Some(id) = vocab.byte_tokens[b as usize].or(vocab.unk) {
                        out.push(id);
                    }
                }
            }
        }
        i = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_score_merges_first_and_bytes_fall_back() {
        let vocab: HashMap<String, u32> = [("a", 0), ("b", 1), ("ab", 2), ("bb", 3), ("<0x63>", 4)]
            .into_iter()
            .map(|(s, i)| (s.to_string(), i))
            .collect();
        let scores = [0.0, 0.0, -1.0, -0.5, 0.0];
        let mut bytes = [None; 256];
        bytes[b'c' as usize] = Some(4);
        let v = SpmVocab {
            token_to_id: &vocab,
            scores: &scores,
            byte_tokens: &bytes,
            unk: None,
        };
        let mut out = Vec::new();
        // "abb": "bb" (-0.5) beats "ab" (-1.0) -> [a, bb]; "c" is not a token -> <0x63>.
        tokenize("abbc", &v, &mut out);
        assert_eq!(out, [0, 3, 4]);
    }
}
