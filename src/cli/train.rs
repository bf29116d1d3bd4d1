//! `backflow train`: supervised finetuning (LoRA or full) of a GGUF file or HF folder on
//! instruction data; writes a checkpoint folder that `backflow generate --model DIR` loads.
//! A thin wrapper over [`crate::train::run_job_with`]: one data file, one tag.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::cli::flags::TrainFlags;
use crate::train::data::{self, DataSource, DataStats};
use crate::train::model::TrainMode;
use crate::train::{run_job_with, DataGroup, TrainEvent, TrainJob};

/// Flags of `backflow train`.
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Base model: a GGUF file or a Hugging Face folder.
    #[arg(long, env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// Training data: Alpaca JSON/JSONL, Self-Instruct seed tasks, or conversations.
    #[arg(long)]
    pub data: PathBuf,
    /// Output checkpoint folder (replaced atomically at each save).
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank (the default mode, rank 8).
    #[arg(value_parser = crate::cli::values::at_least_one, long, conflicts_with = "full")]
    pub lora_rank: Option<usize>,
    /// Full finetuning instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// Optimizer steps.
    #[arg(value_parser = crate::cli::values::at_least_one, long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Epochs over the data (default 3 when --steps is not given).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// The optimisation knobs (shared with `run humpback`).
    #[command(flatten)]
    pub train: TrainFlags,
    /// Seed of data order, LoRA init, dropout and the held-out split.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Train the backward model M_yx on reversed pairs (output -> instruction).
    #[arg(long)]
    pub backward: bool,
    /// Tag of the data (system prompt): seed (S_a), augmented (S_w), or untagged.
    #[arg(long, value_enum, default_value_t = DataSource::Seed)]
    pub source: DataSource,
    /// Hold out this fraction of the examples; their output loss is reported before and after.
    #[arg(long, default_value_t = 0.0, conflicts_with = "eval_data")]
    pub eval_frac: f64,
    /// Held-out data file (same formats as --data, never trained on); its output loss is
    /// reported before and after training.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Save a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: usize,
    /// Resume from the checkpoint in --out (optimizer state and step).
    #[arg(long)]
    pub resume: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    pub quiet: bool,
}

impl TrainArgs {
    /// The job these flags describe, training on `records` (read from `--data`).
    /// `eval_records` are the records of `--eval-data` (empty without it).
    pub fn job(
        &self,
        records: Vec<data::Record>,
        malformed: usize,
        eval_records: Vec<data::Record>,
    ) -> Result<TrainJob> {
        let mode = if self.full {
            TrainMode::Full
        } else {
            let rank = self.lora_rank.unwrap_or(8);
            if rank == 0 {
                bail!("--lora-rank must be positive");
            }
            self.train.lora(rank)
        };
        let mut job = TrainJob {
            model: self.model.clone(),
            data: vec![DataGroup {
                source: self.source,
                records,
            }],
            data_label: self.data.display().to_string(),
            malformed,
            out: self.out.clone(),
            mode,
            steps: self.steps,
            epochs: self.epochs,
            seed: self.seed,
            backward: self.backward,
            eval_frac: self.eval_frac,
            eval_data: if eval_records.is_empty() {
                Vec::new()
            } else {
                vec![DataGroup {
                    source: self.source,
                    records: eval_records,
                }]
            },
            save_every: self.save_every,
            resume: self.resume,
            quiet: self.quiet,
            ..TrainJob::new(PathBuf::new(), Vec::new(), PathBuf::new())
        };
        self.train.apply(&mut job);
        Ok(job)
    }
}

/// Runs `backflow train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let mut read = DataStats::default();
    let records = data::read_records(&args.data, &mut read)?;
    let eval_records = match &args.eval_data {
        Some(path) => {
            let mut eval_read = DataStats::default();
            let records = data::read_records(path, &mut eval_read)?;
            if records.is_empty() {
                bail!("--eval-data {}: no records", path.display());
            }
            if eval_read.malformed > 0 {
                eprintln!(
                    "--eval-data {}: {} malformed item(s) skipped",
                    path.display(),
                    eval_read.malformed
                );
            }
            records
        }
        None => Vec::new(),
    };
    let job = args.job(records, read.malformed, eval_records)?;
    let outcome = run_job_with(&job, &mut |e| match e {
        TrainEvent::EvalBefore { loss, tokens } => {
            eprintln!("held-out loss before training: {loss:.4} ({tokens} output tokens)")
        }
        TrainEvent::EvalAfter { loss, tokens } => {
            eprintln!("held-out loss after training:  {loss:.4} ({tokens} output tokens)")
        }
        _ => {}
    })
    .with_context(|| {
        format!(
            "training {} into {}",
            args.model.display(),
            args.out.display()
        )
    })?;
    if outcome.reused {
        if let (Some(before), Some(after)) = (outcome.eval_before, outcome.eval_after) {
            eprintln!("held-out loss before training: {before:.4} (recorded)");
            eprintln!("held-out loss after training:  {after:.4} (recorded)");
        }
        eprintln!(
            "{} already holds this job, finished (version {}): not retrained",
            outcome.out.display(),
            outcome.version
        );
        return Ok(());
    }
    eprintln!(
        "wrote {} (version {}) in {:.1}s, {:.0} training tokens/s",
        outcome.out.display(),
        outcome.version,
        outcome.secs,
        outcome.tokens_per_sec
    );
    Ok(())
}
