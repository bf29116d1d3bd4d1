//! The OpenAI API's request and response bodies, as far as `backflow serve` implements them
//! (field names and shapes from the API reference; fields backflow does not use are ignored on
//! the way in and not written on the way out).

use serde::{Deserialize, Serialize};

use crate::model::chat::{Message, Role};

/// A message's `content`: a string, or an array of parts of which the `text` ones count.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Typed parts (`{"type": "text", "text": ...}`); other part types are refused.
    Parts(Vec<ContentPart>),
}

/// One part of an array `content`.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// `text` (the only kind a text model takes).
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    #[serde(default)]
    pub text: Option<String>,
}

/// One message of a chat request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer` (read as system), `user` or `assistant`.
    pub role: String,
    /// What is said.
    pub content: Option<Content>,
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several (the API allows up to 4).
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings, empty ones left out.
    pub fn strings(&self) -> Vec<String> {
        let all = match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        };
        all.into_iter().filter(|s| !s.is_empty()).collect()
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with the usage before `[DONE]`.
    #[serde(default)]
    pub include_usage: bool,
}

/// What `/v1/chat/completions` and `/v1/completions` share.
#[derive(Debug, Clone, Deserialize)]
pub struct Sampling {
    /// The model's id (`/v1/models`).
    #[serde(default)]
    pub model: Option<String>,
    /// Most new tokens (`max_tokens`, or the newer `max_completion_tokens`).
    #[serde(default, alias = "max_completion_tokens")]
    pub max_tokens: Option<usize>,
    /// Softmax temperature (the API's default: 1).
    #[serde(default)]
    pub temperature: Option<f32>,
    /// Nucleus mass (default 1).
    #[serde(default)]
    pub top_p: Option<f32>,
    /// Seed of the sampler (default: a fresh one per request).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Answers wanted (only 1 is served).
    #[serde(default)]
    pub n: Option<usize>,
    /// Server-sent events instead of one body.
    #[serde(default)]
    pub stream: bool,
    /// Options of a stream.
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// Strings that end the answer (not included in it).
    #[serde(default)]
    pub stop: Option<Stop>,
}

/// A `/v1/chat/completions` request.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Model, length, sampling, streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl ChatRequest {
    /// The conversation as the model server takes it, or why it cannot be.
    pub fn messages(&self) -> Result<Vec<Message>, String> {
        if self.messages.is_empty() {
            return Err("`messages` is empty".into());
        }
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let role = match m.role.as_str() {
                    "system" | "developer" => Role::System,
                    "user" => Role::User,
                    "assistant" => Role::Assistant,
                    other => return Err(format!("messages[{i}]: role {other:?} is not served")),
                };
                let content = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for p in parts {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                (kind, _) => {
                                    return Err(format!(
                                        "messages[{i}]: a {kind:?} part (only text is served)"
                                    ))
                                }
                            }
                        }
                        text
                    }
                };
                Ok(Message { role, content })
            })
            .collect()
    }
}

/// `prompt` of a completions request: a string, or an array holding one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// The prompt.
    One(String),
    /// Several prompts (only one is served).
    Many(Vec<String>),
}

/// A `/v1/completions` request.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// The raw prompt.
    pub prompt: Prompt,
    /// Model, length, sampling, streaming.
    #[serde(flatten)]
    pub sampling: Sampling,
}

impl CompletionRequest {
    /// The one prompt, or why there is not exactly one.
    pub fn prompt(&self) -> Result<String, String> {
        match &self.prompt {
            Prompt::One(p) => Ok(p.clone()),
            Prompt::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            Prompt::Many(v) => Err(format!(
                "{} prompts in one request: send one per request (they are batched together)",
                v.len()
            )),
        }
    }
}

/// Token counts of an answer.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct Usage {
    /// Tokens of the prompt (chat template included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// The assistant's message in a chat answer or a stream delta.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Delta {
    /// `assistant` (first chunk of a stream, and every whole answer).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// One choice of a chat answer (`message`) or chunk (`delta`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatChoice {
    /// Always 0 (one answer per request).
    pub index: usize,
    /// The whole answer (`chat.completion`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<Delta>,
    /// The new text (`chat.completion.chunk`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<Delta>,
    /// `stop` or `length`; `null` in a stream until the last chunk.
    pub finish_reason: Option<String>,
}

/// A chat answer or stream chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatResponse {
    /// `chatcmpl-N`.
    pub id: String,
    /// `chat.completion` or `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
    /// The one choice (none in a usage-only last chunk).
    pub choices: Vec<ChatChoice>,
    /// Token counts (whole answers; a stream's last chunk when asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One choice of a completions answer or chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextChoice {
    /// Always 0.
    pub index: usize,
    /// The (new) text.
    pub text: String,
    /// Not computed: always `null`.
    pub logprobs: Option<()>,
    /// `stop` or `length`; `null` in a stream until the last chunk.
    pub finish_reason: Option<String>,
}

/// A completions answer or stream chunk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextResponse {
    /// `cmpl-N`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// The model's id.
    pub model: String,
    /// The one choice.
    pub choices: Vec<TextChoice>,
    /// Token counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// One entry of `/v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelEntry {
    /// The id requests name it by.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix seconds when it was loaded.
    pub created: u64,
    /// `backflow`.
    pub owned_by: String,
}

/// `/v1/models`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models served.
    pub data: Vec<ModelEntry>,
}

/// An error body: `{"error": {"message", "type", "code"}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// For people.
    pub message: String,
    /// `invalid_request_error`, `server_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// A machine-readable code (`model_not_found`, `server_busy`), when there is one.
    pub code: Option<String>,
}
