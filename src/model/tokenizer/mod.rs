//! Tokenizers of LLaMA-family checkpoints, built from GGUF metadata or a Hugging Face
//! `tokenizer.json`:
//!
//! - byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`: SmolLM2, Llama 3, Qwen2, GPT-2, ...)
//!   with merge ranks and the pre-tokenizer named by `tokenizer.ggml.pre`;
//! - SentencePiece-style BPE over scores (`"llama"`: Llama 1/2, Mistral) with `▁` for spaces and
//!   `<0xNN>` byte fallback.
//!
//! Both follow llama.cpp's `llama-vocab.cpp` (checked against its own test vectors by
//! `tests/tokenizer.rs`). Special tokens (control, user-defined) are split out of the text
//! first, longest first, as llama.cpp's `tokenizer_st_partition` does; control tokens only when
//! the caller asks for it (`parse_special`), so text from the web can never inject
//! `<|im_end|>`.
//!
//! Encoding caches the ids of every pre-tokenized word it has seen: prompts of one job share
//! most of their words (the rating template above all), so nearly every word is a hash lookup.
//!
//! Why one file of this size: the encoder's common path (special-token split, pre-tokenization
//! dispatch, the word cache, decoding) for every tokenizer kind; the kinds' own algorithms are in
//! the submodules.

mod bpe;
mod bytelevel;
mod hf;
mod pretok;
mod spm;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

pub use pretok::PreTokenizer;

use crate::model::gguf::GgufTokenizerMeta;
use bpe::{Merge, MergeMap};

/// Words kept in the encode cache before it is emptied (bounds memory on endless streams).
const WORD_CACHE_CAP: usize = 200_000;

/// Errors while building a tokenizer.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A `tokenizer.json` that is not valid JSON or lacks a required field.
    #[error("bad tokenizer.json {path}: {reason}")]
    Json {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Vocabulary data that is inconsistent (lengths that differ, ids out of range).
    #[error("invalid tokenizer data: {0}")]
    Invalid(String),
    /// A tokenizer model or pre-tokenizer this crate does not implement.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
}

/// The role of a vocabulary entry (GGUF `tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    /// An ordinary piece of text.
    Normal,
    /// The unknown token.
    Unknown,
    /// A control token (`<|im_start|>`, `</s>`): only produced from text when asked.
    Control,
    /// A user-defined token: always matched in text as a whole.
    UserDefined,
    /// A reserved, unused entry.
    Unused,
    /// A `<0xNN>` byte token (SentencePiece byte fallback).
    Byte,
}

impl TokenKind {
    /// The kind of a GGUF token type code (anything unknown is treated as normal, as llama.cpp).
    pub fn from_gguf(code: i32) -> Self {
        match code {
            2 => TokenKind::Unknown,
            3 => TokenKind::Control,
            4 => TokenKind::UserDefined,
            5 => TokenKind::Unused,
            6 => TokenKind::Byte,
            _ => TokenKind::Normal,
        }
    }

    /// The GGUF token type code of the kind.
    pub fn gguf_code(self) -> i32 {
        match self {
            TokenKind::Normal => 1,
            TokenKind::Unknown => 2,
            TokenKind::Control => 3,
            TokenKind::UserDefined => 4,
            TokenKind::Unused => 5,
            TokenKind::Byte => 6,
        }
    }
}

/// The two vocabulary algorithms.
enum Model {
    /// Byte-level BPE.
    Bpe {
        pre: PreTokenizer,
        merges: MergeMap,
        /// The token of each byte's byte-level code point.
        byte_ids: [Option<u32>; 256],
        /// Use a whole word's token when the word is one, without merging (Llama 3).
        ignore_merges: bool,
        /// Word -> ids cache.
        cache: Mutex<HashMap<String, Vec<u32>>>,
    },
    /// SentencePiece-style BPE over scores.
    Spm {
        scores: Vec<f32>,
        byte_tokens: [Option<u32>; 256],
        add_space_prefix: bool,
    },
}

/// Everything [`Tokenizer::build`] needs, whichever file it came from.
struct Parts {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    model: PartsModel,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

enum PartsModel {
    Bpe {
        pre: PreTokenizer,
        merges: Vec<(String, String)>,
        ignore_merges: bool,
    },
    Spm {
        scores: Vec<f32>,
        add_space_prefix: bool,
    },
}

/// A text <-> token id converter for one vocabulary. `Sync`: share it behind an `Arc`.
pub struct Tokenizer {
    tokens: Vec<String>,
    kinds: Vec<TokenKind>,
    token_to_id: HashMap<String, u32>,
    /// The bytes each token stands for when decoded (control tokens: their text).
    pieces: Vec<Vec<u8>>,
    /// Control, user-defined and unknown tokens, longest text first.
    specials: Vec<u32>,
    model: Model,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match &self.model {
                    Model::Bpe { pre, .. } => format!("bpe({pre:?})"),
                    Model::Spm { .. } => "spm".to_string(),
                },
            )
            .field("vocab_size", &self.tokens.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    ///
    /// `meta.model` must be `gpt2` (byte-level BPE, with a known `meta.pre`; a missing or
    /// `default` one falls back to the GPT-2 regex, with a warning) or `llama` (SentencePiece,
    /// with `scores`; a space is prefixed to the text, llama.cpp's default for it).
    pub fn from_gguf_metadata(meta: &GgufTokenizerMeta) -> Result<Self, TokenizerError> {
        let n = meta.tokens.len();
        let kinds = if meta.token_types.is_empty() {
            vec![TokenKind::Normal; n]
        } else if meta.token_types.len() == n {
            meta.token_types
                .iter()
                .map(|&t| TokenKind::from_gguf(t))
                .collect()
        } else {
            return Err(TokenizerError::Invalid(format!(
                "{} token types for {n} tokens",
                meta.token_types.len()
            )));
        };
        let model = match meta.model.as_str() {
            "gpt2" => {
                let pre = match meta.pre.as_deref() {
                    // Old conversions without a pre-tokenizer name: llama.cpp then runs a legacy
                    // set of regexes; the GPT-2 regex that such "gpt2" vocabularies were trained
                    // with is the closer choice, but say so.
                    None | Some("default") => {
                        log::warn!(
                            "GGUF tokenizer has no pre-tokenizer name; using the GPT-2 regex"
                        );
                        PreTokenizer::Gpt2
                    }
                    Some(name) => PreTokenizer::from_gguf_name(name).ok_or_else(|| {
                        TokenizerError::Unsupported(format!("pre-tokenizer {name:?}"))
                    })?,
                };
                let merges = meta
                    .merges
                    .iter()
                    .map(|m| split_merge(m))
                    .collect::<Result<Vec<_>, _>>()?;
                PartsModel::Bpe {
                    pre,
                    merges,
                    // llama.cpp looks whole words up first for the Llama 3 family.
                    ignore_merges: pre == PreTokenizer::Llama3,
                }
            }
            "llama" => {
                if meta.scores.len() != n {
                    return Err(TokenizerError::Invalid(format!(
                        "{} scores for {n} tokens",
                        meta.scores.len()
                    )));
                }
                PartsModel::Spm {
                    scores: meta.scores.clone(),
                    add_space_prefix: true,
                }
            }
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model {other:?} (supported: gpt2, llama)"
                )))
            }
        };
        Self::build(Parts {
            tokens: meta.tokens.clone(),
            kinds,
            model,
            bos: meta.bos_id,
            eos: meta.eos_id,
            pad: meta.pad_id,
            unk: meta.unk_id,
            add_bos: meta.add_bos,
            chat_template: meta.chat_template.clone(),
        })
    }

    /// The tokenizer as GGUF `tokenizer.*` metadata, which [`Tokenizer::from_gguf_metadata`]
    /// (and llama.cpp) read back as the same tokenizer: the vocabulary with its kinds, the
    /// merges by rank (byte-level BPE) or the scores (SentencePiece), the pre-tokenizer's
    /// llama.cpp name, the special ids and the chat template. Merges that name tokens the
    /// vocabulary lacks were never used and are not written.
    pub fn gguf_metadata(&self) -> GgufTokenizerMeta {
        let (model, pre, merges, scores) = match &self.model {
            Model::Bpe { pre, merges, .. } => {
                let mut ranked: Vec<(u32, u32, u32)> =
                    merges.iter().map(|(&(l, r), m)| (m.rank, l, r)).collect();
                ranked.sort_unstable();
                let merges = ranked
                    .into_iter()
                    .map(|(_, l, r)| {
                        format!("{} {}", self.tokens[l as usize], self.tokens[r as usize])
                    })
                    .collect();
                (
                    "gpt2",
                    Some(pre.gguf_name().to_string()),
                    merges,
                    Vec::new(),
                )
            }
            Model::Spm { scores, .. } => ("llama", None, Vec::new(), scores.clone()),
        };
        GgufTokenizerMeta {
            model: model.to_string(),
            pre,
            tokens: self.tokens.clone(),
            token_types: self.kinds.iter().map(|k| k.gguf_code()).collect(),
            merges,
            scores,
            bos_id: self.bos,
            eos_id: self.eos,
            pad_id: self.pad,
            unk_id: self.unk,
            add_bos: self.add_bos,
            chat_template: self.chat_template.clone(),
        }
    }

    /// Builds the tokenizer of a Hugging Face `tokenizer.json` (a `BPE` model with a byte-level
    /// pre-tokenizer and decoder, and its `added_tokens`). When a `tokenizer_config.json` sits
    /// next to it, its `chat_template`, `bos_token`, `eos_token`, `pad_token` and
    /// `add_bos_token` are read too.
    pub fn from_tokenizer_json(path: impl AsRef<std::path::Path>) -> Result<Self, TokenizerError> {
        Self::build(hf::load(path.as_ref())?)
    }

    fn build(p: Parts) -> Result<Self, TokenizerError> {
        let n = p.tokens.len();
        if p.kinds.len() != n {
            return Err(TokenizerError::Invalid(
                "token kinds do not match tokens".into(),
            ));
        }
        let n_u32 = u32::try_from(n)
            .map_err(|_| TokenizerError::Invalid(format!("{n} tokens is too many")))?;
        for (name, id) in [
            ("bos", p.bos),
            ("eos", p.eos),
            ("pad", p.pad),
            ("unk", p.unk),
        ] {
            if let Some(id) = id {
                if id >= n_u32 {
                    return Err(TokenizerError::Invalid(format!(
                        "{name} id {id} out of a vocabulary of {n}"
                    )));
                }
            }
        }
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, t) in p.tokens.iter().enumerate() {
            // First id wins on duplicate texts, as llama.cpp's token_to_id map.
            token_to_id.entry(t.clone()).or_insert(i as u32);
        }
        let is_bpe = matches!(p.model, PartsModel::Bpe { .. });
        let pieces = p
            .tokens
            .iter()
            .zip(&p.kinds)
            .map(|(t, &k)| piece_bytes(t, k, is_bpe))
            .collect();
        let mut specials: Vec<u32> = (0..n_u32)
            .filter(|&i| {
                matches!(
                    p.kinds[i as usize],
                    TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown
                ) && !p.tokens[i as usize].is_empty()
            })
            .collect();
        // Longest first, so a special token that contains another one wins; stable, so equal
        // lengths keep id order.
        specials.sort_by_key(|&i| std::cmp::Reverse(p.tokens[i as usize].len()));

        let model = match p.model {
            PartsModel::Bpe {
                pre,
                merges,
                ignore_merges,
            } => {
                let mut map = MergeMap::with_capacity(merges.len());
                for (rank, (l, r)) in merges.iter().enumerate() {
                    let (Some(&li), Some(&ri)) = (token_to_id.get(l), token_to_id.get(r)) else {
                        continue;
                    };
                    let Some(&merged) = token_to_id.get(&format!("{l}{r}")) else {
                        continue;
                    };
                    // Keep the first (lowest) rank of a pair listed twice.
                    map.entry((li, ri)).or_insert(Merge {
                        rank: rank as u32,
                        merged,
                    });
                }
                let table = bytelevel::byte_to_char();
                let mut byte_ids = [None; 256];
                for (b, slot) in byte_ids.iter_mut().enumerate() {
                    *slot = token_to_id.get(table[b].to_string().as_str()).copied();
                }
                Model::Bpe {
                    pre,
                    merges: map,
                    byte_ids,
                    ignore_merges,
                    cache: Mutex::new(HashMap::new()),
                }
            }
            PartsModel::Spm {
                scores,
                add_space_prefix,
            } => {
                let mut byte_tokens = [None; 256];
                for (b, slot) in byte_tokens.iter_mut().enumerate() {
                    *slot = token_to_id.get(&format!("<0x{b:02X}>")).copied();
                }
                Model::Spm {
                    scores,
                    byte_tokens,
                    add_space_prefix,
                }
            }
        };
        Ok(Tokenizer {
            tokens: p.tokens,
            kinds: p.kinds,
            token_to_id,
            pieces,
            specials,
            model,
            bos: p.bos,
            eos: p.eos,
            pad: p.pad,
            unk: p.unk,
            add_bos: p.add_bos,
            chat_template: p.chat_template,
        })
    }

    /// Encodes `text` without BOS/EOS. With `parse_special`, control tokens written in the
    /// text (`<|im_start|>`) become their ids; without it they are tokenized as plain text.
    /// User-defined tokens are always matched (llama.cpp and Hugging Face agree on that).
    pub fn encode(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 4);
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(a, b) => {
                    self.encode_fragment(&text[a..b], prev_special, &mut out);
                    prev_special = false;
                }
            }
        }
        out
    }

    /// [`encode`](Self::encode), preceded by BOS when the vocabulary asks for one
    /// (`add_bos`): the ids to feed a model for a whole prompt.
    pub fn encode_prompt(&self, text: &str, parse_special: bool) -> Vec<u32> {
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend(self.encode(text, parse_special));
        ids
    }

    /// Decodes ids to text, control tokens included as their text; byte sequences that are not
    /// valid UTF-8 become U+FFFD, and an id outside the vocabulary becomes U+FFFD too.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.decode_inner(ids, false)
    }

    /// [`decode`](Self::decode) without control and unknown tokens (`<|im_end|>`, `<s>`): the
    /// text a user should see.
    pub fn decode_skip_special(&self, ids: &[u32]) -> String {
        self.decode_inner(ids, true)
    }

    fn decode_inner(&self, ids: &[u32], skip_special: bool) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            bytes.extend_from_slice(self.piece_for_output(id, i == 0, skip_special));
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// The bytes `id` contributes to output text: nothing for skipped specials, U+FFFD for an
    /// unknown id, and without the space SentencePiece prefixed to the text for the first one.
    fn piece_for_output(&self, id: u32, first: bool, skip_special: bool) -> &[u8] {
        const REPLACEMENT: &[u8] = "\u{FFFD}".as_bytes();
        let Some(piece) = self.pieces.get(id as usize) else {
            return REPLACEMENT;
        };
        let kind = self.kinds[id as usize];
        if skip_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
            return &[];
        }
        if first {
            if let Model::Spm {
                add_space_prefix: true,
                ..
            } = self.model
            {
                return piece.strip_prefix(b" ").unwrap_or(piece);
            }
        }
        piece
    }

    /// The raw bytes token `id` decodes to (control tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        self.pieces.get(id as usize).map(Vec::as_slice)
    }

    /// The vocabulary entry of `id`, as stored (byte-level or `▁` form).
    pub fn id_to_token(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The id of a vocabulary entry, as stored (e.g. `"<|im_end|>"`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_to_id.get(token).copied()
    }

    /// The kind of `id`, `None` outside the vocabulary.
    pub fn token_kind(&self, id: u32) -> Option<TokenKind> {
        self.kinds.get(id as usize).copied()
    }

    /// Whether `id` is a control or unknown token (not text a user should see).
    pub fn is_special(&self, id: u32) -> bool {
        matches!(
            self.token_kind(id),
            Some(TokenKind::Control | TokenKind::Unknown)
        )
    }

    /// Number of entries in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Padding token.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }

    /// Unknown token.
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// Whether prompts start with BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The model's chat template (Jinja source), when the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The pre-tokenizer of a byte-level BPE vocabulary (`None` for SentencePiece).
    pub fn pre_tokenizer(&self) -> Option<PreTokenizer> {
        match &self.model {
            Model::Bpe { pre, .. } => Some(*pre),
            Model::Spm { .. } => None,
        }
    }

    /// Splits `text` into special tokens and the text between them (llama.cpp's
    /// `tokenizer_st_partition`: each special token, longest first, splits every text fragment).
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        if text.is_empty() {
            return Vec::new();
        }
        let mut frags = vec![Fragment::Text(0, text.len())];
        for &id in &self.specials {
            let kind = self.kinds[id as usize];
            if !parse_special && matches!(kind, TokenKind::Control | TokenKind::Unknown) {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            // Cheap test first: most special tokens are absent from most texts.
            if !frags
                .iter()
                .any(|f| matches!(*f, Fragment::Text(a, b) if text[a..b].contains(needle)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut a, b) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = text[a..b].find(needle) {
                    if at > 0 {
                        next.push(Fragment::Text(a, a + at));
                    }
                    next.push(Fragment::Token(id));
                    a += at + needle.len();
                }
                if a < b {
                    next.push(Fragment::Text(a, b));
                }
            }
            frags = next;
        }
        frags
    }

    /// Encodes one stretch of text that contains no special token.
    fn encode_fragment(&self, text: &str, after_special: bool, out: &mut Vec<u32>) {
        match &self.model {
            Model::Bpe {
                pre,
                merges,
                byte_ids,
                ignore_merges,
                cache,
            } => {
                let mut words = Vec::new();
                pre.split(text, &mut words);
                let mut initial = Vec::new();
                for (a, b) in words {
                    let word = &text[a..b];
                    if let Ok(c) = cache.lock() {
                        if let Some(ids) = c.get(word) {
                            out.extend_from_slice(ids);
                            continue;
                        }
                    }
                    let start = out.len();
                    let whole = if *ignore_merges {
                        let table = bytelevel::byte_to_char();
                        let s: String = word.bytes().map(|b| table[b as usize]).collect();
                        self.token_to_id.get(&s).copied()
                    } else {
                        None
                    };
                    if let Some(id) = whole {
                        out.push(id);
                    } else {
                        initial.clear();
                        // A byte without a byte-level token (never in a complete vocabulary)
                        // becomes unk, or is dropped when there is none.
                        initial.extend(
                            word.bytes()
                                .filter_map(|b| byte_ids[b as usize].or(self.unk)),
                        );
                        bpe::merge_word(&initial, merges, out);
                    }
                    if let Ok(mut c) = cache.lock() {
                        if c.len() >= WORD_CACHE_CAP {
                            c.clear();
                        }
                        c.insert(word.to_string(), out[start..].to_vec());
                    }
                }
            }
            Model::Spm {
                scores,
                byte_tokens,
                add_space_prefix,
            } => {
                let mut s = String::with_capacity(text.len() + 4);
                if *add_space_prefix && after_special {
                    s.push(' ');
                }
                s.push_str(text);
                let escaped = s.replace(' ', "\u{2581}");
                let vocab = spm::SpmVocab {
                    token_to_id: &self.token_to_id,
                    scores,
                    byte_tokens,
                    unk: self.unk,
                };
                spm::tokenize(&escaped, &vocab, out);
            }
        }
    }
}

/// A piece of the text being encoded: text bytes `a..b`, or a special token.
#[derive(Debug, Clone, Copy)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// Splits a merge line `"left right"` at the first space after its first character (a merge's
/// left side may itself be a lone space in non-byte-level vocabularies).
fn split_merge(line: &str) -> Result<(String, String), TokenizerError> {
    let first = line.chars().next().map_or(0, char::len_utf8);
    match line[first..].find(' ') {
        Some(i) => Ok((
            line[..first + i].to_string(),
            line[first + i + 1..].to_string(),
        )),
        None => Err(TokenizerError::Invalid(format!("bad merge {line:?}"))),
    }
}

/// The bytes a token decodes to.
fn piece_bytes(token: &str, kind: TokenKind, bpe: bool) -> Vec<u8> {
    match kind {
        TokenKind::Control | TokenKind::UserDefined | TokenKind::Unknown => {
            token.as_bytes().to_vec()
        }
        TokenKind::Byte => parse_byte_token(token)
            .map(|b| vec![b])
            .unwrap_or_else(|| token.as_bytes().to_vec()),
        TokenKind::Normal | TokenKind::Unused => {
            if bpe {
                bytelevel::decode_token(token).unwrap_or_else(|| token.as_bytes().to_vec())
            } else {
                token.replace('\u{2581}', " ").into_bytes()
            }
        }
    }
}

/// The byte of a `<0xNN>` token.
fn parse_byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Turns a stream of generated ids into text as it comes, never splitting a UTF-8 character:
/// the bytes of a character cut across tokens are held back until it is complete.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
    started: bool,
    skip_special: bool,
}

impl StreamDecoder {
    /// A decoder that shows control tokens as their text.
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder that drops control and unknown tokens.
    pub fn skipping_special() -> Self {
        StreamDecoder {
            skip_special: true,
            ..Self::default()
        }
    }

    /// Adds one token and returns the text it completes (possibly empty).
    pub fn push(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        let first = !self.started;
        self.started = true;
        self.pending
            .extend_from_slice(tokenizer.piece_for_output(id, first, self.skip_special));
        let mut text = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    text.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // Valid prefix is safe to emit.
                    text.push_str(std::str::from_utf8(&self.pending[..good]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.pending.drain(..good);
                            break;
                        }
                        // Bytes that can never become valid: replace them, go on.
                        Some(bad) => {
                            text.push('\u{FFFD}');
                            self.pending.drain(..good + bad);
                        }
                    }
                }
            }
        }
        text
    }

    /// Flushes what is held back at the end of the stream (an incomplete character becomes
    /// U+FFFD).
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A byte-level vocabulary: the 256 byte tokens, "ab", "Ġa", and two control tokens.
    fn tiny() -> Tokenizer {
        let table = bytelevel::byte_to_char();
        let mut tokens: Vec<String> = (0..256).map(|b| table[b].to_string()).collect();
        tokens.extend(["ab", "Ġa", "<|x|>", "<|xy|>"].map(String::from));
        let mut types = vec![1; 258];
        types.extend([3, 3]);
        let meta = GgufTokenizerMeta {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens,
            token_types: types,
            merges: vec!["a b".into(), "Ġ a".into()],
            eos_id: Some(258),
            ..Default::default()
        };
        match Tokenizer::from_gguf_metadata(&meta) {
            Ok(t) => t,
            Err(e) => panic!("tiny vocabulary rejected: {e}"),
        }
    }

    #[test]
    fn merges_and_special_tokens() {
        let t = tiny();
        // "ab a": words "ab", " a" -> merged tokens 256 and 257.
        assert_eq!(t.encode("ab a", false), [256, 257]);
        // The longer control token wins; without parse_special it is plain text.
        assert_eq!(t.encode("<|xy|>ab", true), [259, 256]);
        let plain = t.encode("<|x|>", false);
        assert_eq!(plain.len(), 5);
        assert_eq!(t.decode(&plain), "<|x|>");
        assert_eq!(t.decode_skip_special(&[258, 256]), "ab");
    }

    #[test]
    fn tokenizer_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Tokenizer>();
    }

    #[test]
    fn stream_decoder_holds_split_characters() {
        let t = tiny();
        // "é" is 0xC3 0xA9: one byte token each.
        let mut d = StreamDecoder::new();
        assert_eq!(d.push(&t, 0xC3), "");
        assert_eq!(d.push(&t, 0xA9), "é");
        assert_eq!(d.push(&t, 0xC3), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }

    #[test]
    fn bad_metadata_is_an_error() {
        let meta = GgufTokenizerMeta {
            model: "gpt2".into(),
            pre: Some("no-such-pre".into()),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_gguf_metadata(&meta),
            Err(TokenizerError::Unsupported(_))
        ));
        let meta = GgufTokenizerMeta {
            model: "llama".into(),
            tokens: vec!["a".into()],
            ..Default::default()
        };
        assert!(matches!(
            Tokenizer::from_gguf_metadata(&meta),
            Err(TokenizerError::Invalid(_))
        ));
    }

    #[test]
    fn merge_lines_split_at_the_first_inner_space() {
        assert_eq!(
            split_merge("Ġ t").ok(),
            Some(("Ġ".to_string(), "t".to_string()))
        );
        assert_eq!(
            split_merge("  a").ok(),
            Some((" ".to_string(), "a".to_string()))
        );
        assert!(split_merge("ab").is_err());
    }
}
