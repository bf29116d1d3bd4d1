//! `backflow export --model PATH --out DIR`: a GGUF file, an HF folder or a LoRA adapter folder
//! (merged onto its base) written as a Hugging Face folder; see [`crate::train::export`].

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Flags of `backflow export`.
#[derive(Args, Debug, Clone)]
pub struct ExportArgs {
    /// A GGUF file, a Hugging Face folder, or an adapter folder (`backflow train` without --full).
    #[arg(long, env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// The HF folder to write (replaced atomically).
    #[arg(long)]
    pub out: PathBuf,
}

/// Runs `backflow export`.
pub fn run(args: ExportArgs) -> Result<()> {
    let done = crate::train::export::export_hf(&args.model, &args.out).with_context(|| {
        format!(
            "exporting {} to {}",
            args.model.display(),
            args.out.display()
        )
    })?;
    eprintln!(
        "wrote {} ({} tensors, {:.1} MB f32{}, version {})",
        done.out.display(),
        done.tensors,
        done.weight_bytes as f64 / 1e6,
        if done.merged_adapter {
            ", adapter merged"
        } else {
            ""
        },
        done.version
    );
    Ok(())
}
