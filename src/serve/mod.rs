//! The model server: one thread per process owns the device and the weights; timely operators
//! send it requests over a crossbeam channel and are woken by a `SyncActivator` when answers come
//! back, so the model never blocks a worker. Requests from all local workers are batched together
//! (up to `max_batch`, waiting at most `batch_window` for a batch to fill), grouped by model
//! version; the generator reuses the KV cache of a prefix every prompt of a batch shares (the
//! rating template), computing it once. Versions that are LoRA adapters share their base's
//! weights ([`crate::train::load::InferenceLoader`]): a new version costs its adapter.
//!
//! With [`ServerConfig::cache`] set, every successful answer is also kept in a persistent
//! [`AnswerCache`]: a request seen before (same version, messages, length and sampling) is
//! answered as soon as it arrives, without the model, even after the process was killed and
//! started again.
//!
//! The files: `protocol` (requests and answers), `stats` (counters), `batcher` (the thread's
//! loop and the cache lookups), `admission` (which requests enter which running batch),
//! `execute` (batches on the model), `cache` (the answer file),
//! `openai` (`backflow serve`: the OpenAI-compatible HTTP API in front of it).

mod admission;
mod batcher;
pub mod cache;
mod execute;
pub mod openai;
mod protocol;
mod stats;

pub use execute::LoadError;
pub use protocol::{Ask, Choice, GenAnswer, GenError, GenRequest};
pub use stats::{ServerStats, VersionStats};

use crate::model::device::Precision;
use cache::{AnswerCache, CacheError};
use crossbeam_channel::Sender;
use protocol::Command;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;
use thiserror::Error;

/// Why the server could not do something.
#[derive(Debug, Error)]
pub enum ServeError {
    /// The server thread is gone.
    #[error("the model server has stopped")]
    Stopped,
    /// A checkpoint failed to load.
    #[error("loading model {version} from {}", path.display())]
    Load {
        /// The version it was to be loaded as.
        version: String,
        /// The checkpoint.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: LoadError,
    },
    /// The answer cache could not be opened.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The server thread could not be started.
    #[error("starting the model server thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// The default of [`ServerConfig::kv_cache_bytes`], in MiB.
pub const DEFAULT_KV_CACHE_MB: usize = 512;

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most sequences in one batch.
    pub max_batch: usize,
    /// How long the first request of a batch waits for others to join it.
    pub batch_window: Duration,
    /// Most prompt tokens (past the batch's shared prefix) of newcomers prefilled between two
    /// decode steps of a running batch (the first newcomer always joins): the rows already
    /// decoding wait at most one such prefill per token they make. A new batch takes up to
    /// `max_batch` requests whatever their length: no row waits on it.
    pub max_join_tokens: usize,
    /// Most batches one version runs at once, one per shared prompt prefix (a loop's
    /// instruction prompts and rating prompts served by one model: each kind's template
    /// computed once, not once per row of a mixed batch), all stepped in one forward pass.
    pub max_running_batches: usize,
    /// Most prompt tokens (each prompt counted at the longest of its pass, padding included)
    /// of one forward pass of forced choices (a judge's verdicts, a selector's ratings): they
    /// are answered a pass at a time, so this bounds the pass's activations (with 32 prompts a
    /// pass, judging 98 pairs with a 1.5B model peaked at 12 GB resident) and lets answers
    /// come back as each pass ends. A prompt longer than this runs in a pass of its own.
    pub max_choice_tokens: usize,
    /// Most bytes of KV cache the running batches of every version may take together, each
    /// projected for every row running to its longest (rows x slots, the shared prefix apart):
    /// a request that would pass it waits for rows to finish (the first row of a version's
    /// batch always runs, so no version waits forever on another). It bounds the server's
    /// memory whatever `max_batch`, the prompts' lengths and the number of versions loaded, as
    /// vLLM's KV cache size does; the version loaded last fills first.
    pub kv_cache_bytes: usize,
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
            max_join_tokens: 1024,
            max_running_batches: 4,
            max_choice_tokens: 4096,
            kv_cache_bytes: DEFAULT_KV_CACHE_MB << 20,
            prefix_cache: true,
            cache: None,
            precision: Precision::backend_default(),
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
            .send(Command::Generate(Box::new(request)))
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

#[cfg(test)]
impl ModelClient {
    /// A client whose requests `answer` answers on a thread of its own instead of a model (every
    /// load succeeds): for operator tests, which check what an operator does with answers.
    pub(crate) fn answering(
        answer: impl Fn(&GenRequest) -> Result<String, GenError> + Send + 'static,
    ) -> ModelClient {
        let (tx, rx) = crossbeam_channel::unbounded::<Command>();
        std::thread::spawn(move || {
            for command in rx {
                match command {
                    Command::Load { done, .. } => {
                        let _ = done.send(Ok(()));
                    }
                    Command::Generate(r) => {
                        let _ = r.reply.send(GenAnswer {
                            ticket: r.ticket,
                            result: answer(&r),
                            choice: None,
                            choice_probs: None,
                            prompt_tokens: 0,
                            new_tokens: 0,
                        });
                        if let Some(w) = &r.wake {
                            let _ = w.activate();
                        }
                    }
                }
            }
        });
        ModelClient { tx }
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
            .spawn(move || batcher::serve(rx, config, cache, &thread_stats))
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

#[cfg(test)]
mod tests;
