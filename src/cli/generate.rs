//! `backflow generate`: one completion from a GGUF file or a Hugging Face folder. Prints only
//! the generated text on stdout; logs go to stderr.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, Context, Result};
use clap::Args;

use crate::model::chat::{ChatTemplate, Message};
use crate::model::device::{default_device, DefaultBackend};
use crate::model::{Generator, Precision, Request, Sampling};

/// Flags of `backflow generate`.
#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// A GGUF file, or a Hugging Face folder (config.json, model.safetensors, tokenizer.json).
    #[arg(long, env = "BACKFLOW_MODEL")]
    pub model: PathBuf,
    /// The user's message (or, with --raw, the whole prompt).
    #[arg(long)]
    pub prompt: String,
    /// A system prompt (default: the chat template's own, if it has one).
    #[arg(long)]
    pub system: Option<String>,
    /// Feed the prompt as given, without the chat template; special tokens written in it
    /// (`<|im_start|>`) are parsed.
    #[arg(long)]
    pub raw: bool,
    /// The prompt is a response (a web passage): ask a backward model M_yx for the instruction
    /// it answers, in the conversation M_yx is trained on (`train --backward`, the pipeline's
    /// augment step).
    #[arg(long, conflicts_with_all = ["raw", "system"])]
    pub backward: bool,
    /// Most tokens to generate.
    #[arg(value_parser = crate::cli::values::at_least_one, long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(value_parser = crate::cli::values::temperature, long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(value_parser = crate::cli::values::top_p, long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Weight format: native (a GGUF's own 4/5-bit blocks where backflow has a kernel for them,
    /// 8-bit blocks for the rest; the CPU default), q8 (8-bit blocks), f32 (the CUDA default),
    /// f16/bf16 (for CUDA; on CPU only the block formats and f32 have the fast paths).
    #[arg(long, value_enum, default_value_t = Precision::backend_default())]
    pub dtype: Precision,
}

/// Runs `backflow generate`.
pub fn run(args: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let device = default_device();
    let ck =
        crate::train::load::load_for_inference::<DefaultBackend>(&args.model, &device, args.dtype)
            .with_context(|| format!("loading {}", args.model.display()))?;
    let tokenizer = ck
        .tokenizer
        .load()
        .with_context(|| format!("the tokenizer of {}", args.model.display()))?;
    log::info!(
        "loaded {} ({:?}, {} layers) on {} in {} in {:.1}s",
        args.model.display(),
        ck.model.config().arch,
        ck.model.config().n_layers,
        crate::model::device::backend_name(),
        args.dtype,
        t0.elapsed().as_secs_f64()
    );

    let mut stop_ids = ck.stop_ids.clone();
    let prompt_ids = if args.raw {
        tokenizer.encode_prompt(&args.prompt, true)
    } else {
        let template = ChatTemplate::for_tokenizer(&tokenizer)?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::system(system.clone()));
        }
        if args.backward {
            messages.extend(crate::humpback::prompts::augment_messages(&args.prompt));
        } else {
            messages.push(Message::user(args.prompt.clone()));
        }
        stop_ids.extend(template.stop_tokens(&tokenizer));
        template.encode(&tokenizer, &messages, true)
    };
    stop_ids.sort_unstable();
    stop_ids.dedup();
    log::info!("prompt: {} tokens", prompt_ids.len());

    let mut generator = Generator::new(ck.model, stop_ids);
    let request = Request {
        then_choose: None,
        prompt_ids,
        max_new_tokens: args.max_tokens,
        sampling: Sampling {
            temperature: args.temperature,
            top_p: args.top_p,
            seed: args.seed,
        },
        stop_ids: Vec::new(),
    };
    let t1 = Instant::now();
    let completion = generator
        .generate(std::slice::from_ref(&request))?
        .pop()
        .ok_or_else(|| anyhow!("no completion"))?;
    let secs = t1.elapsed().as_secs_f64();
    log::info!(
        "{} tokens in {:.2}s ({:.1} tok/s), stop: {:?}",
        completion.ids.len(),
        secs,
        completion.ids.len() as f64 / secs.max(1e-9),
        completion.stop
    );
    println!("{}", tokenizer.decode(&completion.ids));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_from_the_real_model() {
        let Some(home) = std::env::var_os("HOME") else {
            return;
        };
        let model =
            PathBuf::from(home).join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !model.exists() {
            eprintln!("skipped: {} is absent", model.display());
            return;
        }
        let args = GenerateArgs {
            model,
            prompt: "Say hi.".into(),
            system: Some("You are terse.".into()),
            raw: false,
            backward: false,
            max_tokens: 4,
            temperature: 0.7,
            top_p: 0.9,
            seed: 3,
            dtype: Precision::F32,
        };
        run(args.clone()).expect("chat mode");
        run(GenerateArgs {
            raw: true,
            prompt: "<|im_start|>user\nHi<|im_end|>\n".into(),
            ..args.clone()
        })
        .expect("raw mode");
        run(GenerateArgs {
            backward: true,
            system: None,
            prompt: "Paris is the capital and largest city of France.".into(),
            ..args.clone()
        })
        .expect("backward mode");
        let missing = GenerateArgs {
            model: PathBuf::from("/nonexistent/model.gguf"),
            ..args
        };
        assert!(run(missing).is_err());
    }
}
