//! What an evaluation reads and writes: prompts (with optional reference answers), answers made
//! by a model or elsewhere, and a selector's labelled dev set. JSON arrays or JSONL; a row that
//! is not one of these is counted, never fatal alone.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use thiserror::Error;

/// Why an evaluation file could not be read.
#[derive(Debug, Error)]
pub enum DataError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON array that does not parse.
    #[error("{path}: not JSON: {message}")]
    Json {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// No usable row at all.
    #[error("{path}: no usable rows ({malformed} malformed)")]
    Empty {
        /// The file.
        path: String,
        /// Rows that were not of the expected shape.
        malformed: usize,
    },
}

/// One evaluation prompt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPrompt {
    /// The instruction.
    pub instruction: String,
    /// Its input, empty when none.
    #[serde(default)]
    pub input: String,
    /// A reference answer, when the file has one.
    #[serde(default)]
    pub output: Option<String>,
}

impl EvalPrompt {
    /// What the user says: the instruction, then the input after a blank line (the way
    /// `backflow train` joins them). Answers are matched to prompts by this text.
    pub fn user_text(&self) -> String {
        join_input(&self.instruction, &self.input)
    }
}

/// An instruction and its input as one user message (input after a blank line, if any).
pub fn join_input(instruction: &str, input: &str) -> String {
    match input.trim() {
        "" => instruction.trim().to_owned(),
        i => format!("{}\n\n{i}", instruction.trim()),
    }
}

/// One answer: a line of `answers-NAME.jsonl`, or of an answers file made elsewhere
/// (AlpacaEval's model outputs have this shape).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AnswerRow {
    /// The instruction (with its input joined, as [`EvalPrompt::user_text`]).
    pub instruction: String,
    /// The answer.
    pub output: String,
    /// Who wrote it.
    #[serde(default)]
    pub generator: String,
}

/// A selector dev-set row: a pair and whether it is a good example.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DevPair {
    /// The instruction.
    pub instruction: String,
    /// Its input, empty when none.
    #[serde(default)]
    pub input: String,
    /// The candidate answer.
    pub output: String,
    /// `good` or `bad`.
    pub label: Label,
    /// How the pair was made (`seed`, `mismatched`, `truncated`, `web`, ...), for reports.
    #[serde(default)]
    pub kind: String,
}

/// A dev-set label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Label {
    /// A pair a selector should keep.
    Good,
    /// A pair a selector should drop.
    Bad,
}

/// Rows read from a file, and how many were not usable.
#[derive(Clone, Debug, PartialEq)]
pub struct Rows<T> {
    /// The usable rows, in file order.
    pub rows: Vec<T>,
    /// Rows that were not of the expected shape (counted, reported).
    pub malformed: usize,
}

impl<T> Rows<T> {
    /// The rows read from `path`, or [`DataError::Empty`] when there is none.
    fn non_empty(path: &Path, rows: Vec<T>, malformed: usize) -> Result<Rows<T>, DataError> {
        if rows.is_empty() {
            return Err(DataError::Empty {
                path: path.display().to_string(),
                malformed,
            });
        }
        Ok(Rows { rows, malformed })
    }
}

/// The JSON values of a JSON array or JSONL file; lines that are not JSON count as malformed.
fn values(path: &Path) -> Result<(Vec<Value>, usize), DataError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: shown.clone(),
        source,
    })?;
    if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(&text).map_err(|e| DataError::Json {
            path: shown,
            message: e.to_string(),
        })?;
        return Ok((v.as_array().cloned().unwrap_or_default(), 0));
    }
    let mut out = Vec::new();
    let mut malformed = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str(line) {
            Ok(v) => out.push(v),
            Err(_) => malformed += 1,
        }
    }
    Ok((out, malformed))
}

fn text_of(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Reads prompts: rows with `instruction` (optional `input`, optional `output`), or
/// Self-Instruct seed tasks (one prompt per instance). A row without an instruction is
/// malformed.
pub fn read_prompts(path: &Path) -> Result<Rows<EvalPrompt>, DataError> {
    let (values, mut malformed) = values(path)?;
    let mut rows = Vec::new();
    for v in &values {
        let Some(instruction) = text_of(v, "instruction").filter(|i| !i.trim().is_empty()) else {
            malformed += 1;
            continue;
        };
        match v.get("instances").and_then(Value::as_array) {
            Some(instances) => rows.extend(instances.iter().map(|inst| EvalPrompt {
                instruction: instruction.clone(),
                input: text_of(inst, "input").unwrap_or_default(),
                output: text_of(inst, "output"),
            })),
            None => rows.push(EvalPrompt {
                instruction,
                input: text_of(v, "input").unwrap_or_default(),
                output: text_of(v, "output"),
            }),
        }
    }
    Rows::non_empty(path, rows, malformed)
}

/// Reads an answers file: rows with `instruction` (optional `input`, joined to it) and
/// `output`, or Self-Instruct seed tasks (their instances' outputs, e.g. the human answers of
/// held-out tasks); keyed by the user text they answer. A later row for the same instruction replaces
/// an earlier one (counted as malformed: an answers file has one answer per prompt).
pub fn read_answers(path: &Path) -> Result<Rows<AnswerRow>, DataError> {
    let (values, mut malformed) = values(path)?;
    let mut rows = Vec::new();
    for v in &values {
        // Self-Instruct seed tasks: each instance's output answers the instruction + its input.
        let instances: Vec<&Value> = match v.get("instances").and_then(Value::as_array) {
            Some(i) => i.iter().collect(),
            None => vec![v],
        };
        for inst in instances {
            match (text_of(v, "instruction"), text_of(inst, "output")) {
                (Some(instruction), Some(output)) => rows.push(AnswerRow {
                    instruction: join_input(
                        &instruction,
                        &text_of(inst, "input").unwrap_or_default(),
                    ),
                    output,
                    generator: text_of(v, "generator").unwrap_or_default(),
                }),
                _ => malformed += 1,
            }
        }
    }
    Rows::non_empty(path, rows, malformed)
}

/// Answers keyed by the user text they answer; the number of duplicates left out.
pub fn answers_by_instruction(rows: &[AnswerRow]) -> (HashMap<String, String>, usize) {
    let mut map = HashMap::new();
    let mut duplicates = 0;
    for r in rows {
        if map
            .insert(r.instruction.trim().to_owned(), r.output.clone())
            .is_some()
        {
            duplicates += 1;
        }
    }
    (map, duplicates)
}

/// Reads a selector dev set: rows with `instruction`, `output` and `label` (`good`/`bad`).
pub fn read_dev_set(path: &Path) -> Result<Rows<DevPair>, DataError> {
    let (values, mut malformed) = values(path)?;
    let mut rows = Vec::new();
    for v in values {
        match serde_json::from_value::<DevPair>(v) {
            Ok(p) if !p.instruction.trim().is_empty() => rows.push(p),
            _ => malformed += 1,
        }
    }
    Rows::non_empty(path, rows, malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::NamedTempFile::new().expect("temp");
        f.write_all(text.as_bytes()).expect("write");
        f
    }

    #[test]
    fn prompts_from_jsonl_json_and_seed_tasks() {
        let f = file(
            "{\"instruction\": \"Add.\", \"input\": \"2 2\", \"output\": \"4\"}\n\
             not json\n{\"input\": \"no instruction\"}\n\
             {\"instruction\": \"Name a colour.\"}\n\
             {\"id\": \"s\", \"instruction\": \"Seed.\", \"instances\": [{\"input\": \"\", \"output\": \"a\"}, {\"input\": \"x\", \"output\": \"b\"}]}\n",
        );
        let p = read_prompts(f.path()).expect("prompts");
        assert_eq!(p.malformed, 2);
        assert_eq!(p.rows.len(), 4);
        assert_eq!(p.rows[0].user_text(), "Add.\n\n2 2");
        assert_eq!(p.rows[0].output.as_deref(), Some("4"));
        assert_eq!(p.rows[1].output, None);
        assert_eq!(p.rows[3].user_text(), "Seed.\n\nx");
        let f = file("[{\"instruction\": \"A\"}, 3]");
        let p = read_prompts(f.path()).expect("array");
        assert_eq!((p.rows.len(), p.malformed), (1, 1));
        let f = file("[oops");
        assert!(matches!(
            read_prompts(f.path()),
            Err(DataError::Json { .. })
        ));
        let f = file("{}\n");
        assert!(matches!(
            read_prompts(f.path()),
            Err(DataError::Empty { malformed: 1, .. })
        ));
    }

    #[test]
    fn answers_match_prompts_by_instruction_text() {
        let f = file(
            "{\"instruction\": \"Add.\", \"input\": \"2 2\", \"output\": \"4\", \"generator\": \"g\"}\n\
             {\"instruction\": \"Name a colour.\", \"output\": \"red\"}\n\
             {\"instruction\": \"Name a colour.\", \"output\": \"blue\"}\n\
             {\"instruction\": \"no output\"}\n\
             {\"instruction\": \"Seed.\", \"instances\": [{\"input\": \"x\", \"output\": \"y\"}]}\n",
        );
        let a = read_answers(f.path()).expect("answers");
        assert_eq!(a.malformed, 1);
        assert_eq!(a.rows.len(), 4);
        let (map, dups) = answers_by_instruction(&a.rows);
        assert_eq!(dups, 1);
        assert_eq!(map.get("Add.\n\n2 2").map(String::as_str), Some("4"));
        assert_eq!(map.get("Name a colour.").map(String::as_str), Some("blue"));
        assert_eq!(map.get("Seed.\n\nx").map(String::as_str), Some("y"));
    }

    #[test]
    fn dev_set_rows_need_a_label() {
        let f = file(
            "{\"instruction\": \"I\", \"output\": \"O\", \"label\": \"good\"}\n\
             {\"instruction\": \"I\", \"output\": \"O\", \"label\": \"bad\", \"kind\": \"mismatched\"}\n\
             {\"instruction\": \"I\", \"output\": \"O\", \"label\": \"meh\"}\n\
             {\"instruction\": \"I\", \"output\": \"O\"}\n",
        );
        let d = read_dev_set(f.path()).expect("dev");
        assert_eq!(d.malformed, 2);
        assert_eq!(d.rows[0].label, Label::Good);
        assert_eq!(d.rows[1].kind, "mismatched");
    }
}
