//! The model server: one thread per process owns the device and the weights; timely operators
//! send it requests over a crossbeam channel and are woken by a `SyncActivator` when answers come
//! back, so the model never blocks a worker. Requests from all local workers are batched together
//! (up to `max_batch`, waiting at most `batch_window` for a batch to fill), grouped by model
//! version; the generator reuses the KV cache of a prefix every prompt of a batch shares (the
//! rating template), computing it once.

use crate::model::chat::{ChatTemplate, Message};
use crate::model::device::{default_device, DefaultBackend};
use crate::model::generate::{Generator, Request};
use crate::model::sampling::Sampling;
use crate::model::tokenizer::Tokenizer;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
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
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others to join it.
    pub batch_window: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_batch: 32,
            batch_window: Duration::from_millis(20),
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
}

/// The answer to one [`GenRequest`].
#[derive(Clone, Debug)]
pub struct GenAnswer {
    /// The request's ticket.
    pub ticket: u64,
    /// The generated text, or why there is none.
    pub result: Result<String, String>,
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

/// Throughput counters of the server.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests answered.
    pub requests: AtomicU64,
    /// Prompt tokens processed.
    pub prompt_tokens: AtomicU64,
    /// Tokens generated.
    pub new_tokens: AtomicU64,
    /// Batches run.
    pub batches: AtomicU64,
    /// Microseconds spent generating.
    pub busy_us: AtomicU64,
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
}

impl ModelServer {
    /// Starts the server thread.
    pub fn start(config: ServerConfig) -> ModelServer {
        let (tx, rx) = crossbeam_channel::unbounded();
        let stats = Arc::new(ServerStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("model-server".into())
            .spawn(move || serve(rx, config, &thread_stats))
            .ok();
        ModelServer {
            tx: Some(tx),
            thread,
            stats,
        }
    }

    /// A client for operators.
    pub fn client(&self) -> Result<ModelClient, ServeError> {
        self.tx
            .clone()
            .map(|tx| ModelClient { tx })
            .ok_or(ServeError::Stopped)
    }

    /// Loads the checkpoint at `path` (GGUF, HF folder, or LoRA adapter folder) as `version`,
    /// blocking until it is ready.
    pub fn load(&self, version: &str, path: &Path) -> Result<(), ServeError> {
        let (done, wait) = crossbeam_channel::bounded(1);
        let tx = self.tx.as_ref().ok_or(ServeError::Stopped)?;
        tx.send(Command::Load {
            version: version.to_owned(),
            path: path.to_owned(),
            done,
        })
        .map_err(|_| ServeError::Stopped)?;
        wait.recv().map_err(|_| ServeError::Stopped)?
    }

    /// Throughput counters.
    pub fn stats(&self) -> &ServerStats {
        &self.stats
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

struct Loaded {
    generator: Generator<DefaultBackend>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
}

fn load(path: &Path) -> Result<Loaded, String> {
    let device = default_device();
    let ck = crate::train::checkpoint::load_for_inference::<DefaultBackend>(path, &device)
        .map_err(|e| format!("{e:#}"))?;
    let tokenizer = ck.tokenizer.load().map_err(|e| e.to_string())?;
    let template = ChatTemplate::for_tokenizer(&tokenizer).map_err(|e| e.to_string())?;
    let mut stop_ids = ck.stop_ids.clone();
    stop_ids.extend(template.stop_tokens(&tokenizer));
    stop_ids.sort_unstable();
    stop_ids.dedup();
    Ok(Loaded {
        generator: Generator::new(ck.model, stop_ids),
        tokenizer,
        template,
    })
}

fn serve(rx: Receiver<Command>, config: ServerConfig, stats: &ServerStats) {
    let mut models: HashMap<String, Loaded> = HashMap::new();
    let mut pending: Vec<GenRequest> = Vec::new();
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
                    let result = load(&path)
                        .map(|m| {
                            models.insert(version.clone(), m);
                        })
                        .map_err(|message| ServeError::Load {
                            version,
                            path,
                            message,
                        });
                    let _ = done.send(result);
                }
                Some(Command::Generate(r)) => pending.push(r),
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
                stats,
            );
        }
        if closed {
            return;
        }
    }
}

fn run_batches(
    models: &mut HashMap<String, Loaded>,
    requests: Vec<GenRequest>,
    max_batch: usize,
    stats: &ServerStats,
) {
    let mut by_model: HashMap<String, Vec<GenRequest>> = HashMap::new();
    for r in requests {
        by_model.entry(r.model.clone()).or_default().push(r);
    }
    for (version, group) in by_model {
        let Some(model) = models.get_mut(&version) else {
            for r in group {
                answer(
                    r,
                    Err(format!("model version {version} is not loaded")),
                    0,
                    0,
                );
            }
            continue;
        };
        for chunk in chunks(group, max_batch) {
            let encoded: Vec<Request> = chunk
                .iter()
                .map(|r| Request {
                    prompt_ids: model.template.encode(&model.tokenizer, &r.messages, true),
                    max_new_tokens: r.max_new_tokens,
                    sampling: r.sampling,
                    stop_ids: Vec::new(),
                })
                .collect();
            stats
                .requests
                .fetch_add(chunk.len() as u64, Ordering::Relaxed);
            let started = Instant::now();
            let result = model.generator.generate(&encoded);
            stats
                .busy_us
                .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
            stats.batches.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(completions) => {
                    for ((r, req), c) in chunk.into_iter().zip(&encoded).zip(completions) {
                        let text = model.tokenizer.decode_skip_special(&c.ids);
                        stats
                            .prompt_tokens
                            .fetch_add(req.prompt_ids.len() as u64, Ordering::Relaxed);
                        stats
                            .new_tokens
                            .fetch_add(c.ids.len() as u64, Ordering::Relaxed);
                        answer(r, Ok(text), req.prompt_ids.len(), c.ids.len());
                    }
                }
                Err(e) => {
                    let message = e.to_string();
                    for r in chunk {
                        answer(r, Err(message.clone()), 0, 0);
                    }
                }
            }
        }
    }
}

fn chunks(mut v: Vec<GenRequest>, n: usize) -> Vec<Vec<GenRequest>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let rest = v.split_off(v.len().min(n.max(1)));
        out.push(std::mem::replace(&mut v, rest));
    }
    out
}

fn answer(r: GenRequest, result: Result<String, String>, prompt_tokens: usize, new_tokens: usize) {
    let GenRequest {
        ticket,
        reply,
        wake,
        ..
    } = r;
    // A caller that went away is not an error of the server.
    let _ = reply.send(GenAnswer {
        ticket,
        result,
        prompt_tokens,
        new_tokens,
    });
    if let Some(w) = wake {
        let _ = w.activate();
    }
}
