//! What every stage read, kept and dropped, and why. Stats merge across workers and processes into
//! the job's summary.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How many examples (file and offset) are kept per drop reason in the summary.
pub const MAX_EXAMPLES_PER_REASON: usize = 50;

/// Why something was dropped. Stable snake_case names: they are the keys of the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    // --- reading
    /// A file that could not be opened or read at all.
    UnreadableFile,
    /// A file with no bytes.
    EmptyFile,
    /// A gzip stream that ends before its end.
    TruncatedGzip,
    /// A zstd stream that ends before its end.
    TruncatedZstd,
    /// Bytes that are not a WARC record where one was expected (skipped up to the next record).
    MalformedRecord,
    /// A record whose Content-Length does not match its bytes.
    ContentLengthMismatch,
    /// A WARC record of a type we do not read (request, metadata, warcinfo...).
    OtherRecordType,
    /// A response whose payload is not HTML (PDF, image...).
    NotHtml,
    /// An HTTP response with a status other than 2xx.
    HttpStatus,
    /// A page larger than the configured maximum.
    PageTooLarge,
    /// A JSONL line that is not JSON.
    InvalidJson,
    /// A JSONL object without the text field.
    MissingText,
    // --- extraction
    /// A page with no text left after boilerplate removal.
    NoText,
    // --- segmentation
    /// A passage shorter than the minimum.
    TooShort,
    /// A passage longer than the maximum with no sub-header to split it at.
    TooLong,
    /// A passage whose header is empty.
    EmptyHeader,
    /// Text before the first header of a page that has headers (it follows no header).
    NoHeader,
    /// A passage whose header is all upper case.
    UppercaseHeader,
    /// A passage under a navigation header (advertisement, forum, quick links...).
    NavigationHeader,
    /// A passage whose sentences repeat one another.
    Repetitive,
    // --- dedup
    /// Same normalised text as a passage kept.
    ExactDuplicate,
    /// MinHash similarity to a passage kept at or above the threshold.
    NearDuplicate,
    // --- the Humpback loop
    /// The backward model gave no instruction (empty answer or a model error).
    AugmentFailed,
    /// A rating answer without a readable score in 1..=5 (kept in the ratings output).
    RatingUnparsed,
    /// No rating of a candidate parsed, so it cannot be curated.
    Unrated,
    /// A score below the curation threshold.
    BelowThreshold,
    /// An instruction too short or too long to be plausible.
    InstructionLength,
    /// A pair whose output (the answer) is empty: never curated, whatever its score.
    EmptyOutput,
    /// A passage beyond `--limit` (the job took enough passages).
    OverLimit,
}

impl DropReason {
    /// Whether this reason is about one record of a file (as opposed to the whole file or stream):
    /// such drops count among the records read.
    pub fn is_record(self) -> bool {
        use DropReason::*;
        matches!(
            self,
            MalformedRecord
                | ContentLengthMismatch
                | OtherRecordType
                | NotHtml
                | HttpStatus
                | PageTooLarge
                | InvalidJson
                | MissingText
        )
    }

    /// The reason's name in the summary.
    pub fn as_str(self) -> &'static str {
        use DropReason::*;
        match self {
            UnreadableFile => "unreadable_file",
            EmptyFile => "empty_file",
            TruncatedGzip => "truncated_gzip",
            TruncatedZstd => "truncated_zstd",
            MalformedRecord => "malformed_record",
            ContentLengthMismatch => "content_length_mismatch",
            OtherRecordType => "other_record_type",
            NotHtml => "not_html",
            HttpStatus => "http_status",
            PageTooLarge => "page_too_large",
            InvalidJson => "invalid_json",
            MissingText => "missing_text",
            NoText => "no_text",
            TooShort => "too_short",
            TooLong => "too_long",
            EmptyHeader => "empty_header",
            NoHeader => "no_header",
            UppercaseHeader => "uppercase_header",
            NavigationHeader => "navigation_header",
            Repetitive => "repetitive",
            ExactDuplicate => "exact_duplicate",
            NearDuplicate => "near_duplicate",
            AugmentFailed => "augment_failed",
            RatingUnparsed => "rating_unparsed",
            Unrated => "unrated",
            BelowThreshold => "below_threshold",
            InstructionLength => "instruction_length",
            EmptyOutput => "empty_output",
            OverLimit => "over_limit",
        }
    }
}

/// One dropped item, with enough to find it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drop {
    /// Why.
    pub reason: DropReason,
    /// The input file.
    pub file: String,
    /// Byte offset of the record in the file.
    pub offset: u64,
    /// A short human-readable detail (the content type, the parse error, the header...).
    pub detail: String,
}

/// Counts of one reason, with the first few examples.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReasonStats {
    /// How many were dropped for this reason.
    pub count: u64,
    /// The first [`MAX_EXAMPLES_PER_REASON`] of them (deterministically: the smallest by file, offset).
    pub examples: Vec<Drop>,
}

/// Counters of one worker, or merged over the whole job.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Input files opened.
    pub files: u64,
    /// Bytes read from input files (compressed size for gzip).
    pub bytes_read: u64,
    /// Records read (every WARC record, JSONL line or page file), kept or not.
    pub records_read: u64,
    /// Pages that gave text after extraction.
    pub pages_kept: u64,
    /// Passages made by segmentation (before dedup).
    pub segments_made: u64,
    /// Passages written (after dedup).
    pub passages_written: u64,
    /// Dropped items by reason.
    pub dropped: BTreeMap<DropReason, ReasonStats>,
}

impl Stats {
    /// Counts one drop.
    pub fn drop(&mut self, drop: Drop) {
        let entry = self.dropped.entry(drop.reason).or_default();
        entry.count += 1;
        push_example(&mut entry.examples, drop);
    }

    /// Counts `n` drops of one reason without examples (e.g. dedup, where the duplicate's origin is
    /// recorded separately).
    pub fn drop_many(&mut self, reason: DropReason, n: u64) {
        self.dropped.entry(reason).or_default().count += n;
    }

    /// Adds another worker's counts to these.
    pub fn merge(&mut self, other: &Stats) {
        self.files += other.files;
        self.bytes_read += other.bytes_read;
        self.records_read += other.records_read;
        self.pages_kept += other.pages_kept;
        self.segments_made += other.segments_made;
        self.passages_written += other.passages_written;
        for (reason, theirs) in &other.dropped {
            let ours = self.dropped.entry(*reason).or_default();
            ours.count += theirs.count;
            for ex in &theirs.examples {
                push_example(&mut ours.examples, ex.clone());
            }
        }
    }

    /// Total dropped over all reasons.
    pub fn total_dropped(&self) -> u64 {
        self.dropped.values().map(|r| r.count).sum()
    }

    /// How many were dropped for `reason`.
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).map_or(0, |r| r.count)
    }
}

/// Keeps the smallest examples by (file, offset, detail) so merged summaries do not depend on which
/// worker reported first.
fn push_example(examples: &mut Vec<Drop>, drop: Drop) {
    let key = |d: &Drop| (d.file.clone(), d.offset, d.detail.clone());
    let pos = examples.partition_point(|e| key(e) <= key(&drop));
    if pos < MAX_EXAMPLES_PER_REASON {
        examples.insert(pos, drop);
        examples.truncate(MAX_EXAMPLES_PER_REASON);
    }
}

/// Peak resident memory of this process in MB (`VmHWM` of `/proc/self/status`), where the
/// system reports it.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
