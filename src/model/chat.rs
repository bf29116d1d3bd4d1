//! Chat templates: turn a conversation into the prompt text a chat model was trained on.
//!
//! Checkpoints ship their template as Jinja source (GGUF `tokenizer.chat_template`, Hugging Face
//! `tokenizer_config.json`). Rather than embedding a Jinja engine, the template is recognised by
//! its markers and rendered by the matching hand-written format, as llama.cpp's
//! `llm_chat_detect_template` does; `tests/tokenizer.rs` checks the rendering against the real
//! template evaluated by Python's `jinja2`. A model's built-in default system prompt (SmolLM2:
//! "You are a helpful AI assistant named SmolLM, trained by Hugging Face") is read out of the
//! template and used when a conversation has no system message, exactly as the template would.

use crate::model::tokenizer::Tokenizer;

/// Errors of chat template detection.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The checkpoint has no chat template and its vocabulary suggests none.
    #[error("the model has no chat template")]
    NoTemplate,
    /// A template whose format this crate does not know.
    #[error("unrecognised chat template (known: ChatML, Llama 2, Llama 3): {0:.120}")]
    Unrecognized(String),
}

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// The role's name in templates.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

impl Message {
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Message {
            role: Role::System,
            content: content.into(),
        }
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Message {
            role: Role::User,
            content: content.into(),
        }
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Message {
            role: Role::Assistant,
            content: content.into(),
        }
    }
}

/// The prompt formats this crate renders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatFormat {
    /// `<|im_start|>role\ncontent<|im_end|>\n` (SmolLM2, Qwen2).
    ChatMl,
    /// `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s>` (Llama 2, Mistral).
    Llama2,
    /// `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>` (Llama 3).
    Llama3,
}

/// A chat format with the model's default system prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    format: ChatFormat,
    default_system: Option<String>,
}

impl ChatTemplate {
    /// A template of `format` with an optional default system prompt.
    pub fn new(format: ChatFormat, default_system: Option<String>) -> Self {
        ChatTemplate {
            format,
            default_system,
        }
    }

    /// Recognises a Jinja chat template by its markers and reads its default system prompt.
    pub fn from_jinja(template: &str) -> Result<Self, ChatError> {
        let format = if template.contains("<|im_start|>") {
            ChatFormat::ChatMl
        } else if template.contains("<|start_header_id|>") {
            ChatFormat::Llama3
        } else if template.contains("[INST]") {
            ChatFormat::Llama2
        } else {
            return Err(ChatError::Unrecognized(template.to_string()));
        };
        let default_system = match format {
            ChatFormat::ChatMl => literal_between(template, "<|im_start|>system", "<|im_end|>"),
            // Llama 2 and 3 templates carry no literal default system prompt in practice.
            ChatFormat::Llama2 | ChatFormat::Llama3 => None,
        };
        Ok(ChatTemplate::new(format, default_system))
    }

    /// The template of a tokenizer's model: its own chat template, or ChatML when it has none
    /// but its vocabulary has `<|im_start|>`.
    pub fn for_tokenizer(tokenizer: &Tokenizer) -> Result<Self, ChatError> {
        match tokenizer.chat_template() {
            Some(t) => Self::from_jinja(t),
            None if tokenizer.token_to_id("<|im_start|>").is_some() => {
                Ok(ChatTemplate::new(ChatFormat::ChatMl, None))
            }
            None => Err(ChatError::NoTemplate),
        }
    }

    /// The format.
    pub fn format(&self) -> ChatFormat {
        self.format
    }

    /// The system prompt used when a conversation has none.
    pub fn default_system(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// Replaces the default system prompt (`None`: no system turn unless a message has one).
    pub fn with_default_system(mut self, system: Option<String>) -> Self {
        self.default_system = system;
        self
    }

    /// Renders `messages` as prompt text, ending with the assistant's header when
    /// `add_generation_prompt`. Encode the result with `parse_special = true` and without an
    /// extra BOS ([`ChatTemplate::encode`] does both): the text already has the special tokens
    /// the template writes, BOS included where the format has one.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> String {
        let mut system = self.default_system.as_deref();
        let mut rest = messages;
        if let Some(first) = messages.first() {
            if first.role == Role::System {
                system = Some(first.content.as_str());
                rest = &messages[1..];
            }
        }
        let mut out = String::new();
        match self.format {
            ChatFormat::ChatMl => {
                let turn = |out: &mut String, role: &str, content: &str| {
                    out.push_str("<|im_start|>");
                    out.push_str(role);
                    out.push('\n');
                    out.push_str(content);
                    out.push_str("<|im_end|>\n");
                };
                if let Some(s) = system {
                    turn(&mut out, "system", s);
                }
                for m in rest {
                    turn(&mut out, m.role.as_str(), &m.content);
                }
                if add_generation_prompt {
                    out.push_str("<|im_start|>assistant\n");
                }
            }
            ChatFormat::Llama2 => {
                for (i, m) in rest.iter().enumerate() {
                    let content = match (i, system) {
                        (0, Some(s)) => format!("<<SYS>>\n{s}\n<</SYS>>\n\n{}", m.content),
                        _ => m.content.clone(),
                    };
                    match m.role {
                        Role::Assistant => {
                            out.push(' ');
                            out.push_str(content.trim());
                            out.push_str(" </s>");
                        }
                        Role::User | Role::System => {
                            out.push_str("<s>[INST] ");
                            out.push_str(content.trim());
                            out.push_str(" [/INST]");
                        }
                    }
                }
            }
            ChatFormat::Llama3 => {
                out.push_str("<|begin_of_text|>");
                let turn = |out: &mut String, role: &str, content: &str| {
                    out.push_str("<|start_header_id|>");
                    out.push_str(role);
                    out.push_str("<|end_header_id|>\n\n");
                    out.push_str(content.trim());
                    out.push_str("<|eot_id|>");
                };
                if let Some(s) = system {
                    turn(&mut out, "system", s);
                }
                for m in rest {
                    turn(&mut out, m.role.as_str(), &m.content);
                }
                if add_generation_prompt {
                    out.push_str("<|start_header_id|>assistant<|end_header_id|>\n\n");
                }
            }
        }
        out
    }

    /// Renders and encodes a conversation: the ids to feed the model.
    pub fn encode(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Vec<u32> {
        tokenizer.encode(&self.render(messages, add_generation_prompt), true)
    }

    /// The texts of the tokens that end an assistant turn in this format.
    pub fn stop_strings(&self) -> &'static [&'static str] {
        match self.format {
            ChatFormat::ChatMl => &["<|im_end|>", "<|endoftext|>"],
            ChatFormat::Llama2 => &["</s>"],
            ChatFormat::Llama3 => &["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
        }
    }

    /// The ids that end generation: the format's stop tokens present in the vocabulary, and
    /// the tokenizer's EOS; sorted, without duplicates.
    pub fn stop_tokens(&self, tokenizer: &Tokenizer) -> Vec<u32> {
        let mut ids: Vec<u32> = self
            .stop_strings()
            .iter()
            .filter_map(|s| tokenizer.token_to_id(s))
            .chain(tokenizer.eos_id())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The first literal text in `template` between `open` + a newline and `close`: a default
/// system prompt written into the template. Jinja expressions (`'`, `{`, `+`) are not literals.
fn literal_between(template: &str, open: &str, close: &str) -> Option<String> {
    let mut search = template;
    while let Some(at) = search.find(open) {
        let after = &search[at + open.len()..];
        // The newline after the role is a real newline or a `\n` escape inside a Jinja string.
        let body = after
            .strip_prefix('\n')
            .or_else(|| after.strip_prefix("\\n"));
        if let Some(body) = body {
            if let Some(end) = body.find(close) {
                let text = &body[..end];
                if !text.is_empty() && !text.contains(['\'', '"', '{', '}', '+']) {
                    return Some(text.replace("\\n", "\n"));
                }
            }
        }
        search = after;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's template, as stored in its GGUF.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn smollm2_template_is_chatml_with_its_default_system() {
        let t = ChatTemplate::from_jinja(SMOLLM2).map_err(|e| e.to_string());
        let t = t.as_ref().map_err(|e| e.as_str());
        assert_eq!(t.map(ChatTemplate::format), Ok(ChatFormat::ChatMl));
        assert_eq!(
            t.ok().and_then(ChatTemplate::default_system),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
    }

    #[test]
    fn chatml_render_inserts_the_default_system() {
        let t = ChatTemplate::new(ChatFormat::ChatMl, Some("S".into()));
        assert_eq!(
            t.render(&[Message::user("hi")], true),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&[Message::system("X"), Message::user("hi")], false),
            "<|im_start|>system\nX<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
        );
    }

    #[test]
    fn llama2_render() {
        let t =
            ChatTemplate::from_jinja("{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}");
        let t = match t {
            Ok(t) => t,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(
            t.render(
                &[
                    Message::system("S"),
                    Message::user("Q1 "),
                    Message::assistant("A1"),
                    Message::user("Q2")
                ],
                true
            ),
            "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]"
        );
    }

    #[test]
    fn unknown_templates_are_refused() {
        assert!(ChatTemplate::from_jinja("{{ messages }}").is_err());
    }
}
