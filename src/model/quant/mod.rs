//! Weights kept as 8-bit blocks, and the product of `f32` activations with them.
//!
//! The format is GGUF's `Q8_0` with an `f32` scale: each row cut into blocks of [`QK`] = 32
//! values, each block stored as 32 signed bytes `q` and one scale `d = max|v| / 127`, so
//! `v ≈ d·q`. Why this format first (see `README.md`, "Weight formats", for the measurements):
//! - one kernel serves every GGUF tensor type and Hugging Face folders alike (they are
//!   dequantized one tensor at a time at load and requantized, never held as a model of `f32`);
//! - its error is far below that of the 4- and 5-bit types the downloads use, so re-quantizing
//!   a `Q4_K` tensor to it costs almost nothing in logits;
//! - the product runs in integer arithmetic with the activations quantized to the same blocks
//!   (as llama.cpp does for its `Q8_0` and k-quant kernels), four times less memory traffic per
//!   weight than `f32`, which is what batch-1 decoding is bound by.
//!
//! The scale is `f32` rather than GGUF's `f16`: 6% more bytes than `Q8_0` on disk, one
//! conversion less per block in the inner loop.

pub mod kernels;

use kernels::{Kernel, RowRef, ROWS};
use rayon::prelude::*;
use std::sync::OnceLock;

/// Values per block.
pub const QK: usize = 32;

/// From this many activation rows on, products go through f32 GEMM over dequantized weight
/// tiles instead of the integer dot kernels (measured on SmolLM2-135M, `benches/
/// model_throughput.rs`: the integer kernels win at decode batch 8 and lose at prefill).
pub const GEMM_MIN_ROWS: usize = 48;

/// About how many weight rows one GEMM call of [`GEMM_MIN_ROWS`]-or-more rows multiplies.
const GEMM_COLS: usize = 256;

/// A `[rows, cols]` matrix of Q8 blocks, row-major; `cols` is padded with zeros to a multiple
/// of [`QK`] inside (the padding multiplies activations' zero padding).
#[derive(Clone)]
pub struct Q8Matrix {
    rows: usize,
    cols: usize,
    /// Blocks per row.
    blocks: usize,
    /// `rows × blocks` scales.
    scales: Vec<f32>,
    /// `rows × blocks × QK` values.
    quants: Vec<i8>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix[{}, {}]", self.rows, self.cols)
    }
}

/// Quantizes one block: the scale and the 32 values, round to nearest as ggml's
/// `quantize_row_q8_0_ref`. A non-finite value (a diverged weight or activation) quantizes to
/// zero and does not set the scale, so it cannot turn its finite neighbours into garbage.
fn quantize_block(v: &[f32], q: &mut [i8]) -> f32 {
    let amax = v
        .iter()
        .filter(|x| x.is_finite())
        .fold(0f32, |m, x| m.max(x.abs()));
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (q, &x) in q.iter_mut().zip(v) {
        *q = if x.is_finite() {
            (x * id).round().clamp(-127.0, 127.0) as i8
        } else {
            0
        };
    }
    d
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix.
    ///
    /// # Panics
    /// When `data.len() != rows * cols` (a caller's bug, never input).
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Q8Matrix::quantize: shape");
        let blocks = cols.div_ceil(QK);
        let mut scales = vec![0f32; rows * blocks];
        let mut quants = vec![0i8; rows * blocks * QK];
        let row_jobs = scales
            .par_chunks_mut(blocks.max(1))
            .zip(quants.par_chunks_mut((blocks * QK).max(1)))
            .zip(data.par_chunks(cols.max(1)));
        row_jobs.for_each(|((s, q), row)| {
            let mut padded = [0f32; QK];
            for (b, (s, q)) in s.iter_mut().zip(q.chunks_exact_mut(QK)).enumerate() {
                let start = b * QK;
                let end = (start + QK).min(cols);
                let v = if end - start == QK {
                    &row[start..end]
                } else {
                    padded.fill(0.0);
                    padded[..end - start].copy_from_slice(&row[start..end]);
                    &padded[..]
                };
                *s = quantize_block(v, q);
            }
        });
        Q8Matrix {
            rows,
            cols,
            blocks,
            scales,
            quants,
        }
    }

    /// Rows (outputs, for a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs, for a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes the matrix holds in memory.
    pub fn bytes(&self) -> usize {
        self.scales.len() * 4 + self.quants.len()
    }

    fn row(&self, r: usize) -> RowRef<'_> {
        RowRef {
            quants: &self.quants[r * self.blocks * QK..(r + 1) * self.blocks * QK],
            scales: &self.scales[r * self.blocks..(r + 1) * self.blocks],
        }
    }

    /// Row `r` as `f32` values (`out.len() == cols`), e.g. an embedding lookup.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let row = self.row(r);
        let whole = self.cols / QK;
        kernels::dequantize(
            &row.quants[..whole * QK],
            &row.scales[..whole],
            &mut out[..whole * QK],
        );
        for (i, o) in out.iter_mut().enumerate().take(self.cols).skip(whole * QK) {
            *o = row.scales[i / QK] * row.quants[i] as f32;
        }
    }

    /// The whole matrix as `f32`, row-major (tests and the reference path).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, o) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, o);
        }
        out
    }

    /// `x · selfᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major, with the machine's
    /// kernel ([`Kernel::detect`]).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        static KERNEL: OnceLock<Kernel> = OnceLock::new();
        self.matmul_t_with(*KERNEL.get_or_init(Kernel::detect), x, m)
    }

    /// [`Q8Matrix::matmul_t`] with a given kernel (the tests run each one).
    ///
    /// # Panics
    /// When `x.len() != m * cols` (a caller's bug).
    pub fn matmul_t_with(&self, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.cols, "Q8Matrix::matmul_t: shape");
        let n = self.rows;
        let mut y = vec![0f32; m * n];
        if n == 0 || m == 0 {
            return y;
        }
        // Activations are quantized to the weights' blocks in every path, so the product is
        // the same numbers whichever path computes it.
        let xq = Q8Matrix::quantize(x, m, self.cols);
        // Many rows (a prefill): the weights' dequantization is paid once for all of them and
        // f32 GEMM's register blocking wins over the row-pair dot products.
        let xd = (m >= GEMM_MIN_ROWS).then(|| xq.dequantize());
        // Each task owns a run of weight rows, that is a run of output columns. The dot
        // kernels: about 8 runs per thread so rayon can balance them, at least 16 rows. GEMM
        // packs all `m` activation rows once per call, so its runs are about GEMM_COLS wide (a
        // packed value then serves that many products), in a multiple of the thread count.
        let threads = rayon::current_num_threads().max(1);
        let per_task = if xd.is_some() {
            let rounds = (n as f64 / (threads * GEMM_COLS) as f64).round().max(1.0) as usize;
            n.div_ceil(threads * rounds)
        } else {
            n.div_ceil(threads * 8).max(16)
        };
        let out = OutPtr(y.as_mut_ptr());
        (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
            let cols = task * per_task..((task + 1) * per_task).min(n);
            // SAFETY: `y` (m × n values) outlives the loop, and the tasks' column runs are
            // disjoint.
            unsafe {
                let y = out.get();
                match &xd {
                    Some(xd) => self.columns_by_gemm(xd, m, cols, y),
                    None => self.columns_by_dots(kernel, &xq, cols, y),
                }
            }
        });
        y
    }

    /// Output columns `cols` of `y` `[m, rows]` for many rows `m`: those weight rows
    /// dequantized, then one f32 GEMM against the dequantized activations `xd` `[m, cols]`.
    ///
    /// # Safety
    /// `y` points to `m × self.rows` values, of which no other thread touches columns `cols`.
    unsafe fn columns_by_gemm(
        &self,
        xd: &[f32],
        m: usize,
        cols: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        let (n, k, count) = (self.rows, self.cols, cols.len());
        let mut w = vec![0f32; count * k];
        for (j, row) in w.chunks_exact_mut(k).enumerate() {
            self.dequantize_row(cols.start + j, row);
        }
        // y[i·n + cols.start + j] = Σ_c xd[i·k + c] · w[j·k + c]: dst [m, count] with row
        // stride n; lhs [m, k] row-major; rhs [k, count] = wᵀ (row stride 1, column stride k).
        // SAFETY: lhs and rhs cover m·k and count·k values; dst's extent is the caller's.
        unsafe {
            gemm::gemm(
                m,
                count,
                k,
                y.add(cols.start),
                1,
                n as isize,
                false,
                xd.as_ptr(),
                1,
                k as isize,
                w.as_ptr(),
                k as isize,
                1,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }

    /// Output columns `cols` of `y` `[m, rows]` by the integer dot kernels. Activations are
    /// taken a tile of rows at a time, so a tile stays in cache while the run's weight rows
    /// pass over it.
    ///
    /// # Safety
    /// As [`Q8Matrix::columns_by_gemm`].
    unsafe fn columns_by_dots(
        &self,
        kernel: Kernel,
        xq: &Q8Matrix,
        cols: std::ops::Range<usize>,
        y: *mut f32,
    ) {
        const TILE: usize = 16;
        let (m, n) = (xq.rows, self.rows);
        let mut dots = [0f32; ROWS];
        for t0 in (0..m).step_by(TILE) {
            let t1 = (t0 + TILE).min(m);
            for j in cols.clone() {
                let w = self.row(j);
                for r0 in (t0..t1).step_by(ROWS) {
                    let r1 = (r0 + ROWS).min(t1);
                    let mut xs = [w; ROWS];
                    for (slot, r) in xs.iter_mut().zip(r0..r1) {
                        *slot = xq.row(r);
                    }
                    kernel.dot(w, &xs[..r1 - r0], &mut dots);
                    for (r, &v) in (r0..r1).zip(&dots) {
                        // SAFETY: r < m and j in the caller's columns.
                        unsafe { *y.add(r * n + j) = v };
                    }
                }
            }
        }
    }
}

/// The output buffer of a product, shared by the tasks that write its disjoint column runs.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: only used by `matmul_t_with`, whose tasks write disjoint parts of the buffer.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    ///
    /// # Safety
    /// The caller writes only its own part of the buffer.
    unsafe fn get(self) -> *mut f32 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Plain `f32` `x · wᵀ` in `f64` accumulation: the independent reference.
    fn reference(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|c| x[i * k + c] as f64 * w[j * k + c] as f64)
                    .sum();
                y[i * n + j] = s as f32;
            }
        }
        y
    }

    #[test]
    fn a_block_round_trips_within_half_a_step() {
        // Values k·d for integers k come back exactly; others within d/2.
        let d = 0.01f32;
        let exact: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * d).collect();
        let mut exact_max = exact.clone();
        exact_max[0] = -127.0 * d; // sets the scale to exactly d
        let q = Q8Matrix::quantize(&exact_max, 1, 32);
        let back = q.dequantize();
        for (a, b) in exact_max.iter().zip(&back) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let v = random(32 * 5, 1);
        let q = Q8Matrix::quantize(&v, 5, 32);
        let back = q.dequantize();
        for (blk, (a, b)) in v.chunks(32).zip(back.chunks(32)).enumerate() {
            let amax = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, y) in a.iter().zip(b) {
                assert!(
                    (x - y).abs() <= amax / 127.0 / 2.0 + 1e-7,
                    "block {blk}: {x} vs {y}"
                );
            }
        }
    }

    #[test]
    fn non_finite_values_quantize_to_zero_beside_their_neighbours() {
        let mut v = vec![0f32; 64];
        v[40] = f32::NAN;
        v[41] = 1.27;
        v[42] = f32::INFINITY;
        v[43] = -0.5;
        let back = Q8Matrix::quantize(&v, 1, 64).dequantize();
        let mut want = vec![0f32; 64];
        want[41] = 1.27; // the block's max: exact
        want[43] = -0.5; // -50 steps of 0.01
        for (i, (b, w)) in back.iter().zip(&want).enumerate() {
            assert!((b - w).abs() < 1e-6, "[{i}] {b} vs {w}");
        }
    }

    #[test]
    fn every_kernel_matches_the_f32_product_on_odd_shapes() {
        // cols not a multiple of 32 (padding), m not a multiple of the 4-row kernel nor of the
        // 16-row tile, n not a multiple of the 16-row task.
        for &(m, n, k) in &[
            (1, 7, 32),
            (3, 33, 45),
            (5, 17, 64),
            (18, 40, 100),
            (1, 300, 576),
        ] {
            let x = random(m * k, 10 + m as u64);
            let w = random(n * k, 20 + n as u64);
            let q = Q8Matrix::quantize(&w, n, k);
            let want = reference(&x, &w, m, n, k);
            let portable = q.matmul_t_with(Kernel::Portable, &x, m);
            for kernel in Kernel::available() {
                let got = q.matmul_t_with(kernel, &x, m);
                for (i, ((g, p), e)) in got.iter().zip(&portable).zip(&want).enumerate() {
                    // The vector kernels compute the same integer sums; only the f32
                    // accumulation order differs from the portable loop.
                    assert!((g - p).abs() <= 1e-4 * (1.0 + p.abs()), "{kernel:?} [{i}]");
                    // Against f32: each product carries two roundings of at most half a step
                    // (1/127 of a block's max, 1 here), σ ≈ 0.0019 per product for values
                    // uniform in ±1, summed over k: 6σ.
                    let tol = 6.0 * 0.0019 * (k as f32).sqrt();
                    assert!(
                        (g - e).abs() < tol,
                        "{kernel:?} {m}x{n}x{k} [{i}]: {g} vs {e}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_product_is_the_dequantized_product_with_quantized_activations() {
        // Exactly what the kernels compute: both sides dequantized, multiplied in f64.
        let (m, n, k) = (6, 9, 96);
        let x = random(m * k, 3);
        let w = random(n * k, 4);
        let q = Q8Matrix::quantize(&w, n, k);
        let xq = Q8Matrix::quantize(&x, m, k);
        let want = reference(&xq.dequantize(), &q.dequantize(), m, n, k);
        for kernel in Kernel::available() {
            let got = q.matmul_t_with(kernel, &x, m);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{kernel:?}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn dequantized_rows_match_the_whole_matrix() {
        let w = random(3 * 40, 5);
        let q = Q8Matrix::quantize(&w, 3, 40);
        let all = q.dequantize();
        let mut row = vec![0f32; 40];
        q.dequantize_row(2, &mut row);
        assert_eq!(row, all[80..120].to_vec());
        assert_eq!(q.bytes(), 3 * 2 * 4 + 3 * 2 * 32);
    }
}
