//! Segmentation into self-contained passages (Humpback §2.1): a segment is a header with the text
//! that follows it, including the sub-trees of lower-level headers.
//!
//! # Policy
//! The page's headers form a tree (a header's parent is the nearest preceding header of a higher
//! level; skipped levels are fine). Each header's *subtree text* is its header line, its own blocks,
//! then each sub-header line with its own subtree, all joined by blank lines; lengths are counted in
//! characters, header lines and separators included. The tree is walked top-down:
//!
//! * a header whose subtree is within `[min_chars, max_chars]` becomes one passage and is not
//!   descended (its sub-headers appear in it as lines);
//! * shorter: dropped as [`DropReason::TooShort`];
//! * longer, with sub-headers: split at them. Its own lead text (before the first sub-header), with
//!   the header line, becomes a passage of its own if at least `min_chars` (packed as below if above
//!   `max_chars`), else is dropped as too short; then each sub-header is visited the same way;
//! * longer, without sub-headers: its blocks are packed greedily, at block boundaries, into
//!   passages of at most `max_chars`, each starting with the header line; the greedy fill aims at
//!   an even share (total / number of passages needed) so that the last passage is not a short
//!   remainder. A block that alone does
//!   not fit is cut at sentence boundaries, then at line breaks (code); a piece that still does not
//!   fit is dropped as [`DropReason::TooLong`]. Packed passages under `min_chars` are too short.
//!
//! Header filters, checked before the length: a navigation header
//! ([`SegmentOptions::navigation_headers`], whole header, case-insensitive, surrounding punctuation
//! ignored) drops its whole subtree; an empty header (no letter or digit) or an upper-case one
//! ([`DropReason::UppercaseHeader`]: at least `uppercase_ratio` of its letters upper case, with
//! enough letters and words to be shouting rather than an acronym or identifier such as `BLAKE2`)
//! drops its own text, and its sub-headers are still visited when the subtree is too long to be one
//! passage.
//! Every passage is then checked for repetition ([`is_repetitive`]).
//!
//! Text before the first header of a page that has headers follows no header: it is dropped as
//! [`DropReason::NoHeader`], unless [`SegmentOptions::lead_under_title`] puts it under the page title.
//! A page without any header (plain text from WET/JSONL, or headerless HTML) is packed greedily
//! into passages of at most `max_chars` from its paragraphs, with an empty header path.
//!
//! Why one file of this size: the policy above is one walk over a page's blocks (header stack,
//! packing, the drop rules); its parts only make sense together, and the tests of each rule sit
//! beside it.

use super::html::ExtractedPage;
use crate::records::Block;
use crate::stats::DropReason;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use unicode_segmentation::UnicodeSegmentation;
use xxhash_rust::xxh3::xxh3_64;

/// Options of [`segment`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SegmentOptions {
    /// Shortest passage kept, in characters (paper: 600).
    pub min_chars: usize,
    /// Longest passage kept, in characters (paper: 3000).
    pub max_chars: usize,
    /// A header is "upper case" when its upper-case letters are at least this fraction of its
    /// letters (1.0: all of them).
    pub uppercase_ratio: f64,
    /// Headers with fewer letters than this are never judged upper case (keeps "API", "JSON").
    pub uppercase_min_letters: usize,
    /// Headers with fewer words (containing letters) than this are never judged upper case: a
    /// single upper-case token is an acronym or an identifier (`BLAKE2`, `TEST_PREFIX`), not shouting.
    pub uppercase_min_words: usize,
    /// Headers that mark navigation or boilerplate (compared lower-cased, trimmed of punctuation).
    pub navigation_headers: Vec<String>,
    /// Word n-gram size for sentence similarity.
    pub repetition_ngram: usize,
    /// Two sentences are repeats when the Jaccard similarity of their n-gram sets is at least this.
    pub repetition_jaccard: f64,
    /// A passage is repetitive when at least this fraction of its sentences repeat another one.
    pub repetition_fraction: f64,
    /// Segment text before the first header under the page `<title>` instead of dropping it.
    pub lead_under_title: bool,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        let nav = [
            "advertisement",
            "advertisements",
            "ads",
            "forum",
            "forums",
            "quick link",
            "quick links",
            "quicklinks",
            "free newsletter",
            "newsletter",
            "subscribe",
            "related posts",
            "related articles",
            "related",
            "navigation",
            "menu",
            "main menu",
            "table of contents",
            "contents",
            "share",
            "share this",
            "comments",
            "leave a reply",
            "leave a comment",
            "footer",
            "sidebar",
            "previous topic",
            "next topic",
            "this page",
            "quick search",
            "search",
            "sponsored",
            "tags",
            "categories",
            "archives",
            "recent posts",
            "follow us",
        ];
        SegmentOptions {
            min_chars: 600,
            max_chars: 3000,
            uppercase_ratio: 1.0,
            uppercase_min_letters: 5,
            uppercase_min_words: 2,
            navigation_headers: nav.iter().map(|s| s.to_string()).collect(),
            repetition_ngram: 3,
            repetition_jaccard: 0.7,
            repetition_fraction: 0.5,
            lead_under_title: false,
        }
    }
}

/// One passage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// The headers from the page's top to this passage's header (empty for plain text).
    pub header_path: Vec<String>,
    /// The header line, a blank line, then the blocks (sub-header lines included) separated by
    /// blank lines.
    pub text: String,
}

/// What [`segment`] made of a page.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SegmentOutcome {
    /// Passages kept, in document order.
    pub segments: Vec<Segment>,
    /// Pieces dropped, with why and a short detail (header path and length).
    pub drops: Vec<(DropReason, String)>,
}

/// Segments a page with `opts` (compiles the options each call; reuse a [`Segmenter`] in loops).
pub fn segment(page: &ExtractedPage, opts: &SegmentOptions) -> SegmentOutcome {
    Segmenter::new(opts).segment(page)
}

/// Segmentation with compiled options.
#[derive(Clone, Debug)]
pub struct Segmenter {
    opts: SegmentOptions,
    navigation: HashSet<String>,
}

struct Node {
    level: u8,
    header: String,
    /// Texts of this header's own blocks (before its first sub-header).
    blocks: Vec<usize>,
    children: Vec<usize>,
    /// Characters of the subtree's parts and their number (for the separators).
    part_chars: usize,
    parts: usize,
}

impl Node {
    fn subtree_chars(&self) -> usize {
        self.part_chars + 2 * self.parts.saturating_sub(1)
    }
}

enum HeaderProblem {
    Navigation,
    Bad(DropReason),
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

impl Segmenter {
    /// Compiles `opts`.
    pub fn new(opts: &SegmentOptions) -> Self {
        Segmenter {
            navigation: opts
                .navigation_headers
                .iter()
                .map(|h| normalize_header(h))
                .collect(),
            opts: opts.clone(),
        }
    }

    /// Segments one page.
    pub fn segment(&self, page: &ExtractedPage) -> SegmentOutcome {
        let mut out = SegmentOutcome::default();
        let texts: Vec<&str> = page
            .blocks
            .iter()
            .map(|b| match b {
                Block::Heading { text, .. } | Block::Text(text) => text.as_str(),
            })
            .collect();
        let has_headings = page
            .blocks
            .iter()
            .any(|b| matches!(b, Block::Heading { .. }));
        if !has_headings {
            let all: Vec<usize> = (0..texts.len()).collect();
            self.pack(&[], None, &all, &texts, &mut out);
            return out;
        }

        // Build the header tree; node 0 is a root holding the text before the first header.
        let mut nodes = vec![Node {
            level: 0,
            header: String::new(),
            blocks: Vec::new(),
            children: Vec::new(),
            part_chars: 0,
            parts: 0,
        }];
        let mut stack = vec![0usize];
        for (i, b) in page.blocks.iter().enumerate() {
            match b {
                Block::Heading { level, text } => {
                    let level = (*level).max(1);
                    while stack.len() > 1 && nodes[stack[stack.len() - 1]].level >= level {
                        stack.pop();
                    }
                    let parent = stack[stack.len() - 1];
                    let id = nodes.len();
                    nodes.push(Node {
                        level,
                        header: text.trim().to_string(),
                        blocks: Vec::new(),
                        children: Vec::new(),
                        part_chars: 0,
                        parts: 0,
                    });
                    nodes[parent].children.push(id);
                    stack.push(id);
                }
                Block::Text(_) => {
                    let top = stack[stack.len() - 1];
                    nodes[top].blocks.push(i);
                }
            }
        }
        // Subtree sizes, children before parents (children always have larger ids).
        for id in (1..nodes.len()).rev() {
            let own: usize = nodes[id].blocks.iter().map(|&b| chars(texts[b])).sum();
            let (mut pc, mut parts) = (chars(&nodes[id].header) + own, 1 + nodes[id].blocks.len());
            for &c in &nodes[id].children {
                pc += nodes[c].part_chars;
                parts += nodes[c].parts;
            }
            nodes[id].part_chars = pc;
            nodes[id].parts = parts;
        }

        // The lead before the first header.
        let lead = &nodes[0].blocks;
        if !lead.is_empty() {
            match page.title.as_deref().filter(|_| self.opts.lead_under_title) {
                Some(title) => {
                    let path = vec![title.to_string()];
                    self.pack(&path, Some(title), lead, &texts, &mut out);
                }
                None => {
                    let n: usize = lead.iter().map(|&b| chars(texts[b])).sum();
                    out.drops.push((
                        DropReason::NoHeader,
                        format!("{} blocks, {n} chars before the first header", lead.len()),
                    ));
                }
            }
        }
        let mut path = Vec::new();
        for &c in &nodes[0].children {
            self.visit(&nodes, c, &texts, &mut path, &mut out);
        }
        out
    }

    fn header_problem(&self, header: &str) -> Option<HeaderProblem> {
        if !header.chars().any(char::is_alphanumeric) {
            return Some(HeaderProblem::Bad(DropReason::EmptyHeader));
        }
        if self.navigation.contains(&normalize_header(header)) {
            return Some(HeaderProblem::Navigation);
        }
        let (mut letters, mut upper) = (0usize, 0usize);
        for c in header.chars().filter(|c| c.is_alphabetic()) {
            letters += 1;
            if c.is_uppercase() {
                upper += 1;
            }
        }
        let words = header
            .split_whitespace()
            .filter(|w| w.chars().any(char::is_alphabetic))
            .count();
        if letters >= self.opts.uppercase_min_letters.max(1)
            && words >= self.opts.uppercase_min_words
            && upper as f64 >= self.opts.uppercase_ratio * letters as f64
        {
            return Some(HeaderProblem::Bad(DropReason::UppercaseHeader));
        }
        None
    }

    fn visit(
        &self,
        nodes: &[Node],
        id: usize,
        texts: &[&str],
        path: &mut Vec<String>,
        out: &mut SegmentOutcome,
    ) {
        let node = &nodes[id];
        path.push(node.header.clone());
        let len = node.subtree_chars();
        let (min, max) = (self.opts.min_chars, self.opts.max_chars);
        let detail = |what: &str| format!("{}{what} ({len} chars)", path.join(" > "));
        match self.header_problem(&node.header) {
            Some(HeaderProblem::Navigation) => {
                out.drops.push((DropReason::NavigationHeader, detail("")));
            }
            Some(HeaderProblem::Bad(reason)) => {
                if len > max && !node.children.is_empty() {
                    if !node.blocks.is_empty() {
                        out.drops.push((reason, detail(": own text")));
                    }
                    for &c in &node.children {
                        self.visit(nodes, c, texts, path, out);
                    }
                } else {
                    out.drops.push((reason, detail("")));
                }
            }
            None if len < min => out.drops.push((DropReason::TooShort, detail(""))),
            None if len <= max => {
                let mut parts = Vec::with_capacity(node.parts);
                collect_parts(nodes, id, texts, &mut parts);
                self.emit(path.clone(), parts.join("\n\n"), out);
            }
            None if node.children.is_empty() => {
                self.pack(path, Some(&node.header), &node.blocks, texts, out);
            }
            None => {
                if !node.blocks.is_empty() {
                    let own: usize = node.blocks.iter().map(|&b| chars(texts[b])).sum();
                    let lead_len = chars(&node.header) + own + 2 * node.blocks.len();
                    if lead_len < min {
                        out.drops.push((
                            DropReason::TooShort,
                            format!("{}: own text ({lead_len} chars)", path.join(" > ")),
                        ));
                    } else {
                        self.pack(path, Some(&node.header), &node.blocks, texts, out);
                    }
                }
                for &c in &node.children {
                    self.visit(nodes, c, texts, path, out);
                }
            }
        }
        path.pop();
    }

    /// Keeps a passage unless it is repetitive.
    fn emit(&self, header_path: Vec<String>, text: String, out: &mut SegmentOutcome) {
        if is_repetitive(
            &text,
            self.opts.repetition_ngram,
            self.opts.repetition_jaccard,
            self.opts.repetition_fraction,
        ) {
            out.drops.push((
                DropReason::Repetitive,
                format!("{} ({} chars)", header_path.join(" > "), chars(&text)),
            ));
            return;
        }
        out.segments.push(Segment { header_path, text });
    }

    /// Packs `blocks` greedily into passages of at most `max_chars`, each starting with `header`.
    fn pack(
        &self,
        path: &[String],
        header: Option<&str>,
        blocks: &[usize],
        texts: &[&str],
        out: &mut SegmentOutcome,
    ) {
        let (min, max) = (self.opts.min_chars, self.opts.max_chars);
        let header_len = header.map_or(0, |h| chars(h) + 2);
        let budget = max.saturating_sub(header_len).max(1);
        let name = if path.is_empty() {
            "(no header)".to_string()
        } else {
            path.join(" > ")
        };

        // Pieces that fit the budget: whole blocks, or long blocks cut at sentences, then lines.
        let mut pieces: Vec<(String, usize)> = Vec::new();
        for &b in blocks {
            let t = texts[b];
            let n = chars(t);
            if n <= budget {
                pieces.push((t.to_string(), n));
                continue;
            }
            for (piece, pn) in cut(t, budget) {
                if pn > budget {
                    out.drops.push((
                        DropReason::TooLong,
                        format!("{name}: a block part of {pn} chars"),
                    ));
                } else {
                    pieces.push((piece, pn));
                }
            }
        }

        let mut current: Vec<String> = Vec::new();
        let mut current_len = 0usize;
        let flush =
            |current: &mut Vec<String>, current_len: &mut usize, out: &mut SegmentOutcome| {
                if current.is_empty() {
                    return;
                }
                let total = header_len + *current_len;
                let body = current.join("\n\n");
                current.clear();
                *current_len = 0;
                if total < min {
                    out.drops
                        .push((DropReason::TooShort, format!("{name} ({total} chars)")));
                    return;
                }
                let text = match header {
                    Some(h) => format!("{h}\n\n{body}"),
                    None => body,
                };
                self.emit(path.to_vec(), text, out);
            };
        // Balanced greedy: aim at an even share of the text per passage, so that the last one is
        // not a short remainder (dropped as too short) while the others are full.
        let total: usize =
            pieces.iter().map(|p| p.1).sum::<usize>() + 2 * pieces.len().saturating_sub(1);
        let count = total.div_ceil(budget).max(1);
        let target = total.div_ceil(count);
        for (piece, n) in pieces {
            let added = if current.is_empty() { n } else { n + 2 };
            if !current.is_empty() && (current_len + added > budget || current_len >= target) {
                flush(&mut current, &mut current_len, out);
                current_len = n;
            } else {
                current_len += added;
            }
            current.push(piece);
        }
        flush(&mut current, &mut current_len, out);
    }
}

/// Parts of a subtree in order: header, own blocks, then each child's parts.
fn collect_parts<'a>(nodes: &'a [Node], id: usize, texts: &[&'a str], parts: &mut Vec<&'a str>) {
    let node = &nodes[id];
    parts.push(&node.header);
    parts.extend(node.blocks.iter().map(|&b| texts[b]));
    for &c in &node.children {
        collect_parts(nodes, c, texts, parts);
    }
}

/// Cuts a long text into pieces of at most `budget` characters at sentence boundaries, then at
/// line breaks; pieces that still do not fit are returned as they are (the caller drops them).
fn cut(text: &str, budget: usize) -> Vec<(String, usize)> {
    let mut units: Vec<&str> = Vec::new();
    for sentence in text.split_sentence_bounds() {
        if chars(sentence) <= budget {
            units.push(sentence);
        } else {
            units.extend(sentence.split_inclusive('\n'));
        }
    }
    let mut out: Vec<(String, usize)> = Vec::new();
    let mut cur = String::new();
    let mut cur_len = 0;
    for u in units {
        let n = chars(u);
        if cur_len + n > budget && !cur.is_empty() {
            let t = cur.trim().to_string();
            let tn = chars(&t);
            out.push((t, tn));
            cur.clear();
            cur_len = 0;
        }
        cur.push_str(u);
        cur_len += n;
    }
    let t = cur.trim().to_string();
    if !t.is_empty() {
        let tn = chars(&t);
        out.push((t, tn));
    }
    out.retain(|(t, _)| !t.is_empty());
    out
}

/// Lower-cases, collapses whitespace and trims non-alphanumeric characters at both ends.
fn normalize_header(h: &str) -> String {
    let lower = h.to_lowercase();
    let trimmed = lower.trim_matches(|c: char| !c.is_alphanumeric());
    trimmed.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether a passage repeats itself: it is split into sentences (at `.`, `!`, `?` and their CJK
/// forms followed by whitespace, and at line breaks, so that list items and code lines count as
/// sentences of their own); each sentence becomes the set of its word `ngram`s (a sentence shorter
/// than `ngram` words is one n-gram of all its words; words are runs of letters and digits,
/// lower-cased); a sentence *repeats* when its Jaccard similarity with some other sentence is at
/// least `jaccard`; the passage is repetitive when at least `fraction` of its sentences repeat.
/// Needs two sentences. A simple splitter rather than UAX #29: this runs on every passage, and the
/// Unicode one was slower than the whole HTML extraction.
pub fn is_repetitive(text: &str, ngram: usize, jaccard: f64, fraction: f64) -> bool {
    const MAX_SENTENCES: usize = 1000;
    let n = ngram.max(1);
    let mut sets: Vec<Vec<u64>> = Vec::new();
    let mut words: Vec<u64> = Vec::new();
    for sentence in sentences(text).take(MAX_SENTENCES) {
        words.clear();
        words.extend(word_hashes(sentence));
        if words.is_empty() {
            continue;
        }
        let mut set: Vec<u64> = if words.len() <= n {
            vec![combine(&words)]
        } else {
            words.windows(n).map(combine).collect()
        };
        set.sort_unstable();
        set.dedup();
        sets.push(set);
    }
    if sets.len() < 2 {
        return false;
    }
    let mut repeats = vec![false; sets.len()];
    for i in 0..sets.len() {
        for j in (i + 1)..sets.len() {
            if repeats[i] && repeats[j] {
                continue;
            }
            // |A∩B|/|A∪B| <= min/max: skip pairs whose sizes alone rule the threshold out.
            let (a, b) = (sets[i].len(), sets[j].len());
            if (a.min(b) as f64) < jaccard * a.max(b) as f64 {
                continue;
            }
            if sorted_jaccard(&sets[i], &sets[j]) >= jaccard {
                repeats[i] = true;
                repeats[j] = true;
            }
        }
    }
    let count = repeats.iter().filter(|&&r| r).count();
    count as f64 >= fraction * sets.len() as f64
}

/// Splits at sentence-ending punctuation followed by whitespace, and at line breaks.
fn sentences(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut prev_end = false;
        for (i, c) in rest.char_indices() {
            if c == '\n' || (prev_end && c.is_whitespace()) {
                let (s, r) = rest.split_at(i);
                rest = &r[c.len_utf8()..];
                return Some(s);
            }
            prev_end = matches!(c, '.' | '!' | '?' | '。' | '！' | '？');
        }
        Some(std::mem::take(&mut rest))
    })
}

/// Hashes of the lower-cased words (runs of alphanumerics) of a sentence.
fn word_hashes(sentence: &str) -> impl Iterator<Item = u64> + '_ {
    sentence
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| {
            if w.bytes().any(|b| b.is_ascii_uppercase() || b >= 0x80) {
                xxh3_64(w.to_lowercase().as_bytes())
            } else {
                xxh3_64(w.as_bytes())
            }
        })
}

/// An order-sensitive hash of a word n-gram from its word hashes.
fn combine(words: &[u64]) -> u64 {
    words.iter().fold(0x9E37_79B9_7F4A_7C15u64, |h, &w| {
        (h.rotate_left(23) ^ w).wrapping_mul(0xBF58_476D_1CE4_E5B9)
    })
}

/// Jaccard similarity of two sorted, deduplicated sets.
fn sorted_jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut inter) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                inter += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - inter;
    if union == 0 {
        0.0
    } else {
        inter as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(level: u8, t: &str) -> Block {
        Block::Heading {
            level,
            text: t.to_string(),
        }
    }
    fn p(t: &str) -> Block {
        Block::Text(t.to_string())
    }
    fn page(blocks: Vec<Block>) -> ExtractedPage {
        ExtractedPage {
            title: Some("T".into()),
            blocks,
            flattened_depth: false,
        }
    }
    /// A distinct sentence per index, so that nothing is repetitive by accident.
    fn prose(seed: usize, chars_wanted: usize) -> String {
        let words = [
            "river", "mountain", "lantern", "copper", "violet", "harbor", "meadow", "signal",
            "thunder", "quiet", "amber", "silver", "orchard", "canyon", "pepper", "glacier",
        ];
        let mut s = String::new();
        let mut k = seed * 7919;
        while s.chars().count() < chars_wanted {
            for w in 0..6 {
                k = k
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let word = words[(k >> 33) % words.len()];
                if w == 0 {
                    // Capitalised, so that UAX #29 sees a sentence start.
                    s.push_str(&word[..1].to_uppercase());
                    s.push_str(&word[1..]);
                } else {
                    s.push_str(word);
                }
                s.push(' ');
            }
            s.push_str(&format!("number {k}. "));
        }
        s.trim().to_string()
    }

    #[test]
    fn fitting_header_is_one_passage_with_subheaders() {
        let a = prose(1, 400);
        let b = prose(2, 400);
        let pg = page(vec![h(1, "Top"), p(&a), h(2, "Sub"), p(&b)]);
        let out = segment(&pg, &SegmentOptions::default());
        assert_eq!(out.segments.len(), 1, "{:?}", out.drops);
        assert_eq!(out.segments[0].header_path, vec!["Top"]);
        assert_eq!(out.segments[0].text, format!("Top\n\n{a}\n\nSub\n\n{b}"));
    }

    #[test]
    fn long_header_splits_at_subheaders_and_drops_short_lead() {
        let pg = page(vec![
            h(1, "Top"),
            p("short lead"),
            h(2, "One"),
            p(&prose(3, 1500)),
            h(2, "Two"),
            p(&prose(4, 1500)),
            h(2, "Three"),
            p("tiny"),
        ]);
        let out = segment(&pg, &SegmentOptions::default());
        let paths: Vec<_> = out.segments.iter().map(|s| s.header_path.clone()).collect();
        assert_eq!(paths, vec![vec!["Top", "One"], vec!["Top", "Two"]]);
        let reasons: Vec<_> = out.drops.iter().map(|d| d.0).collect();
        assert_eq!(reasons, vec![DropReason::TooShort, DropReason::TooShort]);
        assert!(out.drops[0].1.contains("own text"));
    }

    #[test]
    fn long_leaf_is_packed_with_header_line() {
        let blocks: Vec<Block> = std::iter::once(h(2, "Leaf"))
            .chain((0..10).map(|i| p(&prose(10 + i, 700))))
            .collect();
        let out = segment(&page(blocks), &SegmentOptions::default());
        assert!(out.segments.len() >= 3);
        for s in &out.segments {
            assert!(s.text.starts_with("Leaf\n\n"));
            assert!(s.text.chars().count() <= 3000);
            assert_eq!(s.header_path, vec!["Leaf"]);
        }
    }

    #[test]
    fn header_filters() {
        let body = prose(20, 800);
        let pg = page(vec![
            h(2, "ADVERTISEMENT"),
            p(&body),
            h(2, "Quick Links:"),
            p(&body),
            h(2, "¶"),
            p(&body),
            h(2, "BREAKING NEWS TODAY"),
            p(&body),
            h(2, "API"),
            p(&prose(21, 800)),
            h(2, "TEST_PREFIX"),
            p(&prose(22, 800)),
        ]);
        let out = segment(&pg, &SegmentOptions::default());
        let reasons: Vec<_> = out.drops.iter().map(|d| d.0).collect();
        assert_eq!(
            reasons,
            vec![
                DropReason::NavigationHeader,
                DropReason::NavigationHeader,
                DropReason::EmptyHeader,
                DropReason::UppercaseHeader
            ]
        );
        let kept: Vec<_> = out
            .segments
            .iter()
            .map(|s| s.header_path[0].as_str())
            .collect();
        assert_eq!(kept, vec!["API", "TEST_PREFIX"]);
    }

    #[test]
    fn text_before_first_header() {
        let pg = page(vec![p(&prose(30, 700)), h(2, "H"), p(&prose(31, 700))]);
        let out = segment(&pg, &SegmentOptions::default());
        assert_eq!(out.drops[0].0, DropReason::NoHeader);
        assert_eq!(out.segments.len(), 1);
        let opts = SegmentOptions {
            lead_under_title: true,
            ..Default::default()
        };
        let out = segment(&pg, &opts);
        assert_eq!(out.segments.len(), 2);
        assert_eq!(out.segments[0].header_path, vec!["T"]);
    }

    #[test]
    fn plain_text_packing() {
        let paras: Vec<String> = (0..8).map(|i| prose(40 + i, 500)).collect();
        let pg = ExtractedPage::from_plain_text(&paras.join("\n\n"));
        let out = segment(&pg, &SegmentOptions::default());
        // 8 paragraphs of 500..570 chars (about 4,300 with separators): two passages, balanced,
        // together holding every paragraph in order.
        assert_eq!(out.segments.len(), 2, "{:?}", out.drops);
        assert!(out.segments.iter().all(|s| s.header_path.is_empty()));
        assert!(out.segments.iter().all(|s| s.text.chars().count() <= 3000));
        let rejoined: Vec<&str> = out.segments.iter().map(|s| s.text.as_str()).collect();
        assert_eq!(rejoined.join("\n\n"), paras.join("\n\n"));
        assert!(out.segments[1].text.chars().count() >= 1500);
    }

    #[test]
    fn repetitive_passage_dropped() {
        let rep = "Buy cheap shoes online today at our store. ".repeat(20);
        let pg = page(vec![h(2, "Shoes"), p(&rep)]);
        let out = segment(&pg, &SegmentOptions::default());
        assert!(out.segments.is_empty());
        assert_eq!(out.drops[0].0, DropReason::Repetitive);
        assert!(!is_repetitive(&prose(50, 900), 3, 0.7, 0.5));
    }

    #[test]
    fn cut_long_block_at_sentences() {
        let text = prose(60, 5000);
        let pieces = cut(&text, 1000);
        assert!(pieces.len() >= 5);
        assert!(pieces.iter().all(|(t, n)| *n <= 1000 && t.ends_with('.')));
    }
}
