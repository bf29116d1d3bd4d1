//! backflow: instruction backtranslation (Humpback) as a streaming timely dataflow.
//!
//! The core lives under `src/` (records, formats, text, model, cluster, cli); the timely operators
//! under `operators/` and the pipelines under `pipelines/`, mounted into this one crate.

#![warn(missing_docs)]

pub mod cli;
pub mod cluster;
pub mod dataset;
pub mod eval;
pub mod formats;
pub mod humpback;
pub mod ingest_log;
pub mod memory;
pub mod model;
pub mod output;
pub mod progress;
pub mod records;
pub mod report;
pub mod run_records;
pub mod serve;
pub mod spill;
pub mod stats;
pub mod text;
pub mod train;

#[path = "../operators/mod.rs"]
pub mod operators;
#[path = "../pipelines/mod.rs"]
pub mod pipelines;
