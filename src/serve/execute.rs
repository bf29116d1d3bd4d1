//! Running the model: loading checkpoints, generation by continuous batching (with a forced
//! choice after the answer where asked), forced choices alone, and the replies, counted and
//! cached before anyone hears back.
//!
//! Each loaded version keeps a queue of encoded requests and its running batches, one per
//! shared prompt prefix (at most [`ServerConfig::max_running_batches`]). Between two decode
//! steps queued requests join the batch whose prefix they use or start batches of their own
//! ([`super::admission`]: room under `max_batch` rows, at most
//! [`ServerConfig::max_join_tokens`] prompt tokens per step so the rows already decoding wait
//! one short prefill, not a long one, the KV budget); then every batch of every version over
//! one base decodes one token per row in one forward pass, and each row is answered the step
//! it finishes.

use super::admission::{self, Fit, Limits, OpenBatch};
use super::batcher::Pending;
use super::cache::{pack_choice, AnswerCache, AnswerKey, CachedAnswer};
use super::protocol::{GenAnswer, GenError, GenRequest};
use super::stats::{ServerStats, VersionStats};
use super::ServerConfig;
use crate::model::chat::ChatTemplate;
use crate::model::device::{default_device, DefaultBackend};
use crate::model::generate::{
    pick_option, ChoiceAfter, Completion, Generator, Request, RunningBatch,
};
use crate::model::tokenizer::StreamDecoder;
use crate::model::tokenizer::Tokenizer;
use crate::train::load::InferenceLoader;
use crossbeam_channel::Sender;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::time::Instant;

/// A model ready to answer: its generator, tokenizer and chat template, the requests waiting
/// for it and the batch it is decoding.
pub(super) struct Loaded {
    generator: Generator<DefaultBackend>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Encoded requests not yet in a running batch, oldest first.
    queue: VecDeque<(Pending, Request)>,
    /// Its running batches, one per shared prefix, oldest first.
    running: Vec<InFlight>,
    /// Who waits on each row of its running batches, by the row's key.
    waiters: HashMap<u64, Waiter>,
    /// The key of the next row.
    next_key: u64,
    /// When it was loaded, among the server's versions (0 first): the last loaded with work
    /// goes first ([`step_all`]).
    pub(super) order: usize,
}

/// A running batch.
struct InFlight {
    batch: RunningBatch<DefaultBackend>,
    /// Set when a queued request needed a batch of its own and no more could run: no one else
    /// joins until the batch is empty.
    closed: bool,
}

/// The caller of one row: its request, its prompt's length, and its stream if it streams.
struct Waiter {
    pending: Pending,
    prompt_tokens: usize,
    stream: Option<(Sender<String>, StreamDecoder)>,
}

impl Waiter {
    fn new(pending: Pending, request: &Request) -> Waiter {
        let stream = pending
            .request
            .stream
            .clone()
            .map(|tx| (tx, StreamDecoder::skipping_special()));
        Waiter {
            pending,
            prompt_tokens: request.prompt_ids.len(),
            stream,
        }
    }
}

/// Why a checkpoint could not be made ready to answer.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Its weights or configuration.
    #[error(transparent)]
    Checkpoint(#[from] crate::train::TrainError),
    /// Its tokenizer.
    #[error(transparent)]
    Tokenizer(#[from] crate::model::tokenizer::TokenizerError),
    /// Its chat template.
    #[error(transparent)]
    Template(#[from] crate::model::chat::ChatError),
}

/// The loader of the server's models: each base once, adapters unmerged over it, so every
/// version of a run trained as an adapter shares its base's weights.
pub(super) fn loader(config: &ServerConfig) -> InferenceLoader<DefaultBackend> {
    InferenceLoader::new(default_device(), config.precision)
}

/// Loads the checkpoint at `path` for inference.
pub(super) fn load(
    path: &Path,
    config: &ServerConfig,
    loader: &mut InferenceLoader<DefaultBackend>,
) -> Result<Loaded, LoadError> {
    let ck = loader.load(path)?;
    let tokenizer = ck.tokenizer.load()?;
    let template = ChatTemplate::for_tokenizer(&tokenizer)?;
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
        queue: VecDeque::new(),
        running: Vec::new(),
        waiters: HashMap::new(),
        next_key: 0,
        order: 0,
    })
}

/// Takes `requests`: forced choices are answered now (one forward pass per batch of them, at
/// most `max_batch` prompts and [`ServerConfig::max_choice_tokens`] tokens); generation
/// requests are encoded and queued for their version's running batch ([`step_all`]). A request
/// for a version not loaded is answered with an error.
pub(super) fn admit(
    models: &mut HashMap<String, Loaded>,
    requests: Vec<Pending>,
    config: &ServerConfig,
    mut cache: Option<&mut AnswerCache>,
    stats: &ServerStats,
) {
    let mut by_model: HashMap<String, Vec<Pending>> = HashMap::new();
    for p in requests {
        by_model
            .entry(p.request.ask.model.clone())
            .or_default()
            .push(p);
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
                Reply::failed(p.request, GenError::NotLoaded(version.clone())).send();
            }
            continue;
        };
        let mut choices: Vec<EncodedChoice> = Vec::new();
        let mut rest: Vec<Pending> = Vec::new();
        for p in group {
            match &p.request.ask.choose {
                Some(c) => {
                    let mut prompt = p.request.ask.prompt_ids(&model.template, &model.tokenizer);
                    prompt.extend(model.tokenizer.encode(&c.prefill, false));
                    // Each option must be exactly one token, or the choice is not well defined.
                    let options = c.option_ids(&model.tokenizer);
                    choices.push(EncodedChoice {
                        pending: p,
                        prompt,
                        options,
                    });
                }
                None => rest.push(p),
            }
        }
        // A pass pads every prompt to its longest: similar lengths together waste the least
        // prefill on padding.
        choices.sort_by_key(|c| c.prompt.len());
        let passes = choice_passes(
            choices,
            config.max_batch.max(1),
            config.max_choice_tokens,
            |c| c.prompt.len(),
        );
        for pass in passes {
            run_choices(model, &version, pass, cache.as_deref_mut(), stats);
        }
        let mut bad = VersionStats::default();
        for p in rest {
            let then_choose = match p.request.ask.choose_after.as_ref() {
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
                        continue;
                    }
                },
            };
            let request = Request {
                prompt_ids: p.request.ask.prompt_ids(&model.template, &model.tokenizer),
                max_new_tokens: p.request.ask.max_new_tokens,
                sampling: p.request.ask.sampling,
                stop_ids: Vec::new(),
                then_choose,
            };
            model.queue.push_back((p, request));
        }
        if bad.requests > 0 {
            stats.add(&version, bad);
        }
    }
}

/// Whether any version has requests queued or a batch running.
pub(super) fn has_work(models: &HashMap<String, Loaded>) -> bool {
    models.values().any(Loaded::has_work)
}

impl Loaded {
    /// Gives back the KV blocks its model keeps for the next batches.
    pub(super) fn release_kv_spare(&self) {
        self.generator.model().release_kv_spare();
    }

    /// Whether it has requests queued or a batch running.
    fn has_work(&self) -> bool {
        !self.queue.is_empty() || !self.running.is_empty()
    }

    /// Rows in its running batches.
    fn rows(&self) -> usize {
        self.running.iter().map(|f| f.batch.len()).sum()
    }

    /// Bytes of KV cache its running batches hold once every row has run to its longest (their
    /// [`KvProjection`]s, as `fill` projects them); 0 with no batch running.
    fn kv_bytes_projected(&self) -> usize {
        let tokens: usize = (self.running.iter())
            .map(|f| f.batch.kv_projection().tokens())
            .sum();
        tokens.saturating_mul(self.generator.kv_bytes_per_token())
    }
}

/// Of the versions with work, the one loaded last (in the loop, the current round's model,
/// whose ratings the next training waits for) steps every tick; the others one tick in this
/// many: the round in progress goes first, and older work (the backward model's instructions)
/// still moves.
pub(super) const OLDER_EVERY: u64 = 4;

/// Whether a version loaded `order`-th steps at `tick`, when the last loaded with work is
/// `newest`.
fn steps_now(order: usize, newest: usize, tick: u64) -> bool {
    order == newest || tick.is_multiple_of(OLDER_EVERY)
}

/// One step (at `tick`, the server loop's count) of the versions with work whose turn it is
/// ([`OLDER_EVERY`]): queued requests join (or start) its batch, then the batch decodes one
/// token per row and the rows that finished are answered.
pub(super) fn step_all(
    models: &mut HashMap<String, Loaded>,
    config: &ServerConfig,
    mut cache: Option<&mut AnswerCache>,
    stats: &ServerStats,
    tick: u64,
) {
    let Some(newest) = models
        .values()
        .filter(|m| m.has_work())
        .map(|m| m.order)
        .max()
    else {
        return;
    };
    // One KV budget for the whole server: each version fills within what the others' running
    // batches leave of it, the newest first (its rows are what the round waits for).
    let mut held: HashMap<String, usize> = (models.iter())
        .map(|(v, m)| (v.clone(), m.kv_bytes_projected()))
        .collect();
    let mut turns: Vec<(&String, &mut Loaded)> = models.iter_mut().collect();
    turns.sort_by_key(|(_, m)| std::cmp::Reverse(m.order));
    for (version, model) in turns {
        if !model.has_work() || !steps_now(model.order, newest, tick) {
            continue;
        }
        let others: usize = (held.iter())
            .filter(|(v, _)| *v != version)
            .map(|(_, b)| *b)
            .sum();
        let free = config.kv_cache_bytes.saturating_sub(others);
        let started = Instant::now();
        let mut d = VersionStats::default();
        let mut replies = fill(model, config, free, &mut d);
        let together = others + model.kv_bytes_projected();
        (stats.kv_bytes_peak).fetch_max(together as u64, std::sync::atomic::Ordering::Relaxed);
        replies.extend(pick(model, &mut d));
        held.insert(version.clone(), model.kv_bytes_projected());
        let replies: Vec<Reply> = replies
            .into_iter()
            .map(|r| match r {
                Settle::Done(waiter, completion) => {
                    answer(model, &mut d, cache.as_deref_mut(), *waiter, completion)
                }
                Settle::Failed(reply) => {
                    d.requests += 1;
                    d.errors += 1;
                    *reply
                }
            })
            .collect();
        d.busy_us = started.elapsed().as_micros() as u64;
        let timing = model.generator.take_timing();
        d.prefill_tokens = timing.prefill_tokens as u64;
        d.prefill_us = (timing.prefill_s * 1e6) as u64;
        if !replies.is_empty() {
            // At most this step's answers are lost if the process is killed from here on.
            if let Some(cache) = cache.as_deref_mut() {
                cache.flush();
            }
        }
        stats.add(version, d);
        for reply in replies {
            reply.send();
        }
    }
    advance_all(models, stats);
}

/// The forward step of every version whose batches picked tokens this tick ([`pick`]): all
/// the batches of the versions over one base (the adapters of a run; a version's batches of
/// different prefixes) in one pass, reading the base weights once for all their rows
/// ([`Generator::advance_jointly`]); each version is charged the pass's time in proportion to
/// its rows. A failed pass fails every row of its versions' batches.
fn advance_all(models: &mut HashMap<String, Loaded>, stats: &ServerStats) {
    let mut waiting: Vec<(&String, &mut Loaded)> = (models.iter_mut())
        .filter(|(_, m)| m.running.iter().any(|f| f.batch.has_picked()))
        .collect();
    while let Some(first) = waiting.pop() {
        let (mut group, rest): (Vec<_>, Vec<_>) = waiting
            .into_iter()
            .partition(|(_, m)| (m.generator.model()).shares_base_with(first.1.generator.model()));
        waiting = rest;
        group.push(first);
        let started = Instant::now();
        // Each version's rows in the pass, in the group's order.
        let rows: Vec<usize> = group.iter().map(|(_, m)| m.rows()).collect();
        let mut passes = 0;
        let mut batches = Vec::with_capacity(group.len());
        for (_, m) in group.iter_mut() {
            let Loaded {
                generator, running, ..
            } = &mut **m;
            let picked: Vec<_> = (running.iter_mut())
                .filter(|f| f.batch.has_picked())
                .map(|f| &mut f.batch)
                .collect();
            passes += picked.len();
            batches.push((generator, picked));
        }
        let result = Generator::advance_jointly(&mut batches);
        drop(batches);
        let total: usize = rows.iter().sum();
        let micros = started.elapsed().as_micros() as u64;
        for ((version, model), n) in group.into_iter().zip(rows) {
            let d = VersionStats {
                busy_us: micros * n as u64 / total.max(1) as u64,
                decode_us: micros * n as u64 / total.max(1) as u64,
                joint_steps: u64::from(passes > 1),
                ..VersionStats::default()
            };
            let mut replies = Vec::new();
            if let Err(e) = &result {
                let error = GenError::Model(e.to_string());
                let mut failed = VersionStats::default();
                replies = fail_running(model, &error, &mut failed);
                stats.add(version, failed);
            }
            stats.add(version, d);
            for reply in replies {
                reply.send();
            }
        }
    }
}

/// Fails every row of `model`'s running batches with `error` and drops the batches.
fn fail_running(model: &mut Loaded, error: &GenError, d: &mut VersionStats) -> Vec<Reply> {
    model.running.clear();
    (model.waiters.drain())
        .map(|(_, w)| {
            d.requests += 1;
            d.errors += 1;
            Reply::failed(w.pending.request, error.clone())
        })
        .collect()
}

/// What a step did to a request.
enum Settle {
    /// It is done: its completion.
    Done(Box<Waiter>, Completion),
    /// It failed: its reply.
    Failed(Box<Reply>),
}

/// Moves queued requests into the running batches they should join or into new ones, as
/// [`admission::plan`] decides within the step's limits and `kv_bytes` of KV cache (what the
/// server's budget leaves after the other versions' batches).
fn fill(
    model: &mut Loaded,
    config: &ServerConfig,
    kv_bytes: usize,
    d: &mut VersionStats,
) -> Vec<Settle> {
    let max_rows = config.max_batch.max(1);
    if model.queue.is_empty() || model.rows() >= max_rows {
        return Vec::new();
    }
    let generator = &model.generator;
    let limits = Limits {
        max_rows,
        max_batches: config.max_running_batches.max(1),
        max_join_tokens: config.max_join_tokens,
        kv_tokens: kv_bytes / generator.kv_bytes_per_token().max(1),
        min_shared_prefix: generator.min_shared_prefix,
        paged: generator.paged_kv(),
    };
    // At most `max_rows` requests go in, and each looks that far behind it for a shared head.
    let queue: Vec<&Request> = (model.queue.iter())
        .take(2 * max_rows + 1)
        .map(|(_, r)| r)
        .collect();
    let kept: Vec<usize> = (queue.iter())
        .map(|r| generator.kept_prefix_len(&r.prompt_ids))
        .collect();
    let shared: Vec<usize> = (queue.iter())
        .map(|r| {
            (model.running.iter())
                .map(|f| generator.shared_head_len(&f.batch, &r.prompt_ids))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let open: Vec<OpenBatch> = (model.running.iter())
        .map(|f| OpenBatch {
            prefix_len: f.batch.prefix_len(),
            projection: f.batch.kv_projection(),
            rows: f.batch.len(),
            closed: f.closed,
        })
        .collect();
    let fit = |b: usize, r: &Request| {
        let batch = &model.running[b].batch;
        if generator.should_join(batch, r) {
            Fit::Join
        } else if Generator::can_join(batch, r) {
            Fit::Own
        } else {
            Fit::No
        }
    };
    let plan = admission::plan(&queue, &open, &kept, &shared, fit, &limits);
    for &b in &plan.close {
        let f = &mut model.running[b];
        log::debug!(
            "batch of {} rows (prefix {} tokens) closed to newcomers: a request needs a batch \
             of its own and {} run already",
            f.batch.len(),
            f.batch.prefix_len(),
            limits.max_batches
        );
        f.closed = true;
    }
    // The requests taken, by queue position; the others stay in their order.
    let last = (plan.joins.iter())
        .chain(plan.starts.iter().map(|s| &s.members))
        .flatten()
        .max()
        .map_or(0, |&q| q + 1);
    let mut taken: Vec<Option<(Pending, Request)>> = model.queue.drain(..last).map(Some).collect();
    let mut take = |positions: &[usize], taken: &mut Vec<Option<(Pending, Request)>>| {
        let mut keyed = Vec::with_capacity(positions.len());
        let mut waiters = Vec::with_capacity(positions.len());
        for &q in positions {
            if let Some((pending, request)) = taken[q].take() {
                waiters.push((model.next_key, Waiter::new(pending, &request)));
                keyed.push((model.next_key, request));
                model.next_key += 1;
            }
        }
        (keyed, waiters)
    };
    /// Where a group of newcomers goes.
    enum Into {
        /// Into running batch `.0`.
        Join(usize),
        /// Into a new batch, which computes the first `head` tokens of its lone prompt.
        Start { head: usize },
    }
    let mut groups = Vec::new();
    for (b, positions) in plan.joins.iter().enumerate() {
        if !positions.is_empty() {
            let (keyed, waiters) = take(positions, &mut taken);
            groups.push((Into::Join(b), keyed, waiters));
        }
    }
    for start in &plan.starts {
        let (keyed, waiters) = take(&start.members, &mut taken);
        groups.push((Into::Start { head: start.head }, keyed, waiters));
    }
    for left in taken.into_iter().rev().flatten() {
        model.queue.push_front(left);
    }
    let mut out = Vec::new();
    for (batch, keyed, waiters) in groups {
        let joined = match batch {
            Into::Join(b) => (model.generator)
                .join(&mut model.running[b].batch, keyed)
                .map(|finished| (None, finished)),
            Into::Start { head } => model.generator.start_sharing(keyed, head),
        };
        let mut waiters: HashMap<u64, Waiter> = waiters.into_iter().collect();
        match joined {
            Ok((started, finished)) => {
                if let Some(batch) = started {
                    log::debug!(
                        "batch started: {} rows, shared prefix {} tokens, {} batches running",
                        batch.len(),
                        batch.prefix_len(),
                        model.running.len() + 1
                    );
                    d.batches += 1;
                    model.running.push(InFlight {
                        batch,
                        closed: false,
                    });
                }
                for (key, completion) in finished {
                    if let Some(w) = waiters.remove(&key) {
                        out.push(Settle::Done(Box::new(w), completion));
                    }
                }
                model.waiters.extend(waiters);
            }
            Err(e) => {
                // The running batches are as they were: only these newcomers fail.
                let error = GenError::Model(e.to_string());
                out.extend(waiters.into_values().map(|w| {
                    Settle::Failed(Box::new(Reply::failed(w.pending.request, error.clone())))
                }));
            }
        }
    }
    out
}

/// The first half of a decoding step of the running batches: every row's next token picked
/// and the rows that finished answered ([`Generator::pick`]); the forward step follows in
/// [`advance_all`]. A failed pick fails every row of its batch.
fn pick(model: &mut Loaded, d: &mut VersionStats) -> Vec<Settle> {
    if model.running.is_empty() {
        return Vec::new();
    }
    d.decode_steps += 1;
    d.decode_rows += model.rows() as u64;
    let Loaded {
        generator,
        tokenizer,
        running,
        waiters,
        ..
    } = model;
    let mut out = Vec::new();
    running.retain_mut(|flight| {
        let keys: Vec<u64> = flight.batch.keys().collect();
        let result = generator.pick(&mut flight.batch, &mut |key, tok| {
            // Rows whose caller streams get their text as it comes, whole characters only.
            if let Some((tx, decoder)) = waiters.get_mut(&key).and_then(|w| w.stream.as_mut()) {
                let piece = decoder.push(tokenizer, tok);
                if !piece.is_empty() {
                    // A caller that went away only stops hearing.
                    let _ = tx.send(piece);
                }
            }
        });
        match result {
            Ok(finished) => {
                out.extend(
                    finished.into_iter().filter_map(|(key, c)| {
                        Some(Settle::Done(Box::new(waiters.remove(&key)?), c))
                    }),
                );
                !flight.batch.is_empty()
            }
            Err(e) => {
                let error = GenError::Model(e.to_string());
                out.extend(keys.iter().filter_map(|key| {
                    let w = waiters.remove(key)?;
                    let reply = Reply::failed(w.pending.request, error.clone());
                    Some(Settle::Failed(Box::new(reply)))
                }));
                false
            }
        }
    });
    out
}

/// The reply of a finished row, counted and cached.
fn answer(
    model: &Loaded,
    d: &mut VersionStats,
    cache: Option<&mut AnswerCache>,
    waiter: Waiter,
    c: Completion,
) -> Reply {
    let Waiter {
        pending,
        prompt_tokens,
        ..
    } = waiter;
    let text = model.tokenizer.decode_skip_special(&c.ids);
    let choice = pending
        .request
        .ask
        .choose_after
        .as_ref()
        .and_then(|after| c.choice.and_then(|i| after.options.get(i).cloned()));
    let probs = choice.as_ref().and(c.choice_probs);
    d.requests += 1;
    settle(
        d,
        cache,
        pending.key,
        Reply {
            request: pending.request,
            result: Ok(text),
            choice,
            choice_probs: probs,
            prompt_tokens,
            new_tokens: c.ids.len(),
        },
    )
}

/// An answer on its way back.
pub(super) struct Reply {
    pub(super) request: GenRequest,
    pub(super) result: Result<String, GenError>,
    pub(super) choice: Option<String>,
    pub(super) choice_probs: Option<Vec<f32>>,
    pub(super) prompt_tokens: usize,
    pub(super) new_tokens: usize,
}

impl Reply {
    /// A failure, with no tokens counted.
    pub(super) fn failed(request: GenRequest, error: GenError) -> Self {
        Reply {
            request,
            result: Err(error),
            choice: None,
            choice_probs: None,
            prompt_tokens: 0,
            new_tokens: 0,
        }
    }

    /// Sends the answer to the caller and wakes it.
    pub(super) fn send(self) {
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
    generator: &mut Generator<B>,
) -> VersionStats {
    let timing = generator.take_timing();
    VersionStats {
        requests: n as u64,
        batches: 1,
        busy_us: started.elapsed().as_micros() as u64,
        prefill_tokens: timing.prefill_tokens as u64,
        prefill_us: (timing.prefill_s * 1e6) as u64,
        decode_us: (timing.decode_s * 1e6) as u64,
        ..VersionStats::default()
    }
}

/// A model batch that failed: every request of it gets `message`, counted as an error.
fn fail_all(d: &mut VersionStats, chunk: Vec<Pending>, error: GenError) -> Vec<Reply> {
    d.errors = chunk.len() as u64;
    chunk
        .into_iter()
        .map(|p| Reply::failed(p.request, error.clone()))
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
        let stored = if r.ask.choose.is_some() || r.ask.choose_after.is_some() {
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

/// A forced-choice request encoded for its model: its prompt with the choice's prefill, and
/// its options' token ids (or why they are not one token each).
struct EncodedChoice {
    pending: Pending,
    prompt: Vec<u32>,
    options: Result<Vec<u32>, GenError>,
}

/// Answers one pass of forced-choice requests (see [`choice_passes`]) with one batched forward
/// pass.
fn run_choices(
    model: &mut Loaded,
    version: &str,
    pass: Vec<EncodedChoice>,
    mut cache: Option<&mut AnswerCache>,
    stats: &ServerStats,
) {
    let (mut chunk, mut prompts, mut options) = (Vec::new(), Vec::new(), Vec::new());
    for c in pass {
        chunk.push(c.pending);
        prompts.push(c.prompt);
        options.push(c.options);
    }
    let started = Instant::now();
    let result = model.generator.next_token_logits(&prompts);
    let mut d = batch_stats(chunk.len(), started, &mut model.generator);
    let mut replies = Vec::with_capacity(chunk.len());
    match result {
        Ok(logits) => {
            for (((p, ids), opts), row) in chunk.into_iter().zip(&prompts).zip(options).zip(logits)
            {
                let picked = opts.and_then(|opts| {
                    pick_option(&row, &opts)
                        .and_then(|(i, probs)| {
                            let c = p.request.ask.choose.as_ref()?;
                            Some((c.options.get(i)?.clone(), probs))
                        })
                        .ok_or(GenError::NoOption)
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
        Err(e) => replies = fail_all(&mut d, chunk, GenError::Model(e.to_string())),
    }
    stats.add(version, d);
    for reply in replies {
        reply.send();
    }
}

/// `items` (shortest first) cut, in order, into forward passes of at most `max_rows` items
/// whose padded size (items x the longest `len`) is at most `max_tokens`; an item longer than
/// that alone makes a pass.
fn choice_passes<T>(
    items: Vec<T>,
    max_rows: usize,
    max_tokens: usize,
    len: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    let mut passes: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut longest = 0;
    for item in items {
        let l = longest.max(len(&item));
        let fits = current.len() < max_rows.max(1) && (current.len() + 1) * l <= max_tokens;
        if !current.is_empty() && !fits {
            passes.push(std::mem::take(&mut current));
            longest = 0;
        }
        longest = longest.max(len(&item));
        current.push(item);
    }
    if !current.is_empty() {
        passes.push(current);
    }
    passes
}

#[cfg(test)]
mod tests {
    use super::choice_passes;

    #[test]
    fn choice_passes_keep_order_and_bound_rows_and_padded_tokens() {
        let lens = vec![100, 100, 200, 300, 300, 900, 2000];
        // 4096 tokens and 3 rows a pass: [100, 100, 200] (3 rows, 600 padded), [300, 300,
        // 900] (2700), then 2000 alone would fit with nothing else: [2000].
        let passes = choice_passes(lens.clone(), 3, 4096, |&l| l);
        assert_eq!(
            passes,
            vec![vec![100, 100, 200], vec![300, 300, 900], vec![2000]]
        );
        // 1000 tokens: 100 + 100 + 200 -> 600; 300 joins at 4 x 300 = 1200 > 1000: cut; 300,
        // 300 -> 600; 900 with them 2700: cut; 900 alone; 2000 over the budget alone.
        let passes = choice_passes(lens.clone(), 32, 1000, |&l| l);
        assert_eq!(
            passes,
            vec![vec![100, 100, 200], vec![300, 300], vec![900], vec![2000]]
        );
        // Every item once, in order.
        let flat: Vec<usize> = passes.into_iter().flatten().collect();
        assert_eq!(flat, lens);
        assert!(choice_passes(Vec::<usize>::new(), 4, 10, |&l| l).is_empty());
    }
}
