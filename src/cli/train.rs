//! `backflow train`: supervised finetuning (LoRA or full) of a GGUF file or HF folder on
//! instruction data; writes a checkpoint folder that `backflow generate --model DIR` loads.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use burn::tensor::backend::Backend;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::model::chat::ChatTemplate;
use crate::model::device::default_device;
use crate::model::tokenizer::Tokenizer;
use crate::model::TokenizerSource;
use crate::train::checkpoint::{self, Adapter, BaseModel};
use crate::train::data::{self, DataSource, DataStats, Example};
use crate::train::lora::LoraConfig;
use crate::train::model::{TrainLlama, TrainMode};
use crate::train::sft::{eval_loss, micro_batches, step_indices, SftConfig, TrainBackend, Trainer};

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
    #[arg(long, conflicts_with = "full")]
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
    #[arg(long, conflicts_with = "epochs")]
    pub steps: Option<usize>,
    /// Epochs over the data (default 3 when --steps is not given).
    #[arg(long)]
    pub epochs: Option<f64>,
    /// Peak learning rate (default: 1e-5 full, as the paper; 2e-4 LoRA).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Final learning rate of the linear decay (default: 9e-6 full, as the paper; lr/10 LoRA).
    #[arg(long)]
    pub lr_end: Option<f64>,
    /// AdamW weight decay (paper: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Max tokens per example: longer outputs are truncated, prompts this long are dropped.
    #[arg(long, default_value_t = 512)]
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
    #[arg(long, default_value_t = 0.0)]
    pub eval_frac: f64,
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

/// The tokenizer files of the output: the HF base's own, or written from the GGUF vocabulary.
fn tokenizer_files(src: &TokenizerSource) -> Result<Vec<(String, Vec<u8>)>> {
    Ok(match src {
        TokenizerSource::Gguf(meta) => match crate::train::tokenizer_json::from_gguf(meta) {
            Ok((tj, tc)) => vec![
                ("tokenizer.json".into(), tj.into_bytes()),
                ("tokenizer_config.json".into(), tc.into_bytes()),
            ],
            Err(e) => {
                log::warn!("checkpoint without tokenizer.json: {e}");
                Vec::new()
            }
        },
        TokenizerSource::TokenizerJson(p) => {
            let mut v = vec![(
                "tokenizer.json".into(),
                std::fs::read(p).with_context(|| p.display().to_string())?,
            )];
            let cfg = p.with_file_name("tokenizer_config.json");
            if cfg.exists() {
                v.push(("tokenizer_config.json".into(), std::fs::read(&cfg)?));
            }
            v
        }
        TokenizerSource::Missing => Vec::new(),
    })
}

fn append_metrics(out: &Path, line: &serde_json::Value) -> Result<()> {
    std::fs::create_dir_all(out)?;
    let p = out.join(checkpoint::METRICS);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&p)?;
    writeln!(f, "{line}")?;
    Ok(())
}

/// Runs `backflow train`.
pub fn run(args: TrainArgs) -> Result<()> {
    let t0 = Instant::now();
    let device = default_device();
    TrainBackend::seed(&device, args.seed);
    let resume_state = args.out.join(checkpoint::TRAINER_STATE);
    if args.resume && !resume_state.exists() {
        bail!(
            "--resume: no {} in {}",
            checkpoint::TRAINER_STATE,
            args.out.display()
        );
    }
    let mode = if args.full {
        TrainMode::Full
    } else {
        let rank = args.lora_rank.unwrap_or(8);
        if rank == 0 {
            bail!("--lora-rank must be positive");
        }
        let mut lc = LoraConfig::all_projections(rank);
        lc.alpha = args.lora_alpha.unwrap_or(lc.alpha);
        lc.dropout = args.lora_dropout;
        TrainMode::Lora(lc)
    };

    // A full-finetuning resume continues from the saved weights; LoRA re-reads the base.
    let weights_path = if args.resume && args.full {
        args.out.clone()
    } else {
        args.model.clone()
    };
    let mut base = BaseModel::open(&weights_path)
        .with_context(|| format!("opening {}", weights_path.display()))?;
    let cfg = base.config().clone();
    let (tok_src, stop_ids) = base.tokenizer();
    let tokenizer = tok_src.load().context("the base model's tokenizer")?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;

    // Data.
    let mut stats = DataStats::default();
    let records = data::read_records(&args.data, &mut stats)?;
    let max_len = args.max_len.min(cfg.max_seq_len);
    let mut examples = data::encode_all(
        &records,
        &template,
        &tokenizer,
        args.source,
        args.backward,
        max_len,
        &mut stats,
    );
    if examples.is_empty() {
        bail!("no usable examples: {stats:?}");
    }
    let mut held_out: Vec<Example> = Vec::new();
    if args.eval_frac > 0.0 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed ^ 0x5EED);
        examples.shuffle(&mut rng);
        let n = ((examples.len() as f64 * args.eval_frac).round() as usize)
            .clamp(1, examples.len() - 1);
        held_out = examples.split_off(examples.len() - n);
    }
    log::info!(
        "data: {} records, {} kept ({} train, {} held out), {} truncated to {max_len}, {} dropped (prompt too long), {} empty, {} malformed",
        stats.records, stats.kept, examples.len(), held_out.len(), stats.truncated, stats.prompt_too_long, stats.empty, stats.malformed
    );

    let defaults = match mode {
        TrainMode::Full => SftConfig::paper_full(0),
        TrainMode::Lora(_) => SftConfig::lora(0),
    };
    let lr = args.lr.unwrap_or(defaults.lr);
    let mut sft = SftConfig {
        lr,
        lr_end: args.lr_end.unwrap_or(if args.lr.is_some() && !args.full {
            lr / 10.0
        } else {
            defaults.lr_end.min(lr)
        }),
        weight_decay: args.weight_decay,
        batch_size: args.batch_size.max(1),
        grad_accum: args.grad_accum.max(1),
        max_grad_norm: args.max_grad_norm,
        steps: 0,
        seed: args.seed,
    };
    sft.steps = match args.steps {
        Some(s) => s,
        None => {
            let epochs = args.epochs.unwrap_or(3.0);
            ((examples.len() as f64 * epochs) / sft.effective_batch() as f64).ceil() as usize
        }
    }
    .max(1);

    let mut model: TrainLlama<TrainBackend> =
        base.with_source(|src| TrainLlama::load(cfg.clone(), src, &mode, &device))?;
    let mut start_step = 0;
    let opt_state = if args.resume {
        let st: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&resume_state)?)?;
        start_step = st["step"]
            .as_u64()
            .ok_or_else(|| anyhow!("bad {}", resume_state.display()))?
            as usize;
        if !args.full {
            Adapter::read(&args.out)?.attach(&mut model, &device)?;
        }
        Some(std::fs::read(args.out.join(checkpoint::OPTIMIZER))?)
    } else {
        if args.out.exists() {
            // A fresh run starts a fresh metrics log.
            let m = args.out.join(checkpoint::METRICS);
            if m.exists() {
                std::fs::remove_file(&m)?;
            }
        }
        None
    };
    let pad = tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0);
    let mut trainer = Trainer::new(model, sft.clone(), device);
    if let Some(state) = opt_state {
        trainer.restore(&state, start_step)?;
    }
    log::info!(
        "{} on {} ({} layers), {:?}; {} steps x {} examples, lr {:.2e} -> {:.2e}; loaded in {:.1}s",
        args.model.display(),
        crate::model::device::backend_name(),
        cfg.n_layers,
        mode,
        sft.steps,
        sft.effective_batch(),
        sft.lr,
        sft.lr_end,
        t0.elapsed().as_secs_f64()
    );

    let eval = |t: &Trainer<TrainBackend>| -> Option<(f64, usize)> {
        (!held_out.is_empty()).then(|| {
            eval_loss(
                &t.valid(),
                &held_out,
                sft.batch_size,
                pad,
                &default_device(),
            )
        })
    };
    let eval_before = if start_step == 0 {
        eval(&trainer)
    } else {
        None
    };
    if let Some((l, n)) = eval_before {
        eprintln!("held-out loss before training: {l:.4} ({n} output tokens)");
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(sft.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .map_err(|e| anyhow!("{e}"))?,
    );
    bar.set_position(start_step as u64);
    let save = |t: &Trainer<TrainBackend>, extra: serde_json::Value| -> Result<String> {
        save_checkpoint(
            &args, &mode, &cfg, &tokenizer, &tok_src, &stop_ids, t, &stats, extra,
        )
    };
    let (mut tok_total, mut secs_total) = (0usize, 0f64);
    while trainer.step < sft.steps {
        let idx = step_indices(
            examples.len(),
            trainer.step,
            sft.effective_batch(),
            sft.seed,
        );
        let micro = micro_batches(&examples, &idx, sft.batch_size, pad);
        let m = trainer.train_step(&micro);
        tok_total += m.tokens;
        secs_total += m.secs;
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} {:.0} tok/s",
            m.loss,
            m.lr,
            tok_total as f64 / secs_total.max(1e-9)
        ));
        bar.inc(1);
        append_metrics(&args.out, &serde_json::to_value(&m)?)?;
        if args.quiet {
            log::info!(
                "step {} loss {:.4} grad_norm {:.3} {:.0} tok/s",
                m.step,
                m.loss,
                m.grad_norm,
                m.tokens as f64 / m.secs.max(1e-9)
            );
        }
        if args.save_every > 0
            && trainer.step.is_multiple_of(args.save_every)
            && trainer.step < sft.steps
        {
            save(&trainer, serde_json::Value::Null)?;
        }
    }
    bar.finish();
    let eval_after = eval(&trainer);
    if let Some((l, n)) = eval_after {
        eprintln!("held-out loss after training:  {l:.4} ({n} output tokens)");
    }
    let version = save(
        &trainer,
        serde_json::json!({
            "held_out_examples": held_out.len(),
            "loss_before": eval_before.map(|e| e.0),
            "loss_after": eval_after.map(|e| e.0),
            "output_tokens": eval_after.map(|e| e.1),
        }),
    )?;
    eprintln!(
        "wrote {} (version {version}) in {:.1}s, {:.0} training tokens/s",
        args.out.display(),
        t0.elapsed().as_secs_f64(),
        tok_total as f64 / secs_total.max(1e-9)
    );
    Ok(())
}

/// Writes the checkpoint folder; returns its version (content hash of the weights).
#[allow(clippy::too_many_arguments)]
fn save_checkpoint(
    args: &TrainArgs,
    mode: &TrainMode,
    cfg: &crate::model::LlamaConfig,
    tokenizer: &Tokenizer,
    tok_src: &TokenizerSource,
    stop_ids: &[u32],
    trainer: &Trainer<TrainBackend>,
    stats: &DataStats,
    eval: serde_json::Value,
) -> Result<String> {
    let model = trainer.valid();
    let mut files: Vec<(String, Vec<u8>)> = tokenizer_files(tok_src)?;
    let base = std::fs::canonicalize(&args.model).unwrap_or_else(|_| args.model.clone());
    let (kind, weights) = match mode {
        TrainMode::Full => {
            let bytes = checkpoint::safetensors_bytes(&checkpoint::export_weights(&model)?)?;
            let eos: Vec<u32> = tokenizer
                .eos_id()
                .into_iter()
                .chain(stop_ids.iter().copied())
                .collect::<std::collections::BTreeSet<_>>()
                .into_iter()
                .collect();
            let config = checkpoint::hf_config(cfg, tokenizer.bos_id(), &eos);
            files.push((
                checkpoint::CONFIG.into(),
                serde_json::to_vec_pretty(&config)?,
            ));
            ("full", (checkpoint::WEIGHTS, bytes))
        }
        TrainMode::Lora(lc) => {
            let bytes = checkpoint::safetensors_bytes(&checkpoint::export_adapter(&model)?)?;
            files.push((
                checkpoint::ADAPTER_CONFIG.into(),
                serde_json::to_vec_pretty(&checkpoint::adapter_config(lc, &base))?,
            ));
            ("lora", (checkpoint::ADAPTER_WEIGHTS, bytes))
        }
    };
    let version = checkpoint::content_hash(&weights.1);
    files.push((weights.0.into(), weights.1));
    let meta = serde_json::json!({
        "version": version,
        "kind": kind,
        "base_model": base,
        "step": trainer.step,
        "sft": trainer.cfg,
        "lora": match mode { TrainMode::Lora(lc) => serde_json::to_value(lc)?, TrainMode::Full => serde_json::Value::Null },
        "backward": args.backward,
        "source": args.source,
        "data": args.data,
        "data_stats": stats,
        "max_len": args.max_len,
        "eval": eval,
    });
    files.push((checkpoint::META.into(), serde_json::to_vec_pretty(&meta)?));
    files.push((
        checkpoint::TRAINER_STATE.into(),
        serde_json::to_vec_pretty(&serde_json::json!({"step": trainer.step}))?,
    ));
    files.push((checkpoint::OPTIMIZER.into(), trainer.optimizer_state()?));
    checkpoint::write_folder_atomic(&args.out, &files, &[checkpoint::METRICS])?;
    Ok(version)
}
