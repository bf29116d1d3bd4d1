//! The model server: one thread per process owns the device and the weights; timely operators
//! send it requests over a crossbeam channel and are woken by a `SyncActivator` when answers come
//! back, so the model never blocks a worker. Requests from all local workers are batched together
//! (up to `max_batch`, waiting at most `batch_window` for a batch to fill), grouped by model
//! version; the generator reuses the KV cache of a prefix every prompt of a batch shares (the
//! rating template), computing it once.
//!
//! With [`ServerConfig::cache`] set, every successful answer is also kept in a persistent
//! [`AnswerCache`]: a request seen before (same version, messages, length and sampling) is
//! answered as soon as it arrives, without the model, even after the process was killed and
//! started again.

pub mod cache;

use crate::model::chat::{ChatTemplate, Message};
use crate::model::device::{default_device, DefaultBackend, Precision};
use crate::model::generate::{pick_option, ChoiceAfter, Generator, Request};
use crate::model::sampling::Sampling;
use crate::model::tokenizer::Tokenizer;
use cache::{answer_key, AnswerCache, AnswerKey, CacheError, CachedAnswer};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use thiserror::Error;
use timely::scheduling::SyncActivator;

/// Why the server could not do something.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The server thread is gone.
    #[error("the model server has stopped")]
    Stopped,
    /// A checkpoint failed to load.
    #[error("loading model {version} from {path}: {message}")]
    Load {
        /// The version it was to be loaded as.
        version: String,
        /// The checkpoint.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The answer cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The server thread could not be started.
    #[error("starting the model server thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others to join it.
    pub batch_window: Duration,
    /// Whether a batch's shared prompt prefix is computed once and its KV reused (on by
    /// default; off only to measure what it saves).
    pub prefix_cache: bool,
    /// The persistent answer cache file of this process (see [`cache`]); `None`: no cache.
    pub cache: Option<PathBuf>,
    /// The float type models are loaded in.
    pub precision: Precision,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch: 32,
            batch_window: Duration::from_millis(20),
            prefix_cache: true,
            cache: None,
            precision: Precision::F32,
        }
    }
}

/// One generation request.
pub struct GenRequest {
    /// The caller's id for this request, returned with the answer.
    pub ticket: u64,
    /// The model version to use (as loaded with [`ModelServer::load`]).
    pub model: String,
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<Message>,
    /// Most new tokens.
    pub max_new_tokens: usize,
    /// Sampling (seed included: the same request gives the same answer on any process).
    pub sampling: Sampling,
    /// Where the answer goes.
    pub reply: Sender<GenAnswer>,
    /// Woken when the answer is sent.
    pub wake: Option<SyncActivator>,
    /// Instead of generating, pick one of a few one-token answers (see [`Choice`]).
    pub choose: Option<Choice>,
    /// Generate, then make this choice right after the answer, from the answer's own KV cache
    /// ([`GenAnswer::choice`]): the choice of [`GenRequest::choose`] at the cost of a few
    /// decode steps instead of a second prefill of the whole conversation.
    pub choose_after: Option<Choice>,
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

impl Choice {
    /// The conversation the answer cache keys this choice by: the request's, plus `tag`, the
    /// prefill and the options as a last turn no chat could contain (NUL-separated).
    fn cache_messages(&self, messages: &[Message], tag: &str) -> Vec<Message> {
        let mut m = messages.to_vec();
        m.push(Message::assistant(format!(
            "\u{0}{tag}\u{0}{}\u{0}{}",
            self.prefill,
            self.options.join("\u{0}")
        )));
        m
    }

    /// The option ids, each exactly one token, or why not.
    fn option_ids(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>, String> {
        self.options
            .iter()
            .map(|o| match tokenizer.encode(o, false).as_slice() {
                [id] if !o.contains('\u{0}') => Ok(*id),
                [_] => Err(format!("choice option {o:?} contains NUL")),
                other => Err(format!(
                    "choice option {o:?} is {} tokens, not one",
                    other.len()
                )),
            })
            .collect()
    }
}

/// How the answer cache stores an answer with a choice: the choice (no NUL, see
/// [`Choice::option_ids`]; empty for none), NUL, the options' probabilities (comma-separated,
/// empty for none), NUL, the answer. Keys of such answers carry a tag of their own
/// ([`Choice::cache_messages`]), so entries written before probabilities were kept are never
/// read in this form.
fn pack_choice(choice: Option<&str>, probs: Option<&[f32]>, text: &str) -> String {
    let probs = probs
        .map(|p| p.iter().map(f32::to_string).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    format!("{}\u{0}{probs}\u{0}{text}", choice.unwrap_or(""))
}

/// The inverse of [`pack_choice`].
fn unpack_choice(packed: &str) -> (Option<String>, Option<Vec<f32>>, String) {
    let mut parts = packed.splitn(3, '\u{0}');
    let (Some(choice), Some(probs), Some(text)) = (parts.next(), parts.next(), parts.next()) else {
        return (None, None, packed.to_owned());
    };
    let probs: Option<Vec<f32>> = if probs.is_empty() {
        None
    } else {
        probs.split(',').map(|p| p.parse().ok()).collect()
    };
    let choice = (!choice.is_empty()).then(|| choice.to_owned());
    (choice, probs, text.to_owned())
}

/// The answer to one [`GenRequest`].
#[derive(Clone, Debug)]
pub struct GenAnswer {
    /// The request's ticket.
    pub ticket: u64,
    /// The generated text, or why there is none.
    pub result: Result<String, String>,
    /// With [`GenRequest::choose_after`]: the option picked after the answer (`None` when the
    /// context had no room for the choice, or not asked); with [`GenRequest::choose`], the
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

enum Command {
    Load {
        version: String,
        path: PathBuf,
        done: Sender<Result<(), ServeError>>,
    },
    Generate(GenRequest),
}

/// The counters of one model version (and, summed, of the server).
///
/// `requests` counts every answered request: generated, from the cache, or failed. Token
/// counts, batches and busy time are model work only, so a request answered from the cache adds
/// to `requests` and `cache_hits` and nothing else.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionStats {
    /// Requests answered.
    pub requests: u64,
    /// Of those, answered from the answer cache.
    pub cache_hits: u64,
    /// Of those, answered with an error (version not loaded, generation failed).
    pub errors: u64,
    /// Prompt tokens processed by the model.
    pub prompt_tokens: u64,
    /// Prompt tokens the model actually ran a forward pass over: a shared prefix counts once
    /// per batch that computed it and not at all when it was already cached, so
    /// `prompt_tokens - prefill_tokens` is what the prefix cache saved.
    pub prefill_tokens: u64,
    /// Tokens generated by the model.
    pub new_tokens: u64,
    /// Batches run.
    pub batches: u64,
    /// Microseconds spent generating.
    pub busy_us: u64,
}

impl VersionStats {
    /// Adds `d`'s counts to these.
    pub fn add(&mut self, d: &VersionStats) {
        self.requests += d.requests;
        self.cache_hits += d.cache_hits;
        self.errors += d.errors;
        self.prompt_tokens += d.prompt_tokens;
        self.prefill_tokens += d.prefill_tokens;
        self.new_tokens += d.new_tokens;
        self.batches += d.batches;
        self.busy_us += d.busy_us;
    }
}

/// Throughput counters of the server: totals as atomics (cheap to read from any thread) and
/// the same counters per model version ([`ServerStats::snapshot`], [`ServerStats::version`]).
/// See [`VersionStats`] for what each counts.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests answered (from the cache and failed ones included).
    pub requests: AtomicU64,
    /// Requests answered from the answer cache.
    pub cache_hits: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Prompt tokens run through the model (see [`VersionStats::prefill_tokens`]).
    pub prefill_tokens: AtomicU64,
    /// Tokens generated.
    pub new_tokens: AtomicU64,
    /// Batches run.
    pub batches: AtomicU64,
    /// Microseconds spent generating.
    pub busy_us: AtomicU64,
    /// Answers read from the cache file at start.
    pub cache_loaded: AtomicU64,
    /// Bytes of torn or corrupt tail dropped from the cache file at start.
    pub cache_dropped_bytes: AtomicU64,
    versions: Mutex<HashMap<String, VersionStats>>,
}

impl ServerStats {
    /// The counters of every version seen so far, sorted by version.
    pub fn snapshot(&self) -> Vec<(String, VersionStats)> {
        let map = self.versions.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<(String, VersionStats)> =
            map.iter().map(|(v, s)| (v.clone(), *s)).collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The counters of `version` (all zero if it was never asked for).
    pub fn version(&self, version: &str) -> VersionStats {
        let map = self.versions.lock().unwrap_or_else(PoisonError::into_inner);
        map.get(version).copied().unwrap_or_default()
    }

    /// Adds `d` to the totals and to `version`'s counters.
    fn add(&self, version: &str, d: VersionStats) {
        let r = Ordering::Relaxed;
        self.requests.fetch_add(d.requests, r);
        self.cache_hits.fetch_add(d.cache_hits, r);
        self.errors.fetch_add(d.errors, r);
        self.prompt_tokens.fetch_add(d.prompt_tokens, r);
        self.prefill_tokens.fetch_add(d.prefill_tokens, r);
        self.new_tokens.fetch_add(d.new_tokens, r);
        self.batches.fetch_add(d.batches, r);
        self.busy_us.fetch_add(d.busy_us, r);
        // A panic elsewhere while holding the lock leaves plain counters, still worth keeping.
        let mut map = self.versions.lock().unwrap_or_else(PoisonError::into_inner);
        match map.get_mut(version) {
            Some(s) => s.add(&d),
            None => {
                map.insert(version.to_owned(), d);
            }
        }
    }
}

/// A handle to the server thread; cloneable senders go to the operators.
pub struct ModelServer {
    tx: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<ServerStats>,
}

/// What operators hold: a sender of requests.
#[derive(Clone)]
pub struct ModelClient {
    tx: Sender<Command>,
}

impl ModelClient {
    /// Sends a request; its answer arrives on `request.reply`.
    pub fn send(&self, request: GenRequest) -> Result<(), ServeError> {
        self.tx
            .send(Command::Generate(request))
            .map_err(|_| ServeError::Stopped)
    }

    /// Loads the checkpoint at `path` (GGUF, HF folder, or LoRA adapter folder) as `version`,
    /// blocking until it is ready. A version already loaded is kept as it is and this returns
    /// `Ok` at once, whatever `path` is: a version names one model, and several workers of a
    /// process each ask for a version that arrives along the dataflow (possibly each from its
    /// own copy of the files).
    pub fn load(&self, version: &str, path: &Path) -> Result<(), ServeError> {
        let (done, wait) = crossbeam_channel::bounded(1);
        self.tx
            .send(Command::Load {
                version: version.to_owned(),
                path: path.to_owned(),
                done,
            })
            .map_err(|_| ServeError::Stopped)?;
        wait.recv().map_err(|_| ServeError::Stopped)?
    }
}

impl ModelServer {
    /// Starts the server thread. A cache file that cannot be opened is logged and the server
    /// runs without a cache; a thread that cannot start is logged and every call answers
    /// [`ServeError::Stopped`]. Use [`ModelServer::try_start`] to get those errors instead.
    pub fn start(config: ServerConfig) -> ModelServer {
        let cache = match open_cache(&config) {
            Ok(c) => c,
            Err(e) => {
                log::error!("{e}; answers will not be cached");
                None
            }
        };
        match Self::spawn(config, cache) {
            Ok(server) => server,
            Err(e) => {
                log::error!("{e}");
                ModelServer {
                    tx: None,
                    thread: None,
                    stats: Arc::default(),
                }
            }
        }
    }

    /// Starts the server thread, failing if the answer cache cannot be opened (an I/O error,
    /// or a file that is not an answer cache) or the thread cannot be started.
    pub fn try_start(config: ServerConfig) -> Result<ModelServer, ServeError> {
        let cache = open_cache(&config)?;
        Self::spawn(config, cache)
    }

    fn spawn(config: ServerConfig, cache: Option<AnswerCache>) -> Result<ModelServer, ServeError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(ServerStats::default());
        if let Some(c) = &cache {
            stats
                .cache_loaded
                .store(c.loaded() as u64, Ordering::Relaxed);
            stats
                .cache_dropped_bytes
                .store(c.dropped_bytes(), Ordering::Relaxed);
        }
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("model-server".into())
            .spawn(move || serve(rx, config, cache, &thread_stats))
            .map_err(ServeError::Spawn)?;
        Ok(ModelServer {
            tx: Some(tx),
            thread: Some(thread),
            stats,
        })
    }

    /// A client for operators.
    pub fn client(&self) -> Result<ModelClient, ServeError> {
        self.tx
            .clone()
            .map(|tx| ModelClient { tx })
            .ok_or(ServeError::Stopped)
    }

    /// Loads the checkpoint at `path` as `version`, blocking until it is ready; see
    /// [`ModelClient::load`].
    pub fn load(&self, version: &str, path: &Path) -> Result<(), ServeError> {
        self.client()?.load(version, path)
    }

    /// Throughput counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
    }

    /// The throughput counters, to be read from another thread (a progress reporter).
    pub fn shared_stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        // Closing the channel ends the thread once every client is gone too.
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn open_cache(config: &ServerConfig) -> Result<Option<AnswerCache>, CacheError> {
    config.cache.as_deref().map(AnswerCache::open).transpose()
}

struct Loaded {
    generator: Generator<DefaultBackend>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

fn load(path: &Path, config: &ServerConfig) -> Result<Loaded, String> {
    let device = default_device();
    let ck = crate::train::checkpoint::load_for_inference::<DefaultBackend>(
        path,
        &device,
        config.precision,
    )
    .map_err(|e| format!("{e:#}"))?;
    let tokenizer = ck.tokenizer.load().map_err(|e| e.to_string())?;
    let template = ChatTemplate::for_tokenizer(&tokenizer).map_err(|e| e.to_string())?;
    let mut stop_ids = ck.stop_ids.clone();
    stop_ids.extend(template.stop_tokens(&tokenizer));
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let mut generator = Generator::new(ck.model, stop_ids);
    // The server already cuts batches at `max_batch`; the generator must not cut them smaller.
    generator.max_batch = config.max_batch.max(1);
    if !config.prefix_cache {
        // No batch's common prefix is ever long enough to be cached.
        generator.min_shared_prefix = usize::MAX;
    }
    Ok(Loaded {
        generator,
        tokenizer,
        template,
    })
}

/// A request waiting for a batch, with its cache key when there is a cache.
struct Pending {
    request: GenRequest,
    key: Option<AnswerKey>,
}

fn serve(
    rx: Receiver<Command>,
    config: ServerConfig,
    mut cache: Option<AnswerCache>,
    stats: &ServerStats,
) {
    let mut models: HashMap<String, Loaded> = HashMap::new();
    let mut pending: Vec<Pending> = Vec::new();
    loop {
        // Block for the first command, then let a batch fill for a short window.
        let first = match rx.recv() {
            Ok(c) => c,
            Err(_) => return,
        };
        let mut closed = false;
        let deadline = Instant::now() + config.batch_window;
        let mut next = Some(first);
        loop {
            match next.take() {
                Some(Command::Load {
                    version,
                    path,
                    done,
                }) => {
                    let result = if models.contains_key(&version) {
                        Ok(())
                    } else {
                        load(&path, &config)
                            .map(|m| {
                                log::info!("model {version} loaded from {}", path.display());
                                models.insert(version.clone(), m);
                            })
                            .map_err(|message| ServeError::Load {
                                version,
                                path,
                                message,
                            })
                    };
                    let _ = done.send(result);
                }
                Some(Command::Generate(r)) => {
                    if let Some(p) = from_cache(r, cache.as_ref(), config.precision, stats) {
                        pending.push(p);
                    }
                }
                None => {}
            }
            if pending.len() >= config.max_batch {
                break;
            }
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(c) => next = Some(c),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => {
                    closed = true;
                    break;
                }
            }
        }
        if !pending.is_empty() {
            run_batches(
                &mut models,
                std::mem::take(&mut pending),
                config.max_batch,
                cache.as_mut(),
                stats,
            );
        }
        if closed {
            return;
        }
    }
}

/// Answers `r` from the cache if it holds the answer; otherwise gives it back to be generated.
/// Answers of a model loaded in f16/bf16 are kept apart from its f32 answers (their version
/// carries the precision); f32 keys are those of caches written before precisions existed.
fn from_cache(
    r: GenRequest,
    cache: Option<&AnswerCache>,
    precision: Precision,
    stats: &ServerStats,
) -> Option<Pending> {
    let Some(cache) = cache else {
        return Some(Pending {
            request: r,
            key: None,
        });
    };
    let version = match precision {
        Precision::F32 => r.model.clone(),
        other => format!("{}\0{other}", r.model),
    };
    let key = match (&r.choose, &r.choose_after) {
        (Some(c), _) => answer_key(
            &version,
            &c.cache_messages(&r.messages, "choice-p"),
            1,
            &Sampling::greedy(),
        ),
        (None, Some(c)) => answer_key(
            &version,
            &c.cache_messages(&r.messages, "choice-after-p"),
            r.max_new_tokens,
            &r.sampling,
        ),
        (None, None) => answer_key(&version, &r.messages, r.max_new_tokens, &r.sampling),
    };
    match cache.get(key) {
        Some(hit) => {
            stats.add(
                &r.model,
                VersionStats {
                    requests: 1,
                    cache_hits: 1,
                    ..VersionStats::default()
                },
            );
            let (choice, choice_probs, text) = if r.choose.is_some() || r.choose_after.is_some() {
                unpack_choice(&hit.text)
            } else {
                (None, None, hit.text.clone())
            };
            Reply {
                request: r,
                result: Ok(text),
                choice,
                choice_probs,
                prompt_tokens: hit.prompt_tokens,
                new_tokens: hit.new_tokens,
            }
            .send();
            None
        }
        None => Some(Pending {
            request: r,
            key: Some(key),
        }),
    }
}

fn run_batches(
    models: &mut HashMap<String, Loaded>,
    requests: Vec<Pending>,
    max_batch: usize,
    mut cache: Option<&mut AnswerCache>,
    stats: &ServerStats,
) {
    let mut by_model: HashMap<String, Vec<Pending>> = HashMap::new();
    for p in requests {
        by_model.entry(p.request.model.clone()).or_default().push(p);
    }
    for (version, group) in by_model {
        let Some(model) = models.get_mut(&version) else {
            stats.add(
                &version,
                VersionStats {
                    requests: group.len() as u64,
                    errors: group.len() as u64,
                    ..VersionStats::default()
                },
            );
            for p in group {
                Reply::failed(p.request, format!("model version {version} is not loaded")).send();
            }
            continue;
        };
        let (mut choices, group): (Vec<Pending>, Vec<Pending>) =
            group.into_iter().partition(|p| p.request.choose.is_some());
        // Similar lengths together, as for generation below (characters stand in for tokens).
        choices.sort_by_key(|p| {
            p.request
                .messages
                .iter()
                .map(|m| m.content.len())
                .sum::<usize>()
        });
        for chunk in chunks(choices, max_batch) {
            run_choices(model, &version, chunk, cache.as_deref_mut(), stats);
        }
        // A batch pads every prompt to its longest: batching prompts of similar lengths
        // together (shortest first, stable) wastes the least prefill on padding.
        let mut bad = VersionStats::default();
        let mut encoded: Vec<(Pending, Request)> = group
            .into_iter()
            .filter_map(|p| {
                let then_choose = match p.request.choose_after.as_ref() {
                    None => None,
                    Some(c) => match c.option_ids(&model.tokenizer) {
                        Ok(options) => Some(ChoiceAfter {
                            prefill: model.tokenizer.encode(&c.prefill, false),
                            options,
                        }),
                        Err(e) => {
                            bad.requests += 1;
                            bad.errors += 1;
                            Reply::failed(p.request, e).send();
                            return None;
                        }
                    },
                };
                let request = Request {
                    prompt_ids: model
                        .template
                        .encode(&model.tokenizer, &p.request.messages, true),
                    max_new_tokens: p.request.max_new_tokens,
                    sampling: p.request.sampling,
                    stop_ids: Vec::new(),
                    then_choose,
                };
                Some((p, request))
            })
            .collect();
        if bad.requests > 0 {
            stats.add(&version, bad);
        }
        encoded.sort_by_key(|(_, r)| r.prompt_ids.len());
        for batch in chunks(encoded, max_batch) {
            let (chunk, encoded): (Vec<Pending>, Vec<Request>) = batch.into_iter().unzip();
            let started = Instant::now();
            let result = model.generator.generate(&encoded);
            let mut d = batch_stats(chunk.len(), started, &model.generator);
            // Counters and the cache file are brought up to date before anyone hears back, so
            // a caller that got its answer sees it counted, and finds it saved after a kill.
            let replies: Vec<Reply> = match result {
                Ok(completions) => {
                    let mut replies = Vec::with_capacity(chunk.len());
                    for ((p, req), c) in chunk.into_iter().zip(&encoded).zip(completions) {
                        let text = model.tokenizer.decode_skip_special(&c.ids);
                        let choice =
                            p.request.choose_after.as_ref().and_then(|after| {
                                c.choice.and_then(|i| after.options.get(i).cloned())
                            });
                        let probs = choice.as_ref().and(c.choice_probs);
                        let reply = settle(
                            &mut d,
                            cache.as_deref_mut(),
                            p.key,
                            Reply {
                                request: p.request,
                                result: Ok(text),
                                choice,
                                choice_probs: probs,
                                prompt_tokens: req.prompt_ids.len(),
                                new_tokens: c.ids.len(),
                            },
                        );
                        replies.push(reply);
                    }
                    // At most this batch is lost if the process is killed from here on.
                    if let Some(cache) = cache.as_deref_mut() {
                        cache.flush();
                    }
                    replies
                }
                Err(e) => fail_all(&mut d, chunk, &e.to_string()),
            };
            stats.add(&version, d);
            for reply in replies {
                reply.send();
            }
        }
    }
}

/// An answer on its way back.
struct Reply {
    request: GenRequest,
    result: Result<String, String>,
    choice: Option<String>,
    choice_probs: Option<Vec<f32>>,
    prompt_tokens: usize,
    new_tokens: usize,
}

impl Reply {
    /// A failure, with no tokens counted.
    fn failed(request: GenRequest, message: String) -> Self {
        Reply {
            request,
            result: Err(message),
            choice: None,
            choice_probs: None,
            prompt_tokens: 0,
            new_tokens: 0,
        }
    }

    /// Sends the answer to the caller and wakes it.
    fn send(self) {
        let GenRequest {
            ticket,
            reply,
            wake,
            ..
        } = self.request;
        // A caller that went away is not an error of the server.
        let _ = reply.send(GenAnswer {
            ticket,
            result: self.result,
            choice: self.choice,
            choice_probs: self.choice_probs,
            prompt_tokens: self.prompt_tokens,
            new_tokens: self.new_tokens,
        });
        if let Some(w) = wake {
            let _ = w.activate();
        }
    }
}

/// The counters of one model batch of `n` requests that started at `started`.
fn batch_stats<B: burn::tensor::backend::Backend>(
    n: usize,
    started: Instant,
    generator: &Generator<B>,
) -> VersionStats {
    VersionStats {
        requests: n as u64,
        batches: 1,
        busy_us: started.elapsed().as_micros() as u64,
        prefill_tokens: generator.last_timing().prefill_tokens as u64,
        ..VersionStats::default()
    }
}

/// A model batch that failed: every request of it gets `message`, counted as an error.
fn fail_all(d: &mut VersionStats, chunk: Vec<Pending>, message: &str) -> Vec<Reply> {
    d.errors = chunk.len() as u64;
    chunk
        .into_iter()
        .map(|p| Reply::failed(p.request, message.to_owned()))
        .collect()
}

/// Counts a successful answer and saves it in the cache under `key`; returns the reply.
fn settle(
    d: &mut VersionStats,
    cache: Option<&mut AnswerCache>,
    key: Option<AnswerKey>,
    reply: Reply,
) -> Reply {
    d.prompt_tokens += reply.prompt_tokens as u64;
    d.new_tokens += reply.new_tokens as u64;
    if let (Some(cache), Some(key), Ok(text)) = (cache, key, &reply.result) {
        let r = &reply.request;
        let stored = if r.choose.is_some() || r.choose_after.is_some() {
            pack_choice(reply.choice.as_deref(), reply.choice_probs.as_deref(), text)
        } else {
            text.clone()
        };
        cache.insert(
            key,
            CachedAnswer {
                text: stored,
                prompt_tokens: reply.prompt_tokens,
                new_tokens: reply.new_tokens,
            },
        );
    }
    reply
}

/// Answers a batch of [`Choice`] requests with one batched forward pass.
fn run_choices(
    model: &mut Loaded,
    version: &str,
    chunk: Vec<Pending>,
    mut cache: Option<&mut AnswerCache>,
    stats: &ServerStats,
) {
    let mut prompts = Vec::with_capacity(chunk.len());
    let mut options = Vec::with_capacity(chunk.len());
    for p in &chunk {
        let Some(c) = &p.request.choose else { continue };
        let mut ids = model
            .template
            .encode(&model.tokenizer, &p.request.messages, true);
        ids.extend(model.tokenizer.encode(&c.prefill, false));
        prompts.push(ids);
        // Each option must be exactly one token, or the choice is not well defined.
        options.push(c.option_ids(&model.tokenizer));
    }
    let started = Instant::now();
    let result = model.generator.next_token_logits(&prompts);
    let mut d = batch_stats(chunk.len(), started, &model.generator);
    let mut replies = Vec::with_capacity(chunk.len());
    match result {
        Ok(logits) => {
            for (((p, ids), opts), row) in chunk.into_iter().zip(&prompts).zip(options).zip(logits)
            {
                let picked = opts.and_then(|opts| {
                    pick_option(&row, &opts)
                        .and_then(|(i, probs)| {
                            let c = p.request.choose.as_ref()?;
                            Some((c.options.get(i)?.clone(), probs))
                        })
                        .ok_or_else(|| "no option to choose from".to_owned())
                });
                match picked {
                    Ok((text, probs)) => replies.push(settle(
                        &mut d,
                        cache.as_deref_mut(),
                        p.key,
                        Reply {
                            request: p.request,
                            result: Ok(text.clone()),
                            choice: Some(text),
                            choice_probs: Some(probs),
                            prompt_tokens: ids.len(),
                            new_tokens: 1,
                        },
                    )),
                    Err(e) => {
                        d.prompt_tokens += ids.len() as u64;
                        d.errors += 1;
                        replies.push(Reply {
                            prompt_tokens: ids.len(),
                            ..Reply::failed(p.request, e)
                        });
                    }
                }
            }
            if let Some(cache) = cache {
                cache.flush();
            }
        }
        Err(e) => replies = fail_all(&mut d, chunk, &e.to_string()),
    }
    stats.add(version, d);
    for reply in replies {
        reply.send();
    }
}

fn chunks<T>(mut v: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let rest = v.split_off(v.len().min(n.max(1)));
        out.push(std::mem::replace(&mut v, rest));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real SmolLM2-135M-Instruct GGUF, or `None` (with a message) when it is not cached.
    fn model_path() -> Option<PathBuf> {
        let home = std::env::var_os("HOME")?;
        let p = PathBuf::from(home).join(".cache/backflow/model/SmolLM2-135M-Instruct.Q4_1.gguf");
        if p.is_file() {
            Some(p)
        } else {
            eprintln!(
                "skipped: {} is absent (scripts/fetch-assets.sh fetches it)",
                p.display()
            );
            None
        }
    }

    /// Sends every conversation at once (so they can share a batch) and waits for the answers,
    /// returned in the order asked.
    fn ask(
        client: &ModelClient,
        version: &str,
        conversations: &[Vec<Message>],
        max_new_tokens: usize,
    ) -> Vec<GenAnswer> {
        round_trip(client, conversations.len(), |ticket, reply| GenRequest {
            choose: None,
            choose_after: None,
            ticket,
            model: version.to_owned(),
            messages: conversations[ticket as usize].clone(),
            max_new_tokens,
            sampling: Sampling::greedy(),
            reply,
            wake: None,
        })
    }

    /// Sends `n` requests made by `make(ticket, reply)` (tickets 0..n) and returns every
    /// answer, in ticket order.
    fn round_trip(
        client: &ModelClient,
        n: usize,
        make: impl Fn(u64, Sender<GenAnswer>) -> GenRequest,
    ) -> Vec<GenAnswer> {
        let (reply, answers) = crossbeam_channel::unbounded();
        for ticket in 0..n as u64 {
            client.send(make(ticket, reply.clone())).expect("send");
        }
        let mut out: Vec<GenAnswer> = (0..n)
            .map(|_| {
                answers
                    .recv_timeout(Duration::from_secs(600))
                    .expect("an answer")
            })
            .collect();
        out.sort_by_key(|a| a.ticket);
        out
    }

    fn question() -> Vec<Message> {
        vec![Message::user("What is the capital of France?")]
    }

    #[test]
    fn serve_unloaded_version_is_an_error_counted_per_version_and_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("answers.bin");
        {
            let server = ModelServer::try_start(ServerConfig {
                cache: Some(path.clone()),
                ..ServerConfig::default()
            })
            .expect("start");
            let client = server.client().expect("client");
            let a = ask(&client, "nope", &[question(), question()], 4);
            assert!(a.iter().all(|a| a.result.is_err()), "{a:?}");
            let v = server.stats().version("nope");
            assert_eq!(
                (v.requests, v.errors, v.cache_hits, v.batches),
                (2, 2, 0, 0)
            );
            assert_eq!(server.stats().errors.load(Ordering::Relaxed), 2);
            assert_eq!(server.stats().version("other"), VersionStats::default());
            let snap = server.stats().snapshot();
            assert_eq!(snap.len(), 1);
            assert_eq!(snap[0].0, "nope");
            // A failed load is reported, and does not make the version loaded.
            let missing = dir.path().join("missing.gguf");
            assert!(matches!(
                client.load("nope", &missing),
                Err(ServeError::Load { .. })
            ));
        }
        let cache = AnswerCache::open(&path).expect("reopen");
        assert_eq!(cache.loaded(), 0, "errors are not cached");
    }

    #[test]
    fn serve_foreign_cache_file_fails_try_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("not-a-cache.txt");
        std::fs::write(&path, "hello, this is a text file\n").expect("write");
        let result = ModelServer::try_start(ServerConfig {
            cache: Some(path.clone()),
            ..ServerConfig::default()
        });
        assert!(matches!(result, Err(ServeError::Cache(_))));
        // `start` goes on without the cache and leaves the file alone.
        let server = ModelServer::start(ServerConfig {
            cache: Some(path.clone()),
            ..ServerConfig::default()
        });
        assert!(server.client().is_ok());
        drop(server);
        assert_eq!(
            std::fs::read_to_string(&path).expect("read"),
            "hello, this is a text file\n"
        );
    }

    #[test]
    fn serve_loading_a_loaded_version_again_is_a_no_op() {
        let Some(model) = model_path() else { return };
        let server = ModelServer::start(ServerConfig::default());
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        // Several workers asking for the same version at once: all succeed.
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let (client, model) = (client.clone(), model.clone());
                std::thread::spawn(move || client.load("v0", &model))
            })
            .collect();
        for h in handles {
            h.join().expect("join").expect("load again");
        }
        // Already loaded, the path is not even read.
        let t0 = Instant::now();
        client
            .load("v0", Path::new("/nonexistent/model.gguf"))
            .expect("no-op load");
        assert!(t0.elapsed() < Duration::from_secs(1));
        // A new version is loaded for real, so a bad path fails.
        assert!(matches!(
            client.load("v1", Path::new("/nonexistent/model.gguf")),
            Err(ServeError::Load { .. })
        ));
        let a = ask(&client, "v0", &[question()], 4);
        assert!(a[0].result.is_ok(), "{a:?}");
    }

    #[test]
    fn serve_answers_repeated_requests_from_the_cache_across_restarts() {
        let Some(model) = model_path() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("_cache/answers-p000.bin");
        let config = ServerConfig {
            cache: Some(path.clone()),
            ..ServerConfig::default()
        };
        let first = {
            let server = ModelServer::try_start(config.clone()).expect("start");
            let client = server.client().expect("client");
            // Before the model is there: an error, which must not be cached.
            assert!(ask(&client, "v0", &[question()], 6)[0].result.is_err());
            server.load("v0", &model).expect("load");
            let a = ask(&client, "v0", &[question()], 6).remove(0);
            let text = a.result.clone().expect("generated");
            assert!(a.new_tokens > 0 && a.prompt_tokens > 0, "{a:?}");
            let stats = server.stats();
            let generated = stats.new_tokens.load(Ordering::Relaxed);
            assert_eq!(generated, a.new_tokens as u64);
            let b = ask(&client, "v0", &[question()], 6).remove(0);
            assert_eq!(b.result.as_deref(), Ok(text.as_str()));
            assert_eq!(
                (b.prompt_tokens, b.new_tokens),
                (a.prompt_tokens, a.new_tokens)
            );
            assert_eq!(stats.cache_hits.load(Ordering::Relaxed), 1);
            assert_eq!(
                stats.new_tokens.load(Ordering::Relaxed),
                generated,
                "no generation"
            );
            let v = stats.version("v0");
            assert_eq!(
                (v.requests, v.cache_hits, v.errors, v.batches),
                (3, 1, 1, 1)
            );
            // Another length is another answer.
            let c = ask(&client, "v0", &[question()], 3).remove(0);
            assert!(c.result.is_ok());
            assert_eq!(stats.version("v0").cache_hits, 1);
            text
        };
        // A fresh server on the same file: answered without generating, model loaded or not.
        let server = ModelServer::try_start(config.clone()).expect("restart");
        assert_eq!(server.stats().cache_loaded.load(Ordering::Relaxed), 2);
        assert_eq!(
            server.stats().cache_dropped_bytes.load(Ordering::Relaxed),
            0
        );
        let client = server.client().expect("client");
        let again = ask(&client, "v0", &[question()], 6).remove(0);
        assert_eq!(again.result.as_deref(), Ok(first.as_str()));
        server.load("v0", &model).expect("load");
        let again = ask(&client, "v0", &[question()], 6).remove(0);
        assert_eq!(again.result.as_deref(), Ok(first.as_str()));
        let stats = server.stats();
        assert_eq!(stats.new_tokens.load(Ordering::Relaxed), 0);
        assert_eq!(stats.batches.load(Ordering::Relaxed), 0);
        assert_eq!(stats.version("v0").cache_hits, 2);
        drop(client);
        drop(server);
        // The same file, the model in bf16: its answers are its own, not the f32 ones.
        let server = ModelServer::try_start(ServerConfig {
            precision: Precision::Bf16,
            ..config
        })
        .expect("restart in bf16");
        server.load("v0", &model).expect("load bf16");
        let client = server.client().expect("client");
        assert!(ask(&client, "v0", &[question()], 6)[0].result.is_ok());
        let stats = server.stats();
        assert_eq!(stats.version("v0").cache_hits, 0, "no f32 answer served");
        assert!(
            stats.new_tokens.load(Ordering::Relaxed) > 0,
            "generated in bf16"
        );
    }

    #[test]
    fn serve_forced_choice_picks_the_most_likely_option() {
        let Some(model) = model_path() else { return };
        let server = ModelServer::try_start(ServerConfig::default()).expect("start");
        server.load("v0", &model).expect("load");
        let client = server.client().expect("client");
        let messages = vec![Message::user(
            "Rate this answer from 1 to 5. Question: What is 2+2? Answer: 4.",
        )];
        let prefill = "The answer is correct and short.\nScore: ".to_owned();
        let digits: Vec<String> = (1..=5).map(|d| d.to_string()).collect();
        let options = [digits.clone(), vec!["1".into(), "twelve".into()]];
        let got = round_trip(&client, 2, |ticket, reply| GenRequest {
            ticket,
            model: "v0".into(),
            messages: messages.clone(),
            max_new_tokens: 1,
            sampling: Sampling::greedy(),
            reply,
            wake: None,
            choose: Some(Choice {
                prefill: prefill.clone(),
                options: options[ticket as usize].clone(),
            }),
            choose_after: None,
        });
        // Reference: the model's own forward pass, batch 1, a fresh cache, no generator.
        let device = default_device();
        let ck = crate::model::load_checkpoint::<DefaultBackend>(&model, &device, Precision::F32)
            .expect("load");
        let tokenizer = ck.tokenizer.load().expect("tokenizer");
        let template = ChatTemplate::for_tokenizer(&tokenizer).expect("template");
        let mut ids = template.encode(&tokenizer, &messages, true);
        ids.extend(tokenizer.encode(&prefill, false));
        let tokens: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        let mut cache = ck.model.new_cache(1, ids.len());
        let logits: Vec<f32> = ck
            .model
            .forward(&tokens, ids.len(), &mut cache)
            .expect("forward")
            .into_data()
            .to_vec()
            .expect("f32");
        let vocab = ck.model.config().vocab;
        let last = &logits[logits.len() - vocab..];
        let best = digits
            .iter()
            .max_by(|a, b| {
                let l = |d: &String| last[tokenizer.encode(d, false)[0] as usize];
                l(a).total_cmp(&l(b))
            })
            .expect("options");
        assert_eq!(got[0].result.as_deref(), Ok(best.as_str()));
        assert_eq!(got[0].new_tokens, 1);
        let err = got[1]
            .result
            .clone()
            .expect_err("a multi-token option is refused");
        assert!(err.contains("twelve"), "{err}");
    }

    #[test]
    fn serve_prefix_cache_off_gives_the_same_greedy_answers() {
        let Some(model) = model_path() else { return };
        // A long shared system turn (well over the generator's 32-token threshold), then
        // different questions: the batch's common prefix is what the prefix cache keeps.
        let system = "You are a careful assistant for the Python documentation. Answer in one \
                      short sentence, name the module or function involved, and never invent \
                      an API that does not exist in the standard library of Python 3.11.";
        let conversations: Vec<Vec<Message>> = [
            "How do I read a file line by line?",
            "How do I sort a list of dictionaries by a key?",
            "What does the with statement do?",
        ]
        .iter()
        .map(|q| vec![Message::system(system), Message::user(*q)])
        .collect();
        let answers = |prefix_cache: bool| -> (Vec<String>, VersionStats) {
            let server = ModelServer::start(ServerConfig {
                prefix_cache,
                ..ServerConfig::default()
            });
            server.load("v0", &model).expect("load");
            let client = server.client().expect("client");
            let texts = ask(&client, "v0", &conversations, 12)
                .into_iter()
                .map(|a| a.result.expect("generated"))
                .collect();
            (texts, server.stats().version("v0"))
        };
        let (with, with_stats) = answers(true);
        let (without, without_stats) = answers(false);
        assert!(with.iter().all(|t| !t.is_empty()), "{with:?}");
        assert_eq!(with, without);
        // The comparison means something only if the prefix was shared in one case and not in
        // the other.
        assert_eq!(with_stats.batches, 1, "the three prompts share one batch");
        assert_eq!(with_stats.prompt_tokens, without_stats.prompt_tokens);
        assert_eq!(without_stats.prefill_tokens, without_stats.prompt_tokens);
        assert!(
            with_stats.prefill_tokens + 2 * 32 <= with_stats.prompt_tokens,
            "prefix cache on: {with_stats:?}"
        );
    }

    #[test]
    fn serve_choice_after_the_answer_comes_with_it_and_from_the_cache() {
        let Some(model) = model_path() else { return };
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ServerConfig {
            cache: Some(dir.path().join("answers.bin")),
            ..ServerConfig::default()
        };
        let digits: Vec<String> = (1..=5).map(|d| d.to_string()).collect();
        // Ticket 0 generates; ticket 1 generates the same, then chooses among `options`.
        let send = |client: &ModelClient, options: &[String]| -> Vec<GenAnswer> {
            round_trip(client, 2, |ticket, reply| GenRequest {
                ticket,
                model: "v0".into(),
                messages: question(),
                max_new_tokens: 8,
                sampling: Sampling::greedy(),
                reply,
                wake: None,
                choose: None,
                choose_after: (ticket == 1).then(|| Choice {
                    prefill: "\nScore: ".into(),
                    options: options.to_vec(),
                }),
            })
        };
        let first = {
            let server = ModelServer::try_start(config.clone()).expect("start");
            server.load("v0", &model).expect("load");
            let client = server.client().expect("client");
            let got = send(&client, &digits);
            // The answer is the plain request's; the choice one of the options.
            assert_eq!(got[1].result, got[0].result);
            assert_eq!(got[0].choice, None);
            let choice = got[1].choice.clone().expect("a choice");
            assert!(digits.contains(&choice), "{choice}");
            // An option that is not one token fails the request, clearly.
            let bad = send(&client, &["1".into(), "twelve".into()]);
            let err = bad[1].result.clone().expect_err("refused");
            assert!(err.contains("twelve"), "{err}");
            got[1].clone()
        };
        // A fresh server on the same file: text and choice from the cache, no model needed.
        let server = ModelServer::try_start(config).expect("restart");
        let client = server.client().expect("client");
        let again = send(&client, &digits);
        assert_eq!(
            (&again[1].result, &again[1].choice),
            (&first.result, &first.choice)
        );
        assert_eq!(server.stats().batches.load(Ordering::Relaxed), 0);
    }
}
