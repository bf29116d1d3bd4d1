//! What flows between the operators and the server: requests, forced choices, answers, and the
//! commands of the server's channel.

use super::ServeError;
use crate::model::chat::Message;
use crate::model::sampling::Sampling;
use crate::model::tokenizer::Tokenizer;
use crossbeam_channel::Sender;
use std::path::PathBuf;
use timely::scheduling::SyncActivator;

/// What is asked of a model: a conversation, how to answer it, and any forced choice. Operators
/// and the evaluation build these; the server's channel carries them in a [`GenRequest`].
#[derive(Clone, Debug)]
pub struct Ask {
    /// The model version to use (as loaded with [`ModelServer::load`]).
    ///
    /// [`ModelServer::load`]: super::ModelServer::load
    pub model: String,
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<Message>,
    /// Instead of `messages`: the whole prompt as text, fed as it is without the chat template
    /// (special tokens written in it are parsed; BOS first when the vocabulary asks for it), as
    /// an OpenAI `/v1/completions` request is.
    pub raw_prompt: Option<String>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Sampling (seed included: the same request gives the same answer on any process).
    pub sampling: Sampling,
    /// Instead of generating, pick one of a few one-token answers (see [`Choice`]).
    pub choose: Option<Choice>,
    /// Generate, then make this choice right after the answer, from the answer's own KV cache
    /// ([`GenAnswer::choice`]): the choice of [`Ask::choose`] at the cost of a few decode steps
    /// instead of a second prefill of the whole conversation.
    pub choose_after: Option<Choice>,
}

/// One request on the server's channel: an [`Ask`], and where and to whom its answer goes.
pub struct GenRequest {
    /// The caller's id for this request, returned with the answer.
    pub ticket: u64,
    /// What is asked.
    pub ask: Ask,
    /// Where the answer goes.
    pub reply: Sender<GenAnswer>,
    /// Woken when the answer is sent.
    pub wake: Option<SyncActivator>,
    /// Where the answer's text goes as it is generated, piece by piece (whole characters, no
    /// special tokens); the full answer still comes on `reply`. An answer from the cache comes
    /// only on `reply`.
    pub stream: Option<Sender<String>>,
}

/// A forced choice: the prompt is the conversation with the assistant's turn opened and `prefill`
/// written into it; the answer is whichever of `options` (each one token) the model finds most
/// likely next. One forward pass, no sampling: how a rating is read from a model too small to
/// write its own `Score: N` line.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice {
    /// Text the assistant's turn starts with (e.g. its own reasoning, then `Score: `).
    pub prefill: String,
    /// The answers to pick from, each exactly one token (e.g. `1`..`5`).
    pub options: Vec<String>,
}

impl Ask {
    /// The prompt's ids for a model with `template` and `tokenizer`.
    pub(super) fn prompt_ids(
        &self,
        template: &crate::model::chat::ChatTemplate,
        tokenizer: &Tokenizer,
    ) -> Vec<u32> {
        match &self.raw_prompt {
            Some(text) => tokenizer.encode_prompt(text, true),
            None => template.encode(tokenizer, &self.messages, true),
        }
    }

    /// The conversation the answer cache keys this request by: `messages`, or for a raw prompt
    /// a turn no chat could contain (NUL-tagged) holding it.
    pub(super) fn cache_messages(&self) -> Vec<Message> {
        match &self.raw_prompt {
            Some(text) => vec![Message::user(format!("\u{0}raw\u{0}{text}"))],
            None => self.messages.clone(),
        }
    }
}

impl Choice {
    /// The conversation the answer cache keys this choice by: the request's, plus `tag`, the
    /// prefill and the options as a last turn no chat could contain (NUL-separated).
    pub(super) fn cache_messages(&self, messages: &[Message], tag: &str) -> Vec<Message> {
        let mut m = messages.to_vec();
        m.push(Message::assistant(format!(
            "\u{0}{tag}\u{0}{}\u{0}{}",
            self.prefill,
            self.options.join("\u{0}")
        )));
        m
    }

    /// The option ids, each exactly one token, or why not.
    pub(super) fn option_ids(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, GenError> {
        self.options
            .iter()
            .map(|o| match tokenizer.encode(o, false).as_slice() {
                [id] if !o.contains('\u{0}') => Ok(*id),
                [_] => Err(GenError::BadChoice(format!(
                    "choice option {o:?} contains NUL"
                ))),
                other => Err(GenError::BadChoice(format!(
                    "choice option {o:?} is {} tokens, not one",
                    other.len()
                ))),
            })
            .collect()
    }
}

/// Why a request got no answer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GenError {
    /// The server thread is gone.
    #[error("the model server has stopped")]
    Stopped,
    /// The request named a version the server has not loaded.
    #[error("model version {0} is not loaded")]
    NotLoaded(String),
    /// A choice that is not well defined: an option that is not exactly one token.
    #[error("{0}")]
    BadChoice(String),
    /// The choice had no option to pick.
    #[error("no option to choose from")]
    NoOption,
    /// The model failed on the batch (its error, as text: model errors are not `Clone`).
    #[error("the model failed: {0}")]
    Model(String),
}

/// The answer to one [`GenRequest`].
#[derive(Clone, Debug)]
pub struct GenAnswer {
    /// The request's ticket.
    pub ticket: u64,
    /// The generated text, or why there is none.
    pub result: Result<String, GenError>,
    /// With [`Ask::choose_after`]: the option picked after the answer (`None` when the
    /// context had no room for the choice, or not asked); with [`Ask::choose`], the
    /// option picked (also the `result`).
    pub choice: Option<String>,
    /// With `choice`: each option's probability, in the order of [`Choice::options`], under
    /// the model's whole next-token distribution (the probability-weighted scores of G-Eval
    /// and a judge's verdict probabilities are read from these).
    pub choice_probs: Option<Vec<f32>>,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub new_tokens: usize,
}

/// What clients send the server thread.
pub(super) enum Command {
    /// Load a checkpoint as a version.
    Load {
        /// The version.
        version: String,
        /// The checkpoint.
        path: PathBuf,
        /// Told when it is loaded, or why not.
        done: Sender<Result<(), ServeError>>,
    },
    /// Answer a request (boxed: a request is several times the size of a load).
    Generate(Box<GenRequest>),
}
