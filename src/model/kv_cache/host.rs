//! The KV cache of a batch in host memory, one buffer per sequence: the store of a model
//! running on flex in `f32`.
//!
//! A sequence's buffer holds its own slots only, from the slot its prefill started at
//! (`first`, in the batch's slot numbering) up to the batch's length, for every layer: `[k|v,
//! layer, kv_head, stride, head_dim]`, `stride` slots reserved per (layer, head). So joining a
//! batch moves no data (the newcomers' buffers are moved in and every sequence's `first` is
//! renumbered when the batch's slots shift), a finished sequence leaves by dropping its
//! buffer, dropping dead leading slots renumbers, and memory follows each sequence's own
//! length, not the batch's longest. The tensor store builds every layer's tensors anew for each
//! of these (`cat`, `select`): in a batch that rows keep joining and leaving that was tens of
//! MB of fresh pages per join, and a fifth of the loop's time went to the kernel zeroing them.

use super::GROW_CHUNK;

/// One sequence's slots `first..first + stride` (batch numbering), every layer's K and V.
#[derive(Debug)]
struct SeqKv {
    buf: Vec<f32>,
    stride: usize,
    first: usize,
}

/// The K and V of every layer of a batch, a buffer per sequence.
#[derive(Debug)]
pub(super) struct HostKv {
    seqs: Vec<SeqKv>,
    layers: usize,
    heads: usize,
    d: usize,
}

/// One layer's own slots for attention, per (sequence, kv head): host buffers, or one dense
/// array `[batch, kv_heads, cap, head_dim]`.
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

impl<'a> OwnKv<'a> {
    /// Dense `k` and `v` `[batch, kv_heads, cap, head_dim]`, every slot readable.
    pub fn dense(k: &'a [f32], v: &'a [f32], cap: usize) -> Self {
        OwnKv {
            source: Source::Dense { k, v },
            len: cap,
        }
    }

    /// The keys and values of (sequence, kv head) number `bh` (`kvh` heads of `d` values), as
    /// `[n, d]` each, and the batch slot their first row is.
    pub fn block(&self, bh: usize, kvh: usize, d: usize) -> (&'a [f32], &'a [f32], usize) {
        match self.source {
            Source::Dense { k, v } => {
                let run = bh * self.len * d..(bh + 1) * self.len * d;
                (&k[run.clone()], &v[run], 0)
            }
            Source::Host { kv, layer } => {
                let seq = &kv.seqs[bh / kvh];
                let n = self.len.saturating_sub(seq.first).min(seq.stride);
                let (k, v) = kv.rows(seq, layer, bh % kvh);
                (&k[..n * d], &v[..n * d], seq.first)
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
            }
        }
    }
}

impl SeqKv {
    fn zeroed(floats_per_slot: usize, stride: usize) -> SeqKv {
        SeqKv {
            buf: vec![0.0; floats_per_slot * stride],
            stride,
            first: 0,
        }
    }
}

impl HostKv {
    /// Zeroed buffers for `layers` layers of `batch` sequences with room for `slots` slots.
    pub(super) fn new(layers: usize, batch: usize, heads: usize, d: usize, slots: usize) -> Self {
        let per_slot = 2 * layers * heads * d;
        HostKv {
            seqs: (0..batch).map(|_| SeqKv::zeroed(per_slot, slots)).collect(),
            layers,
            heads,
            d,
        }
    }

    /// Layers held.
    pub(super) fn layers(&self) -> usize {
        self.layers
    }

    /// Bytes held (the buffers' allocations).
    pub(super) fn bytes(&self) -> usize {
        let floats: usize = self.seqs.iter().map(|s| s.buf.capacity()).sum();
        floats * std::mem::size_of::<f32>()
    }

    /// Sequence `seq`'s K and V rows of (`layer`, `head`), `[stride, d]` each.
    fn rows<'s>(&self, seq: &'s SeqKv, layer: usize, head: usize) -> (&'s [f32], &'s [f32]) {
        let row = seq.stride * self.d;
        let k_at = (layer * self.heads + head) * row;
        let v_at = k_at + self.layers * self.heads * row;
        (&seq.buf[k_at..k_at + row], &seq.buf[v_at..v_at + row])
    }

    /// Layer `l`'s own slots for attention, `len` of them written (batch numbering).
    pub(super) fn layer(&self, l: usize, len: usize) -> OwnKv<'_> {
        OwnKv {
            source: Source::Host { kv: self, layer: l },
            len,
        }
    }

    /// Makes room in every sequence for the batch slots before `end`: a sequence that lacks it
    /// moves to a buffer half as long again (rarely: a sequence's prefill reserves room for its
    /// answer).
    pub(super) fn ensure_written(&mut self, end: usize) {
        let (rows, d) = (2 * self.layers * self.heads, self.d);
        for seq in &mut self.seqs {
            let need = end.saturating_sub(seq.first);
            if need <= seq.stride {
                continue;
            }
            let wider = (seq.stride + seq.stride / 2).max(need);
            let stride = wider.div_ceil(GROW_CHUNK) * GROW_CHUNK;
            let mut grown = vec![0.0; rows * stride * d];
            for (to, from) in grown
                .chunks_exact_mut(stride * d)
                .zip(seq.buf.chunks_exact(seq.stride * d))
            {
                to[..from.len()].copy_from_slice(from);
            }
            seq.buf = grown;
            seq.stride = stride;
        }
    }

    /// Writes layer `l`'s new keys and values, `[batch, kv_heads, s, head_dim]` each, at batch
    /// slots `start..start + s` (made room for by [`HostKv::ensure_written`]).
    pub(super) fn write(&mut self, l: usize, start: usize, k: &[f32], v: &[f32], s: usize) {
        let (heads, layers, d) = (self.heads, self.layers, self.d);
        let run = s * d;
        for (bh, (kn, vn)) in k.chunks_exact(run).zip(v.chunks_exact(run)).enumerate() {
            let seq = &mut self.seqs[bh / heads];
            let row = seq.stride * d;
            let local = (start - seq.first) * d;
            let k_at = (l * heads + bh % heads) * row + local;
            let v_at = k_at + layers * heads * row;
            seq.buf[k_at..k_at + run].copy_from_slice(kn);
            seq.buf[v_at..v_at + run].copy_from_slice(vn);
        }
    }

    /// Keeps the sequences `rows`, in that order; the others' buffers are freed.
    pub(super) fn retain(&mut self, rows: &[usize]) {
        let mut all: Vec<Option<SeqKv>> = std::mem::take(&mut self.seqs)
            .into_iter()
            .map(Some)
            .collect();
        self.seqs = rows
            .iter()
            .filter_map(|&r| all.get_mut(r)?.take())
            .collect();
    }

    /// Renumbers the slots of every sequence `by` later (the batch right-aligned to a longer
    /// one that joins it): no data moves.
    pub(super) fn shift_right(&mut self, by: usize) {
        for seq in &mut self.seqs {
            seq.first += by;
        }
    }

    /// Drops the batch's first `dead` slots: renumbering, and for a sequence whose buffer
    /// starts before slot `dead` (its prefill's left padding), moving its later slots down.
    pub(super) fn drop_front(&mut self, dead: usize) {
        let d = self.d;
        for seq in &mut self.seqs {
            if seq.first >= dead {
                seq.first -= dead;
                continue;
            }
            let cut = (dead - seq.first).min(seq.stride);
            for row in seq.buf.chunks_exact_mut(seq.stride * d) {
                row.copy_within(cut * d.., 0);
                let keep = row.len() - cut * d;
                row[keep..].fill(0.0);
            }
            seq.first = 0;
        }
    }

    /// Takes the sequences of `other` (same shape) after these.
    pub(super) fn append(&mut self, other: HostKv) {
        self.seqs.extend(other.seqs);
    }

    /// Sequence 0's first `len` slots of layer `l` (it must start at slot 0), `[kv_heads,
    /// len, head_dim]` K and V.
    pub(super) fn first_slots(&self, l: usize, len: usize) -> Option<(Vec<f32>, Vec<f32>)> {
        let seq = self
            .seqs
            .first()
            .filter(|s| s.first == 0 && len <= s.stride)?;
        let d = self.d;
        let (mut k, mut v) = (Vec::new(), Vec::new());
        for h in 0..self.heads {
            let (kr, vr) = self.rows(seq, l, h);
            k.extend_from_slice(&kr[..len * d]);
            v.extend_from_slice(&vr[..len * d]);
        }
        Some((k, v))
    }

    /// Layer `l` as dense `[batch, kv_heads, cap, head_dim]` K and V, `len` slots written
    /// (zeros elsewhere): a copy, for the burn-ops path.
    pub(super) fn dense(&self, l: usize, len: usize, cap: usize) -> (Vec<f32>, Vec<f32>) {
        let d = self.d;
        let size = self.seqs.len() * self.heads * cap * d;
        let (mut k, mut v) = (vec![0.0; size], vec![0.0; size]);
        for (i, seq) in self.seqs.iter().enumerate() {
            let n = len.saturating_sub(seq.first).min(seq.stride);
            for h in 0..self.heads {
                let (kr, vr) = self.rows(seq, l, h);
                let at = ((i * self.heads + h) * cap + seq.first) * d;
                k[at..at + n * d].copy_from_slice(&kr[..n * d]);
                v[at..at + n * d].copy_from_slice(&vr[..n * d]);
            }
        }
        (k, v)
    }
}
