//! The KV cache of a batch in host memory, in fixed-size blocks of slots per sequence (paged,
//! as vLLM's PagedAttention keeps it): the store of a model running on flex in `f32`.
//!
//! A block holds [`BLOCK`] consecutive slots of one sequence for every layer, `[k|v, layer,
//! kv_head, BLOCK, head_dim]`; a sequence's blocks start at batch slot `first` (its prefill's
//! first slot, renumbered as the batch's slots shift). So joining a batch moves no data (the
//! newcomers' blocks move in, `first` is renumbered), a finished sequence gives its blocks
//! back, dropping dead leading slots renumbers, growing takes one more block, and memory
//! follows each sequence's own length. Blocks all have one size, so the ones finished
//! sequences give back ([`SpareBuffers`]) serve the next sequences every time: fresh pages
//! cost the kernel's zeroing on first touch, which took a fifth of the loop's time when every
//! join built the cache's tensors anew (`cat`), and a sixth with a growing buffer per sequence.

use std::sync::{Mutex, PoisonError};

use super::GROW_CHUNK;

/// Slots per block.
pub const BLOCK: usize = GROW_CHUNK;

/// Blocks that finished sequences gave back, for the next sequences of the same model. At
/// most `SPARE_BYTES` are kept.
#[derive(Debug, Default)]
pub struct SpareBuffers {
    blocks: Mutex<Vec<Vec<f32>>>,
}

/// The most bytes [`SpareBuffers`] keeps.
const SPARE_BYTES: usize = 256 << 20;

impl SpareBuffers {
    /// A block of `len` values: a kept one, else a new one. A kept block keeps its old
    /// values: every slot is written before it is read.
    fn take(&self, len: usize) -> Vec<f32> {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        match blocks.iter().position(|b| b.len() == len) {
            Some(i) => blocks.swap_remove(i),
            None => vec![0.0; len],
        }
    }

    /// Keeps `block` for a later sequence if there is room under [`SPARE_BYTES`].
    fn give(&self, block: Vec<f32>) {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        let kept: usize = blocks.iter().map(Vec::len).sum();
        if (kept + block.len()) * std::mem::size_of::<f32>() <= SPARE_BYTES {
            blocks.push(block);
        }
    }

    /// Gives every kept block back to the allocator (the server idle: a training beside it
    /// needs the memory more than the next batch needs warm pages).
    pub fn clear(&self) {
        let mut blocks = self.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        *blocks = Vec::new();
    }

    /// Blocks kept.
    #[cfg(test)]
    pub(super) fn kept(&self) -> usize {
        self.blocks.lock().map_or(0, |b| b.len())
    }
}

/// One sequence's blocks; block `i` holds batch slots `first + i·BLOCK ..`. `first` is
/// negative once leading slots were dropped inside its first block.
#[derive(Debug)]
struct SeqKv {
    blocks: Vec<Vec<f32>>,
    first: isize,
}

/// The K and V of every layer of a batch, in blocks per sequence.
#[derive(Debug)]
pub(super) struct HostKv {
    seqs: Vec<SeqKv>,
    spare: std::sync::Arc<SpareBuffers>,
    layers: usize,
    heads: usize,
    d: usize,
}

/// One layer's own slots for attention: host blocks, or one dense array `[batch, kv_heads,
/// cap, head_dim]`.
#[derive(Debug, Clone, Copy)]
pub struct OwnKv<'a> {
    source: Source<'a>,
    /// Slots written so far (batch numbering); later ones are masked.
    len: usize,
}

#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    Host { kv: &'a HostKv, layer: usize },
    Dense { k: &'a [f32], v: &'a [f32] },
}

/// The own slots of one (sequence, kv head): `k` and `v` hold slices of `span` slots each
/// (the last may be shorter), the first starting at batch slot `first`.
#[derive(Debug, Default)]
pub struct OwnRows<'a> {
    /// Keys, `[span, head_dim]` per slice.
    pub k: Vec<&'a [f32]>,
    /// Values, laid out as the keys.
    pub v: Vec<&'a [f32]>,
    /// Batch slot of the first slice's first row.
    pub first: isize,
    /// Slots per slice.
    pub span: usize,
}

impl<'a> OwnKv<'a> {
    /// Dense `k` and `v` `[batch, kv_heads, cap, head_dim]`, every slot readable.
    pub fn dense(k: &'a [f32], v: &'a [f32], cap: usize) -> Self {
        OwnKv {
            source: Source::Dense { k, v },
            len: cap,
        }
    }

    /// The keys and values of (sequence, kv head) number `bh` (`kvh` heads of `d` values).
    pub fn rows(&self, bh: usize, kvh: usize, d: usize) -> OwnRows<'a> {
        match self.source {
            Source::Dense { k, v } => {
                let run = bh * self.len * d..(bh + 1) * self.len * d;
                OwnRows {
                    k: vec![&k[run.clone()]],
                    v: vec![&v[run]],
                    first: 0,
                    span: self.len.max(1),
                }
            }
            Source::Host { kv, layer } => {
                let seq = &kv.seqs[bh / kvh];
                let mut rows = OwnRows {
                    first: seq.first,
                    span: BLOCK,
                    ..OwnRows::default()
                };
                for block in &seq.blocks {
                    let (k, v) = kv.rows(block, layer, bh % kvh);
                    rows.k.push(k);
                    rows.v.push(v);
                }
                rows
            }
        }
    }

    /// Whether the data fit `batch` sequences of `kvh` heads of `d` values and `cap` slots.
    pub fn fits(&self, batch: usize, kvh: usize, d: usize, cap: usize) -> bool {
        match self.source {
            Source::Dense { k, v } => {
                self.len == cap && k.len() == batch * kvh * cap * d && v.len() == k.len()
            }
            Source::Host { kv, layer } => {
                kv.seqs.len() == batch
                    && kv.heads == kvh
                    && kv.d == d
                    && layer < kv.layers
                    && self.len <= cap
                    && kv.seqs.iter().all(|s| s.end() >= self.len as isize)
            }
        }
    }
}

impl SeqKv {
    /// The batch slot after its last block.
    fn end(&self) -> isize {
        self.first + (self.blocks.len() * BLOCK) as isize
    }
}

impl Drop for HostKv {
    fn drop(&mut self) {
        for seq in std::mem::take(&mut self.seqs) {
            self.give(seq);
        }
    }
}

impl HostKv {
    /// No blocks yet for `batch` sequences of `layers` layers; they come as slots are written.
    pub(super) fn new(
        (layers, heads, d): (usize, usize, usize),
        batch: usize,
        spare: std::sync::Arc<SpareBuffers>,
    ) -> Self {
        HostKv {
            seqs: (0..batch)
                .map(|_| SeqKv {
                    blocks: Vec::new(),
                    first: 0,
                })
                .collect(),
            spare,
            layers,
            heads,
            d,
        }
    }

    /// Layers held.
    pub(super) fn layers(&self) -> usize {
        self.layers
    }

    /// Slots of sequence `i` from its first block to the batch's `len` written ones.
    pub(super) fn held_slots(&self, i: usize, len: usize) -> usize {
        self.seqs
            .get(i)
            .map_or(0, |s| usize::try_from(len as isize - s.first).unwrap_or(0))
    }

    /// Values per block.
    fn block_len(&self) -> usize {
        2 * self.layers * self.heads * BLOCK * self.d
    }

    fn give(&self, seq: SeqKv) {
        for block in seq.blocks {
            self.spare.give(block);
        }
    }

    /// A block's K and V rows of (`layer`, `head`), `[BLOCK, d]` each.
    fn rows<'s>(&self, block: &'s [f32], layer: usize, head: usize) -> (&'s [f32], &'s [f32]) {
        let row = BLOCK * self.d;
        let k_at = (layer * self.heads + head) * row;
        let v_at = k_at + self.layers * self.heads * row;
        (&block[k_at..k_at + row], &block[v_at..v_at + row])
    }

    /// Layer `l`'s own slots for attention, `len` of them written (batch numbering).
    pub(super) fn layer(&self, l: usize, len: usize) -> OwnKv<'_> {
        OwnKv {
            source: Source::Host { kv: self, layer: l },
            len,
        }
    }

    /// Gives every sequence blocks for the batch slots before `end`.
    pub(super) fn ensure_written(&mut self, end: usize) {
        let len = self.block_len();
        for seq in &mut self.seqs {
            while seq.end() < end as isize {
                seq.blocks.push(self.spare.take(len));
            }
        }
    }

    /// Writes layer `l`'s new keys and values, `[batch, kv_heads, s, head_dim]` each, at batch
    /// slots `start..start + s` (given blocks by [`HostKv::ensure_written`]).
    pub(super) fn write(&mut self, l: usize, start: usize, k: &[f32], v: &[f32], s: usize) {
        let (heads, layers, d) = (self.heads, self.layers, self.d);
        let row = BLOCK * d;
        let v_off = layers * heads * row;
        for (bh, (kn, vn)) in k.chunks_exact(s * d).zip(v.chunks_exact(s * d)).enumerate() {
            let seq = &mut self.seqs[bh / heads];
            let at = (l * heads + bh % heads) * row;
            for (t, (kt, vt)) in kn.chunks_exact(d).zip(vn.chunks_exact(d)).enumerate() {
                let local = (start + t) as isize - seq.first;
                let Ok(local) = usize::try_from(local) else {
                    continue; // before its first slot: not its own (never the case)
                };
                let (b, off) = (local / BLOCK, local % BLOCK);
                let Some(block) = seq.blocks.get_mut(b) else {
                    continue;
                };
                let kr = at + off * d;
                block[kr..kr + d].copy_from_slice(kt);
                block[v_off + kr..v_off + kr + d].copy_from_slice(vt);
            }
        }
    }

    /// Keeps the sequences `rows`, in that order; the others' blocks are given back.
    pub(super) fn retain(&mut self, rows: &[usize]) {
        let mut all: Vec<Option<SeqKv>> = std::mem::take(&mut self.seqs)
            .into_iter()
            .map(Some)
            .collect();
        self.seqs = rows
            .iter()
            .filter_map(|&r| all.get_mut(r)?.take())
            .collect();
        for seq in all.into_iter().flatten() {
            self.give(seq);
        }
    }

    /// Renumbers every sequence's slots `by` later (the batch right-aligned to a longer one
    /// that joins it): no data moves.
    pub(super) fn shift_right(&mut self, by: usize) {
        for seq in &mut self.seqs {
            seq.first += by as isize;
        }
    }

    /// Drops the batch's first `dead` slots: renumbering, and the blocks that now lie wholly
    /// before slot 0 given back.
    pub(super) fn drop_front(&mut self, dead: usize) {
        for seq in &mut self.seqs {
            seq.first -= dead as isize;
            let gone = usize::try_from(-seq.first).unwrap_or(0) / BLOCK;
            let gone = gone.min(seq.blocks.len());
            for block in seq.blocks.drain(..gone) {
                self.spare.give(block);
            }
            seq.first += (gone * BLOCK) as isize;
        }
    }

    /// Takes the sequences of `other` (same shape) after these.
    pub(super) fn append(&mut self, mut other: HostKv) {
        self.seqs.append(&mut other.seqs);
    }

    /// Copies `len` values per (layer, head) out of sequence `seq`'s slots `from..from + n`
    /// (batch numbering) into `out` `[kv_heads, n, d]` K and V for `layer`.
    fn copy_slots(&self, seq: &SeqKv, layer: usize, from: usize, n: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.d;
        let (mut k, mut v) = (vec![0.0; self.heads * n * d], vec![0.0; self.heads * n * d]);
        for h in 0..self.heads {
            for t in 0..n {
                let Ok(local) = usize::try_from((from + t) as isize - seq.first) else {
                    continue;
                };
                let Some(block) = seq.blocks.get(local / BLOCK) else {
                    continue;
                };
                let (kr, vr) = self.rows(block, layer, h);
                let (src, dst) = ((local % BLOCK) * d, (h * n + t) * d);
                k[dst..dst + d].copy_from_slice(&kr[src..src + d]);
                v[dst..dst + d].copy_from_slice(&vr[src..src + d]);
            }
        }
        (k, v)
    }

    /// Sequence 0's first `len` slots of layer `l` (it must start at slot 0), `[kv_heads,
    /// len, head_dim]` K and V.
    pub(super) fn first_slots(&self, l: usize, len: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let seq = self
            .seqs
            .first()
            .filter(|s| s.first == 0 && s.end() >= len as isize)?;
        Some(self.copy_slots(seq, l, 0, len))
    }

    /// Layer `l` as dense `[batch, kv_heads, cap, head_dim]` K and V, `len` slots written
    /// (zeros elsewhere): a copy, for the burn-ops path.
    pub(super) fn dense(&self, l: usize, len: usize, cap: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.d;
        let size = self.seqs.len() * self.heads * cap * d;
        let (mut k, mut v) = (vec![0.0; size], vec![0.0; size]);
        for (i, seq) in self.seqs.iter().enumerate() {
            let from = seq.first.max(0) as usize;
            let n = len.saturating_sub(from);
            let (ks, vs) = self.copy_slots(seq, l, from, n);
            for h in 0..self.heads {
                let at = ((i * self.heads + h) * cap + from) * d;
                let src = h * n * d..(h + 1) * n * d;
                k[at..at + n * d].copy_from_slice(&ks[src.clone()]);
                v[at..at + n * d].copy_from_slice(&vs[src]);
            }
        }
        (k, v)
    }
}
