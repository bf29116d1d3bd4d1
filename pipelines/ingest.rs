//! The ingest subgraph every pipeline that reads crawl dumps starts with, and its flags:
//!
//! ```text
//! discover -> read -> extract -> segment -> dedup -> keep      (passages, deduplicated)
//!                                   \    (written before) /
//!                                    \_______________ ___/      (text waits in keep for its verdict)
//! ```
//!
//! `backflow segment` writes what comes out; `run humpback` augments it.

use crate::formats::ReadOptions;
use crate::operators::dedup::{dedup, DedupOptions};
use crate::operators::discover::{discover, DiscoverConfig, OnFileDone};
use crate::operators::extract::extract;
use crate::operators::read::{read, ReadPacing};
use crate::operators::segment::segment;
use crate::operators::write::keep;
use crate::operators::written_before::written_before;
use crate::operators::{Time, WorkerStats};
use crate::progress::Progress;
use crate::records::Passage;
use crate::text::html::ExtractOptions;
use crate::text::minhash::MinHasher;
use crate::text::segment::SegmentOptions;
use anyhow::{bail, Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use timely::dataflow::{ProbeHandle, Scope, StreamVec};

/// How crawl dumps become passages: reading, segmentation and deduplication.
#[derive(Args, Debug, Clone)]
pub struct IngestFlags {
    /// Shortest passage in characters.
    #[arg(long, default_value_t = 600)]
    pub min_chars: usize,
    /// Longest passage in characters.
    #[arg(long, default_value_t = 3000)]
    pub max_chars: usize,
    /// File with extra navigation headers to drop, one per line (added to the built-in list).
    #[arg(long, value_name = "FILE")]
    pub nav_headers: Option<PathBuf>,
    /// Near-duplicate threshold: estimated Jaccard similarity of 5-word shingles.
    #[arg(long, default_value_t = 0.8)]
    pub near_threshold: f64,
    /// Keep near duplicates (exact duplicates are always removed).
    #[arg(long)]
    pub no_near_dedup: bool,
    /// The text field of JSONL inputs.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Pages larger than this (MiB) are skipped and counted as page_too_large.
    #[arg(long, default_value_t = 16)]
    pub max_page_mb: u64,
    /// A large input advances to a new epoch every this many MiB.
    #[arg(value_parser = crate::cli::values::at_least_one_u64, long, default_value_t = 64)]
    pub chunk_mb: u64,
    /// At most this many input files in flight (backpressure).
    #[arg(value_parser = crate::cli::values::at_least_one_u64, long, default_value_t = 4)]
    pub max_open_files: u64,
}

/// The operators' options, checked: what [`ingest`] is built from.
#[derive(Clone, Debug)]
pub struct IngestOptions {
    /// Reading records out of files.
    pub read: ReadOptions,
    /// How far a large file runs ahead, and in which chunks.
    pub pacing: ReadPacing,
    /// Text out of HTML.
    pub extract: ExtractOptions,
    /// Passages out of text.
    pub segment: SegmentOptions,
    /// Exact and near duplicates.
    pub dedup: DedupOptions,
}

impl IngestFlags {
    /// The options these flags describe, or why they cannot work (checked before any worker
    /// starts: the subgraph assumes them valid).
    pub fn options(&self) -> Result<IngestOptions> {
        if self.min_chars >= self.max_chars {
            bail!(
                "--min-chars ({}) must be below --max-chars ({})",
                self.min_chars,
                self.max_chars
            );
        }
        if !(0.0..=1.0).contains(&self.near_threshold) {
            bail!(
                "--near-threshold must be within 0..1, got {}",
                self.near_threshold
            );
        }
        let mut segment = SegmentOptions {
            min_chars: self.min_chars,
            max_chars: self.max_chars,
            ..SegmentOptions::default()
        };
        if let Some(path) = &self.nav_headers {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --nav-headers {}", path.display()))?;
            segment.navigation_headers.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(str::to_lowercase),
            );
        }
        let dedup = DedupOptions {
            near: !self.no_near_dedup,
            threshold: self.near_threshold,
            ..DedupOptions::default()
        };
        MinHasher::new(
            dedup.bands * dedup.rows,
            dedup.bands,
            dedup.ngram,
            dedup.seed,
        )?;
        Ok(IngestOptions {
            read: ReadOptions {
                text_field: self.text_field.clone(),
                max_page_bytes: self.max_page_mb << 20,
                ..ReadOptions::default()
            },
            pacing: ReadPacing {
                chunk_bytes: self.chunk_mb << 20,
                ..ReadPacing::default()
            },
            extract: ExtractOptions::default(),
            segment,
            dedup,
        })
    }
}

/// What one job's ingest reads, cloned into every worker.
#[derive(Clone)]
pub struct Ingest {
    /// The operators' options.
    pub options: IngestOptions,
    /// The files to read, the folder to follow, how many files at once
    /// (`IngestFlags::max_open_files`).
    pub discover: DiscoverConfig,
    /// Passage files an earlier run of the same job wrote: dedup's history (a restarted
    /// `--follow` job never writes a passage twice).
    pub written_before: Vec<PathBuf>,
    /// Ctrl-C: discover no further file.
    pub stop: Arc<AtomicBool>,
}

/// The subgraph: deduplicated passages, each released once its epoch's verdicts are complete.
/// `probe` paces reading (a file runs at most a few chunks ahead of it); `on_file_done` is
/// called by worker 0 for each file whose epochs have all passed it.
pub fn ingest<'s>(
    scope: Scope<'s, Time>,
    ingest: &Ingest,
    on_file_done: OnFileDone,
    probe: &ProbeHandle<Time>,
    stats: &WorkerStats,
    progress: &Arc<Progress>,
) -> StreamVec<'s, Time, Passage> {
    let options = &ingest.options;
    let items = discover(
        scope,
        ingest.discover.clone(),
        probe.clone(),
        ingest.stop.clone(),
        on_file_done,
    );
    let records = read(
        items,
        options.read.clone(),
        options.pacing.clone(),
        probe.clone(),
        stats.clone(),
        progress.clone(),
    );
    let pages = extract(records, options.extract.clone(), stats.clone());
    let passages = segment(pages, options.segment.clone(), stats.clone());
    let history = (!ingest.written_before.is_empty())
        .then(|| written_before(scope, ingest.written_before.clone(), progress.clone()));
    let verdicts = dedup(passages.clone(), history, options.dedup.clone())
        .expect("dedup options are checked by IngestFlags::options before the job starts");
    keep(passages, verdicts, stats.clone())
}
