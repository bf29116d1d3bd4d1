//! `backflow export --model PATH --out PATH [--format hf|gguf] [--outtype f32|f16|q8_0]`: a GGUF
//! file, an HF folder or a LoRA adapter folder (merged onto its base) written as a Hugging Face
//! folder ([`crate::train::export`]) or as one GGUF file ([`crate::train::export_gguf`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};

use crate::train::export_gguf::GgufOutType;

/// What `backflow export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A Hugging Face folder (config.json, model.safetensors in f32, tokenizer.json).
    Hf,
    /// One GGUF file for llama.cpp, Ollama, LM Studio (weights in --outtype).
    Gguf,
}

/// Flags of `backflow export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// A GGUF file, a Hugging Face folder, or an adapter folder (`backflow train` without --full).
    #[arg(long, env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// The HF folder or GGUF file to write (replaced only once complete).
    #[arg(long)]
    pub out: PathBuf,
    /// The output format (default: gguf when --out ends in .gguf, else hf).
    #[arg(long, value_enum)]
    pub format: Option<ExportFormat>,
    /// Weight type of a GGUF export (norms and biases stay f32, as llama.cpp's converter keeps
    /// them; q8_0 falls back to f16 for rows that do not split into blocks of 32).
    #[arg(long, value_enum, default_value = "f16")]
    pub outtype: GgufOutType,
}

/// Runs `backflow export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let format = args.format.unwrap_or_else(|| {
        if args.out.extension().is_some_and(|e| e == "gguf") {
            ExportFormat::Gguf
        } else {
            ExportFormat::Hf
        }
    });
    let done = match format {
        ExportFormat::Hf => crate::train::export::export_hf(&args.model, &args.out),
        ExportFormat::Gguf => {
            crate::train::export_gguf::export_gguf(&args.model, &args.out, args.outtype)
        }
    }
    .with_context(|| {
        format!(
            "exporting {} to {}",
            args.model.display(),
            args.out.display()
        )
    })?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB {}{}, version {})",
        done.out.display(),
        done.tensors,
        done.weight_bytes as f64 / 1e6,
        match format {
            ExportFormat::Hf => "f32".to_string(),
            ExportFormat::Gguf => format!("{:?}", args.outtype).to_lowercase(),
        },
        if done.merged_adapter {
            ", adapter merged"
        } else {
            ""
        },
        done.version
    );
    Ok(())
}
