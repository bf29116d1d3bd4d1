//! The records that flow between operators. Everything here is `serde` so that timely can move it
//! between processes (bincode on the wire).

use crate::text::html::ExtractedPage;
use serde::{Deserialize, Serialize};

/// Where a record came from in its crawl dump.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default)]
pub struct Origin {
    /// The input file, as given or discovered.
    pub file: String,
    /// Byte offset of the record in the file (for gzip inputs: of the gzip member holding it).
    pub offset: u64,
}

/// The payload of a raw record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// An HTML document, still as bytes; `charset` is the one the HTTP header declared, if any.
    Html {
        /// The payload as received (dechunked and decompressed).
        bytes: Vec<u8>,
        /// The charset of the HTTP `Content-Type`, if declared.
        charset: Option<String>,
    },
    /// Text that was already extracted upstream (WET conversion records, JSONL).
    Text(String),
}

/// One document as read from a crawl dump, before extraction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RawRecord {
    /// Where it came from.
    pub origin: Origin,
    /// The target URL (WARC-Target-URI, JSONL `url`, or a file:// URL for a folder of pages).
    pub url: String,
    /// The record's id (WARC-Record-ID, JSONL `id`), or one derived from the origin.
    pub record_id: String,
    /// The payload.
    pub body: Body,
}

/// One block of extracted text.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Block {
    /// A header `h1`..`h6`; `level` is 1..=6.
    Heading {
        /// 1 for `h1` .. 6 for `h6`.
        level: u8,
        /// The header text, whitespace collapsed.
        text: String,
    },
    /// A paragraph-like block of text (p, li, pre, td, ...), whitespace normalised (pre keeps newlines).
    Text(String),
}

/// A document after extraction: its text as a flat sequence of headers and blocks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Where it came from.
    pub origin: Origin,
    /// The target URL.
    pub url: String,
    /// The record's id.
    pub record_id: String,
    /// Its title and text blocks, as extraction left them.
    pub content: ExtractedPage,
}

/// A self-contained passage: a header with the content under it (paper §2.1).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Passage {
    /// A unique id: a hash of the page's origin and the passage's position in it.
    pub id: u64,
    /// Hash of the normalised text: the passage's identity for exact dedup.
    pub content_hash: u64,
    /// The passage text: the header line, then the content under it.
    pub text: String,
    /// The page's URL.
    pub url: String,
    /// The page's record id.
    pub record_id: String,
    /// Where the page came from.
    pub origin: Origin,
    /// The headers from the page's top to this passage's header.
    pub header_path: Vec<String>,
}

/// A passage with the instruction the backward model wrote for it (the paper's `(x^, y)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// The passage: the candidate answer `y`.
    pub passage: Passage,
    /// The generated instruction `x^`.
    pub instruction: String,
    /// The backward model's version.
    pub augment_version: String,
}

impl Candidate {
    /// A pair given as data (a dataset to rate, a selector's dev set), as a candidate: the
    /// output is the passage, its id a hash of `file` and `index` (seeding its sampling).
    pub fn given(file: &str, index: u64, instruction: &str, output: &str) -> Candidate {
        let id = xxhash_rust::xxh3::xxh3_64(format!("{file}\u{0}{index}").as_bytes());
        Candidate {
            passage: Passage {
                id,
                content_hash: crate::text::minhash::content_hash(output),
                text: output.to_owned(),
                url: String::new(),
                record_id: index.to_string(),
                origin: Origin {
                    file: file.to_owned(),
                    offset: index,
                },
                header_path: Vec::new(),
            },
            instruction: instruction.to_owned(),
            augment_version: "given".into(),
        }
    }
}

/// One self-rating of a candidate by a forward model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rating {
    /// The rated candidate.
    pub candidate: Candidate,
    /// The rating model's version.
    pub model_version: String,
    /// The mean of the samples' scores (read from the answer, or else the forced choice), or
    /// `None` when no sample has one.
    pub score: Option<f64>,
    /// The graded score (G-Eval's probability-weighted score, Liu et al. 2023): the mean over
    /// samples of the parsed score where the answer has one, else the expected value of the
    /// forced choice's probabilities over `1`..`5`; `None` when no sample has either. Unlike
    /// the forced choice's argmax it orders candidates a small model cannot score in words.
    #[serde(default)]
    pub graded: Option<f64>,
    /// Every sampled rating: the raw answer and what it parsed to.
    pub samples: Vec<RatingSample>,
}

/// One sampled rating answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RatingSample {
    /// The model's whole answer.
    pub raw: String,
    /// The score read from it, or why none could be.
    pub score: Result<u8, crate::humpback::score::ScoreError>,
    /// When no score could be read: the score the model picked when its answer was followed by
    /// `Score: ` and only 1..5 were allowed (see `operators::rate`).
    #[serde(default)]
    pub forced: Option<u8>,
    /// The probabilities of `1`..`5` in the forced choice after the answer (under the model's
    /// whole next-token distribution), kept for every sample that had room for the choice,
    /// whether or not the answer had a score of its own.
    #[serde(default)]
    pub forced_probs: Option<Vec<f32>>,
}

impl RatingSample {
    /// The sample's score: read from the answer, else forced.
    pub fn value(&self) -> Option<u8> {
        self.score.as_ref().ok().copied().or(self.forced)
    }

    /// The expected score under the forced choice's probabilities of `1`..`5`, renormalised
    /// over those five; `None` without probabilities or when they are all zero.
    pub fn expected(&self) -> Option<f64> {
        let p = self.forced_probs.as_ref()?;
        let total: f64 = p.iter().map(|&x| x as f64).sum();
        (p.len() == 5 && total > 0.0 && total.is_finite()).then(|| {
            p.iter()
                .enumerate()
                .map(|(i, &x)| (i + 1) as f64 * x as f64)
                .sum::<f64>()
                / total
        })
    }

    /// The sample's graded score: read from the answer, else [`RatingSample::expected`].
    pub fn graded(&self) -> Option<f64> {
        match &self.score {
            Ok(v) => Some(*v as f64),
            Err(_) => self.expected(),
        }
    }
}
