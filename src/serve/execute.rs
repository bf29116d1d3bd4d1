//! Running batches on the model: loading checkpoints, generating (with a forced choice after the
//! answer where asked), forced choices alone, and the replies, counted and cached before anyone
//! hears back.

use super::batcher::Pending;
use super::cache::{pack_choice, AnswerCache, AnswerKey, CachedAnswer};
use super::protocol::{GenAnswer, GenError, GenRequest};
use super::stats::{ServerStats, VersionStats};
use super::ServerConfig;
use crate::model::chat::ChatTemplate;
use crate::model::device::{default_device, DefaultBackend};
use crate::model::generate::{pick_option, ChoiceAfter, Generator, Request};
use crate::model::tokenizer::StreamDecoder;
use crate::model::tokenizer::Tokenizer;
use crate::train::load::InferenceLoader;
use crossbeam_channel::Sender;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

/// A model ready to answer: its generator, tokenizer and chat template.
pub(super) struct Loaded {
    generator: Generator<DefaultBackend>,
    tokenizer: Tokenizer,
    template: ChatTemplate,
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
    })
}

/// Answers `requests`, grouped by version, in batches of at most `max_batch`.
pub(super) fn run_batches(
    models: &mut HashMap<String, Loaded>,
    requests: Vec<Pending>,
    max_batch: usize,
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
        let (mut choices, group): (Vec<Pending>, Vec<Pending>) = group
            .into_iter()
            .partition(|p| p.request.ask.choose.is_some());
        // Similar lengths together, as for generation below (characters stand in for tokens).
        choices.sort_by_key(|p| {
            p.request
                .ask
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
                            return None;
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
            // Rows whose caller streams get their text as it comes, whole characters only.
            let mut streams: Vec<Option<(Sender<String>, StreamDecoder)>> = chunk
                .iter()
                .map(|p| {
                    let tx = p.request.stream.clone()?;
                    Some((tx, StreamDecoder::skipping_special()))
                })
                .collect();
            let result = if streams.iter().any(Option::is_some) {
                let tokenizer = &model.tokenizer;
                model.generator.generate_streaming(&encoded, &mut |i, tok| {
                    if let Some((tx, decoder)) = streams.get_mut(i).and_then(Option::as_mut) {
                        let piece = decoder.push(tokenizer, tok);
                        if !piece.is_empty() {
                            // A caller that went away only stops hearing.
                            let _ = tx.send(piece);
                        }
                    }
                })
            } else {
                model.generator.generate(&encoded)
            };
            let mut d = batch_stats(chunk.len(), started, &model.generator);
            // Counters and the cache file are brought up to date before anyone hears back, so
            // a caller that got its answer sees it counted, and finds it saved after a kill.
            let replies: Vec<Reply> = match result {
                Ok(completions) => {
                    let mut replies = Vec::with_capacity(chunk.len());
                    for ((p, req), c) in chunk.into_iter().zip(&encoded).zip(completions) {
                        let text = model.tokenizer.decode_skip_special(&c.ids);
                        let choice =
                            p.request.ask.choose_after.as_ref().and_then(|after| {
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
                Err(e) => fail_all(&mut d, chunk, GenError::Model(e.to_string())),
            };
            stats.add(&version, d);
            for reply in replies {
                reply.send();
            }
        }
    }
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
        let Some(c) = &p.request.ask.choose else {
            continue;
        };
        let mut ids = p.request.ask.prompt_ids(&model.template, &model.tokenizer);
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

/// `v` cut into pieces of at most `n`.
fn chunks<T>(mut v: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let rest = v.split_off(v.len().min(n.max(1)));
        out.push(std::mem::replace(&mut v, rest));
    }
    out
}
