//! Training data: reading instruction data in the common formats, tagging it as the Humpback
//! paper does, reversing it for the backward model, and tokenizing it with the model's chat
//! template into (ids, trained-token mask) examples.
//!
//! Formats (detected per record, so files may mix them):
//! - Alpaca: `{"instruction", "input", "output"}` (JSON array or JSONL); a non-empty `input` is
//!   appended to the instruction after a blank line, as Alpaca's own prompt does.
//! - Self-Instruct seed tasks: `{"instruction", "instances": [{"input", "output"}]}`: one pair
//!   per instance.
//! - Conversations: `{"messages": [{"role", "content"}]}` (ChatML / OpenAI style) or ShareGPT
//!   `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`.
//!
//! Max-length policy: an example whose prompt (everything before the first trained token)
//! alone reaches `max_len` is dropped (it would teach nothing); otherwise it is truncated to
//! `max_len` tokens, cutting the end of the output. Both are counted in [`DataStats`].

use std::path::Path;

use serde_json::Value;

use crate::model::chat::{ChatTemplate, Message, Role};
use crate::model::tokenizer::Tokenizer;

use super::TrainError;

/// System prompt of seed examples (paper: tag S_a).
pub const SEED_TAG: &str = "Answer in the style of an AI Assistant.";
/// System prompt of self-augmented examples (paper: tag S_w).
pub const AUGMENTED_TAG: &str = "Answer with knowledge from web search.";
/// The backward model's instruction (Back-and-Forth Translation, same group as Humpback); the
/// response follows it, then [`SEED_TAG`].
pub const BACKWARD_PROMPT: &str = "Below is a candidate answer to a question or instruction from an user. Write the most likely question to which the text below would be a great answer.";

/// Where training pairs come from: decides the system-prompt tag.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum DataSource {
    /// Human-written seed data: system prompt [`SEED_TAG`].
    Seed,
    /// Backtranslated, curated web data: system prompt [`AUGMENTED_TAG`].
    Augmented,
    /// No tag: the template's default system prompt, or the data's own.
    Untagged,
}

impl DataSource {
    /// The system prompt of this source.
    pub fn tag(self) -> Option<&'static str> {
        match self {
            DataSource::Seed => Some(SEED_TAG),
            DataSource::Augmented => Some(AUGMENTED_TAG),
            DataSource::Untagged => None,
        }
    }
}

/// One training record as read.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// An (instruction, output) pair.
    Pair {
        /// The instruction (with its input appended).
        instruction: String,
        /// The response.
        output: String,
    },
    /// A conversation; every assistant turn is trained.
    Chat(Vec<Message>),
}

/// The user message that asks the backward model M_yx for the instruction of `output`.
pub fn backward_prompt(output: &str) -> String {
    format!("{BACKWARD_PROMPT}\n\n{}\n\n{SEED_TAG}", output.trim())
}

impl Record {
    /// An (instruction, output) pair.
    pub fn pair(instruction: &str, output: &str) -> Record {
        Record::Pair {
            instruction: instruction.to_owned(),
            output: output.to_owned(),
        }
    }

    /// The first (user, assistant) exchange: the pair a backward model is trained on.
    fn first_pair(&self) -> Option<(&str, &str)> {
        match self {
            Record::Pair {
                instruction,
                output,
            } => Some((instruction, output)),
            Record::Chat(m) => {
                let u = m.iter().position(|m| m.role == Role::User)?;
                let a = m[u..].iter().find(|m| m.role == Role::Assistant)?;
                Some((&m[u].content, &a.content))
            }
        }
    }

    /// The conversation to train on. Forward: the record with `source`'s tag as system prompt
    /// (a conversation's own system prompt wins). Backward (`M_yx`): the output in
    /// [`backward_prompt`] as the user turn, the instruction as the answer, no tag.
    pub fn to_messages(&self, source: DataSource, backward: bool) -> Option<Vec<Message>> {
        if backward {
            let (instruction, output) = self.first_pair()?;
            return Some(vec![
                Message::user(backward_prompt(output)),
                Message::assistant(instruction.trim()),
            ]);
        }
        let mut out = Vec::new();
        match self {
            Record::Pair {
                instruction,
                output,
            } => {
                out.extend(source.tag().map(Message::system));
                out.push(Message::user(instruction.clone()));
                out.push(Message::assistant(output.clone()));
            }
            Record::Chat(m) => {
                if m.first().map(|m| m.role) != Some(Role::System) {
                    out.extend(source.tag().map(Message::system));
                }
                out.extend(m.iter().cloned());
            }
        }
        Some(out)
    }
}

/// Counts of the data pipeline, reported by `backflow train`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataStats {
    /// Records read (a seed task with n instances counts n).
    pub records: usize,
    /// Lines or array items that were not a record of a known format.
    pub malformed: usize,
    /// Records without a non-empty output / assistant turn.
    pub empty: usize,
    /// Dropped: the prompt alone reaches the max length.
    pub prompt_too_long: usize,
    /// Kept but truncated to the max length.
    pub truncated: usize,
    /// Examples kept.
    pub kept: usize,
}

/// Parses one JSON value into records (several for a multi-instance seed task).
pub fn parse_value(v: &Value) -> Option<Vec<Record>> {
    let s = |v: &Value| v.as_str().map(str::to_string);
    if let Some(msgs) = v.get("messages").and_then(Value::as_array) {
        let m = msgs
            .iter()
            .map(|m| {
                let role = match m.get("role")?.as_str()? {
                    "system" => Role::System,
                    "user" | "human" => Role::User,
                    "assistant" | "gpt" => Role::Assistant,
                    _ => return None,
                };
                Some(Message {
                    role,
                    content: s(m.get("content")?)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        return Some(vec![Record::Chat(m)]);
    }
    if let Some(msgs) = v.get("conversations").and_then(Value::as_array) {
        let m = msgs
            .iter()
            .map(|m| {
                let role = match m.get("from")?.as_str()? {
                    "system" => Role::System,
                    "human" | "user" => Role::User,
                    "gpt" | "assistant" => Role::Assistant,
                    _ => return None,
                };
                Some(Message {
                    role,
                    content: s(m.get("value")?)?,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        return Some(vec![Record::Chat(m)]);
    }
    let instruction = s(v.get("instruction")?)?;
    let join = |input: Option<&Value>| match input.and_then(Value::as_str).map(str::trim) {
        Some(i) if !i.is_empty() => format!("{}\n\n{i}", instruction.trim()),
        _ => instruction.trim().to_string(),
    };
    if let Some(instances) = v.get("instances").and_then(Value::as_array) {
        return instances
            .iter()
            .map(|inst| {
                Some(Record::Pair {
                    instruction: join(inst.get("input")),
                    output: s(inst.get("output")?)?,
                })
            })
            .collect();
    }
    Some(vec![Record::Pair {
        instruction: join(v.get("input")),
        output: s(v.get("output")?)?,
    }])
}

/// Reads a JSON array or JSONL file of records; malformed items are counted, not fatal.
pub fn read_records(path: &Path, stats: &mut DataStats) -> Result<Vec<Record>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_records_str(&text, stats)
        .map_err(|reason| TrainError::Data(format!("{}: {reason}", path.display())))
}

/// [`read_records`] on text.
pub fn read_records_str(text: &str, stats: &mut DataStats) -> Result<Vec<Record>, String> {
    let mut out = Vec::new();
    let mut take = |v: &Value, stats: &mut DataStats| match parse_value(v) {
        Some(rs) => {
            stats.records += rs.len();
            out.extend(rs);
        }
        None => stats.malformed += 1,
    };
    if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        for item in v.as_array().into_iter().flatten() {
            take(item, stats);
        }
    } else {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v) => take(&v, stats),
                Err(_) => stats.malformed += 1,
            }
        }
    }
    if out.is_empty() {
        return Err(format!("no records ({} malformed)", stats.malformed));
    }
    Ok(out)
}

/// A tokenized example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// Token ids of the whole conversation.
    pub ids: Vec<u32>,
    /// `trained[i]`: token `i` is a target (an assistant output token or its end-of-turn).
    pub trained: Vec<bool>,
}

impl Example {
    /// Number of trained tokens.
    pub fn n_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }
}

/// An error naming the first token id of `examples` outside a vocabulary of `vocab`: a
/// tokenizer that does not match the model (an adapter folder's own `tokenizer.json` with
/// added tokens, say) would otherwise index past the model's embedding.
pub fn check_vocab(examples: &[Example], vocab: usize) -> Result<(), String> {
    match (examples.iter())
        .flat_map(|e| e.ids.iter())
        .find(|&&t| t as usize >= vocab)
    {
        Some(t) => Err(format!(
            "token id {t} outside the model's vocabulary of {vocab}: the tokenizer does not \
             match the model"
        )),
        None => Ok(()),
    }
}

/// The token that pads a pass to its longest example: the tokenizer's pad, else its end of
/// text, else 0, the first of them inside a vocabulary of `vocab`. Pads are looked up but never
/// targets, and a causal mask keeps every real position from them: which one changes no loss.
pub fn pad_id(tokenizer: &Tokenizer, vocab: usize) -> u32 {
    first_inside(&[tokenizer.pad_id(), tokenizer.eos_id()], vocab)
}

/// The first of `ids` that is some id under `vocab`, else 0.
fn first_inside(ids: &[Option<u32>], vocab: usize) -> u32 {
    (ids.iter().flatten())
        .copied()
        .find(|&t| (t as usize) < vocab)
        .unwrap_or(0)
}

/// Why an example was not kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Nothing to train on.
    Empty,
    /// The prompt alone reaches the max length.
    PromptTooLong,
}

/// Tokenizes a conversation: every assistant turn's tokens, up to and including the first stop
/// token after it (the end-of-turn the model must learn to emit), are trained; everything else
/// (system, user turns, template headers) is context. The spans come from rendering the
/// conversation prefix by prefix, so they match the template's own tokenization.
pub fn encode(
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    messages: &[Message],
    max_len: usize,
) -> Result<(Example, bool), Skip> {
    let stops = template.stop_tokens(tokenizer);
    let full = template.encode(tokenizer, messages, false);
    let mut trained = vec![false; full.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant || m.content.trim().is_empty() {
            continue;
        }
        let prefix = template.encode(tokenizer, &messages[..i], true);
        let upto = template.encode(tokenizer, &messages[..=i], false);
        // Special tokens delimit turns, so the prefix encodes identically inside the whole;
        // if a template ever broke that, skip the turn rather than mislabel it.
        if !upto.starts_with(&prefix) || !full.starts_with(&upto) {
            continue;
        }
        let mut end = upto.len();
        if let Some(p) = upto[prefix.len()..].iter().position(|t| stops.contains(t)) {
            end = prefix.len() + p + 1;
        }
        for t in &mut trained[prefix.len()..end] {
            *t = true;
        }
    }
    let Some(first) = trained.iter().position(|&t| t) else {
        return Err(Skip::Empty);
    };
    if first >= max_len {
        return Err(Skip::PromptTooLong);
    }
    let truncated = full.len() > max_len;
    let mut ids = full;
    ids.truncate(max_len);
    trained.truncate(max_len);
    Ok((Example { ids, trained }, truncated))
}

/// Turns records into examples, counting drops and truncations in `stats`.
pub fn encode_all(
    records: &[Record],
    template: &ChatTemplate,
    tokenizer: &Tokenizer,
    source: DataSource,
    backward: bool,
    max_len: usize,
    stats: &mut DataStats,
) -> Vec<Example> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        let Some(messages) = r.to_messages(source, backward) else {
            stats.empty += 1;
            continue;
        };
        match encode(template, tokenizer, &messages, max_len) {
            Ok((ex, truncated)) => {
                stats.truncated += truncated as usize;
                stats.kept += 1;
                out.push(ex);
            }
            Err(Skip::Empty) => stats.empty += 1,
            Err(Skip::PromptTooLong) => stats.prompt_too_long += 1,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ids_past_the_vocabulary_are_an_error_and_pads_stay_inside_it() {
        let ex = |ids: &[u32]| Example {
            ids: ids.to_vec(),
            trained: vec![true; ids.len()],
        };
        let ok = [ex(&[0, 5, 9]), ex(&[9, 1])];
        assert_eq!(check_vocab(&ok, 10), Ok(()));
        let bad = [ex(&[0, 5, 9]), ex(&[3, 10, 12])];
        let err = check_vocab(&bad, 10).expect_err("id 10 of 10");
        assert!(err.starts_with("token id 10 outside"), "{err}");
        // The pad: the tokenizer's, else its end of text, else 0, inside the vocabulary.
        assert_eq!(first_inside(&[Some(3), Some(7)], 10), 3);
        assert_eq!(first_inside(&[None, Some(7)], 10), 7);
        assert_eq!(first_inside(&[Some(12), Some(7)], 10), 7);
        assert_eq!(first_inside(&[Some(12), None], 10), 0);
    }

    #[test]
    fn parses_alpaca_seed_and_chat_formats() {
        let text = r#"{"instruction": "Add.", "input": "1 2", "output": "3"}
not json
{"instruction": "Name two.", "instances": [{"input": "", "output": "a"}, {"input": "x", "output": "b"}]}
{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}
{"foo": 1}"#;
        let mut st = DataStats::default();
        let rs = read_records_str(text, &mut st).expect("records");
        assert_eq!(st.records, 5);
        assert_eq!(st.malformed, 2);
        assert_eq!(
            rs[0],
            Record::Pair {
                instruction: "Add.\n\n1 2".into(),
                output: "3".into()
            }
        );
        assert_eq!(
            rs[2],
            Record::Pair {
                instruction: "Name two.\n\nx".into(),
                output: "b".into()
            }
        );
        assert_eq!(
            rs[4],
            Record::Chat(vec![Message::user("q"), Message::assistant("r")])
        );
        let arr = r#"[{"instruction": "i", "output": "o"}]"#;
        assert_eq!(
            read_records_str(arr, &mut DataStats::default()).map(|r| r.len()),
            Ok(1)
        );
    }

    #[test]
    fn tags_and_backward_pairs() {
        let r = Record::Pair {
            instruction: "Q?".into(),
            output: "A.".into(),
        };
        let fwd = r.to_messages(DataSource::Augmented, false).expect("msgs");
        assert_eq!(
            fwd[0],
            Message::system("Answer with knowledge from web search.")
        );
        let bwd = r.to_messages(DataSource::Seed, true).expect("msgs");
        assert_eq!(bwd.len(), 2);
        assert_eq!(bwd[1], Message::assistant("Q?"));
        assert!(bwd[0].content.starts_with("Below is a candidate answer"));
        assert!(bwd[0].content.contains("\n\nA.\n\n"));
        assert!(bwd[0]
            .content
            .ends_with("Answer in the style of an AI Assistant."));
    }
}
