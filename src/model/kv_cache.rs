//! The KV cache of a batch of sequences, and prefix snapshots that many batches can start from.
//!
//! Every sequence of a batch writes the same cache *slots* at each step (slot = column of the
//! `[batch, kv_heads, capacity, head_dim]` tensors); what differs per sequence is which slots
//! hold real tokens (`valid`) and the RoPE position of the next token. Prompts of different
//! lengths are right-aligned with padding slots in between, so after prefill every sequence's
//! last token is in the same slot and decoding appends one slot for all.
//!
//! The tensors grow in chunks of [`GROW_CHUNK`] slots; attention reads the whole capacity and
//! the mask hides slots that are padding or not written yet. Writes go through `slice_assign`
//! on tensors the cache owns alone, so on CPU they happen in place.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

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
    /// Attention mask `[batch, 1, n_rep·s, capacity]`, `true` = may not attend.
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
    device: B::Device,
}

impl<B: Backend> KvCache<B> {
    /// An empty cache for `batch` sequences with room for `capacity` slots before growing.
    pub fn new(cfg: &LlamaConfig, batch: usize, capacity: usize, device: &B::Device) -> Self {
        let capacity = capacity.max(1);
        let shape = [batch, cfg.n_kv_heads, capacity, cfg.head_dim];
        KvCache {
            k: (0..cfg.n_layers)
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
            v: (0..cfg.n_layers)
                .map(|_| Tensor::zeros(shape, device))
                .collect(),
            batch,
            kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            n_rep: cfg.n_rep(),
            len: 0,
            capacity,
            valid: vec![Vec::new(); batch],
            next_pos: vec![0; batch],
            device: device.clone(),
        }
    }

    /// A cache for `batch` sequences that all start with `prefix`, with room for `capacity`
    /// slots in all (at least the prefix).
    pub fn from_prefix(
        cfg: &LlamaConfig,
        prefix: &PrefixKv<B>,
        batch: usize,
        capacity: usize,
        device: &B::Device,
    ) -> Self {
        let p = prefix.len();
        let capacity = capacity.max(p).max(1);
        let (kv_heads, head_dim) = (cfg.n_kv_heads, cfg.head_dim);
        // The expanded prefix is a broadcast view; `cat` materializes it into storage the
        // cache owns alone, so later writes happen in place.
        let fill = |t: &Tensor<B, 4>| {
            let shared = t.clone().expand([batch, kv_heads, p, head_dim]);
            let rest = Tensor::zeros([batch, kv_heads, capacity - p, head_dim], device);
            Tensor::cat(vec![shared, rest], 2)
        };
        KvCache {
            k: prefix.k.iter().map(fill).collect(),
            v: prefix.v.iter().map(fill).collect(),
            batch,
            kv_heads,
            head_dim,
            n_rep: cfg.n_rep(),
            len: p,
            capacity,
            valid: vec![vec![true; p]; batch],
            next_pos: vec![p; batch],
            device: device.clone(),
        }
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
        let mut mask = vec![true; self.batch * rows * cap];
        for i in 0..self.batch {
            let valid = &self.valid[i];
            for t in 0..s {
                let slot = start + t;
                let mut row = vec![true; cap];
                if valid[slot] {
                    for (j, m) in row.iter_mut().enumerate().take(slot + 1) {
                        *m = !valid[j];
                    }
                } else {
                    // A padding row attends to itself only: its output is never used, and a
                    // row with nothing to attend to would be NaN.
                    row[slot] = false;
                }
                for r in 0..self.n_rep {
                    let at = (i * rows + r * s + t) * cap;
                    mask[at..at + cap].copy_from_slice(&row);
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
        let extra = [self.batch, self.kv_heads, new_cap - self.capacity, self.head_dim];
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let old = std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &self.device));
            *t = Tensor::cat(vec![old, Tensor::zeros(extra, &self.device)], 2);
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

    /// Copies the first `len` slots of sequence 0 out as a reusable prefix. The slots must all
    /// hold real tokens (no padding), which is the case for a cache prefilled with one sequence.
    pub fn snapshot_prefix(&self, ids: &[u32]) -> Result<PrefixKv<B>, ModelError> {
        let len = ids.len();
        if len > self.len || self.batch == 0 || !self.valid[0][..len].iter().all(|&v| v) {
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
    use burn::tensor::{DType, TensorPrimitive};
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
    let TensorPrimitive::Float(mut prim) = cache.into_primitive() else {
        unreachable!("a float tensor's primitive is a float primitive")
    };
    let written = match (&mut prim as &mut dyn Any).downcast_mut::<FlexTensor>() {
        Some(t)
            if t.dtype() == DType::F32
                && t.is_contiguous()
                && t.layout().start_offset() == 0 =>
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
