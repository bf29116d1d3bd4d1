//! 6-bit weights as GGUF files store them: `Q6_K` super-blocks (`block_q6_K { u8 ql[128];
//! u8 qh[64]; i8 scales[16]; f16 d; }`, 256 values `v = d·sc·(q − 32)`, `q` in 0..64 from a
//! nibble of `ql` and two bits of `qh`, one 8-bit `sc` per 16 values), kept byte for byte as
//! the file has them: 6.5625 bits a weight, where 8-bit blocks took 9. In a `Q4_K_M` file they
//! hold the output head and half the layers' `ffn_down` and `attn_v` (a third of the 1.5B Qwen
//! file's bytes).
//!
//! The kernels read a super-block as eight blocks of 32 values in ggml's own order: each half
//! (128 values) has 64 bytes of `ql` and 32 of `qh`, and its block `k` takes the low (`k` < 2)
//! or high nibbles of `ql[32·(k % 2)..][..32]` and bits `2k, 2k + 1` of `qh[..32]`, so one
//! 32-byte load of each gives a block's 32 values with a shift and a mask, as llama.cpp's
//! `ggml_vec_dot_q6_K_q8_K` reads them. Block `b` of a super-block has scales `sc[2b]` (its
//! values 0..16) and `sc[2b + 1]` (16..32).

use super::kernels::{self, Kernel};
use super::QK;
use crate::model::gguf::{dequantize_q6_k, f16_at, GgmlType, QK_K};
use rayon::prelude::*;

/// Bytes of one `Q6_K` super-block.
pub const BLOCK_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;

/// A `[rows, cols]` matrix of `Q6_K` super-blocks, row-major (`cols` a multiple of 256).
#[derive(Clone)]
pub struct Q6Matrix {
    rows: usize,
    cols: usize,
    /// `rows × cols / 256` super-blocks, each [`BLOCK_BYTES`] as in the file.
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Q6Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q6Matrix[{}, {}]", self.rows, self.cols)
    }
}

/// Why GGUF bytes are not a `Q6_K` matrix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Q6Error {
    /// Not `Q6_K`.
    #[error("{0:?} is not Q6_K")]
    Type(GgmlType),
    /// The bytes do not hold `rows × cols` values, or a row is not whole super-blocks, or the
    /// row map leaves the tensor.
    #[error("{got} bytes for {rows} x {cols} Q6_K values")]
    Size {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes given.
        got: usize,
    },
}

impl Q6Matrix {
    /// Whether tensors of type `ty` are kept as `Q6_K` super-blocks.
    pub fn keeps(ty: GgmlType) -> bool {
        ty == GgmlType::Q6_K
    }

    /// Copies a GGUF `Q6_K` tensor of `rows × cols` values, its row `r` taken from the file's
    /// row `source_row(r)` (llama's q/k un-permutation, or `r`).
    pub fn from_gguf(
        ty: GgmlType,
        bytes: &[u8],
        rows: usize,
        cols: usize,
        source_row: impl Fn(usize) -> usize + Sync,
    ) -> Result<Self, Q6Error> {
        if !Self::keeps(ty) {
            return Err(Q6Error::Type(ty));
        }
        let row_bytes = cols / QK_K * BLOCK_BYTES;
        let size = || Q6Error::Size {
            rows,
            cols,
            got: bytes.len(),
        };
        if !cols.is_multiple_of(QK_K) || bytes.len() != rows * row_bytes {
            return Err(size());
        }
        if (0..rows).any(|r| source_row(r) >= rows) {
            return Err(size());
        }
        let mut out = vec![0u8; rows * row_bytes];
        if row_bytes > 0 {
            out.par_chunks_mut(row_bytes)
                .enumerate()
                .for_each(|(r, row)| {
                    let src = source_row(r);
                    row.copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
                });
        }
        Ok(Q6Matrix {
            rows,
            cols,
            bytes: out,
        })
    }

    /// The matrices one under the other (a fused projection).
    ///
    /// # Panics
    /// When the parts' column counts differ (a caller's bug: shapes are checked at load).
    pub fn stack(parts: Vec<Q6Matrix>) -> Q6Matrix {
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(parts.iter().all(|p| p.cols == cols), "Q6Matrix::stack");
        let mut bytes = Vec::with_capacity(parts.iter().map(|p| p.bytes.len()).sum());
        for p in &parts {
            bytes.extend_from_slice(&p.bytes);
        }
        Q6Matrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            bytes,
        }
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the matrix holds in memory.
    pub fn bytes(&self) -> usize {
        self.bytes.len()
    }

    /// Row `r`'s super-blocks, as the file has them.
    pub fn row(&self, r: usize) -> &[u8] {
        let n = self.cols / QK_K * BLOCK_BYTES;
        &self.bytes[r * n..(r + 1) * n]
    }

    /// Row `r` as `f32` values (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        for (y, b) in out
            .chunks_exact_mut(QK_K)
            .zip(self.row(r).chunks_exact(BLOCK_BYTES))
        {
            dequantize_q6_k(b, y);
        }
    }

    /// The whole matrix as `f32`, row-major (tests).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }
}

/// Block `b` (0..8) of a `Q6_K` super-block: its 32 values `q − 32` in order, and the two
/// scales `d·sc` of its halves. What the portable kernel reads; the vector ones read the same
/// bytes in place.
pub fn block_values(sb: &[u8], b: usize) -> ([i8; QK], [f32; 2]) {
    let (half, k) = (b / 4, b % 4);
    let ql = &sb[64 * half + 32 * (k % 2)..][..32];
    let qh = &sb[128 + 32 * half..][..32];
    let mut q = [0i8; QK];
    for (l, v) in q.iter_mut().enumerate() {
        let low = if k < 2 { ql[l] & 0x0F } else { ql[l] >> 4 };
        let high = (qh[l] >> (2 * k)) & 3;
        *v = (low | (high << 4)) as i8 - 32;
    }
    (q, [part_scale(sb, 2 * b), part_scale(sb, 2 * b + 1)])
}

/// The scale `d·sc[i]` of values `16i..16i + 16` (`i` in 0..16) of a `Q6_K` super-block.
fn part_scale(sb: &[u8], i: usize) -> f32 {
    f16_at(sb, 208) * (sb[192 + i] as i8) as f32
}

impl super::BlockWeights for Q6Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        Q6Matrix::dequantize_row(self, r, out);
    }

    /// A super-block's eight blocks share their activations' scale: the kernel sums its
    /// sixteen 16-value parts in integers, each times its `sc`, and scales the sum once.
    fn activation_group(&self) -> usize {
        QK_K / QK
    }

    fn dots(&self, kernel: Kernel, j: usize, xs: &[super::ActRow<'_>], out: &mut [f32]) {
        kernels::dot_q6(kernel, self.row(j), xs, out);
    }

    /// The raw 6-bit values, zero point 32, a scale `d·sc` per 16 values.
    fn panel_format(&self) -> super::PanelFormat {
        super::PanelFormat {
            step: 16,
            zero: 32,
            offsets: false,
        }
    }

    fn unpack_row(&self, r: usize, values: &mut [u8], scales: &mut [f32], _: &mut [f32]) {
        let row = self.row(r);
        kernels::unpack_q6(row, values);
        for (sb, scales) in row
            .chunks_exact(BLOCK_BYTES)
            .zip(scales.chunks_exact_mut(16))
        {
            for (i, s) in scales.iter_mut().enumerate() {
                *s = part_scale(sb, i);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// GGUF bytes of random `Q6_K` super-blocks: every byte random but `d`, a small `f16`.
    fn random_q6(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK_K {
            bytes.extend((0..BLOCK_BYTES - 2).map(|_| rng.random::<u8>()));
            bytes.extend(half::f16::from_f32(rng.random_range(0.0001f32..0.002)).to_le_bytes());
        }
        bytes
    }

    /// The values of super-block `sb` written from the format's definition (ggml's
    /// `dequantize_row_q6_K`, element by element): the independent reference.
    fn reference_values(sb: &[u8]) -> Vec<f32> {
        let d = half::f16::from_le_bytes([sb[208], sb[209]]).to_f32();
        (0..QK_K)
            .map(|i| {
                let (half, j) = (i / 128, i % 128);
                let (quarter, l) = (j / 32, j % 32);
                let ql = sb[64 * half + l + 32 * (quarter % 2)];
                let low = if quarter < 2 { ql & 0x0F } else { ql >> 4 };
                let high = (sb[128 + 32 * half + l] >> (2 * quarter)) & 3;
                let q = (low | (high << 4)) as i32 - 32;
                let sc = sb[192 + 8 * half + l / 16 + 2 * quarter] as i8;
                d * sc as f32 * q as f32
            })
            .collect()
    }

    #[test]
    fn super_blocks_are_kept_exactly() {
        let (rows, cols) = (3, 512);
        let bytes = random_q6(rows, cols, 1);
        let want: Vec<f32> = bytes
            .chunks(BLOCK_BYTES)
            .flat_map(reference_values)
            .collect();
        let q = Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, rows, cols, |r| r).expect("q6");
        assert_eq!(q.dequantize(), want);
        assert_eq!(q.bytes(), bytes.len());
        // The GGUF reader (checked against the `gguf` Python package) agrees.
        let reader = crate::model::gguf::dequantize(GgmlType::Q6_K, &bytes, rows * cols);
        assert_eq!(reader.expect("reader"), want);
        // The blocks the portable kernel reads are the same values.
        let row = q.row(1);
        for b in 0..16 {
            let (vals, sc) = block_values(&row[b / 8 * BLOCK_BYTES..], b % 8);
            for (i, &v) in vals.iter().enumerate() {
                assert_eq!(
                    sc[i / 16] * v as f32,
                    want[cols + b * QK + i],
                    "block {b} [{i}]"
                );
            }
        }
        let rev = Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, rows, cols, |r| 2 - r).expect("q6");
        let mut r0 = vec![0f32; cols];
        rev.dequantize_row(0, &mut r0);
        assert_eq!(r0, want[2 * cols..].to_vec());
        let both = Q6Matrix::stack(vec![q.clone(), rev]);
        assert_eq!(both.rows(), 6);
        assert_eq!(&both.dequantize()[..rows * cols], &want[..]);
    }

    #[test]
    fn wrong_types_sizes_and_row_maps_are_errors() {
        let bytes = random_q6(2, 256, 2);
        let err = Q6Matrix::from_gguf(GgmlType::Q8_0, &bytes, 2, 256, |r| r);
        assert_eq!(err.err(), Some(Q6Error::Type(GgmlType::Q8_0)));
        assert!(Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes[1..], 2, 256, |r| r).is_err());
        assert!(Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, 4, 128, |r| r).is_err());
        assert!(Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, 2, 256, |r| r + 1).is_err());
    }

    #[test]
    fn every_kernel_matches_the_f64_product_on_odd_shapes() {
        for (m, n, k) in [(1, 7, 256), (3, 9, 512), (5, 6, 768), (50, 5, 256)] {
            let bytes = random_q6(n, k, 3 + m as u64);
            let w: Vec<f32> = bytes
                .chunks(BLOCK_BYTES)
                .flat_map(reference_values)
                .collect();
            let q = Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, n, k, |r| r).expect("q6");
            super::super::assert_every_kernel_matches(&q, &w, m, "Q6_K");
        }
    }
}
