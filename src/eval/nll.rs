//! Reference likelihood: the mean negative log-likelihood per output token that a model gives
//! the reference answers of the prompts, computed exactly as the training loss is (the same
//! chat template, system prompt, masking of everything but the assistant's tokens and its end
//! of turn, truncation at `max_len`), so it is comparable with the held-out loss of
//! `backflow train`.

use crate::eval::data::EvalPrompt;
use crate::model::chat::{ChatTemplate, Message};
use crate::train::data::{encode, Example, Skip};
use crate::train::sft::eval_loss;
use anyhow::{Context, Result};
use burn::backend::Flex;
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The reference NLL of one model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReferenceNll {
    /// Mean NLL per target token (nats), over every target token of every example.
    pub nll: f64,
    /// Target tokens.
    pub tokens: usize,
    /// Prompts with a reference answer that were scored.
    pub examples: usize,
    /// Prompts with a reference answer left out (the prompt alone fills `max_len`).
    pub skipped: usize,
}

/// The conversation whose assistant turn is scored: `system` (none: the template's default),
/// the prompt's user text, its reference answer. `None` without a reference answer.
pub fn reference_messages(p: &EvalPrompt, system: Option<&str>) -> Option<Vec<Message>> {
    let output = p.output.as_ref().filter(|o| !o.trim().is_empty())?;
    let mut m: Vec<Message> = system.map(Message::system).into_iter().collect();
    m.push(Message::user(p.user_text()));
    m.push(Message::assistant(output.clone()));
    Some(m)
}

/// The reference NLL of the model at `path` (GGUF, HF folder, adapter folder) over the prompts
/// that carry an answer; `None` when none does.
pub fn reference_nll(
    path: &Path,
    prompts: &[EvalPrompt],
    system: Option<&str>,
    max_len: usize,
    batch: usize,
) -> Result<Option<ReferenceNll>> {
    let conversations: Vec<Vec<Message>> = prompts
        .iter()
        .filter_map(|p| reference_messages(p, system))
        .collect();
    if conversations.is_empty() {
        return Ok(None);
    }
    let device = Default::default();
    let (model, tokenizer) = crate::train::checkpoint::load_for_loss::<Flex>(path, &device)
        .with_context(|| format!("loading {} for the reference NLL", path.display()))?;
    let tokenizer = tokenizer
        .load()
        .with_context(|| format!("the tokenizer of {}", path.display()))?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;
    let mut examples: Vec<Example> = Vec::with_capacity(conversations.len());
    let mut skipped = 0;
    for m in &conversations {
        match encode(&template, &tokenizer, m, max_len) {
            Ok((ex, _truncated)) => examples.push(ex),
            Err(Skip::Empty | Skip::PromptTooLong) => skipped += 1,
        }
    }
    // As training pads.
    let vocab = model.config().vocab;
    let pad = crate::train::data::pad_id(&tokenizer, vocab);
    crate::train::data::check_vocab(&examples, vocab)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("the reference NLL of {}", path.display()))?;
    Ok(Some(nll_of_examples(
        &model, &examples, batch, pad, &device, skipped,
    )))
}

/// The NLL of already tokenized examples (see [`reference_nll`]).
pub fn nll_of_examples<B: burn::tensor::backend::Backend>(
    model: &crate::train::model::TrainLlama<B>,
    examples: &[Example],
    batch: usize,
    pad: u32,
    device: &B::Device,
    skipped: usize,
) -> ReferenceNll {
    let (nll, tokens) = eval_loss(model, examples, batch.max(1), pad, device);
    ReferenceNll {
        nll,
        tokens,
        examples: examples.len(),
        skipped,
    }
}
