//! The KV cache of a batch of sequences, and prefix snapshots that many batches can start from.
//!
//! Every sequence of a batch writes the same cache *slots* at each step (slot = column of the
//! `[batch, kv_heads, capacity, head_dim]` layout); what differs per sequence is which slots
//! hold real tokens (`valid`) and the RoPE position of the next token. Prompts of different
//! lengths are right-aligned with padding slots in between, so after prefill every sequence's
//! last token is in the same slot and decoding appends one slot for all.
//!
//! A batch started from a [`PrefixKv`] keeps the prefix apart, shared by every sequence (one
//! copy, not one per sequence): attention reads it once for the whole batch (see
//! `llama::Llama::forward`), and the batch's own slots start after it.
//!
//! The slots grow in chunks of [`GROW_CHUNK`]; attention reads the whole capacity and the mask
//! hides slots that are padding or not written yet. Two stores hold them: host buffers edited
//! in place for a model on flex in `f32` (`host`), backend tensors elsewhere (`tensors`).

mod host;
mod tensors;

use std::any::Any;

use burn::backend::flex::FlexTensor;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};

use super::config::LlamaConfig;
use super::ModelError;
use host::HostKv;
pub use host::{OwnKv, OwnRows, SpareBuffers};
use std::sync::Arc;
use tensors::TensorKv;

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

/// Where a cache's own slots live.
#[derive(Debug)]
enum Store<B: Backend> {
    /// Host buffers edited in place (flex, `f32`).
    Host(HostKv),
    /// Backend tensors (every other backend or float type).
    Tensors(TensorKv<B>),
}

/// One layer's own slots as attention reads them.
pub enum LayerKv<'a, B: Backend> {
    /// In host memory, strided per (sequence, head).
    Host(OwnKv<'a>),
    /// As tensors `[batch, kv_heads, capacity, head_dim]`.
    Tensors(Tensor<B, 4>, Tensor<B, 4>),
}

/// The KV cache of a batch.
#[derive(Debug)]
pub struct KvCache<B: Backend> {
    store: Store<B>,
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
}

/// Whether `B` is flex: its `f32` caches live in host buffers edited in place.
fn host_backend<B: Backend>(device: &B::Device) -> bool {
    let t = Tensor::<B, 1>::zeros([1], (device, DType::F32));
    let TensorPrimitive::Float(p) = t.into_primitive() else {
        return false;
    };
    (&p as &dyn Any).downcast_ref::<FlexTensor>().is_some()
}

/// The `f32` values of a flex tensor, contiguous (`None` off flex or in another float type).
pub(crate) fn host_values<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Option<Vec<f32>> {
    let TensorPrimitive::Float(p) = t.clone().into_primitive() else {
        return None;
    };
    let f = (&p as &dyn Any).downcast_ref::<FlexTensor>()?;
    if f.dtype() != DType::F32 {
        return None;
    }
    match f.as_slice::<f32>() {
        Some(s) => Some(s.to_vec()),
        None => f.to_contiguous().as_slice::<f32>().map(<[f32]>::to_vec),
    }
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` sequences with room for `capacity` slots before growing,
    /// holding `dtype` (the model's: [`Llama::new_cache`](super::Llama::new_cache)): in host
    /// buffers on flex in `f32` (taken from `spare` where it has some), backend tensors
    /// otherwise.
    pub fn new(
        cfg: &LlamaConfig,
        (batch, capacity): (usize, usize),
        device: &B::Device,
        dtype: DType,
        spare: &Arc<SpareBuffers>,
    ) -> Self {
        let host = Self::paged_on(device, dtype).then(|| spare.clone());
        Self::with_store(cfg, batch, capacity, device, dtype, host)
    }

    /// Whether [`KvCache::new`] on `device` in `dtype` keeps each sequence's slots in blocks of
    /// its own (host memory following each sequence's length) rather than one tensor whose
    /// every row spans the batch's slots.
    pub fn paged_on(device: &B::Device, dtype: DType) -> bool {
        dtype == DType::F32 && host_backend::<B>(device)
    }

    /// Whether this cache keeps each sequence's slots in blocks of its own ([`KvCache::paged_on`]).
    pub fn paged(&self) -> bool {
        matches!(self.store, Store::Host(_))
    }

    /// The written slots sequence `i` holds memory for: on a paged cache, from its first block
    /// to the last written slot; otherwise every written slot of the batch.
    pub fn held_slots(&self, i: usize) -> usize {
        match &self.store {
            Store::Host(kv) => kv.held_slots(i, self.len),
            Store::Tensors(_) => self.len,
        }
    }

    /// [`KvCache::new`] with the store chosen: host buffers (`host`, flex `f32` only, with its
    /// spare buffers) or tensors.
    pub(crate) fn with_store(
        cfg: &LlamaConfig,
        batch: usize,
        capacity: usize,
        device: &B::Device,
        dtype: DType,
        host: Option<Arc<SpareBuffers>>,
    ) -> Self {
        let capacity = capacity.max(1);
        let (layers, heads, d) = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim);
        let store = match host {
            Some(spare) => Store::Host(HostKv::new((layers, heads, d), batch, spare)),
            None => Store::Tensors(TensorKv::new(
                layers,
                [batch, heads, capacity, d],
                device,
                dtype,
            )),
        };
        KvCache {
            store,
            batch,
            kv_heads: heads,
            head_dim: d,
            n_rep: cfg.n_rep(),
            len: 0,
            capacity,
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
            prefix: None,
            device: device.clone(),
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
        if let Store::Host(h) = &mut self.store {
            h.ensure_written(start + s);
        }
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

    /// Grows the slots so that `slots` fit.
    fn reserve(&mut self, slots: usize) {
        if slots <= self.capacity {
            return;
        }
        let new_cap = slots.div_ceil(GROW_CHUNK) * GROW_CHUNK;
        if let Store::Tensors(t) = &mut self.store {
            t.grow(new_cap - self.capacity);
        }
        self.capacity = new_cap;
    }

    /// Writes layer `l`'s new K/V (`[batch, kv_heads, s, head_dim]`) at slot `start`; read the
    /// layer back for attention with [`KvCache::layer`].
    pub fn write(
        &mut self,
        l: usize,
        start: usize,
        k: Tensor<B, 4>,
        v: Tensor<B, 4>,
    ) -> Result<(), ModelError> {
        let s = k.dims()[2];
        match &mut self.store {
            Store::Host(h) => match (host_values(&k), host_values(&v)) {
                (Some(kh), Some(vh)) => h.write(l, start, &kh, &vh, s),
                // A host store only exists on flex in f32, so its K/V read as such.
                _ => {
                    return Err(ModelError::Request(
                        "the host KV cache was given tensors it cannot read".into(),
                    ))
                }
            },
            Store::Tensors(t) => t.write(l, start, k, v),
        }
        Ok(())
    }

    /// Layer `l`'s own slots (`capacity` of them per sequence and head) for attention.
    pub fn layer(&self, l: usize) -> LayerKv<'_, B> {
        match &self.store {
            Store::Host(h) => LayerKv::Host(h.layer(l, self.len)),
            Store::Tensors(t) => LayerKv::Tensors(t.k[l].clone(), t.v[l].clone()),
        }
    }

    /// Layer `l`'s own slots as tensors `[batch, kv_heads, capacity, head_dim]` whatever the
    /// store (a copy from a host store).
    pub fn layer_tensors(&self, l: usize) -> (Tensor<B, 4>, Tensor<B, 4>) {
        match &self.store {
            Store::Host(h) => {
                let (k, v) = h.dense(l, self.len, self.capacity);
                let shape = [self.batch, self.kv_heads, self.capacity, self.head_dim];
                (
                    Tensor::from_data(TensorData::new(k, shape), &self.device),
                    Tensor::from_data(TensorData::new(v, shape), &self.device),
                )
            }
            Store::Tensors(t) => (t.k[l].clone(), t.v[l].clone()),
        }
    }

    /// Keeps only the sequences `rows` (in that order), e.g. to drop finished ones.
    pub fn retain(&mut self, rows: &[usize]) {
        if rows.len() == self.batch && rows.iter().enumerate().all(|(i, &r)| i == r) {
            return;
        }
        match &mut self.store {
            Store::Host(h) => h.retain(rows),
            Store::Tensors(t) => t.retain(rows),
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
        let (mine_before, theirs_before) = (len - self.len, len - other.len);
        match (&mut self.store, other.store) {
            (Store::Host(mine), Store::Host(mut theirs)) => {
                mine.shift_right(mine_before);
                theirs.shift_right(theirs_before);
                mine.append(theirs);
            }
            (Store::Tensors(mine), Store::Tensors(theirs)) => {
                mine.join(&theirs, (self.len, other.len), len, capacity);
            }
            _ => {
                return Err(ModelError::Request(
                    "a batch can only take sequences whose cache is kept the same way".into(),
                ))
            }
        }
        for row in &mut self.valid {
            row.splice(0..0, std::iter::repeat_n(false, mine_before));
        }
        self.valid.extend(other.valid.into_iter().map(|mut row| {
            row.splice(0..0, std::iter::repeat_n(false, theirs_before));
            row
        }));
        self.next_pos.extend(other.next_pos);
        self.batch += other.batch;
        self.len = len;
        self.capacity = capacity;
        Ok(())
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
        match &mut self.store {
            Store::Host(h) => h.drop_front(dead),
            Store::Tensors(t) => t.drop_front(dead, self.len, capacity),
        }
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
        let (k, v) = match &self.store {
            // Copied out contiguous once: attention reads the prefix every layer of every step.
            Store::Host(h) => {
                let shape = [1, self.kv_heads, len, self.head_dim];
                let tensor =
                    |x: Vec<f32>| Tensor::from_data(TensorData::new(x, shape), &self.device);
                let mut k = Vec::new();
                let mut v = Vec::new();
                for l in 0..h.layers() {
                    let (kl, vl) = h.first_slots(l, len).ok_or_else(|| {
                        ModelError::Request(
                            "prefix snapshot of a sequence that starts later".into(),
                        )
                    })?;
                    k.push(tensor(kl));
                    v.push(tensor(vl));
                }
                (k, v)
            }
            // A view into this cache's storage: cheap, and copy-on-write keeps it intact if
            // the cache is written again.
            Store::Tensors(t) => t.first_slots(len),
        };
        Ok(PrefixKv {
            ids: ids.to_vec(),
            k,
            v,
        })
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
        let spare = Arc::default();
        let mut c = KvCache::<Flex>::new(&cfg(), (2, 3), &Default::default(), DType::F32, &spare);
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

    /// A cache under test with its sequences' tags (the value their K/V rows encode).
    struct Tagged {
        cache: KvCache<Flex>,
        tags: Vec<f32>,
    }

    const D: usize = 4;
    const HEADS: usize = 2;

    fn wide_cfg() -> LlamaConfig {
        LlamaConfig {
            n_layers: 2,
            n_heads: HEADS,
            n_kv_heads: HEADS,
            head_dim: D,
            max_seq_len: 512,
            ..cfg()
        }
    }

    /// Runs `s` tokens per sequence (`None` = padding) through `t`, writing into every layer
    /// K = `tag·1000 + position + layer·0.5 + head·0.25` (padding: -1) and V = -K, and checks
    /// that each sequence's visible columns of its last row (the mask attention uses) hold its
    /// positions 0, 1, 2, ... in order, in both the attention view and the dense copy.
    fn step(t: &mut Tagged, tokens: &[Option<u32>], s: usize) {
        let b = t.cache.batch();
        let before: Vec<usize> = (0..b).map(|i| t.cache.next_position(i)).collect();
        let plan = t.cache.append(tokens, s, 512).expect("append");
        for l in 0..2 {
            let mut k = vec![0f32; b * HEADS * s * D];
            for (i, chunk) in k.chunks_exact_mut(D).enumerate() {
                let (seq, h, tok) = (i / (HEADS * s), (i / s) % HEADS, i % s);
                let value = match tokens[seq * s + tok] {
                    Some(_) => {
                        let pos = plan.positions[seq * s + tok] as f32;
                        t.tags[seq] * 1000.0 + pos + l as f32 * 0.5 + h as f32 * 0.25
                    }
                    None => -1.0,
                };
                chunk.fill(value);
            }
            let v: Vec<f32> = k.iter().map(|x| -x).collect();
            let shape = [b, HEADS, s, D];
            let dev = Default::default();
            t.cache
                .write(
                    l,
                    plan.start,
                    Tensor::from_data(TensorData::new(k, shape), &dev),
                    Tensor::from_data(TensorData::new(v, shape), &dev),
                )
                .expect("write");
        }
        let cols = t.cache.capacity();
        for l in 0..2 {
            let (dk, dv) = t.cache.layer_tensors(l);
            let dk: Vec<f32> = dk.into_data().to_vec().expect("f32");
            let dv: Vec<f32> = dv.into_data().to_vec().expect("f32");
            let own = match t.cache.layer(l) {
                LayerKv::Host(own) => Some(own),
                LayerKv::Tensors(..) => None,
            };
            for seq in 0..b {
                let last = (seq * s + s - 1) * cols;
                let visible: Vec<usize> = (0..cols).filter(|&j| !plan.mask[last + j]).collect();
                let real = before[seq] + tokens[seq * s..(seq + 1) * s].iter().flatten().count();
                if tokens[seq * s + s - 1].is_none() {
                    continue;
                }
                assert_eq!(visible.len(), real, "sequence {seq}: visible columns");
                for h in 0..HEADS {
                    for (pos, &j) in visible.iter().enumerate() {
                        let want =
                            t.tags[seq] * 1000.0 + pos as f32 + l as f32 * 0.5 + h as f32 * 0.25;
                        let at = ((seq * HEADS + h) * cols + j) * D;
                        assert_eq!(dk[at], want, "dense K, seq {seq} head {h} slot {j}");
                        assert_eq!(
                            dv[at + D - 1],
                            -want,
                            "dense V, seq {seq} head {h} slot {j}"
                        );
                        if let Some(own) = own {
                            let r = own.rows(seq * HEADS + h, HEADS, D);
                            let local = usize::try_from(j as isize - r.first).expect("stored");
                            let (i, off) = (local / r.span, local % r.span);
                            assert_eq!(r.k[i][off * D], want, "host K, seq {seq} slot {j}");
                            assert_eq!(r.v[i][off * D + 1], -want, "host V, seq {seq} slot {j}");
                        }
                    }
                }
            }
        }
    }

    fn fresh(batch: usize, tags: &[f32], host: Option<&Arc<SpareBuffers>>) -> Tagged {
        let host = host.cloned();
        let cache = KvCache::<Flex>::with_store(
            &wide_cfg(),
            batch,
            3,
            &Default::default(),
            DType::F32,
            host,
        );
        Tagged {
            cache,
            tags: tags.to_vec(),
        }
    }

    fn join(a: &mut Tagged, b: Tagged) {
        a.cache.join(b.cache).expect("join");
        a.tags.extend(b.tags);
    }

    /// Both stores keep every token's K/V where the mask says it is, through prefill with
    /// padding, growth past a chunk, a shorter and a longer batch joining, finished sequences
    /// leaving and dead leading slots dropped, and a newcomer in a buffer a finished sequence
    /// left (old values in it): each sequence's visible columns hold its positions in order
    /// (values written by the test, not by the cache).
    #[test]
    fn both_stores_keep_each_token_where_the_mask_says() {
        let pool = Arc::new(SpareBuffers::default());
        for host in [true, false] {
            let spare = host.then_some(&pool);
            let one = |n: usize| vec![Some(1u32); n];
            let mut a = fresh(2, &[1.0, 2.0], spare);
            step(
                &mut a,
                &[None, Some(1), Some(2), Some(3), Some(4), Some(5)],
                3,
            );
            for _ in 0..70 {
                step(&mut a, &one(2), 1);
            }
            // Shorter than the batch: right-aligned after padding.
            let mut b = fresh(1, &[3.0], spare);
            step(&mut b, &one(5), 5);
            join(&mut a, b);
            step(&mut a, &one(3), 1);
            // Memory: paged, the newcomer holds its own 5 + 1 slots, not the batch's 74.
            let held: Vec<usize> = (0..3).map(|i| a.cache.held_slots(i)).collect();
            let want = if host { vec![74, 74, 6] } else { vec![74; 3] };
            assert_eq!(held, want, "host {host}");
            assert_eq!(a.cache.paged(), host);
            // Longer than the batch: the batch's slots move right.
            let mut c = fresh(1, &[4.0], spare);
            step(&mut c, &one(90), 90);
            join(&mut a, c);
            for _ in 0..3 {
                step(&mut a, &one(4), 1);
            }
            // The first two leave; the rest keep decoding.
            a.cache.retain(&[2, 3]);
            a.tags = vec![3.0, 4.0];
            step(&mut a, &one(2), 1);
            // Only the joined short one is left: the slots before it are dead and dropped.
            a.cache.retain(&[0]);
            a.tags = vec![3.0];
            let len = a.cache.len();
            a.cache.trim_front();
            assert!(
                a.cache.len() < len - GROW_CHUNK,
                "host {host}: dead slots dropped"
            );
            for _ in 0..3 {
                step(&mut a, &one(1), 1);
            }
            assert_eq!(a.cache.next_position(0), 5 + 1 + 3 + 1 + 3, "host {host}");
            let mut e = fresh(1, &[5.0], spare);
            step(&mut e, &one(4), 4);
            join(&mut a, e);
            step(&mut a, &one(2), 1);
            // A newcomer padded on the left inside its own prefill (65 slots before its
            // first token): once it is alone, the slots before it are dropped, part of its
            // first block with them.
            let mut f = fresh(2, &[6.0, 7.0], spare);
            let mut tokens = one(70);
            tokens.extend(std::iter::repeat_n(None, 65));
            tokens.extend(one(5));
            step(&mut f, &tokens, 70);
            join(&mut a, f);
            step(&mut a, &one(4), 1);
            a.cache.retain(&[3]);
            a.tags = vec![7.0];
            let len = a.cache.len();
            a.cache.trim_front();
            assert!(a.cache.len() <= len - 65, "host {host}: padding dropped");
            for _ in 0..2 {
                step(&mut a, &one(1), 1);
            }
            assert_eq!(a.cache.next_position(0), 5 + 1 + 2, "host {host}");
            if host {
                assert!(
                    pool.kept() >= 2,
                    "finished sequences' buffers kept for reuse"
                );
                pool.clear();
                assert_eq!(pool.kept(), 0, "kept buffers given back");
            }
        }
    }
}
