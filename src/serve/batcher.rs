//! The server thread's loop: takes commands, answers what the answer cache holds at once, and
//! runs the model one step at a time ([`super::execute`]), taking the commands that arrived
//! between two steps (continuous batching). Idle, it blocks for the first command and lets a
//! batch fill for a short window.

use super::cache::{answer_key, unpack_choice, AnswerCache, AnswerKey};
use super::execute::{admit, has_work, load, loader, step_all, Loaded, Reply};
use super::protocol::{Command, GenRequest};
use super::stats::{ServerStats, VersionStats};
use super::{ServeError, ServerConfig};
use crate::model::device::DefaultBackend;
use crate::model::device::Precision;
use crate::model::sampling::Sampling;
use crate::train::load::InferenceLoader;
use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A request waiting for a batch, with its cache key when there is a cache.
pub(super) struct Pending {
    /// The request.
    pub(super) request: GenRequest,
    /// Its answer-cache key.
    pub(super) key: Option<AnswerKey>,
}

/// The server thread: runs until every client is gone and every request is answered.
pub(super) fn serve(
    rx: Receiver<Command>,
    config: ServerConfig,
    mut cache: Option<AnswerCache>,
    stats: &ServerStats,
) {
    let mut models: HashMap<String, Loaded> = HashMap::new();
    let mut loader = loader(&config);
    let mut pending: Vec<Pending> = Vec::new();
    let mut closed = false;
    let mut tick: u64 = 0;
    loop {
        let busy = has_work(&models);
        if !busy && closed {
            return;
        }
        let release = || models.values().for_each(Loaded::release_kv_spare);
        let (commands, disconnected) = receive(&rx, busy, &config, release);
        closed |= disconnected;
        for c in commands {
            take_command(
                c,
                &mut models,
                &mut loader,
                &config,
                cache.as_ref(),
                stats,
                &mut pending,
            );
        }
        if !pending.is_empty() {
            admit(
                &mut models,
                std::mem::take(&mut pending),
                &config,
                cache.as_mut(),
                stats,
            );
        }
        step_all(&mut models, &config, cache.as_mut(), stats, tick);
        tick = tick.wrapping_add(1);
    }
}

/// How long the server waits idle before it hands its freed memory back (not at once: a
/// server answering one request after another would fault its pages in again each time).
const RELEASE_AFTER: Duration = Duration::from_millis(200);

/// The commands to take before the next step, and whether every client is gone. Decoding
/// (`busy`), whatever arrived since the last step, without waiting; idle, the first command
/// (blocking), then what arrives within the batch window, up to a batch. Idle for
/// [`RELEASE_AFTER`], it calls `release` (the models' kept KV blocks) and hands freed memory
/// back.
fn receive(
    rx: &Receiver<Command>,
    busy: bool,
    config: &ServerConfig,
    release: impl FnOnce(),
) -> (Vec<Command>, bool) {
    let mut commands = Vec::new();
    if busy {
        loop {
            match rx.try_recv() {
                Ok(c) => commands.push(c),
                Err(TryRecvError::Empty) => return (commands, false),
                Err(TryRecvError::Disconnected) => return (commands, true),
            }
        }
    }
    let first = match rx.recv_timeout(RELEASE_AFTER) {
        Err(RecvTimeoutError::Timeout) => {
            // Idle for a while: the batches' caches and activations go back to the system
            // rather than wait here while a training (another thread) needs memory.
            release();
            crate::memory::release_free_memory();
            rx.recv().map_err(|_| RecvTimeoutError::Disconnected)
        }
        other => other,
    };
    match first {
        Ok(c) => commands.push(c),
        Err(_) => return (commands, true),
    }
    let deadline = Instant::now() + config.batch_window;
    while commands.len() < config.max_batch {
        match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(c) => commands.push(c),
            Err(RecvTimeoutError::Timeout) => break,
            Err(RecvTimeoutError::Disconnected) => return (commands, true),
        }
    }
    (commands, false)
}

/// Loads a model, or queues a generation request (unless the cache answers it).
fn take_command(
    command: Command,
    models: &mut HashMap<String, Loaded>,
    loader: &mut InferenceLoader<DefaultBackend>,
    config: &ServerConfig,
    cache: Option<&AnswerCache>,
    stats: &ServerStats,
    pending: &mut Vec<Pending>,
) {
    match command {
        Command::Load {
            version,
            path,
            done,
        } => {
            let result = if models.contains_key(&version) {
                Ok(())
            } else {
                load(&path, config, loader)
                    .map(|mut m| {
                        log::info!("model {version} loaded from {}", path.display());
                        m.order = models.len();
                        models.insert(version.clone(), m);
                    })
                    .map_err(|source| ServeError::Load {
                        version,
                        path,
                        source,
                    })
            };
            let _ = done.send(result);
        }
        Command::Generate(r) => {
            if let Some(p) = from_cache(*r, cache, config.precision, stats) {
                pending.push(p);
            }
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
        Precision::F32 => r.ask.model.clone(),
        other => format!("{}\0{other}", r.ask.model),
    };
    let key = match (&r.ask.choose, &r.ask.choose_after) {
        (Some(c), _) => answer_key(
            &version,
            &c.cache_messages(&r.ask.cache_messages(), "choice-p"),
            1,
            &Sampling::greedy(),
        ),
        (None, Some(c)) => answer_key(
            &version,
            &c.cache_messages(&r.ask.cache_messages(), "choice-after-p"),
            r.ask.max_new_tokens,
            &r.ask.sampling,
        ),
        (None, None) => answer_key(
            &version,
            &r.ask.cache_messages(),
            r.ask.max_new_tokens,
            &r.ask.sampling,
        ),
    };
    match cache.get(key) {
        Some(hit) => {
            stats.add(
                &r.ask.model,
                VersionStats {
                    requests: 1,
                    cache_hits: 1,
                    ..VersionStats::default()
                },
            );
            let (choice, choice_probs, text) =
                if r.ask.choose.is_some() || r.ask.choose_after.is_some() {
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
