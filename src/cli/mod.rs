//! The `backflow` command line: one subcommand per job, each with its own flags.

pub mod eval;
pub mod export;
pub mod flags;
pub mod generate;
pub mod serve;
pub mod train;
pub mod values;
pub mod warc_pack;

use crate::pipelines::{self, segment::SegmentArgs};
use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use std::ffi::OsString;

/// backflow: instruction backtranslation (Humpback) as a streaming timely dataflow.
#[derive(Parser, Debug)]
#[command(name = "backflow", version, about, long_about = None)]
pub struct Cli {
    /// The job to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Every job.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Crawl dumps to deduplicated, self-contained passages (the ingest-only pipeline).
    ///
    /// Cluster flags: -w workers per process, -n processes, -p this process's index,
    /// -h a hostfile (one host:port per process). `--help` (long form only: -h is the hostfile).
    #[command(disable_help_flag = true)]
    Segment(SegmentArgs),
    /// Run a registered pipeline by name: `backflow run NAME [FLAGS]` (`backflow run list` lists them).
    #[command(disable_help_flag = true)]
    Run {
        /// The pipeline's name.
        name: String,
        /// The pipeline's own flags (see `backflow run NAME --help`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Pack a folder of .html pages into a WARC/1.0 file of `response` records (gzip per record).
    WarcPack(warc_pack::WarcPackArgs),
    /// Generate text with a LLaMA-family model (GGUF file or Hugging Face folder); prints only the
    /// generated text on stdout.
    Generate(generate::GenerateArgs),
    /// Finetune a LLaMA-family model (LoRA or full) on instruction data; writes a checkpoint
    /// folder (Hugging Face layout, or a PEFT adapter) that `generate --model DIR` loads.
    Train(train::TrainArgs),
    /// Write a GGUF file, an HF folder or a LoRA adapter folder (merged onto its base) as a
    /// Hugging Face folder (config.json, model.safetensors, tokenizer.json) for transformers,
    /// PEFT and llama.cpp's converter.
    Export(export::ExportArgs),
    /// An OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions, with
    /// streaming) over the model server: requests in flight are batched together.
    Serve(serve::ServeArgs),
    /// Write a run's curated sets as a Hugging Face dataset folder (data/curated-rNN.parquet and
    /// a README.md card whose configs `datasets.load_dataset(DIR)` reads).
    Dataset(DatasetArgs),
    /// Does it align? Pairwise win rates judged by an LLM (both orders), the likelihood of
    /// reference answers, and each model's precision and recall as a selector.
    Eval(eval::EvalArgs),
    /// Build a labelled dev set for `eval --selector-dev`: seed pairs as good; mismatched,
    /// truncated and web-passage pairs as bad.
    SelectorDevset(eval::DevsetArgs),
}

/// Flags of `backflow dataset`.
#[derive(clap::Args, Debug, Clone)]
pub struct DatasetArgs {
    /// The run's output folder (where `curated-r*.jsonl` are).
    pub run: std::path::PathBuf,
    /// The dataset folder to write (default: RUN/dataset).
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
}

/// Runs `backflow dataset`.
fn dataset(args: DatasetArgs) -> Result<()> {
    let out = args.out.unwrap_or_else(|| args.run.join("dataset"));
    let s = crate::dataset::write_dataset(&args.run, &out)?;
    for (round, rows) in &s.rounds {
        eprintln!(
            "round {round}: {rows} rows -> {}/data/curated-r{round:02}.parquet",
            out.display()
        );
    }
    if s.skipped_total > 0 {
        eprintln!("skipped {} lines that do not parse, e.g.:", s.skipped_total);
        for (f, n, why) in &s.skipped {
            eprintln!("  {}:{n}: {why}", f.display());
        }
    }
    eprintln!(
        "card: {}/README.md (datasets.load_dataset({:?}) loads the last round)",
        out.display(),
        out.display().to_string()
    );
    Ok(())
}

/// Parses the command line and runs the job.
pub fn main() -> Result<()> {
    // The matches too: `eval` orders its entries as given across two flags.
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&matches)?;
    match cli.command {
        Command::Segment(args) => pipelines::segment::run(args),
        Command::Run { name, args } => {
            if name == "list" || name == "--help" {
                for p in pipelines::PIPELINES {
                    println!("{:<12} {}", p.name, p.about);
                }
                return Ok(());
            }
            let Some(pipeline) = pipelines::find(&name) else {
                let known: Vec<_> = pipelines::PIPELINES.iter().map(|p| p.name).collect();
                bail!("no pipeline named {name:?}; known: {}", known.join(", "));
            };
            let mut argv = vec![OsString::from(format!("backflow run {name}"))];
            argv.extend(args);
            (pipeline.main)(argv)
        }
        Command::WarcPack(args) => warc_pack::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Train(args) => train::run(args),
        Command::Export(args) => export::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Dataset(args) => dataset(args),
        Command::Eval(args) => eval::run(args, matches.subcommand_matches("eval")),
        Command::SelectorDevset(args) => eval::devset(args),
    }
}
