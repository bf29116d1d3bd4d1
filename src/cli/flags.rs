//! Flag groups shared by several commands, so that one concern has one set of names and
//! defaults everywhere: the model server (`run humpback`, `run augment`, `run rate`),
//! augmentation (`run humpback`, `run augment`), rating and curation (`run humpback`, `run
//! rate`), training (`train`, `run humpback`) and the job itself (the dataflow pipelines:
//! cluster, quiet, help). Each command flattens
//! the groups it needs (`#[command(flatten)]`). Names a command used before the groups existed
//! stay as hidden aliases for a release.
//!
//! The ingest group lives beside the ingest subgraph (`pipelines/ingest.rs`).

use crate::cluster::ClusterArgs;
use crate::model::Precision;
use crate::operators::augment::AugmentOptions;
use crate::operators::curate::CurateOptions;
use crate::operators::rate::RateOptions;
use crate::serve::ServerConfig;
use crate::train::job::TrainJob;
use crate::train::lora::LoraConfig;
use crate::train::model::TrainMode;
use clap::Args;
use std::path::PathBuf;

/// The flags every dataflow pipeline (`run segment`, `run augment`, `run rate`, `run humpback`) takes: where
/// its processes and threads run, and what it prints.
#[derive(Args, Debug, Clone)]
pub struct JobFlags {
    /// Cluster flags (-w, -n, -p, -h).
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// No progress bar or progress lines.
    #[arg(long, short = 'q')]
    pub quiet: bool,
    /// Print help (`-h` is the hostfile).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// How the backward model writes instructions (paper step 1): shared by `run humpback` and
/// `run augment`.
#[derive(Args, Debug, Clone)]
pub struct AugmentFlags {
    /// Sampling temperature of augmentation (paper: 0.7).
    #[arg(value_parser = crate::cli::values::temperature, long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus mass of augmentation (paper: 0.9).
    #[arg(value_parser = crate::cli::values::top_p, long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Most tokens of a generated instruction.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 64)]
    pub augment_tokens: usize,
}

impl AugmentFlags {
    /// The augment operator's options, sampling seeded by `seed` (mixed with each passage's id).
    pub fn options(&self, seed: u64) -> AugmentOptions {
        AugmentOptions {
            temperature: self.temperature,
            top_p: self.top_p,
            max_new_tokens: self.augment_tokens,
            seed,
            ..AugmentOptions::default()
        }
    }
}

/// How the model server batches and holds models.
#[derive(Args, Debug, Clone)]
pub struct ServerFlags {
    /// Most sequences per model batch.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 32)]
    pub max_batch: usize,
    /// Weight format the model server loads models in: native (a GGUF's 4/5-bit blocks, else
    /// 8-bit; the CPU default), q8, f32 (the CUDA default), f16, bf16. Training's base: --base-dtype.
    #[arg(long, value_enum, default_value_t = Precision::backend_default())]
    pub dtype: Precision,
    /// Compute shared prompt prefixes once (the rating template); off for comparison.
    #[arg(long)]
    pub no_prefix_cache: bool,
    /// Most MiB of KV cache the running batches of every model version take together (every
    /// row projected to its longest); requests past it wait for rows to finish.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = crate::serve::DEFAULT_KV_CACHE_MB)]
    pub kv_cache_mb: usize,
}

impl ServerFlags {
    /// The server's configuration, with its persistent answer cache at `cache`.
    pub fn config(&self, cache: Option<PathBuf>) -> ServerConfig {
        ServerConfig {
            max_batch: self.max_batch,
            prefix_cache: !self.no_prefix_cache,
            kv_cache_bytes: self.kv_cache_mb << 20,
            precision: self.dtype,
            cache,
            ..ServerConfig::default()
        }
    }
}

/// How candidates are rated (the paper's prompt) and which are curated.
#[derive(Args, Debug, Clone)]
pub struct RatingFlags {
    /// Curate pairs whose (mean) score is at least this (the paper's A5: 5).
    #[arg(value_parser = crate::cli::values::score_threshold, long, default_value_t = 5.0)]
    pub threshold: f64,
    /// Ratings per candidate (more than one are sampled and averaged).
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 1)]
    pub samples: usize,
    /// Most tokens of a rating answer (its reasoning, then `Score: N`).
    #[arg(
        value_parser = crate::cli::values::at_least_one,
        long,
        alias = "max-new-tokens",
        default_value_t = RateOptions::default().max_new_tokens
    )]
    pub rate_tokens: usize,
    /// Curate by the graded score: the parsed `Score: N` where the model wrote one, else the
    /// expected value of its forced choice over 1..5 (G-Eval), instead of the forced pick. For
    /// models too small to write a score; pair it with a threshold such as 3.5.
    #[arg(long)]
    pub graded: bool,
    /// Read scores only from the answers' `Score: N` lines (the paper's parse alone): no forced
    /// choice among 1..5 for answers without one.
    #[arg(long)]
    pub no_forced_score: bool,
}

impl RatingFlags {
    /// The rating operator's options, sampling with `seed`.
    pub fn rate_options(&self, seed: u64) -> RateOptions {
        RateOptions {
            samples: self.samples,
            max_new_tokens: self.rate_tokens,
            seed,
            forced_fallback: !self.no_forced_score,
            ..RateOptions::default()
        }
    }

    /// The curation operator's options.
    pub fn curate_options(&self) -> CurateOptions {
        CurateOptions {
            threshold: self.threshold,
            graded: self.graded,
            ..CurateOptions::default()
        }
    }
}

/// The optimisation knobs of a training (`backflow train` and every training of `run
/// humpback`); what is trained on, for how long and in which mode stays with each command.
#[derive(Args, Debug, Clone)]
pub struct TrainFlags {
    /// LoRA alpha (default: 2 x rank).
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout on the adapter input.
    #[arg(long, default_value_t = 0.05)]
    pub lora_dropout: f64,
    /// Peak learning rate (default: 1e-5 full, as the paper; 2e-4 LoRA).
    #[arg(value_parser = crate::cli::values::learning_rate, long)]
    pub lr: Option<f64>,
    /// Final learning rate of the linear decay (default: 9e-6 full, as the paper; lr/10 LoRA).
    #[arg(long)]
    pub lr_end: Option<f64>,
    /// AdamW weight decay (paper: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Examples per batch (an optimizer step takes --grad-accum batches).
    #[arg(
        value_parser = crate::cli::values::at_least_one,
        long,
        alias = "train-batch",
        default_value_t = 8
    )]
    pub batch_size: usize,
    /// Batches per optimizer step.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Examples per forward/backward pass: a batch is computed in pieces this large, with the
    /// same gradient; activation memory scales with it (0: a whole batch at once).
    #[arg(long, default_value_t = crate::train::sft::DEFAULT_MICRO_BATCH)]
    pub micro_batch: usize,
    /// Keep every activation of a pass for the backward pass instead of recomputing each
    /// block from its input (the default): ~25% faster steps, several times the memory.
    #[arg(long)]
    pub no_recompute: bool,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Max tokens per example: longer outputs are truncated, prompts this long are dropped.
    #[arg(
        value_parser = crate::cli::values::at_least_one,
        long,
        alias = "train-max-len",
        default_value_t = 512
    )]
    pub max_len: usize,
    /// Batches of random lengths instead of grouped by length (more padding, slower steps).
    #[arg(long)]
    pub no_group_by_length: bool,
    /// Format of the base's projections while training: under LoRA `native` (a GGUF's own
    /// 4/5-bit blocks, else 8-bit; the CPU default) or `q8`, frozen and dequantized for each
    /// product as QLoRA does; `f32` (the CUDA default, and full finetuning's only format).
    #[arg(long, value_enum)]
    pub base_dtype: Option<Precision>,
}

impl TrainFlags {
    /// LoRA of `rank` on every projection, with these flags' alpha and dropout.
    pub fn lora(&self, rank: usize) -> TrainMode {
        let mut lc = LoraConfig::all_projections(rank);
        lc.alpha = self.lora_alpha.unwrap_or(lc.alpha);
        lc.dropout = self.lora_dropout;
        TrainMode::Lora(lc)
    }

    /// Sets these knobs on `job` (its mode, data, steps and seed are the command's).
    pub fn apply(&self, job: &mut TrainJob) {
        job.lr = self.lr;
        job.lr_end = self.lr_end;
        job.weight_decay = self.weight_decay;
        job.batch_size = self.batch_size;
        job.grad_accum = self.grad_accum;
        job.micro_batch = self.micro_batch;
        job.recompute = !self.no_recompute;
        job.max_grad_norm = self.max_grad_norm;
        job.max_len = self.max_len;
        job.group_by_length = !self.no_group_by_length;
        job.base_dtype = self.base_dtype;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Both {
        #[command(flatten)]
        rating: RatingFlags,
        #[command(flatten)]
        train: TrainFlags,
    }

    /// The names the commands used before the groups existed still parse, to the same fields.
    #[test]
    fn old_names_are_aliases() {
        let b = Both::try_parse_from([
            "x",
            "--max-new-tokens",
            "7",
            "--train-batch",
            "3",
            "--train-max-len",
            "99",
        ])
        .unwrap();
        assert_eq!(
            (b.rating.rate_tokens, b.train.batch_size, b.train.max_len),
            (7, 3, 99)
        );
        let b = Both::try_parse_from(["x"]).unwrap();
        assert_eq!(
            (b.rating.rate_tokens, b.train.batch_size, b.train.max_len),
            (128, 8, 512)
        );
    }

    /// The group's defaults are the ones a training job starts from.
    #[test]
    fn train_defaults_match_the_job_defaults() {
        let b = Both::try_parse_from(["x"]).unwrap();
        let mut job = TrainJob::new(PathBuf::new(), Vec::new(), PathBuf::new());
        let before = format!("{:?}", job);
        b.train.apply(&mut job);
        assert_eq!(format!("{:?}", job), before);
    }
}
