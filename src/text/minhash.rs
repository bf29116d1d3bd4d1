//! Text normalisation, content hashes and MinHash signatures for exact and near-duplicate removal.
//!
//! * [`normalize`] lower-cases, strips Unicode punctuation (general category `P*`, plus the ASCII
//!   symbols of Python's `string.punctuation`, as datatrove does) and collapses whitespace.
//! * [`content_hash`] is xxh3-64 of the normalised text with a fixed seed: it depends on nothing but
//!   the bytes, so it is identical across processes, machines and runs (the identity for exact dedup).
//! * [`MinHasher`] computes MinHash signatures over word n-gram shingles of the normalised text.
//!   Each shingle is hashed **once** (xxh3-64, seeded); the `num_perm` hash functions are then
//!   multiply-add-shift permutations of that 64-bit hash, `h_i(x) = ((a_i * x + b_i) mod 2^64) >> 32`
//!   with odd `a_i` (Dietzfelbinger's universal family; a multiply and an add per value, no
//!   division). This is twice as fast as datatrove's `(a*x + b) mod (2^61 - 1)` and, measured on 200
//!   pairs of known Jaccard similarity, as accurate (mean absolute error 0.027 vs 0.029 with 112
//!   permutations): the xxh3 hash in front already destroys any structure of the input.
//!   `a_i`, `b_i` come from a splitmix64 stream of the seed, so the same `(num_perm, seed)` gives the
//!   same permutations everywhere. The signature is split into `bands` bands of `rows` values; each
//!   band is hashed into a `u64` key ([`MinHasher::band_keys`]): two texts sharing any key are
//!   candidate near-duplicates (LSH).

use std::collections::HashSet;
use thiserror::Error;
use unicode_categories::UnicodeCategories;
use xxhash_rust::xxh3::{xxh3_64_with_seed, Xxh3};

/// Seed of [`content_hash`]. Fixed forever: changing it changes every passage's identity.
pub const CONTENT_HASH_SEED: u64 = 0x6261_636b_666c_6f77; // "backflow"

/// Default number of permutations (14 bands x 8 rows, as datatrove).
pub const DEFAULT_NUM_PERM: usize = 112;
/// Default number of LSH bands.
pub const DEFAULT_BANDS: usize = 14;
/// Default shingle size in words.
pub const DEFAULT_NGRAM_WORDS: usize = 5;
/// Default seed of the permutations.
pub const DEFAULT_MINHASH_SEED: u64 = 1;

/// Invalid MinHash parameters.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum MinHashError {
    /// `num_perm`, `bands` or `ngram_words` is zero.
    #[error("MinHash parameters must be positive (num_perm {num_perm}, bands {bands}, ngram_words {ngram_words})")]
    Zero {
        /// Requested number of permutations.
        num_perm: usize,
        /// Requested number of bands.
        bands: usize,
        /// Requested shingle size.
        ngram_words: usize,
    },
    /// `num_perm` is not a multiple of `bands`.
    #[error("num_perm ({num_perm}) must be a multiple of bands ({bands})")]
    NotDivisible {
        /// Requested number of permutations.
        num_perm: usize,
        /// Requested number of bands.
        bands: usize,
    },
}

/// True for the characters [`normalize`] removes.
fn is_punct(c: char) -> bool {
    if c.is_ascii() {
        // Python's string.punctuation: ASCII punctuation *and* symbols ($+<=>^`|~).
        c.is_ascii_punctuation()
    } else {
        c.is_punctuation()
    }
}

/// Lower-cases, removes punctuation and collapses runs of whitespace to one space (trimmed).
///
/// Punctuation is removed, not replaced by a space (`don't` -> `dont`), like datatrove's
/// `simplify_text`. No Unicode normalisation (NFKC) is applied.
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut pending_space = false;
    for c in text.chars() {
        if c.is_whitespace() {
            pending_space = !out.is_empty();
            continue;
        }
        if is_punct(c) {
            continue;
        }
        if pending_space {
            out.push(' ');
            pending_space = false;
        }
        if c.is_ascii() {
            out.push(c.to_ascii_lowercase());
        } else {
            out.extend(c.to_lowercase());
        }
    }
    out
}

/// xxh3-64 of [`normalize`]`(text)` with [`CONTENT_HASH_SEED`]: stable across processes and machines.
pub fn content_hash(text: &str) -> u64 {
    xxh3_64_with_seed(normalize(text).as_bytes(), CONTENT_HASH_SEED)
}

/// One step of splitmix64: a well-mixed deterministic stream from a seed.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Byte ranges of the words of a normalised text (single spaces between words).
fn word_spans(normalized: &str) -> Vec<(usize, usize)> {
    let mut spans = Vec::new();
    let mut start = 0;
    for (i, b) in normalized.bytes().enumerate() {
        if b == b' ' {
            if i > start {
                spans.push((start, i));
            }
            start = i + 1;
        }
    }
    if normalized.len() > start {
        spans.push((start, normalized.len()));
    }
    spans
}

/// The word n-gram shingles of a normalised text as slices of it. A text with fewer than `n` words
/// (but at least one) is a single shingle; an empty text has none.
fn shingles(normalized: &str, n: usize) -> Vec<&str> {
    let spans = word_spans(normalized);
    if spans.is_empty() {
        return Vec::new();
    }
    let n = n.max(1);
    if spans.len() <= n {
        return vec![&normalized[spans[0].0..spans[spans.len() - 1].1]];
    }
    (0..=spans.len() - n)
        .map(|i| &normalized[spans[i].0..spans[i + n - 1].1])
        .collect()
}

/// MinHash signatures and LSH band keys. See the module documentation for the scheme.
#[derive(Clone, Debug)]
pub struct MinHasher {
    num_perm: usize,
    bands: usize,
    rows: usize,
    ngram_words: usize,
    seed: u64,
    /// Odd multipliers `a_i`.
    a: Vec<u64>,
    /// Offsets `b_i`.
    b: Vec<u64>,
}

impl Default for MinHasher {
    /// 5-word shingles, 112 permutations = 14 bands x 8 rows, seed 1.
    fn default() -> Self {
        // The defaults are valid by construction (112 = 14 * 8, all positive).
        Self::build(
            DEFAULT_NUM_PERM,
            DEFAULT_BANDS,
            DEFAULT_NGRAM_WORDS,
            DEFAULT_MINHASH_SEED,
        )
    }
}

impl MinHasher {
    /// A hasher with `num_perm` permutations in `bands` bands (`num_perm` must be a multiple of
    /// `bands`), shingles of `ngram_words` words, permutations drawn from `seed`.
    pub fn new(
        num_perm: usize,
        bands: usize,
        ngram_words: usize,
        seed: u64,
    ) -> Result<Self, MinHashError> {
        if num_perm == 0 || bands == 0 || ngram_words == 0 {
            return Err(MinHashError::Zero {
                num_perm,
                bands,
                ngram_words,
            });
        }
        if !num_perm.is_multiple_of(bands) {
            return Err(MinHashError::NotDivisible { num_perm, bands });
        }
        Ok(Self::build(num_perm, bands, ngram_words, seed))
    }

    fn build(num_perm: usize, bands: usize, ngram_words: usize, seed: u64) -> Self {
        let mut state = seed;
        let mut a = Vec::with_capacity(num_perm);
        let mut b = Vec::with_capacity(num_perm);
        for _ in 0..num_perm {
            // Odd multipliers: a*x mod 2^64 is then a bijection of x.
            a.push(splitmix64(&mut state) | 1);
            b.push(splitmix64(&mut state));
        }
        MinHasher {
            num_perm,
            bands,
            rows: num_perm / bands,
            ngram_words,
            seed,
            a,
            b,
        }
    }

    /// Number of permutations (signature length).
    pub fn num_perm(&self) -> usize {
        self.num_perm
    }

    /// Number of LSH bands.
    pub fn bands(&self) -> usize {
        self.bands
    }

    /// Rows (signature values) per band.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Shingle size in words.
    pub fn ngram_words(&self) -> usize {
        self.ngram_words
    }

    /// The MinHash signature of `text` (normalised first): `num_perm` values. A text without words
    /// gets all `u32::MAX`.
    pub fn signature(&self, text: &str) -> Vec<u32> {
        let normalized = normalize(text);
        let mut sig = vec![u32::MAX; self.num_perm];
        for shingle in shingles(&normalized, self.ngram_words) {
            // Hash once, then permute: multiply-add-shift over 64-bit words (see module docs).
            let x = xxh3_64_with_seed(shingle.as_bytes(), self.seed);
            for ((s, &a), &b) in sig.iter_mut().zip(&self.a).zip(&self.b) {
                let v = (a.wrapping_mul(x).wrapping_add(b) >> 32) as u32;
                *s = (*s).min(v);
            }
        }
        sig
    }

    /// One key per band: xxh3 of the band index and the band's values. Two signatures that agree
    /// on every value of some band share that band's key. A signature of the wrong length gives
    /// keys only for its complete bands.
    pub fn band_keys(&self, sig: &[u32]) -> Vec<u64> {
        let mut keys = Vec::with_capacity(self.bands);
        let mut buf = Vec::with_capacity(4 + 4 * self.rows);
        for (band, values) in sig.chunks_exact(self.rows).take(self.bands).enumerate() {
            buf.clear();
            buf.extend_from_slice(&(band as u32).to_le_bytes());
            for v in values {
                buf.extend_from_slice(&v.to_le_bytes());
            }
            let mut h = Xxh3::with_seed(self.seed);
            h.update(&buf);
            keys.push(h.digest());
        }
        keys
    }
}

/// The fraction of positions where two signatures agree: an unbiased estimate of the Jaccard
/// similarity of the shingle sets. Signatures of different lengths (different hashers) give 0.
pub fn estimated_jaccard(a: &[u32], b: &[u32]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return 0.0;
    }
    let same = a.iter().zip(b).filter(|(x, y)| x == y).count();
    same as f64 / a.len() as f64
}

/// The exact Jaccard similarity of the word `ngram` shingle sets of two texts (normalised as for
/// signatures). Two texts without words are identical (1.0). For tests and calibration.
pub fn exact_jaccard(a_text: &str, b_text: &str, ngram: usize) -> f64 {
    let (na, nb) = (normalize(a_text), normalize(b_text));
    let sa: HashSet<&str> = shingles(&na, ngram).into_iter().collect();
    let sb: HashSet<&str> = shingles(&nb, ngram).into_iter().collect();
    if sa.is_empty() && sb.is_empty() {
        return 1.0;
    }
    let inter = sa.intersection(&sb).count();
    let union = sa.len() + sb.len() - inter;
    inter as f64 / union as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_strips_punctuation_and_case() {
        assert_eq!(
            normalize("  Hello,   WORLD!\n\t“Quoted” — text… don't  "),
            "hello world quoted text dont"
        );
        assert_eq!(normalize("ÉCOLE  Ünïcode"), "école ünïcode");
        assert_eq!(normalize(" \n "), "");
    }

    #[test]
    fn content_hash_ignores_case_punctuation_and_spacing() {
        assert_eq!(content_hash("Hello, world!"), content_hash("hello   WORLD"));
        assert_ne!(content_hash("hello world"), content_hash("hello there"));
    }

    #[test]
    fn content_hash_is_pinned() {
        // Computed independently with python-xxhash:
        // xxhash.xxh3_64_intdigest(b"hello world", seed=0x6261636b666c6f77) == 7176113643463258791.
        // Pinned so that the seed or the normalisation cannot change unnoticed (passage identities
        // must stay stable across versions).
        assert_eq!(content_hash("Hello, World."), 7_176_113_643_463_258_791);
    }

    #[test]
    fn shingles_of_short_and_empty_texts() {
        assert_eq!(shingles("a b c", 5), vec!["a b c"]);
        assert!(shingles("", 5).is_empty());
        assert_eq!(shingles("a b c d", 3), vec!["a b c", "b c d"]);
    }

    #[test]
    fn rejects_bad_parameters() {
        assert!(MinHasher::new(112, 14, 5, 1).is_ok());
        assert_eq!(
            MinHasher::new(100, 14, 5, 1).err(),
            Some(MinHashError::NotDivisible {
                num_perm: 100,
                bands: 14
            })
        );
        assert!(MinHasher::new(0, 14, 5, 1).is_err());
    }

    #[test]
    fn signatures_are_deterministic_and_seed_dependent() {
        let text = "the quick brown fox jumps over the lazy dog again and again";
        let h1 = MinHasher::default();
        let h2 = MinHasher::default();
        assert_eq!(h1.signature(text), h2.signature(text));
        let h3 = MinHasher::new(112, 14, 5, 2).expect("valid parameters");
        assert_ne!(h1.signature(text), h3.signature(text));
        assert_eq!(h1.band_keys(&h1.signature(text)).len(), 14);
    }
}
