//! The KV cache of a batch as backend tensors: the store of every backend but flex in `f32`
//! (CUDA writes them in place; joins and drops build new tensors).

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};

/// K and V of every layer of a batch, `[batch, kv_heads, capacity, head_dim]` each.
#[derive(Debug)]
pub(super) struct TensorKv<B: Backend> {
    pub(super) k: Vec<Tensor<B, 4>>,
    pub(super) v: Vec<Tensor<B, 4>>,
    device: B::Device,
    dtype: DType,
}

impl<B: Backend> TensorKv<B> {
    /// Zeros of `shape` for each of `layers` layers.
    pub(super) fn new(layers: usize, shape: [usize; 4], device: &B::Device, dtype: DType) -> Self {
        let zeros = || -> Vec<Tensor<B, 4>> {
            (0..layers)
                .map(|_| Tensor::zeros(shape, (device, dtype)))
                .collect()
        };
        TensorKv {
            k: zeros(),
            v: zeros(),
            device: device.clone(),
            dtype,
        }
    }

    fn zeros(&self, shape: [usize; 4]) -> Tensor<B, 4> {
        Tensor::zeros(shape, (&self.device, self.dtype))
    }

    /// Applies `f` to every layer's K and V.
    fn map(&mut self, f: impl Fn(Tensor<B, 4>) -> Tensor<B, 4>) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            let old = std::mem::replace(t, Tensor::empty([0, 0, 0, 0], &self.device));
            *t = f(old);
        }
    }

    /// Adds `extra` zero slots after the existing ones.
    pub(super) fn grow(&mut self, extra: usize) {
        let Some([b, h, _, d]) = self.k.first().map(Tensor::dims) else {
            return;
        };
        let pad = self.zeros([b, h, extra, d]);
        self.map(|t| Tensor::cat(vec![t, pad.clone()], 2));
    }

    /// Writes layer `l`'s new K/V (`[batch, kv_heads, s, head_dim]`) at slot `start`.
    pub(super) fn write(&mut self, l: usize, start: usize, k: Tensor<B, 4>, v: Tensor<B, 4>) {
        let [b, h, s, d] = k.dims();
        let ranges = [0..b, 0..h, start..start + s, 0..d];
        for (cache, new) in [(&mut self.k[l], k), (&mut self.v[l], v)] {
            let old = std::mem::replace(cache, Tensor::empty([0, 0, 0, 0], &self.device));
            *cache = old.slice_assign(ranges.clone(), new);
        }
    }

    /// Keeps the sequences `rows`, in that order.
    pub(super) fn retain(&mut self, rows: &[usize]) {
        let idx: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(idx, [rows.len()]), &self.device);
        self.map(|t| t.select(0, idx.clone()));
    }

    /// Every layer with its written slots `0..len` moved to end at slot `to_len`, in tensors
    /// of `capacity` slots (the rest zero).
    fn aligned(
        &self,
        len: usize,
        to_len: usize,
        capacity: usize,
    ) -> Vec<(Tensor<B, 4>, Tensor<B, 4>)> {
        let place = |t: &Tensor<B, 4>| {
            let [b, h, _, d] = t.dims();
            let mut parts = Vec::with_capacity(3);
            if to_len > len {
                parts.push(self.zeros([b, h, to_len - len, d]));
            }
            if len > 0 {
                parts.push(t.clone().slice([0..b, 0..h, 0..len, 0..d]));
            }
            if capacity > to_len {
                parts.push(self.zeros([b, h, capacity - to_len, d]));
            }
            Tensor::cat(parts, 2)
        };
        self.k
            .iter()
            .zip(&self.v)
            .map(|(k, v)| (place(k), place(v)))
            .collect()
    }

    /// Appends `other`'s sequences; both sides' written slots (`mine` and `theirs` of them)
    /// right-aligned to end at `len`, in tensors of `capacity` slots.
    pub(super) fn join(
        &mut self,
        other: &TensorKv<B>,
        (mine, theirs): (usize, usize),
        len: usize,
        capacity: usize,
    ) {
        let a = self.aligned(mine, len, capacity);
        let b = other.aligned(theirs, len, capacity);
        for (l, (a, b)) in a.into_iter().zip(b).enumerate() {
            self.k[l] = Tensor::cat(vec![a.0, b.0], 0);
            self.v[l] = Tensor::cat(vec![a.1, b.1], 0);
        }
    }

    /// Drops the first `dead` slots, keeping `dead..len` followed by zeros up to `capacity`.
    pub(super) fn drop_front(&mut self, dead: usize, len: usize, capacity: usize) {
        let Some([b, h, _, d]) = self.k.first().map(Tensor::dims) else {
            return;
        };
        let pad = self.zeros([b, h, capacity - (len - dead), d]);
        self.map(|t| {
            let live = t.slice([0..b, 0..h, dead..len, 0..d]);
            Tensor::cat(vec![live, pad.clone()], 2)
        });
    }

    /// Sequence 0's first `len` slots of every layer, `[1, kv_heads, len, head_dim]` K and V.
    pub(super) fn first_slots(&self, len: usize) -> (Vec<Tensor<B, 4>>, Vec<Tensor<B, 4>>) {
        let cut = |t: &Tensor<B, 4>| {
            let [_, h, _, d] = t.dims();
            t.clone().slice([0..1, 0..h, 0..len, 0..d])
        };
        (
            self.k.iter().map(cut).collect(),
            self.v.iter().map(cut).collect(),
        )
    }
}
