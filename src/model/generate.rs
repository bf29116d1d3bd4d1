//! Batched generation with a shared-prefix KV cache.
//!
//! [`Generator`] is meant to be owned by one model-server thread: it takes a batch of
//! [`Request`]s gathered from many workers, prefills all prompts in one forward pass
//! (right-aligned, padding masked out), decodes all sequences together one token per step,
//! drops sequences from the batch as they finish, and answers one [`Completion`] per request
//! in request order.
//!
//! Continuous batching: [`Generator::start`], [`Generator::join`] and [`Generator::step`] run a
//! [`RunningBatch`] one step at a time, so a caller (the model server) adds sequences between two
//! steps and hears each one the step it finishes. A newcomer is prefilled on its own (from the
//! batch's shared prefix) and its KV joins the batch right-aligned with the rows already
//! decoding (`KvCache::join`); slots no row uses any more are dropped from the front
//! (`KvCache::trim_front`), so a batch that never empties reads a bounded cache.
//! [`Generator::generate`] is `start` then `step` until done.
//!
//! Prefix cache: prompts that share a long token prefix (the rating template shared by every
//! rating) compute it once. The generator keeps the K/V of the last few prefixes it used
//! ([`Generator::prefix_slots`], least recently used dropped first), so batches of different
//! kinds for one model (ratings, answers under a system prompt, judge prompts) do not evict each
//! other's; a batch whose prompts all start with a kept prefix reuses the longest such, and a
//! batch of several prompts with a longer common prefix ([`Generator::min_shared_prefix`] tokens
//! or more) computes and keeps that one. [`Generator::cache_prefix`] adds one explicitly. Each request's sampler has its own seeded
//! RNG, so results do not depend on which batch a request lands in.

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::kv_cache::{KvCache, PrefixKv, GROW_CHUNK};
use super::llama::{Llama, Pass};
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
    /// Kept prefixes, least recently used first.
    prefixes: Vec<PrefixKv<B>>,
    decoder: Option<Decoder>,
    /// Whether the model's batches keep KV in blocks per row (asked once: the answer takes a
    /// tensor to find out).
    paged_kv: bool,
    /// Shortest common prefix of a batch worth computing once and caching.
    pub min_shared_prefix: usize,
    /// Most prefixes kept at once (a rating template's K/V on SmolLM2-135M is ~20 MB).
    pub prefix_slots: usize,
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

/// A prefilled batch: its cache and the logits after each prompt, row `r` of both for prompt
/// `order[r]` (prompts are prefilled by length: [`length_groups`]).
struct Prefilled<B: Backend> {
    cache: KvCache<B>,
    logits: Tensor<B, 2>,
    order: Vec<usize>,
}

/// `items` (a batch's requests or prompts) in a prefill's row order `order`.
fn in_order<T>(items: Vec<T>, order: &[usize]) -> Vec<T> {
    let mut slots: Vec<Option<T>> = items.into_iter().map(Some).collect();
    order
        .iter()
        .filter_map(|&i| slots.get_mut(i).and_then(Option::take))
        .collect()
}

/// Padding a prefill pass may add over its prompts' own tokens, as a share of them.
const PAD_SHARE: f64 = 0.25;
/// Padding tokens a pass may add whatever the share: a pass has a fixed cost (every weight
/// read once, every layer's fan-out), so tiny prompts go together.
const PAD_SLACK: usize = 64;

/// Cuts prompts of own lengths `lens` (ascending) into runs prefilled one pass each: a pass
/// right-aligns its prompts to its longest and computes the padding like a token, so prompts
/// of every length in one pass (a rating batch of 32 seed pairs: 5.8 padded tokens for each
/// real one) ran the loop's prefill at half the bench's speed. A run grows while its padding
/// stays under [`PAD_SHARE`] of its tokens plus [`PAD_SLACK`]. Returns the runs' ends.
pub(crate) fn length_groups(lens: &[usize]) -> Vec<usize> {
    let mut ends = Vec::new();
    let (mut start, mut sum) = (0, 0usize);
    for (j, &len) in lens.iter().enumerate() {
        let padded = (j + 1 - start) * len;
        let allowed = ((sum + len) as f64 * (1.0 + PAD_SHARE)) as usize + PAD_SLACK;
        if j > start && padded > allowed {
            ends.push(j);
            (start, sum) = (j, 0);
        }
        sum += len;
    }
    if !lens.is_empty() {
        ends.push(lens.len());
    }
    ends
}

impl<B: Backend> Generator<B> {
    /// A generator that stops sequences at any of `stop_ids` (EOS, `<|im_end|>`, ...).
    pub fn new(model: Llama<B>, stop_ids: Vec<u32>) -> Self {
        Generator {
            paged_kv: KvCache::<B>::paged_on(model.device(), model.dtype()),
            model,
            stop_ids,
            prefixes: Vec::new(),
            decoder: None,
            min_shared_prefix: 32,
            prefix_slots: 4,
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

    /// Whether this model's batches keep each row's KV slots in blocks of its own
    /// ([`KvCache::paged_on`]), so that a row's memory follows its own length.
    pub fn paged_kv(&self) -> bool {
        self.paged_kv
    }

    /// Bytes of KV cache one token of one sequence takes: every layer's K and V.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = self.model.config();
        2 * c.n_layers * c.n_kv_heads * c.head_dim * self.model.dtype().size()
    }

    /// Where the time of the last [`Generator::generate`] call went.
    pub fn last_timing(&self) -> GenerateTiming {
        self.timing
    }

    /// Where the time went since the last call of this (or since [`Generator::generate`] or
    /// [`Generator::next_token_logits`] started), and starts counting afresh: for a caller that
    /// runs [`Generator::start`], [`Generator::join`] and [`Generator::step`] itself.
    pub fn take_timing(&mut self) -> GenerateTiming {
        std::mem::take(&mut self.timing)
    }

    /// Tokens in the most recently used prefix (0 when none is kept).
    pub fn cached_prefix_len(&self) -> usize {
        self.prefixes.last().map_or(0, PrefixKv::len)
    }

    /// The lengths of the kept prefixes, least recently used first.
    pub fn cached_prefix_lens(&self) -> Vec<usize> {
        self.prefixes.iter().map(PrefixKv::len).collect()
    }

    /// Forgets every kept prefix.
    pub fn clear_prefix(&mut self) {
        self.prefixes.clear();
    }

    /// Computes (unless kept already) the K/V of `ids`, to be reused by every later prompt
    /// starting with it, and makes it the most recently used prefix.
    pub fn cache_prefix(&mut self, ids: &[u32]) -> Result<(), ModelError> {
        if ids.is_empty() {
            return Ok(());
        }
        if let Some(i) = self.prefixes.iter().position(|p| p.ids == ids) {
            self.touch(i);
            return Ok(());
        }
        self.check_ids(ids)?;
        let mut cache = self.model.new_cache(1, ids.len());
        let tokens: Vec<Option<u32>> = ids.iter().map(|&t| Some(t)).collect();
        self.model.forward(&tokens, ids.len(), &mut cache)?;
        self.timing.prefill_tokens += ids.len();
        self.prefixes.push(cache.snapshot_prefix(ids)?);
        let excess = self.prefixes.len().saturating_sub(self.prefix_slots.max(1));
        self.prefixes.drain(..excess);
        Ok(())
    }

    /// Makes kept prefix `i` the most recently used.
    fn touch(&mut self, i: usize) {
        let p = self.prefixes.remove(i);
        self.prefixes.push(p);
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

    /// Picks (and if needed computes) the prefix for this batch; returns its length. `head` is
    /// the length of a head the first prompt shares with prompts elsewhere (rows of another
    /// batch; 0 for none): a lone prompt computes and keeps that much as a prefix, for the
    /// prompts that share it to start from.
    fn choose_prefix(&mut self, prompts: &[&[u32]], head: usize) -> Result<usize, ModelError> {
        // A prefix must leave at least one prompt token, whose logits start the generation.
        let usable = |ids: &[u32]| {
            prompts
                .iter()
                .all(|p| p.len() > ids.len() && p.starts_with(ids))
        };
        // The longest kept prefix every prompt starts with.
        let kept = (self.prefixes.iter().enumerate())
            .filter(|(_, p)| usable(&p.ids))
            .max_by_key(|(_, p)| p.len())
            .map(|(i, p)| (i, p.len()));
        let current_len = kept.map_or(0, |k| k.1);
        if let Some(first) = prompts.first() {
            let mut lcp = first.len().saturating_sub(1);
            if prompts.len() == 1 {
                lcp = lcp.min(head);
            }
            for p in &prompts[1..] {
                lcp = lcp.min(common_len(first, p)).min(p.len().saturating_sub(1));
            }
            if lcp >= self.min_shared_prefix && lcp > current_len {
                self.cache_prefix(&first[..lcp])?;
                return Ok(lcp);
            }
        }
        // The prefix the batch uses is the most recently used one (`prefill` takes the last).
        if let Some((i, _)) = kept {
            self.touch(i);
        }
        Ok(current_len)
    }

    /// Prefills a batch of prompts: the cached prefix (if usable), then the rest of every
    /// prompt right-aligned in one forward pass.
    fn prefill(
        &mut self,
        prompts: &[&[u32]],
        reserve: usize,
        head: usize,
    ) -> Result<Prefilled<B>, ModelError> {
        for p in prompts {
            if p.is_empty() {
                return Err(ModelError::Request("empty prompt".into()));
            }
            self.check_ids(p)?;
        }
        // Computing a new shared prefix counts as prefill.
        let t0 = std::time::Instant::now();
        let p_len = self.choose_prefix(prompts, head)?;
        self.timing.prefill_s += t0.elapsed().as_secs_f64();
        let prefix = self.prefixes.last().filter(|_| p_len > 0).cloned();
        self.prefill_from(prompts, reserve, prefix.as_ref())
    }

    /// Prefills prompts that all start with `prefix` (and go on after it), in a cache that
    /// starts from the prefix: shortest first, prompts of like length right-aligned in one
    /// forward pass each ([`length_groups`]), the passes' caches joined.
    fn prefill_from(
        &mut self,
        prompts: &[&[u32]],
        reserve: usize,
        prefix: Option<&PrefixKv<B>>,
    ) -> Result<Prefilled<B>, ModelError> {
        let p_len = prefix.map_or(0, PrefixKv::len);
        let own = |i: usize| prompts[i].len().saturating_sub(p_len);
        let mut order: Vec<usize> = (0..prompts.len()).collect();
        order.sort_by_key(|&i| own(i));
        let lens: Vec<usize> = order.iter().map(|&i| own(i)).collect();
        let mut done: Option<(KvCache<B>, Vec<Tensor<B, 2>>)> = None;
        let mut start = 0;
        for end in length_groups(&lens) {
            let group: Vec<&[u32]> = order[start..end].iter().map(|&i| prompts[i]).collect();
            let (cache, logits) = self.prefill_pass(&group, reserve, prefix)?;
            done = Some(match done {
                None => (cache, vec![logits]),
                Some((mut all, mut rows)) => {
                    all.join(cache)?;
                    rows.push(logits);
                    (all, rows)
                }
            });
            start = end;
        }
        let (cache, logits) = match done {
            Some((cache, rows)) => (cache, Tensor::cat(rows, 0)),
            None => self.prefill_pass(prompts, reserve, prefix)?,
        };
        Ok(Prefilled {
            cache,
            logits,
            order,
        })
    }

    /// One forward pass of [`Generator::prefill_from`]: the rest of every prompt after
    /// `prefix`, right-aligned.
    fn prefill_pass(
        &mut self,
        prompts: &[&[u32]],
        reserve: usize,
        prefix: Option<&PrefixKv<B>>,
    ) -> Result<(KvCache<B>, Tensor<B, 2>), ModelError> {
        let p_len = prefix.map_or(0, PrefixKv::len);
        let b = prompts.len();
        let s = prompts.iter().map(|p| p.len() - p_len).max().unwrap_or(1);
        // Own slots only: a shared prefix lives apart from them.
        let cap = (s + reserve.max(1)).div_ceil(GROW_CHUNK) * GROW_CHUNK;
        let mut cache = match prefix {
            Some(prefix) => self.model.new_cache(b, cap).with_prefix(prefix),
            None => self.model.new_cache(b, cap),
        };
        let mut tokens = Vec::with_capacity(b * s);
        for p in prompts {
            let rest = &p[p_len..];
            tokens.extend(std::iter::repeat_n(None, s - rest.len()));
            tokens.extend(rest.iter().map(|&t| Some(t)));
        }
        let t0 = std::time::Instant::now();
        let logits = self.model.forward(&tokens, s, &mut cache)?;
        self.timing.prefill_s += t0.elapsed().as_secs_f64();
        self.timing.prefill_tokens += prompts.iter().map(|p| p.len() - p_len).sum::<usize>();
        Ok((cache, logits))
    }

    /// The next-token logits after each prompt (`[vocab]` each), batched and using the prefix
    /// cache like [`Generator::generate`].
    pub fn next_token_logits(&mut self, prompts: &[Vec<u32>]) -> Result<Vec<Vec<f32>>, ModelError> {
        self.timing = GenerateTiming::default();
        let mut out = Vec::with_capacity(prompts.len());
        for chunk in prompts.chunks(self.max_batch.max(1)) {
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            let pre = self.prefill(&refs, 0, 0)?;
            let vocab = self.model.config().vocab;
            let flat = to_f32(pre.logits)?;
            let mut rows = vec![Vec::new(); refs.len()];
            for (&i, row) in pre.order.iter().zip(flat.chunks(vocab)) {
                rows[i] = row.to_vec();
            }
            out.extend(rows);
        }
        Ok(out)
    }

    /// Generates a completion for every request (in request order).
    pub fn generate(&mut self, requests: &[Request]) -> Result<Vec<Completion>, ModelError> {
        self.generate_streaming(requests, &mut |_, _| {})
    }

    /// [`Generator::generate`], calling `on_token(request index, token)` for every token of a
    /// completion as soon as it is picked (stop tokens and a choice's prefill are not part of a
    /// completion and are not passed): what a streaming API sends on as it comes.
    pub fn generate_streaming(
        &mut self,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Completion>, ModelError> {
        self.timing = GenerateTiming::default();
        let mut out = Vec::with_capacity(requests.len());
        let size = self.max_batch.max(1);
        for (c, chunk) in requests.chunks(size).enumerate() {
            out.extend(self.generate_batch(chunk, &mut |i, t| on_token(c * size + i, t))?);
        }
        Ok(out)
    }

    /// For each batch row in `want`: the most likely of its request's choice options under
    /// `logits` (`[rows, vocab]`), read from `host` when the logits are already there.
    fn pick_options(
        &self,
        rows: &[Row],
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
                let options = &rows[r].request.then_choose.as_ref()?.options;
                pick_option(row, options)
            })
            .collect())
    }

    fn generate_batch(
        &mut self,
        requests: &[Request],
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Completion>, ModelError> {
        let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
        let keyed = requests.iter().cloned().enumerate();
        let (batch, finished) = self.start(keyed.map(|(i, r)| (i as u64, r)).collect())?;
        for (key, completion) in finished {
            done[key as usize] = Some(completion);
        }
        if let Some(mut batch) = batch {
            while !batch.is_empty() {
                for (key, completion) in
                    self.step(&mut batch, &mut |k, t| on_token(k as usize, t))?
                {
                    done[key as usize] = Some(completion);
                }
            }
        }
        done.into_iter()
            .map(|c| c.ok_or_else(|| ModelError::Request("a sequence was lost".into())))
            .collect()
    }

    /// Starts a running batch of `requests`, each with the caller's key: their prompts are
    /// prefilled together (with the prefix cache). Requests that want no tokens never enter a
    /// batch and are answered at once (the second part); the batch is `None` when none is left.
    #[allow(clippy::type_complexity)]
    pub fn start(
        &mut self,
        requests: Vec<(u64, Request)>,
    ) -> Result<(Option<RunningBatch<B>>, Vec<(u64, Completion)>), ModelError> {
        self.start_sharing(requests, 0)
    }

    /// [`Generator::start`] for requests whose first prompt shares its first `head` tokens with
    /// prompts elsewhere (the rows of another batch: [`Generator::shared_head_len`]). A batch of
    /// one computes that head as its prefix and keeps it, so the next prompts that share it
    /// start from it rather than each prefilling it whole (a rating that arrives alone behind
    /// the rating template). `head` shorter than [`Generator::min_shared_prefix`] is none.
    #[allow(clippy::type_complexity)]
    pub fn start_sharing(
        &mut self,
        requests: Vec<(u64, Request)>,
        head: usize,
    ) -> Result<(Option<RunningBatch<B>>, Vec<(u64, Completion)>), ModelError> {
        let (live, finished) = split_empty(requests);
        if live.is_empty() {
            return Ok((None, finished));
        }
        let prompts: Vec<&[u32]> = live.iter().map(|(_, r)| r.prompt_ids.as_slice()).collect();
        let Prefilled {
            cache,
            logits,
            order,
        } = self.prefill(&prompts, reserve_for(&live), head)?;
        Ok((
            Some(RunningBatch {
                cache,
                logits,
                rows: in_order(live, &order).into_iter().map(Row::new).collect(),
                next: None,
            }),
            finished,
        ))
    }

    /// Whether `request` can join `batch` between its steps: its prompt starts with the batch's
    /// shared prefix and goes on after it (a batch without one takes any prompt).
    pub fn can_join(batch: &RunningBatch<B>, request: &Request) -> bool {
        let prefix = batch.cache.prefix_ids();
        request.max_new_tokens == 0
            || batch.is_empty()
            || (request.prompt_ids.len() > prefix.len() && request.prompt_ids.starts_with(prefix))
    }

    /// Whether `request` is better off joining `batch` than waiting for a batch of its own: it
    /// can join ([`Generator::can_join`]), and no longer shared prefix is to be had elsewhere:
    /// no kept prefix longer than the batch's fits it, and it shares no stretch of
    /// [`Generator::min_shared_prefix`] tokens or more past the batch's prefix with a row of the
    /// batch (then a batch of its own, started when this one empties, computes that stretch
    /// once for all who share it: the rating template behind a first batch of one).
    pub fn should_join(&self, batch: &RunningBatch<B>, request: &Request) -> bool {
        if !Self::can_join(batch, request) {
            return false;
        }
        if request.max_new_tokens == 0 || batch.is_empty() {
            return true;
        }
        let prompt = &request.prompt_ids;
        let have = batch.cache.prefix_ids().len();
        let better_kept = self
            .prefixes
            .iter()
            .any(|p| p.len() > have && prompt.len() > p.len() && prompt.starts_with(&p.ids));
        let longer_shared = have.saturating_add(self.min_shared_prefix);
        let shares_more = (batch.rows.iter())
            .any(|row| common_len(&row.request.prompt_ids, prompt) >= longer_shared);
        !better_kept && !shares_more
    }

    /// Continuous batching: adds `requests` to `batch` between two steps. Their prompts are
    /// prefilled on their own (from the batch's shared prefix) and their rows join the batch,
    /// which goes on decoding the rows it had where they were. Every request must pass
    /// [`Generator::can_join`]. Answers what wants no tokens at once, as [`Generator::start`].
    pub fn join(
        &mut self,
        batch: &mut RunningBatch<B>,
        requests: Vec<(u64, Request)>,
    ) -> Result<Vec<(u64, Completion)>, ModelError> {
        if batch.next.is_some() {
            return Err(ModelError::Request(
                "sequences can join a batch only between steps, not between pick and advance"
                    .into(),
            ));
        }
        if batch.is_empty() {
            let (started, finished) = self.start(requests)?;
            if let Some(started) = started {
                *batch = started;
            }
            return Ok(finished);
        }
        if let Some((key, _)) = requests.iter().find(|(_, r)| !Self::can_join(batch, r)) {
            return Err(ModelError::Request(format!(
                "request {key} does not start with the running batch's shared prefix"
            )));
        }
        let (live, finished) = split_empty(requests);
        if live.is_empty() {
            return Ok(finished);
        }
        for (_, r) in &live {
            self.check_ids(&r.prompt_ids)?;
        }
        let prefix = batch.cache.prefix().cloned();
        let prompts: Vec<&[u32]> = live.iter().map(|(_, r)| r.prompt_ids.as_slice()).collect();
        let pre = self.prefill_from(&prompts, reserve_for(&live), prefix.as_ref())?;
        batch.cache.join(pre.cache)?;
        batch.logits = Tensor::cat(vec![batch.logits.clone(), pre.logits], 0);
        batch
            .rows
            .extend(in_order(live, &pre.order).into_iter().map(Row::new));
        Ok(finished)
    }

    /// One step of `batch`: picks every row's next token, answers the rows that are done (with
    /// their keys), and runs one forward step for the others. `on_token(key, token)` hears every
    /// token of a completion as it is picked (not stop tokens, not a choice's prefill).
    /// [`Generator::pick`] then [`Generator::advance`].
    pub fn step(
        &mut self,
        batch: &mut RunningBatch<B>,
        on_token: &mut dyn FnMut(u64, u32),
    ) -> Result<Vec<(u64, Completion)>, ModelError> {
        let done = self.pick(batch, on_token)?;
        self.advance(batch)?;
        Ok(done)
    }

    /// The first half of [`Generator::step`]: picks every row's next token and answers the rows
    /// that are done; the others' tokens wait in the batch for the forward step
    /// ([`Generator::advance`], or [`Generator::advance_jointly`] with other versions' batches).
    pub fn pick(
        &mut self,
        batch: &mut RunningBatch<B>,
        on_token: &mut dyn FnMut(u64, u32),
    ) -> Result<Vec<(u64, Completion)>, ModelError> {
        let mut done = Vec::new();
        if batch.is_empty() {
            return Ok(done);
        }
        if batch.next.is_some() {
            return Err(ModelError::Request(
                "a batch's picked tokens were not run forward before the next pick".into(),
            ));
        }
        let step_start = std::time::Instant::now();
        let max_pos = self.model.config().max_seq_len;
        let vocab = self.model.config().vocab;
        let RunningBatch {
            cache,
            logits,
            rows,
            next: pending,
        } = batch;
        // Greedy batches pick on the device and move `batch` ints, not the logits.
        let (next, host): (Vec<u32>, Option<Vec<f32>>) =
            if rows.iter().all(|r| r.sampler.config().is_greedy()) {
                (to_u32(logits.clone().argmax(1))?, None)
            } else {
                let flat = to_f32(logits.clone())?;
                let next = flat
                    .chunks(vocab)
                    .zip(rows.iter_mut())
                    .map(|(row, r)| r.sampler.sample(row))
                    .collect();
                (next, Some(flat))
            };
        let mut keep = Vec::with_capacity(rows.len());
        let mut step_tokens = Vec::with_capacity(rows.len());
        // Rows whose logits now follow their whole choice prefill.
        let mut choose_now: Vec<(usize, Completion)> = Vec::new();
        for (r, &tok) in next.iter().enumerate() {
            let row = &mut rows[r];
            if let Some(f) = row.forcing.as_mut() {
                match f.queue.pop_front() {
                    Some(t) => {
                        keep.push(r);
                        step_tokens.push(Some(t));
                    }
                    None => {
                        if let Some(f) = row.forcing.take() {
                            choose_now.push((r, f.completion));
                        }
                    }
                }
                continue;
            }
            let req = &row.request;
            let stop = if self.stop_ids.contains(&tok) || req.stop_ids.contains(&tok) {
                Some(StopReason::StopToken(tok))
            } else {
                row.generated.push(tok);
                on_token(row.key, tok);
                if row.generated.len() >= req.max_new_tokens {
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
            let ids = std::mem::take(&mut row.generated);
            let text = self.decoder.as_ref().map(|d| d(&ids)).unwrap_or_default();
            // What the cache lacks of the completion (its last token, unless that was a stop
            // token, which the completion leaves out), then the prefill.
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
            let Some(after) = &row.request.then_choose else {
                done.push((row.key, completion));
                continue;
            };
            queue.extend(after.prefill.iter().copied());
            if stop == StopReason::ContextFull || cache.next_position(r) + queue.len() > max_pos {
                done.push((row.key, completion));
                continue;
            }
            match queue.pop_front() {
                Some(t) => {
                    keep.push(r);
                    step_tokens.push(Some(t));
                    row.forcing = Some(Forcing { queue, completion });
                }
                // Nothing to feed: these logits already follow the completion.
                None => choose_now.push((r, completion)),
            }
        }
        if !choose_now.is_empty() {
            let want: Vec<usize> = choose_now.iter().map(|(r, _)| *r).collect();
            let picked = self.pick_options(rows, &want, logits, host.as_deref())?;
            for ((r, mut completion), choice) in choose_now.into_iter().zip(picked) {
                if let Some((i, probs)) = choice {
                    completion.choice = Some(i);
                    completion.choice_probs = Some(probs);
                }
                done.push((rows[r].key, completion));
            }
        }
        if keep.is_empty() {
            rows.clear();
            self.timing.decode_s += step_start.elapsed().as_secs_f64();
            return Ok(done);
        }
        if keep.len() != rows.len() {
            cache.retain(&keep);
            cache.trim_front();
            let mut old: Vec<Option<Row>> = std::mem::take(rows).into_iter().map(Some).collect();
            *rows = keep.iter().filter_map(|&r| old[r].take()).collect();
        }
        self.timing.decode_steps += 1;
        self.timing.decode_tokens += step_tokens.len();
        *pending = Some(step_tokens);
        self.timing.decode_s += step_start.elapsed().as_secs_f64();
        Ok(done)
    }

    /// The second half of [`Generator::step`]: runs the tokens [`Generator::pick`] left in
    /// `batch` through the model, one slot per row (nothing when it left none).
    pub fn advance(&mut self, batch: &mut RunningBatch<B>) -> Result<(), ModelError> {
        Self::advance_jointly(&mut [(self, vec![batch])])
    }

    /// [`Generator::advance`] for several batches in one forward pass
    /// ([`Llama::forward_jointly`]): each generator's batches (one per shared prefix), of
    /// generators whose models are versions of one base ([`Llama::shares_base_with`]: LoRA
    /// adapters over it). The base weights are read once for every row, as if they were one
    /// batch, while each batch keeps its own version, cache and shared prefix. Each generator's
    /// decode time gets the pass's time in proportion to its rows.
    pub fn advance_jointly(
        groups: &mut [(&mut Generator<B>, Vec<&mut RunningBatch<B>>)],
    ) -> Result<(), ModelError> {
        let t0 = std::time::Instant::now();
        let mut passes = Vec::new();
        // Which generator each pass is for, and its rows.
        let mut which = Vec::new();
        for (g, (generator, batches)) in groups.iter_mut().enumerate() {
            for batch in batches.iter_mut() {
                let RunningBatch { cache, next, .. } = &mut **batch;
                if let Some(tokens) = next.as_deref() {
                    which.push((g, tokens.len()));
                    passes.push(Pass {
                        model: &generator.model,
                        tokens,
                        s: 1,
                        cache,
                    });
                }
            }
        }
        if passes.is_empty() {
            return Ok(());
        }
        let logits = Llama::forward_jointly(&mut passes);
        drop(passes);
        let rows: usize = which.iter().map(|w| w.1).sum();
        let share = t0.elapsed().as_secs_f64() / rows.max(1) as f64;
        for &(g, n) in &which {
            groups[g].0.timing.decode_s += share * n as f64;
        }
        // The picked tokens are spent either way (a failed pass leaves its batches unusable).
        let mut logits = logits.map(Vec::into_iter);
        for (_, batches) in groups.iter_mut() {
            for batch in batches.iter_mut() {
                if batch.next.take().is_none() {
                    continue;
                }
                if let Some(l) = logits.as_mut().ok().and_then(Iterator::next) {
                    batch.logits = l;
                }
            }
        }
        logits.map(drop)
    }

    /// The longest kept prefix `prompt` could start from (0 when none): a batch of its own
    /// would not prefill it.
    pub fn kept_prefix_len(&self, prompt: &[u32]) -> usize {
        (self.prefixes.iter())
            .filter(|p| prompt.len() > p.len() && prompt.starts_with(&p.ids))
            .map(PrefixKv::len)
            .max()
            .unwrap_or(0)
    }

    /// The longest head `prompt` shares with a row of `batch`, all of it but its last token at
    /// most (0 when under [`Generator::min_shared_prefix`]): the prefix a batch of its own
    /// would compute and keep for it ([`Generator::start_sharing`]).
    pub fn shared_head_len(&self, batch: &RunningBatch<B>, prompt: &[u32]) -> usize {
        let longest = (batch.rows.iter())
            .map(|row| common_len(&row.request.prompt_ids, prompt))
            .max()
            .unwrap_or(0)
            .min(prompt.len().saturating_sub(1));
        if longest >= self.min_shared_prefix {
            longest
        } else {
            0
        }
    }
}

/// A batch being decoded, for continuous batching: sequences join it between steps
/// ([`Generator::join`]) and leave it as they finish ([`Generator::step`]), each under the key
/// its caller gave it.
pub struct RunningBatch<B: Backend> {
    cache: KvCache<B>,
    /// Every row's next-token logits, `[rows, vocab]`.
    logits: Tensor<B, 2>,
    rows: Vec<Row>,
    /// The tokens [`Generator::pick`] chose, one per row, waiting for the forward step that
    /// makes `logits` follow them ([`Generator::advance`]).
    next: Option<Vec<Option<u32>>>,
}

impl<B: Backend> RunningBatch<B> {
    /// Sequences being decoded.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether every sequence is done.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether [`Generator::pick`] left tokens for a forward step not yet run.
    pub fn has_picked(&self) -> bool {
        self.next.is_some()
    }

    /// The keys of the sequences being decoded.
    pub fn keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.rows.iter().map(|r| r.key)
    }

    /// KV cache slots in use (after the shared prefix): what attention reads per step.
    pub fn slots(&self) -> usize {
        self.cache.len()
    }

    /// Tokens of the shared prefix every row starts with (0 without one).
    pub fn prefix_len(&self) -> usize {
        self.cache.prefix_ids().len()
    }

    /// The most forward steps a row may still take (the rest of its new tokens, then its
    /// choice's prefill): how many slots the cache may still grow by.
    pub fn steps_left(&self) -> usize {
        self.rows.iter().map(Row::steps_left).max().unwrap_or(0)
    }

    /// The KV cache this batch may come to hold, every row running to its longest.
    pub fn kv_projection(&self) -> KvProjection {
        let mut p = KvProjection::new(self.cache.paged());
        for (i, row) in self.rows.iter().enumerate() {
            p.add(self.cache.held_slots(i), row.steps_left());
        }
        p
    }
}

/// The KV cache a batch may come to hold, in token slots, from each row's slots held now and
/// the steps it may still take: what the model server's KV budget bounds. Paged (host blocks
/// per sequence), a row holds its own slots, in whole blocks; otherwise (one tensor) every row
/// spans the batch's most slots and grows by its most steps. Counting the paged rows as dense
/// ones held `run rate` over the seed to 17 rows on average of the 32 asked for (27.7 since):
/// once rows join at different times, a row's own slots are a fraction of the batch's span.
#[derive(Debug, Clone, Copy)]
pub struct KvProjection {
    paged: bool,
    rows: usize,
    most_slots: usize,
    most_steps: usize,
    blocks: usize,
}

impl KvProjection {
    /// No rows yet, on a paged cache or not ([`KvCache::paged`]).
    pub fn new(paged: bool) -> Self {
        KvProjection {
            paged,
            rows: 0,
            most_slots: 0,
            most_steps: 0,
            blocks: 0,
        }
    }

    /// A row holding `slots` slots that may still take `steps` steps.
    pub fn add(&mut self, slots: usize, steps: usize) {
        self.rows += 1;
        self.most_slots = self.most_slots.max(slots);
        self.most_steps = self.most_steps.max(steps);
        // A row's blocks start at its first held slot (padding included), so whole blocks of
        // its slots are what it will hold.
        self.blocks += (slots + steps).div_ceil(GROW_CHUNK);
    }

    /// The slots projected.
    pub fn tokens(&self) -> usize {
        if self.paged {
            self.blocks * GROW_CHUNK
        } else {
            self.rows * (self.most_slots + self.most_steps)
        }
    }
}

/// How many tokens `a` and `b` start with in common.
pub fn common_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// The most forward steps `request` takes after its prompt: its new tokens, then the prefill
/// of its choice.
pub fn steps_of(request: &Request) -> usize {
    request.max_new_tokens
        + request
            .then_choose
            .as_ref()
            .map_or(0, |c| c.prefill.len() + 1)
}

/// One sequence of a running batch.
struct Row {
    key: u64,
    request: Request,
    sampler: Sampler,
    generated: Vec<u32>,
    /// Set once its completion is done and its choice prefill is being fed.
    forcing: Option<Forcing>,
}

impl Row {
    /// The most forward steps it may still take: the rest of its new tokens, then its
    /// choice's prefill.
    fn steps_left(&self) -> usize {
        match &self.forcing {
            Some(f) => f.queue.len(),
            None => steps_of(&self.request).saturating_sub(self.generated.len()),
        }
    }

    fn new((key, request): (u64, Request)) -> Row {
        Row {
            key,
            sampler: Sampler::new(request.sampling),
            request,
            generated: Vec::new(),
            forcing: None,
        }
    }
}

/// Requests that want tokens, and the answers of those that want none.
#[allow(clippy::type_complexity)]
fn split_empty(requests: Vec<(u64, Request)>) -> (Vec<(u64, Request)>, Vec<(u64, Completion)>) {
    let mut finished = Vec::new();
    let live = requests
        .into_iter()
        .filter_map(|(key, r)| {
            if r.max_new_tokens > 0 {
                return Some((key, r));
            }
            finished.push((
                key,
                Completion {
                    ids: Vec::new(),
                    text: String::new(),
                    stop: StopReason::MaxTokens,
                    choice: None,
                    choice_probs: None,
                },
            ));
            None
        })
        .collect();
    (live, finished)
}

/// Cache slots to reserve after the prompts: the longest completion asked, up to a chunk.
fn reserve_for(requests: &[(u64, Request)]) -> usize {
    requests
        .iter()
        .map(|(_, r)| r.max_new_tokens)
        .max()
        .unwrap_or(1)
        .min(GROW_CHUNK)
}

/// A finished row being fed its choice prefill.
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
    use super::{pick_option, ChoiceAfter, Completion, Generator, Request};
    use crate::model::llama::{Llama, RandomWeights};
    use crate::model::Precision;
    use burn::backend::Flex;
    use std::collections::HashMap;

    /// The training tests' tiny model (2 layers, 64 positions), random weights.
    fn tiny() -> Llama<Flex> {
        let cfg = crate::train::tiny_config();
        let mut src = RandomWeights::new(cfg.clone(), 3);
        Llama::load(cfg, &mut src, &Default::default(), Precision::F32).expect("model")
    }

    /// The projected KV slots, against hand counts: paged, each row its own slots and steps
    /// in whole blocks of 64; dense, every row the most slots plus the most steps.
    #[test]
    fn kv_projection_counts_rows_as_their_store_holds_them() {
        use super::KvProjection;
        let rows = [(10, 20), (100, 0), (64, 64), (0, 1)];
        let mut paged = KvProjection::new(true);
        let mut dense = KvProjection::new(false);
        for (slots, steps) in rows {
            paged.add(slots, steps);
            dense.add(slots, steps);
        }
        // ceil(30/64) + ceil(100/64) + ceil(128/64) + ceil(1/64) = 1 + 2 + 2 + 1 blocks
        assert_eq!(paged.tokens(), 6 * 64);
        // 4 rows x (100 most slots + 64 most steps)
        assert_eq!(dense.tokens(), 4 * 164);
        assert_eq!(KvProjection::new(true).tokens(), 0);
        assert_eq!(KvProjection::new(false).tokens(), 0);
    }

    /// Two kinds of batch for one model, each with its own long shared prefix, alternate: with
    /// room for both prefixes, the third batch computes none of its prefix again; with one
    /// slot, it recomputes it. Answers are those of a generator with no prefix cache.
    #[test]
    fn prefixes_of_alternating_batches_stay_kept() {
        let prompts = |head: u32| -> Vec<Request> {
            let prefix: Vec<u32> = (0..40).map(|i| (i * 5 + head) % 64).collect();
            (0..3u32)
                .map(|k| {
                    let mut ids = prefix.clone();
                    ids.extend([k + 1, (k * 7) % 64, 9]);
                    Request::greedy(ids, 4)
                })
                .collect()
        };
        let (a, b) = (prompts(1), prompts(2));
        let mut plain = Generator::new(tiny(), vec![]);
        plain.min_shared_prefix = usize::MAX;
        let (want_a, want_b) = (
            plain.generate(&a).expect("a"),
            plain.generate(&b).expect("b"),
        );
        for (slots, third_prefill) in [(4, 3 * 3), (1, 40 + 3 * 3)] {
            let mut gen = Generator::new(tiny(), vec![]);
            gen.prefix_slots = slots;
            let got_a = gen.generate(&a).expect("a");
            let got_b = gen.generate(&b).expect("b");
            let again = gen.generate(&a).expect("a again");
            assert_eq!(
                gen.last_timing().prefill_tokens,
                third_prefill,
                "{slots} slots"
            );
            assert_eq!(gen.cached_prefix_lens().len(), slots.min(2));
            for (got, want) in [(&got_a, &want_a), (&got_b, &want_b), (&again, &want_a)] {
                let ids = |c: &Vec<super::Completion>| -> Vec<Vec<u32>> {
                    c.iter().map(|x| x.ids.clone()).collect()
                };
                assert_eq!(ids(got), ids(want));
            }
        }
    }

    fn request(seed: u32, prefix: &[u32], len: usize, max: usize) -> Request {
        let mut ids = prefix.to_vec();
        ids.extend((0..len as u32).map(|i| (i * 13 + seed * 7 + 1) % 64));
        Request::greedy(ids, max)
    }

    fn alone(r: &Request) -> Completion {
        let mut gen = Generator::new(tiny(), vec![]);
        gen.generate(std::slice::from_ref(r))
            .expect("alone")
            .remove(0)
    }

    /// Continuous batching: a sequence's greedy tokens (and its forced choice) are the same
    /// alone, in a static batch, and joining a running batch midway, whether its prompt is
    /// shorter than what the batch has written or longer (the running rows then move), with and
    /// without a shared prefix.
    #[test]
    fn joining_a_running_batch_changes_no_sequence() {
        for prefix in [
            vec![],
            (0..16).map(|i| (i * 3 + 2) % 64).collect::<Vec<u32>>(),
        ] {
            let mut reqs = vec![
                request(1, &prefix, 10, 12),
                request(2, &prefix, 3, 6),
                request(3, &prefix, 24, 8),
                request(4, &prefix, 5, 0),
            ];
            reqs[1].then_choose = Some(ChoiceAfter {
                prefill: vec![5, 6],
                options: vec![1, 2, 3],
            });
            let want: Vec<Completion> = reqs.iter().map(alone).collect();
            let stat = Generator::new(tiny(), vec![])
                .generate(&reqs)
                .expect("static");

            let mut gen = Generator::new(tiny(), vec![]);
            gen.cache_prefix(&prefix).expect("prefix");
            let mut got: HashMap<u64, Completion> = HashMap::new();
            let (batch, finished) = gen.start(vec![(0, reqs[0].clone())]).expect("start");
            let mut batch = batch.expect("a running batch");
            got.extend(finished);
            for _ in 0..3 {
                got.extend(gen.step(&mut batch, &mut |_, _| {}).expect("step"));
            }
            // Shorter than what the batch has written.
            assert!(batch.slots() > 3);
            got.extend(
                gen.join(&mut batch, vec![(1, reqs[1].clone())])
                    .expect("join"),
            );
            got.extend(gen.step(&mut batch, &mut |_, _| {}).expect("step"));
            // Longer: the running rows move right.
            assert!(batch.slots() < 24);
            let more = vec![(2, reqs[2].clone()), (3, reqs[3].clone())];
            got.extend(gen.join(&mut batch, more).expect("join"));
            assert_eq!(batch.len(), 3);
            while !batch.is_empty() {
                got.extend(gen.step(&mut batch, &mut |_, _| {}).expect("step"));
            }
            for (k, w) in want.iter().enumerate() {
                let c = &got[&(k as u64)];
                assert_eq!(
                    (&c.ids, c.choice, &c.stop),
                    (&w.ids, w.choice, &w.stop),
                    "request {k}, prefix {}",
                    prefix.len()
                );
                assert_eq!(stat[k].ids, w.ids, "static batch, request {k}");
            }
            assert!(want[1].choice.is_some());
        }
    }

    /// Prefill passes by length, against hand counts: a run grows while its padding (the
    /// longest times the count, less the tokens) stays within a quarter of its tokens plus 64.
    #[test]
    fn prompts_of_unlike_lengths_are_prefilled_in_separate_passes() {
        use super::length_groups;
        assert_eq!(length_groups(&[]), Vec::<usize>::new());
        assert_eq!(length_groups(&[5]), vec![1]);
        // 3·50 = 150 padded > 57·1.25 + 64 = 135: the 50 alone.
        assert_eq!(length_groups(&[3, 4, 50]), vec![2, 3]);
        // 4·130 = 520 <= 430·1.25 + 64 = 601: one pass.
        assert_eq!(length_groups(&[100, 100, 100, 130]), vec![4]);
        // 2·200 = 400 > 210·1.25 + 64; 2·210 = 420 <= 512 + 64; 3·1000 > 1410·1.25 + 64.
        assert_eq!(length_groups(&[10, 200, 210, 1000]), vec![1, 3, 4]);
        assert_eq!(
            super::in_order(vec!['a', 'b', 'c'], &[2, 0, 1]),
            ['c', 'a', 'b']
        );
    }

    /// A batch whose prompts go through two prefill passes (lengths 3, 4 and 50: see
    /// [`prompts_of_unlike_lengths_are_prefilled_in_separate_passes`]), given in an order the
    /// passes do not keep: every request gets its own greedy tokens, as alone, and its own
    /// next-token logits.
    #[test]
    fn a_batch_prefilled_in_several_passes_answers_each_request_as_alone() {
        let reqs = vec![
            request(1, &[], 50, 4),
            request(2, &[], 3, 5),
            request(3, &[], 4, 3),
        ];
        let want: Vec<Completion> = reqs.iter().map(alone).collect();
        let got = Generator::new(tiny(), vec![])
            .generate(&reqs)
            .expect("batch");
        for (k, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.ids, w.ids, "request {k}");
        }
        let prompts: Vec<Vec<u32>> = reqs.iter().map(|r| r.prompt_ids.clone()).collect();
        let batched = Generator::new(tiny(), vec![])
            .next_token_logits(&prompts)
            .expect("batched logits");
        for (k, p) in prompts.iter().enumerate() {
            let one = Generator::new(tiny(), vec![])
                .next_token_logits(std::slice::from_ref(p))
                .expect("logits alone");
            let worst = (one[0].iter().zip(&batched[k]))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(worst < 1e-4, "prompt {k}: logits differ by {worst}");
        }
    }

    /// A batch that sequences keep joining for longer than the context keeps every sequence's
    /// tokens and reads a bounded number of slots (the dead ones in front are dropped); a
    /// prompt without the batch's prefix may not join.
    #[test]
    fn a_batch_that_never_empties_stays_bounded() {
        let prefix: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % 64).collect();
        let reqs: Vec<Request> = (0..64)
            .map(|k| {
                request(
                    k,
                    &prefix,
                    2 + (k as usize * 5) % 9,
                    6 + (k as usize * 3) % 7,
                )
            })
            .collect();
        let mut gen = Generator::new(tiny(), vec![]);
        gen.cache_prefix(&prefix).expect("prefix");
        let (batch, _) = gen.start(vec![(0, reqs[0].clone())]).expect("start");
        let mut batch = batch.expect("batch");
        let stranger = request(99, &[], 5, 3);
        assert!(!Generator::can_join(&batch, &stranger));
        assert!(!gen.should_join(&batch, &stranger));
        assert!(gen.join(&mut batch, vec![(99, stranger)]).is_err());
        let mut got: HashMap<u64, Completion> = HashMap::new();
        let (mut next, mut steps, mut most_slots) = (1, 0, 0);
        while !batch.is_empty() || next < reqs.len() {
            // One newcomer every third step, so the batch is never empty until the end.
            if steps % 3 == 0 && next < reqs.len() {
                got.extend(
                    gen.join(&mut batch, vec![(next as u64, reqs[next].clone())])
                        .expect("join"),
                );
                next += 1;
            }
            got.extend(gen.step(&mut batch, &mut |_, _| {}).expect("step"));
            most_slots = most_slots.max(batch.slots());
            steps += 1;
        }
        // Untrimmed, the batch would end with a slot per step.
        assert!(steps > 3 * 64, "{steps} steps");
        assert!(most_slots <= 2 * 64 + 32, "{most_slots} slots");
        for (k, r) in reqs.iter().enumerate() {
            assert_eq!(got[&(k as u64)].ids, alone(r).ids, "request {k}");
        }
    }

    /// A newcomer that shares a long stretch with a row of a batch that has no shared prefix
    /// waits for a batch of its own (where that stretch is computed once); one that shares
    /// little joins; so does one that starts with the batch's prefix.
    #[test]
    fn a_newcomer_waits_when_a_batch_of_its_own_would_share_more() {
        let template: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 64).collect();
        let mut gen = Generator::new(tiny(), vec![]);
        let (batch, _) = gen
            .start(vec![(0, request(1, &template, 4, 8))])
            .expect("start");
        let batch = batch.expect("batch");
        assert!(
            batch.cache.prefix_ids().is_empty(),
            "a batch of one computes no prefix"
        );
        let sibling = request(2, &template, 4, 8);
        assert!(Generator::can_join(&batch, &sibling));
        assert!(!gen.should_join(&batch, &sibling));
        assert!(gen.should_join(&batch, &request(3, &template[..3], 6, 8)));
        // Started from the template as a shared prefix, siblings join.
        let (batch, _) = gen
            .start(vec![
                (0, request(1, &template, 4, 8)),
                (1, request(4, &template, 5, 8)),
            ])
            .expect("start");
        let batch = batch.expect("batch");
        assert_eq!(batch.cache.prefix_ids().len(), 40);
        assert!(gen.should_join(&batch, &sibling));
    }

    /// A lone prompt that shares a long head with a row of another batch computes that head as
    /// its prefix and keeps it: the next prompt sharing it starts from it (joins, or finds it
    /// kept), and the tokens are those of each request alone.
    #[test]
    fn a_lone_prompt_computes_the_head_it_shares_elsewhere() {
        let template: Vec<u32> = (0..40).map(|i| (i * 7 + 3) % 64).collect();
        let mut gen = Generator::new(tiny(), vec![]);
        let first = request(1, &template, 4, 6);
        let (running, _) = gen.start(vec![(0, first.clone())]).expect("start");
        let running = running.expect("batch");
        assert!(
            running.cache.prefix_ids().is_empty(),
            "without a head, none"
        );
        let second = request(2, &template, 5, 6);
        let head = gen.shared_head_len(&running, &second.prompt_ids);
        assert_eq!(head, 40, "the template, where the two part");
        assert_eq!(
            gen.shared_head_len(&running, &template[..20]),
            0,
            "too short"
        );
        assert_eq!(gen.kept_prefix_len(&second.prompt_ids), 0);
        let (batch, _) = gen
            .start_sharing(vec![(1, second.clone())], head)
            .expect("start sharing");
        let mut batch = batch.expect("batch");
        assert_eq!(batch.cache.prefix_ids(), &template[..]);
        let third = request(3, &template, 3, 6);
        assert_eq!(gen.kept_prefix_len(&third.prompt_ids), 40);
        assert!(gen.should_join(&batch, &third));
        let mut got: HashMap<u64, Completion> = HashMap::new();
        got.extend(
            gen.join(&mut batch, vec![(2, third.clone())])
                .expect("join"),
        );
        while !batch.is_empty() {
            got.extend(gen.step(&mut batch, &mut |_, _| {}).expect("step"));
        }
        assert_eq!(got[&1].ids, alone(&second).ids);
        assert_eq!(got[&2].ids, alone(&third).ids);
    }

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
