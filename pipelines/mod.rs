//! Pipelines: each a Rust module that composes operators into a job, with its own flags.
//!
//! To add one: write `pipelines/NAME.rs` with an `Args` struct (clap) and a `run(args)` function,
//! then add one line to [`PIPELINES`]. `backflow run NAME --help` then shows its flags.

use anyhow::Result;
use std::ffi::OsString;

pub mod augment;
pub mod harness;
pub mod humpback;
pub mod ingest;
pub mod rate;
pub mod segment;

/// A registered pipeline: its name, a one-line description, and its entry point, which parses
/// its own flags (the first element is the program name, as clap expects).
pub struct Pipeline {
    /// The name after `backflow run`.
    pub name: &'static str,
    /// What it does, for `backflow run --help`.
    pub about: &'static str,
    /// Parses its flags and runs.
    pub main: fn(Vec<OsString>) -> Result<()>,
}

/// Every pipeline `backflow run` knows.
pub const PIPELINES: &[Pipeline] = &[
    Pipeline {
        name: "humpback",
        about: "the whole method: crawl dumps + seed -> augment, rate, curate, train, round after round",
        main: humpback::main,
    },
    Pipeline {
        name: "segment",
        about: "crawl dumps to deduplicated passages (ingest only)",
        main: segment::main,
    },
    Pipeline {
        name: "augment",
        about: "crawl dumps to passages, each with the instruction a backward model writes for it",
        main: augment::main,
    },
    Pipeline {
        name: "rate",
        about: "rate an existing instruction dataset with a model (self-curation alone)",
        main: rate::main,
    },
];

/// The pipeline called `name`.
pub fn find(name: &str) -> Option<&'static Pipeline> {
    PIPELINES.iter().find(|p| p.name == name)
}
