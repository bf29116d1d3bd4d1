//! Batched generation with a shared-prefix KV cache.
//!
//! [`Generator`] is meant to be owned by one model-server thread: it takes a batch of
//! [`Request`]s gathered from many workers, prefills all prompts in one forward pass
//! (right-aligned, padding masked out), decodes all sequences together one token per step,
//! drops sequences from the batch as they finish, and answers one [`Completion`] per request
//! in request order.
//!
//! Prefix cache: prompts that share a long token prefix (the rating template shared by every
//! rating) compute it once. The generator keeps the K/V of one prefix; a batch whose prompts all
//! start with it reuses it, and a batch of several prompts with a longer common prefix
//! ([`Generator::min_shared_prefix`] tokens or more) computes and keeps that one instead.
//! [`Generator::cache_prefix`] sets it explicitly. Each request's sampler has its own seeded
//! RNG, so results do not depend on which batch a request lands in.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::kv_cache::{KvCache, PrefixKv, GROW_CHUNK};
use super::llama::Llama;
use super::sampling::{Sampler, Sampling};
use super::ModelError;

/// One generation request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Request {
    /// The prompt, tokenized (chat template applied by the caller).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Token choice.
    pub sampling: Sampling,
    /// Extra stop tokens for this request (the generator's own, e.g. EOS, always apply).
    pub stop_ids: Vec<u32>,
    /// After the completion, continue the sequence with these tokens and pick the most likely
    /// next among a few options ([`Completion::choice`]).
    #[serde(default)]
    pub then_choose: Option<ChoiceAfter>,
}

/// A forced choice made right after a completion, from the completion's own KV cache: the
/// sequence goes on with `prefill` (teacher-forced, one token per decode step) and the answer
/// is whichever of `options` the model finds most likely next. Costs at most
/// `prefill.len() + 1` decode steps of one row, where asking afterwards would prefill prompt
/// and answer again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceAfter {
    /// Tokens fed after the completion (e.g. `\nScore: `).
    pub prefill: Vec<u32>,
    /// The candidate next tokens.
    pub options: Vec<u32>,
}

impl Request {
    /// A greedy request with no extra stop tokens.
    pub fn greedy(prompt_ids: Vec<u32>, max_new_tokens: usize) -> Self {
        Request {
            prompt_ids,
            max_new_tokens,
            sampling: Sampling::greedy(),
            stop_ids: Vec::new(),
            then_choose: None,
        }
    }
}

/// Why generation of a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopReason {
    /// A stop token was produced (it is not included in the completion).
    StopToken(u32),
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context length was reached.
    ContextFull,
}

/// The answer to one [`Request`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Generated token ids, without the stop token.
    pub ids: Vec<u32>,
    /// `ids` decoded by the generator's decoder (empty when it has none).
    pub text: String,
    /// Why it ended.
    pub stop: StopReason,
    /// With [`Request::then_choose`]: the index of the most likely option; `None` when not
    /// asked, or when the context had no room for the prefill.
    #[serde(default)]
    pub choice: Option<usize>,
    /// With [`Completion::choice`]: each option's probability under the model's full
    /// next-token distribution (so they sum to at most 1; the rest went to other tokens).
    #[serde(default)]
    pub choice_probs: Option<Vec<f32>>,
}

/// A forced choice's pick: the index of the most likely option, and each option's probability.
pub type Picked = (usize, Vec<f32>);

/// The most likely of `options` in one row of next-token `logits`, with the probability the
/// model gives each option over the whole vocabulary (softmax of the row). `None` when no
/// option is inside the vocabulary.
pub fn pick_option(logits: &[f32], options: &[u32]) -> Option<Picked> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return None;
    }
    // log-sum-exp in f64: 49k-152k terms, most of them tiny.
    let log_z = max as f64
        + logits
            .iter()
            .map(|&l| ((l - max) as f64).exp())
            .sum::<f64>()
            .ln();
    let mut best: Option<(usize, f32)> = None;
    let mut probs = Vec::with_capacity(options.len());
    for (i, &id) in options.iter().enumerate() {
        let l = *logits.get(id as usize)?;
        probs.push((l as f64 - log_z).exp() as f32);
        if best.is_none_or(|(_, b)| l > b) {
            best = Some((i, l));
        }
    }
    best.map(|(i, _)| (i, probs))
}

/// Where the time of the last [`Generator::generate`] call went, for benchmarks and the model
/// server's metrics. Prefill includes computing a new shared prefix; decode is every later
/// forward step with its token choice.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerateTiming {
    /// Seconds in prefill forward passes (all batches of the call).
    pub prefill_s: f64,
    /// Prompt tokens prefilled (shared-prefix tokens counted once per batch that computed them).
    pub prefill_tokens: usize,
    /// Seconds in decode steps.
    pub decode_s: f64,
    /// Decode forward steps run.
    pub decode_steps: usize,
    /// Tokens produced by decode steps (the sum of the batch size over steps).
    pub decode_tokens: usize,
}

/// Turns token ids into text (the tokenizer's `decode`).
pub type Decoder = Box<dyn Fn(&[u32]) -> String + Send>;

/// Batched generation over one model, with a shared-prefix cache. See the module docs.
pub struct Generator<B: Backend> {
    model: Llama<B>,
    stop_ids: Vec<u32>,
    prefix: Option<PrefixKv<B>>,
    decoder: Option<Decoder>,
    /// Shortest common prefix of a batch worth computing once and caching.
    pub min_shared_prefix: usize,
    /// Largest batch run at once; bigger request lists are split.
    pub max_batch: usize,
    timing: GenerateTiming,
}

impl<B: Backend> std::fmt::Debug for Generator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator")
            .field("config", self.model.config())
            .field("stop_ids", &self.stop_ids)
            .field("prefix_len", &self.cached_prefix_len())
            .finish()
    }
}

/// A prefilled batch: its cache and the logits after each prompt.
struct Prefilled<B: Backend> {
    cache: KvCache<B>,
    logits: Tensor<B, 2>,
}

impl<B: Backend> Generator<B> {
    /// A generator that stops sequences at any of `stop_ids` (EOS, `<|im_end|>`, ...).
    pub fn new(model: Llama<B>, stop_ids: Vec<u32>) -> Self {
        Generator {
            model,
            stop_ids,
            prefix: None,
            decoder: None,
            min_shared_prefix: 32,
            max_batch: 32,
            timing: GenerateTiming::default(),
        }
    }

    /// Fills [`Completion::text`] with `decoder(ids)`.
    pub fn with_decoder(mut self, decoder: Decoder) -> Self {
        self.decoder = Some(decoder);
        self
    }

    /// The model.
    pub fn model(&self) -> &Llama<B> {
        &self.model
    }

    /// Where the time of the last [`Generator::generate`] call went.
    pub fn last_timing(&self) -> GenerateTiming {
        self.timing
    }

    /// Tokens in the cached prefix (0 when none).
    pub fn cached_prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixKv::len)
    }

    /// Forgets the cached prefix.
    pub fn clear_prefix(&mut self) {
        self.prefix = None;
    }

    /// Computes and keeps the K/V of `ids`, to be reused by every later prompt starting with it.
    pub fn cache_prefix(&mut self, ids: &[u32]) -> Result<(), ModelError> {
        if ids.is_empty() {
            self.prefix = None;
            return Ok(());
        }
        if self.prefix.as_ref().is_some_and(|p| p.ids == ids) {
            return Ok(());
        }
        self.check_ids(ids)?;
        let mut cache = self.model.new_cache(1, ids.len());
        let tokens: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        self.model.forward(&tokens, ids.len(), &mut cache)?;
        self.timing.prefill_tokens += ids.len();
        self.prefix = Some(cache.snapshot_prefix(ids)?);
        Ok(())
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), ModelError> {
        let vocab = self.model.config().vocab;
        match ids.iter().find(|&&t| t as usize >= vocab) {
            Some(t) => Err(ModelError::Request(format!(
                "token id {t} outside the vocabulary of {vocab}"
            ))),
            None => Ok(()),
        }
    }

    /// Picks (and if needed computes) the prefix for this batch; returns its length.
    fn choose_prefix(&mut self, prompts: &[&[u32]]) -> Result<usize, ModelError> {
        // A prefix must leave at least one prompt token, whose logits start the generation.
        let usable = |ids: &[u32]| {
            prompts
                .iter()
                .all(|p| p.len() > ids.len() && p.starts_with(ids))
        };
        let current = self.prefix.as_ref().map(|p| p.ids.as_slice());
        let current_len = match current {
            Some(ids) if usable(ids) => ids.len(),
            _ => 0,
        };
        if prompts.len() >= 2 {
            let first = prompts[0];
            let mut lcp = first.len().saturating_sub(1);
            for p in &prompts[1..] {
                let common = first
                    .iter()
                    .zip(p.iter())
                    .take_while(|(a, b)| a == b)
                    .count();
                lcp = lcp.min(common).min(p.len().saturating_sub(1));
            }
            if lcp >= self.min_shared_prefix && lcp > current_len {
                self.cache_prefix(&first[..lcp])?;
                return Ok(lcp);
            }
        }
        Ok(current_len)
    }

    /// Prefills a batch of prompts: the cached prefix (if usable), then the rest of every
    /// prompt right-aligned in one forward pass.
    fn prefill(&mut self, prompts: &[&[u32]], reserve: usize) -> Result<Prefilled<B>, ModelError> {
        for p in prompts {
            if p.is_empty() {
                return Err(ModelError::Request("empty prompt".into()));
            }
            self.check_ids(p)?;
        }
        let p_len = self.choose_prefix(prompts)?;
        let b = prompts.len();
        let s = prompts.iter().map(|p| p.len() - p_len).max().unwrap_or(1);
        // Own slots only: a shared prefix lives apart from them.
        let cap = (s + reserve.max(1)).div_ceil(GROW_CHUNK) * GROW_CHUNK;
        let mut cache = match (&self.prefix, p_len) {
            (Some(prefix), n) if n > 0 => self.model.new_cache(b, cap).with_prefix(prefix),
            _ => self.model.new_cache(b, cap),
        };
        let mut tokens = Vec::with_capacity(b * s);
        for p in prompts {
            let rest = &p[p_len..];
            tokens.extend(std::iter::repeat_n(None, s - rest.len()));
            tokens.extend(rest.iter().map(|&t| Some(t)));
        }
        let logits = self.model.forward(&tokens, s, &mut cache)?;
        self.timing.prefill_tokens += prompts.iter().map(|p| p.len() - p_len).sum::<usize>();
        Ok(Prefilled { cache, logits })
    }

    /// The next-token logits after each prompt (`[vocab]` each), batched and using the prefix
    /// cache like [`Generator::generate`].
    pub fn next_token_logits(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.timing = GenerateTiming::default();
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.max_batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let pre = self.prefill(&refs, 0)?;
            let vocab = self.model.config().vocab;
            let flat = to_f32(pre.logits)?;
            out.extend(flat.chunks(vocab).map(<[f32]>::to_vec));
        }
        Ok(out)
    }

    /// Generates a completion for every request (in request order).
    pub fn generate(&mut self, requests: &[Request]) -> Result<Vec<Completion>, ModelError> {
        self.timing = GenerateTiming::default();
        let mut out = Vec::with_capacity(requests.len());
        for chunk in requests.chunks(self.max_batch.max(1)) {
            out.extend(self.generate_batch(chunk)?);
        }
        Ok(out)
    }

    /// For each batch row in `want`: the most likely of its request's choice options under
    /// `logits` (`[rows, vocab]`), read from `host` when the logits are already there.
    fn pick_options(
        &self,
        requests: &[Request],
        rows: &[usize],
        want: &[usize],
        logits: &Tensor<B, 2>,
        host: Option<&[f32]>,
    ) -> Result<Vec<Option<Picked>>, ModelError> {
        let vocab = self.model.config().vocab;
        let fetched;
        let (flat, row_of): (&[f32], Vec<usize>) = match host {
            Some(h) => (h, want.to_vec()),
            None => {
                let idx: Vec<i64> = want.iter().map(|&r| r as i64).collect();
                let idx = Tensor::<B, 1, burn::tensor::Int>::from_data(
                    burn::tensor::TensorData::new(idx, [want.len()]),
                    &logits.device(),
                );
                fetched = to_f32(logits.clone().select(0, idx))?;
                (&fetched, (0..want.len()).collect())
            }
        };
        Ok(want
            .iter()
            .zip(row_of)
            .map(|(&r, at)| {
                let row = flat.get(at * vocab..(at + 1) * vocab)?;
                let options = &requests[rows[r]].then_choose.as_ref()?.options;
                pick_option(row, options)
            })
            .collect())
    }

    fn generate_batch(&mut self, requests: &[Request]) -> Result<Vec<Completion>, ModelError> {
        let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
        // Requests that want no tokens never enter the batch.
        let live: Vec<usize> = (0..requests.len())
            .filter(|&i| {
                if requests[i].max_new_tokens == 0 {
                    done[i] = Some(Completion {
                        ids: Vec::new(),
                        text: String::new(),
                        stop: StopReason::MaxTokens,
                        choice: None,
                        choice_probs: None,
                    });
                    false
                } else {
                    true
                }
            })
            .collect();
        if !live.is_empty() {
            let prompts: Vec<&[u32]> = live
                .iter()
                .map(|&i| requests[i].prompt_ids.as_slice())
                .collect();
            let reserve = live
                .iter()
                .map(|&i| requests[i].max_new_tokens)
                .max()
                .unwrap_or(1)
                .min(GROW_CHUNK);
            let t0 = std::time::Instant::now();
            let Prefilled {
                mut cache,
                mut logits,
            } = self.prefill(&prompts, reserve)?;
            // The prefill's logits are read (argmax) below, which waits for lazy backends.
            let mut prefill_s = t0.elapsed().as_secs_f64();
            let mut first_pick = true;
            let mut step_start = std::time::Instant::now();
            let max_pos = self.model.config().max_seq_len;
            let vocab = self.model.config().vocab;
            let mut rows = live; // request index of each cache row
            let mut samplers: Vec<Sampler> = rows
                .iter()
                .map(|&i| Sampler::new(requests[i].sampling))
                .collect();
            let mut generated: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
            // Rows whose completion is done and which are being fed their choice prefill.
            let mut forcing: Vec<Option<Forcing>> = vec![None; rows.len()];
            loop {
                // Greedy batches pick on the device and move `batch` ints, not the logits.
                let (next, host): (Vec<u32>, Option<Vec<f32>>) =
                    if samplers.iter().all(|s| s.config().is_greedy()) {
                        (to_u32(logits.clone().argmax(1))?, None)
                    } else {
                        let flat = to_f32(logits.clone())?;
                        let next = flat
                            .chunks(vocab)
                            .zip(samplers.iter_mut())
                            .map(|(row, s)| s.sample(row))
                            .collect();
                        (next, Some(flat))
                    };
                if first_pick {
                    prefill_s += step_start.elapsed().as_secs_f64();
                    self.timing.prefill_s += prefill_s;
                    first_pick = false;
                } else {
                    self.timing.decode_s += step_start.elapsed().as_secs_f64();
                }
                let mut keep = Vec::with_capacity(rows.len());
                let mut step_tokens = Vec::with_capacity(rows.len());
                // Rows whose logits now follow their whole choice prefill.
                let mut choose_now: Vec<(usize, Completion)> = Vec::new();
                for (r, &tok) in next.iter().enumerate() {
                    let req = &requests[rows[r]];
                    if let Some(f) = forcing[r].as_mut() {
                        match f.queue.pop_front() {
                            Some(t) => {
                                keep.push(r);
                                step_tokens.push(Some(t));
                            }
                            None => {
                                if let Some(f) = forcing[r].take() {
                                    choose_now.push((r, f.completion));
                                }
                            }
                        }
                        continue;
                    }
                    let stop = if self.stop_ids.contains(&tok) || req.stop_ids.contains(&tok) {
                        Some(StopReason::StopToken(tok))
                    } else {
                        generated[r].push(tok);
                        if generated[r].len() >= req.max_new_tokens {
                            Some(StopReason::MaxTokens)
                        } else if cache.next_position(r) >= max_pos {
                            Some(StopReason::ContextFull)
                        } else {
                            None
                        }
                    };
                    let Some(stop) = stop else {
                        keep.push(r);
                        step_tokens.push(Some(tok));
                        continue;
                    };
                    let ids = std::mem::take(&mut generated[r]);
                    let text = self.decoder.as_ref().map(|d| d(&ids)).unwrap_or_default();
                    // What the cache lacks of the completion (its last token, unless that was
                    // a stop token, which the completion leaves out), then the prefill.
                    let mut queue = std::collections::VecDeque::new();
                    if stop == StopReason::MaxTokens {
                        queue.extend(ids.last().copied());
                    }
                    let completion = Completion {
                        ids,
                        text,
                        stop,
                        choice: None,
                        choice_probs: None,
                    };
                    let Some(after) = &req.then_choose else {
                        done[rows[r]] = Some(completion);
                        continue;
                    };
                    queue.extend(after.prefill.iter().copied());
                    if stop == StopReason::ContextFull
                        || cache.next_position(r) + queue.len() > max_pos
                    {
                        done[rows[r]] = Some(completion);
                        continue;
                    }
                    match queue.pop_front() {
                        Some(t) => {
                            keep.push(r);
                            step_tokens.push(Some(t));
                            forcing[r] = Some(Forcing { queue, completion });
                        }
                        // Nothing to feed: these logits already follow the completion.
                        None => choose_now.push((r, completion)),
                    }
                }
                if !choose_now.is_empty() {
                    let want: Vec<usize> = choose_now.iter().map(|(r, _)| *r).collect();
                    let picked =
                        self.pick_options(requests, &rows, &want, &logits, host.as_deref())?;
                    for ((r, mut completion), choice) in choose_now.into_iter().zip(picked) {
                        if let Some((i, probs)) = choice {
                            completion.choice = Some(i);
                            completion.choice_probs = Some(probs);
                        }
                        done[rows[r]] = Some(completion);
                    }
                }
                if keep.is_empty() {
                    break;
                }
                if keep.len() != rows.len() {
                    cache.retain(&keep);
                    rows = keep.iter().map(|&r| rows[r]).collect();
                    samplers = keep.iter().map(|&r| samplers[r].clone()).collect();
                    generated = keep
                        .iter()
                        .map(|&r| std::mem::take(&mut generated[r]))
                        .collect();
                    forcing = keep.iter().map(|&r| forcing[r].take()).collect();
                }
                step_start = std::time::Instant::now();
                self.timing.decode_steps += 1;
                self.timing.decode_tokens += step_tokens.len();
                logits = self.model.forward(&step_tokens, 1, &mut cache)?;
            }
        }
        done.into_iter()
            .map(|c| c.ok_or_else(|| ModelError::Request("a sequence was lost".into())))
            .collect()
    }
}

/// A finished row being fed its choice prefill.
#[derive(Clone)]
struct Forcing {
    /// Tokens still to feed.
    queue: std::collections::VecDeque<u32>,
    /// The completion, waiting for its choice.
    completion: Completion,
}

fn to_f32<B: Backend>(t: Tensor<B, 2>) -> Result<Vec<f32>, ModelError> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| ModelError::Request(format!("reading logits: {e:?}")))
}

fn to_u32<B: Backend>(t: Tensor<B, 2, burn::tensor::Int>) -> Result<Vec<u32>, ModelError> {
    let v = t
        .into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| ModelError::Request(format!("reading token ids: {e:?}")))?;
    Ok(v.into_iter().map(|x| x as u32).collect())
}

#[cfg(test)]
mod tests {
    use super::pick_option;

    /// Logits ln 1, ln 2, ln 3, ln 4: the softmax is 0.1, 0.2, 0.3, 0.4 over the whole row, so
    /// options {1, 3} have 0.2 and 0.4 (not renormalised), and 3 is picked.
    #[test]
    fn option_probabilities_are_over_the_whole_vocabulary() {
        let logits = [1f32.ln(), 2f32.ln(), 3f32.ln(), 4f32.ln()];
        let (i, p) = pick_option(&logits, &[1, 3]).expect("pick");
        assert_eq!(i, 1);
        assert!(
            (p[0] - 0.2).abs() < 1e-6 && (p[1] - 0.4).abs() < 1e-6,
            "{p:?}"
        );
        // An option outside the vocabulary, or a row of no finite logit, gives no pick.
        assert_eq!(pick_option(&logits, &[1, 9]), None);
        assert_eq!(pick_option(&[f32::NEG_INFINITY; 3], &[0]), None);
        // Large logits do not overflow.
        let (i, p) = pick_option(&[1000.0, 1000.0], &[0, 1]).expect("pick");
        assert_eq!(i, 0);
        assert!((p[0] - 0.5).abs() < 1e-6);
    }
}
