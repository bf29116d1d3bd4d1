//! The KV cache of a batch of sequences, and prefix snapshots that many batches can start from.
//!
//! Every sequence of a batch writes the same cache *slots* at each step (slot = column of the
//! `[batch, kv_heads, capacity, head_dim]` tensors); what differs per sequence is which slots
//! hold real tokens (`valid`) and the RoPE position of the next token. Prompts of different
//! lengths are right-aligned with padding slots in between, so after prefill every sequence's
//! last token is in the same slot and decoding appends one slot for all.
//!
//! A batch started from a [`PrefixKv`] keeps the prefix apart, shared by every sequence (one
//! copy, not one per sequence): attention reads it once for the whole batch (see
//! `llama::Llama::forward`), and the batch's own slots start after it.
//!
//! The tensors grow in chunks of [`GROW_CHUNK`] slots; attention reads the whole capacity and
//! the mask hides slots that are padding or not written yet. Writes go through `slice_assign`
//! on tensors the cache owns alone, so on CPU they happen in place.

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

use super::config::LlamaConfig;
use super::ModelError;

/// Slots added at a time when the cache grows.
pub const GROW_CHUNK: usize = 64;

/// K/V of a token prefix for one sequence, reusable as the start of any batch.
#[derive(Debug, Clone)]
pub struct PrefixKv<B: Backend> {
    /// The prefix's token ids.
    pub ids: Vec<u32>,
    /// Per layer `[1, kv_heads, len, head_dim]`.
    k: Vec<Tensor<B, 4>>,
    v: Vec<Tensor<B, 4>>,
}

impl<B: Backend> PrefixKv<B> {
    /// Number of tokens in the prefix.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the prefix is empty.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// What [`KvCache::append`] decided for one forward step.
#[derive(Debug)]
pub struct AppendPlan {
    /// First slot written by this step.
    pub start: usize,
    /// RoPE position of every new token, `batch × s` row-major (0 for padding).
    pub positions: Vec<i64>,
    /// Attention mask `[batch, 1, n_rep·s, prefix_len + capacity]`, `true` = may not attend.
    pub mask: Vec<bool>,
}

/// The KV cache of a batch.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    k: Vec<Tensor<B, 4>>,
    v: Vec<Tensor<B, 4>>,
    batch: usize,
    kv_heads: usize,
    head_dim: usize,
    n_rep: usize,
    len: usize,
    capacity: usize,
    /// Per sequence, per slot `< len`: holds a real token.
    valid: Vec<Vec<bool>>,
    /// Per sequence: position of its next token.
    next_pos: Vec<usize>,
    /// The shared prefix every sequence starts with, if any.
    prefix: Option<PrefixKv<B>>,
    device: B::Device,
    /// The float type of the K/V tensors (the model's).
    dtype: DType,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` sequences with room for `capacity` slots before growing,
    /// holding `dtype` (the model's: [`Llama::new_cache`](super::Llama::new_cache)).
    pub fn new(
        cfg: &LlamaConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
        dtype: DType,
    ) -> Self {
        let capacity = capacity.max(1);
        let shape = [batch, cfg.n_kv_heads, capacity, cfg.head_dim];
        KvCache {
            k: (0..cfg.n_layers)
                .map(|_| Tensor::zeros(shape, (device, dtype)))
                .collect(),
            v: (0..cfg.n_layers)
                .map(|_| Tensor::zeros(shape, (device, dtype)))
                .collect(),
            batch,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            n_rep: cfg.n_rep(),
            len: 0,
            capacity,
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
            prefix: None,
            device: device.clone(),
            dtype,
        }
    }

    /// This fresh cache with every sequence starting with `prefix` (shared, not copied); its
    /// own `capacity` slots come after it. Only for a cache nothing was written to yet.
    pub fn with_prefix(mut self, prefix: &PrefixKv<B>) -> Self {
        debug_assert_eq!(self.len, 0, "a prefix goes before every written slot");
        self.next_pos = vec![prefix.len(); self.batch];
        self.prefix = Some(prefix.clone());
        self
    }

    /// Tokens in the shared prefix (0 when none).
    pub fn prefix_len(&self) -> usize {
        self.prefix.as_ref().map_or(0, PrefixKv::len)
    }

    /// Layer `l`'s shared prefix K and V, `[1, kv_heads, prefix_len, head_dim]`.
    pub fn prefix_kv(&self, l: usize) -> Option<(Tensor<B, 4>, Tensor<B, 4>)> {
        let p = self.prefix.as_ref().filter(|p| !p.is_empty())?;
        Some((p.k.get(l)?.clone(), p.v.get(l)?.clone()))
    }

    /// Sequences in the batch.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Slots written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no slot was written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots allocated.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The position the next token of sequence `i` will get.
    pub fn next_position(&self, i: usize) -> usize {
        self.next_pos[i]
    }

    /// Reserves slots for `s` new tokens per sequence and plans their positions and mask.
    /// Fails (changing nothing) when a sequence would pass `max_pos`.
    pub fn append(
        &mut self,
        tokens: &[Option<u32>],
        s: usize,
        max_pos: usize,
    ) -> Result<AppendPlan, ModelError> {
        for i in 0..self.batch {
            let new = tokens[i * s..(i + 1) * s]
                .iter()
                .filter(|t| t.is_some())
                .count();
            if self.next_pos[i] + new > max_pos {
                return Err(ModelError::Request(format!(
                    "sequence {i} would reach {} tokens, past the context of {max_pos}",
                    self.next_pos[i] + new
                )));
            }
        }
        let start = self.len;
        self.reserve(start + s);
        let cap = self.capacity;
        let mut positions = Vec::with_capacity(self.batch * s);
        for i in 0..self.batch {
            for t in 0..s {
                let real = tokens[i * s + t].is_some();
                self.valid[i].push(real);
                if real {
                    positions.push(self.next_pos[i] as i64);
                    self.next_pos[i] += 1;
                } else {
                    positions.push(0);
                }
            }
        }
        let rows = self.n_rep * s;
        // Columns: the shared prefix (always visible: every query comes after it), then the
        // batch's own slots.
        let p = self.prefix_len();
        let cols = p + cap;
        let mut mask = vec![true; self.batch * rows * cols];
        for i in 0..self.batch {
            let valid = &self.valid[i];
            for t in 0..s {
                let slot = start + t;
                let mut row = vec![true; cols];
                let (visible, row_own) = row.split_at_mut(p);
                visible.fill(false);
                if valid[slot] {
                    for (j, m) in row_own.iter_mut().enumerate().take(slot + 1) {
                        *m = !valid[j];
                    }
                } else {
                    // A padding row attends to itself only: its output is never used, and a
                    // row with nothing to attend to would be NaN.
                    row_own[slot] = false;
                }
                for r in 0..self.n_rep {
                    let at = (i * rows + r * s + t) * cols;
                    mask[at..at + cols].copy_from_slice(&row);
                }
            }
        }
        self.len += s;
        Ok(AppendPlan {
            start,
            positions,
            mask,
        })
    }

    /// Grows the tensors so that `slots` fit.
    fn reserve(&mut self, slots: usize) {
        if slots <= self.capacity {
            return;
        }
        let new_cap = slots.div_ceil(GROW_CHUNK) * GROW_CHUNK;
        let extra = [
            self.batch,
            self.kv_heads,
            new_cap - self.capacity,
            self.head_dim,
        ];
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let old = std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &self.device));
            *t = Tensor::cat(
                vec![old, Tensor::zeros(extra, (&self.device, self.dtype))],
                2,
            );
        }
        self.capacity = new_cap;
    }

    /// Writes layer `l`'s new K/V (`[batch, kv_heads, s, head_dim]`) at slot `start` and returns
    /// the layer's whole cache (`[batch, kv_heads, capacity, head_dim]`) for attention.
    pub fn write(
        &mut self,
        l: usize,
        start: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let s = k.dims()[2];
        let ranges = [
            0..self.batch,
            0..self.kv_heads,
            start..start + s,
            0..self.head_dim,
        ];
        for (cache, new) in [(&mut self.k[l], k), (&mut self.v[l], v)] {
            let old = std::mem::replace(cache, Tensor::empty([0, 0, 0, 0], &self.device));
            *cache = match write_in_place(old, start, &new) {
                Ok(written) => written,
                Err(old) => old.slice_assign(ranges.clone(), new),
            };
        }
        (self.k[l].clone(), self.v[l].clone())
    }

    /// Keeps only the sequences `rows` (in that order), e.g. to drop finished ones.
    pub fn retain(&mut self, rows: &[usize]) {
        if rows.len() == self.batch && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &self.device);
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let old = std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &self.device));
            *t = old.select(0, idx.clone());
        }
        self.valid = rows.iter().map(|&r| self.valid[r].clone()).collect();
        self.next_pos = rows.iter().map(|&r| self.next_pos[r]).collect();
        self.batch = rows.len();
    }

    /// The shared prefix every sequence starts with, if any.
    pub fn prefix(&self) -> Option<&PrefixKv<B>> {
        self.prefix.as_ref()
    }

    /// The shared prefix's token ids (empty when the batch has none).
    pub fn prefix_ids(&self) -> &[u32] {
        self.prefix.as_ref().map_or(&[], |p| &p.ids)
    }

    /// Adds the sequences of `other` (prefilled on their own, from the same shared prefix or
    /// none) after this batch's: continuous batching. Both are right-aligned to the longer of
    /// the two, so every sequence's last token stays in the last written slot and the next step
    /// appends one slot for all; the slots a shorter side lacks are padding. RoPE positions are
    /// per sequence, so moving a sequence's K/V to other slots changes nothing it computes.
    pub fn join(&mut self, other: KvCache<B>) -> Result<(), ModelError> {
        if self.prefix_ids() != other.prefix_ids() {
            return Err(ModelError::Request(
                "a batch can only take sequences that start from its shared prefix".into(),
            ));
        }
        if other.batch == 0 {
            return Ok(());
        }
        let len = self.len.max(other.len);
        // The room either side had reserved ahead, kept.
        let ahead = (self.capacity - self.len).max(other.capacity - other.len);
        let capacity = (len + ahead).max(1).div_ceil(GROW_CHUNK) * GROW_CHUNK;
        let mine = self.aligned(len, capacity);
        let theirs = other.aligned(len, capacity);
        for (l, (a, b)) in mine.into_iter().zip(theirs).enumerate() {
            self.k[l] = Tensor::cat(vec![a.0, b.0], 0);
            self.v[l] = Tensor::cat(vec![a.1, b.1], 0);
        }
        let grow = len - self.len;
        for row in &mut self.valid {
            row.splice(0..0, std::iter::repeat_n(false, grow));
        }
        self.valid.extend(other.valid.into_iter().map(|mut row| {
            row.splice(0..0, std::iter::repeat_n(false, len - other.len));
            row
        }));
        self.next_pos.extend(other.next_pos);
        self.batch += other.batch;
        self.len = len;
        self.capacity = capacity;
        Ok(())
    }

    /// Per layer, this cache's K/V moved so that its `len` written slots end at slot `to_len`,
    /// in tensors of `capacity` slots (the rest zero).
    fn aligned(&self, to_len: usize, capacity: usize) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        let before = to_len - self.len;
        let after = capacity - to_len;
        let pad = |slots: usize| {
            Tensor::<B, 4>::zeros(
                [self.batch, self.kv_heads, slots, self.head_dim],
                (&self.device, self.dtype),
            )
        };
        let place = |t: &Tensor<B, 4>| {
            let mut parts = Vec::with_capacity(3);
            if before > 0 {
                parts.push(pad(before));
            }
            if self.len > 0 {
                parts.push(t.clone().slice([
                    0..self.batch,
                    0..self.kv_heads,
                    0..self.len,
                    0..self.head_dim,
                ]));
            }
            if after > 0 {
                parts.push(pad(after));
            }
            Tensor::cat(parts, 2)
        };
        self.k
            .iter()
            .zip(&self.v)
            .map(|(k, v)| (place(k), place(v)))
            .collect()
    }

    /// Drops the leading slots that no sequence uses any more (a long-running batch whose first
    /// sequences are gone), once they make up at least a [`GROW_CHUNK`]: attention reads every
    /// slot, so a batch that sequences keep joining must not keep the dead ones.
    pub fn trim_front(&mut self) {
        let dead = self
            .valid
            .iter()
            .map(|row| row.iter().position(|&v| v).unwrap_or(row.len()))
            .min()
            .unwrap_or(0);
        if dead < GROW_CHUNK {
            return;
        }
        let (len, capacity) = (self.len - dead, self.capacity - dead);
        let capacity = capacity.max(len + 1).div_ceil(GROW_CHUNK) * GROW_CHUNK;
        let keep = |t: &Tensor<B, 4>| {
            let live = t.clone().slice([
                0..self.batch,
                0..self.kv_heads,
                dead..self.len,
                0..self.head_dim,
            ]);
            Tensor::cat(
                vec![
                    live,
                    Tensor::zeros(
                        [self.batch, self.kv_heads, capacity - len, self.head_dim],
                        (&self.device, self.dtype),
                    ),
                ],
                2,
            )
        };
        self.k = self.k.iter().map(keep).collect();
        self.v = self.v.iter().map(keep).collect();
        for row in &mut self.valid {
            row.drain(..dead);
        }
        self.len = len;
        self.capacity = capacity;
    }

    /// Copies the first `len` slots of sequence 0 out as a reusable prefix. The slots must all
    /// hold real tokens (no padding), which is the case for a cache prefilled with one sequence.
    pub fn snapshot_prefix(&self, ids: &[u32]) -> Result<PrefixKv<B>, ModelError> {
        let len = ids.len();
        if self.prefix.is_some()
            || len > self.len
            || self.batch == 0
            || !self.valid[0][..len].iter().all(|&v| v)
        {
            return Err(ModelError::Request(
                "prefix snapshot of slots that are not all real tokens".into(),
            ));
        }
        // A view into this cache's storage: cheap, and copy-on-write keeps it intact if
        // the cache is written again.
        let cut = |t: &Tensor<B, 4>| {
            t.clone()
                .slice([0..1, 0..self.kv_heads, 0..len, 0..self.head_dim])
        };
        Ok(PrefixKv {
            ids: ids.to_vec(),
            k: self.k.iter().map(cut).collect(),
            v: self.v.iter().map(cut).collect(),
        })
    }
}

/// Writes `value` (`[b, h, s, d]`) into slots `start..start + s` of `cache` (`[b, h, cap, d]`)
/// in place, when `cache` is a flex CPU tensor that is contiguous and owned alone.
///
/// burn-flex 0.21's `slice_assign` always copies its whole destination (it keeps a second
/// handle to the buffer while writing, so copy-on-write fires): for a KV cache that is a copy
/// of the entire cache per layer per token. Other backends (CUDA) write in place already and
/// take the `Err` path to `slice_assign`.
fn write_in_place<B: Backend>(
    cache: Tensor<B, 4>,
    start: usize,
    value: &Tensor<B, 4>,
) -> Result<Tensor<B, 4>, Tensor<B, 4>> {
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorPrimitive;
    use std::any::Any;

    let [b, h, cap, d] = cache.dims();
    let [vb, vh, s, vd] = value.dims();
    if (vb, vh, vd) != (b, h, d) || start + s > cap {
        return Err(cache);
    }
    let src: Vec<f32> = {
        let TensorPrimitive::Float(vp) = value.clone().into_primitive() else {
            return Err(cache);
        };
        let Some(vf) = (&vp as &dyn Any).downcast_ref::<FlexTensor>() else {
            return Err(cache);
        };
        if vf.dtype() != DType::F32 {
            return Err(cache);
        }
        vf.to_contiguous().storage::<f32>().to_vec()
    };
    let mut prim = match cache.into_primitive() {
        TensorPrimitive::Float(p) => p,
        other => return Err(Tensor::from_primitive(other)),
    };
    let written = match (&mut prim as &mut dyn Any).downcast_mut::<FlexTensor>() {
        Some(t)
            if t.dtype() == DType::F32 && t.is_contiguous() && t.layout().start_offset() == 0 =>
        {
            match t.try_storage_mut::<f32>() {
                Some(dst) if dst.len() == b * h * cap * d => {
                    let run = s * d;
                    for bh in 0..b * h {
                        let at = (bh * cap + start) * d;
                        dst[at..at + run].copy_from_slice(&src[bh * run..(bh + 1) * run]);
                    }
                    true
                }
                _ => false,
            }
        }
        _ => false,
    };
    let cache = Tensor::from_primitive(TensorPrimitive::Float(prim));
    if written {
        Ok(cache)
    } else {
        Err(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Architecture;
    use burn::backend::Flex;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            arch: Architecture::Llama,
            n_layers: 1,
            hidden: 8,
            ffn: 8,
            n_heads: 2,
            n_kv_heads: 1,
            head_dim: 4,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            vocab: 10,
            max_seq_len: 6,
            tie_embeddings: true,
            qkv_bias: false,
        }
    }

    #[test]
    fn padding_positions_and_mask() {
        let mut c = KvCache::<Flex>::new(&cfg(), 2, 3, &Default::default(), DType::F32);
        // Sequence 0: one pad then two tokens; sequence 1: three tokens.
        let plan = c
            .append(&[None, Some(1), Some(2), Some(3), Some(4), Some(5)], 3, 6)
            .expect("append");
        assert_eq!(plan.positions, vec![0, 0, 1, 0, 1, 2]);
        let cols = c.capacity();
        let row = |seq: usize, r: usize, t: usize| {
            let at = (seq * 2 * 3 + r * 3 + t) * cols;
            plan.mask[at..at + 3].to_vec()
        };
        // Pad row attends to itself only; real rows skip the pad and the future.
        assert_eq!(row(0, 0, 0), vec![false, true, true]);
        assert_eq!(row(0, 1, 2), vec![true, false, false]);
        assert_eq!(row(1, 0, 1), vec![false, false, true]);
        assert_eq!(row(1, 1, 1), row(1, 0, 1)); // same mask for both query heads
        assert_eq!((c.next_position(0), c.next_position(1)), (2, 3));
        // Positions past the context are refused without changing the cache.
        assert!(c.append(&[Some(1); 8], 4, 6).is_err());
        assert_eq!(c.len(), 3);
        // Growing keeps room in GROW_CHUNK steps; dropping a sequence keeps the other's state.
        c.append(&[Some(1), Some(2)], 1, 6).expect("append");
        assert_eq!(c.capacity(), GROW_CHUNK);
        c.retain(&[1]);
        assert_eq!((c.batch(), c.next_position(0)), (1, 4));
    }
}
