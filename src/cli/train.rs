//! `backflow train`: supervised finetuning (LoRA or full) of a GGUF file or HF folder on
//! instruction data; writes a checkpoint folder that `backflow generate --model DIR` loads.
//! A thin wrapper over [`crate::train::job::run_job_with`]: one data file, one tag.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

use crate::train::data::{self, DataSource, DataStats};
use crate::train::job::{run_job_with, DataGroup, TrainEvent, TrainJob};
use crate::train::lora::LoraConfig;
use crate::train::model::TrainMode;

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
    /// LoRA alpha (default: 2 x rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Full finetuning instead of LoRA.
    #[arg(long)]
    pub full: bool,
    /// Optimizer steps.
    #[arg(value_parser = crate::cli::values::at_least_one, long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Epochs over the data (default 3 when --steps is not given).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Peak learning rate (default: 1e-5 full, as the paper; 2e-4 LoRA).
    #[arg(value_parser = crate::cli::values::learning_rate, long)]
    pub lr: Option<f64>,
    /// Final learning rate of the linear decay (default: 9e-6 full, as the paper; lr/10 LoRA).
    #[arg(long)]
    pub lr_end: Option<f64>,
    /// AdamW weight decay (paper: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Examples per micro-batch.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Max tokens per example: longer outputs are truncated, prompts this long are dropped.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 512)]
    pub max_len: usize,
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
    /// Batches of random lengths instead of grouped by length (more padding, slower steps).
    #[arg(long)]
    pub no_group_by_length: bool,
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
            let mut lc = LoraConfig::all_projections(rank);
            lc.alpha = self.lora_alpha.unwrap_or(lc.alpha);
            lc.dropout = self.lora_dropout;
            TrainMode::Lora(lc)
        };
        Ok(TrainJob {
            model: self.model.clone(),
            data: vec![DataGroup {
                source: self.source,
                records,
            }],
            data_label: self.data.display().to_string(),
            malformed,
            out: self.out.clone(),
            mode,
            lr: self.lr,
            lr_end: self.lr_end,
            weight_decay: self.weight_decay,
            batch_size: self.batch_size,
            grad_accum: self.grad_accum,
            max_grad_norm: self.max_grad_norm,
            steps: self.steps,
            epochs: self.epochs,
            max_len: self.max_len,
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
            group_by_length: !self.no_group_by_length,
            save_every: self.save_every,
            resume: self.resume,
            quiet: self.quiet,
        })
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
