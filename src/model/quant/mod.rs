//! Weights kept as blocks, and the product of `f32` activations with them.
//!
//! Three formats: [`Q8Matrix`], GGUF's `Q8_0` with an `f32` scale (each row cut into blocks of
//! [`QK`] = 32 values, each stored as 32 signed bytes `q` and one scale `d = max|v| / 127`, so
//! `v ≈ d·q`); [`Q4Matrix`], a GGUF file's own `Q4_0`/`Q4_1`/`Q5_0`/`Q5_1` blocks copied
//! as they are, and its `Q4_K`/`Q5_K` super-blocks repacked, exactly, into the same
//! sub-blocks (`q4` module); [`Q6Matrix`], a file's `Q6_K` super-blocks byte for byte (`q6`
//! module). [`QuantWeight`] is any of them; [`product`] multiplies any [`BlockWeights`].
//! Why the 8-bit format first (see `README.md`, "Weight formats", for the measurements):
//! - one kernel serves every GGUF tensor type and Hugging Face folders alike (they are
//!   dequantized a row at a time at load and requantized, never held as a model of `f32`);
//! - its error is far below that of the 4- and 5-bit types the downloads use, so re-quantizing
//!   a `Q4_K` tensor to it costs almost nothing in logits;
//! - the product runs in integer arithmetic with the activations quantized to the same blocks
//!   (as llama.cpp does for its `Q8_0` and k-quant kernels), four times less memory traffic per
//!   weight than `f32`, which is what batch-1 decoding is bound by.
//!
//! The scale is `f32` rather than GGUF's `f16`: 6% more bytes than `Q8_0` on disk, one
//! conversion less per block in the inner loop.

/// A kernel's dispatch on its number of activation rows: `match $rows` with an arm for 1, 2
/// and 3 rows and one for the rest (`$max`, the most a call takes), each evaluating `$call`
/// with `$R` a constant of that count, so that every row count has an instance of its own
/// with its accumulators in registers; zero rows do nothing. Every block and panel kernel of
/// this module dispatches through it.
macro_rules! with_row_count {
    ($rows:expr, $max:expr, |$R:ident| $call:expr) => {
        match $rows {
            0 => {}
            1 => {
                const $R: usize = 1;
                $call
            }
            2 => {
                const $R: usize = 2;
                $call
            }
            3 => {
                const $R: usize = 3;
                $call
            }
            _ => {
                const $R: usize = $max;
                $call
            }
        }
    };
}

pub mod arena;
pub mod kernels;
pub mod panels;
pub mod q4;
pub mod q6;
pub mod resident;

use arena::{Buf, WeightArena};
pub use kernels::ActRow;
use kernels::{Kernel, RowRef, ROWS};
pub use panels::PanelFormat;
pub use q4::Q4Matrix;
pub use q6::Q6Matrix;
use rayon::prelude::*;
pub use resident::{Q4Panels, Q4kPanels, Q6kPanels, Q8Panels, Resident};

/// Values per block.
pub const QK: usize = 32;

/// From this many activation rows on, on a kernel without panels, products go through f32
/// GEMM over dequantized weight tiles instead of the integer dot kernels (measured on
/// SmolLM2-135M, `benches/model_throughput.rs`: the integer kernels win at decode batch 8 and
/// lose at prefill).
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
    scales: Buf<f32>,
    /// `rows × blocks × QK` values.
    quants: Buf<i8>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q8Matrix[{}, {}]", self.rows, self.cols)
    }
}

/// Quantizes one block (or a group of blocks sharing one scale): the scale and the values,
/// round to nearest as ggml's `quantize_row_q8_0_ref`. A non-finite value (a diverged weight or activation) quantizes to
/// zero and does not set the scale, so it cannot turn its finite neighbours into garbage.
///
/// Written as selects and adds so that it vectorizes (it runs over every activation of every
/// product, and over the whole model at load), and compiled for AVX-512 and AVX2 besides the
/// baseline: rounding adds and subtracts 1.5·2²³, which leaves the float rounded to the nearest
/// integer (ties to even, unlike ggml's `roundf` that rounds them away from zero: the two
/// differ only on exact halves). Scalar, it was a tenth of the Humpback loop's time.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512bw+avx512vl+avx2+fma",
    "x86_64+avx2+fma",
    "aarch64+neon"
))]
pub(crate) fn quantize_block(v: &[f32], q: &mut [i8]) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    const LANES: usize = 16;
    // The largest finite magnitude, in LANES independent lanes (a maximum is exact in any
    // order, and one running maximum is a dependent chain that does not vectorize).
    let keep = |m: f32, x: f32| {
        let a = x.abs();
        // NaN compares false, so neither NaN nor infinity sets the scale.
        if a < f32::INFINITY && a > m {
            a
        } else {
            m
        }
    };
    let (chunks, rest) = v.as_chunks::<LANES>();
    let mut lanes = [0f32; LANES];
    for c in chunks {
        for i in 0..LANES {
            lanes[i] = keep(lanes[i], c[i]);
        }
    }
    let amax = lanes
        .into_iter()
        .chain(rest.iter().copied())
        .fold(0f32, keep);
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let d = amax / 127.0;
    let id = 1.0 / d;
    for (q, &x) in q.iter_mut().zip(v) {
        let scaled = x * id;
        // Finite values scale into ±127; the rest (NaN, ±∞) are zeroed by the select.
        let r = if scaled.abs() <= 127.5 {
            (scaled + ROUND) - ROUND
        } else {
            0.0
        };
        // SAFETY: `r` is an integer in [-128, 128] (finite by the select above), so the
        // conversion is exact and in range. `as i8` on a float saturates through a scalar
        // sequence per value; the unchecked conversion and a truncation vectorize. At most
        // 127: the saturation `r as i8` gave at an exact +127.5.
        *q = unsafe { r.min(127.0).to_int_unchecked::<i32>() } as i8;
    }
    d
}

impl Q8Matrix {
    /// Quantizes a row-major `[rows, cols]` matrix.
    ///
    /// # Panics
    /// When `data.len() != rows * cols` (a caller's bug, never input).
    pub fn quantize(data: &[f32], rows: usize, cols: usize) -> Self {
        Q8Matrix::quantize_grouped(data, rows, cols, 1)
    }

    /// [`Q8Matrix::quantize`] with one scale for every `group` neighbouring blocks (the
    /// largest magnitude among their values over 127), repeated in each block's scale: with
    /// `group` = 8, one scale per 256 values, what llama.cpp's `Q8_K` activations give its
    /// k-quant kernels, which then sum a super-block's eight blocks in integers
    /// ([`ActRow::super_scaled`]). A row's last group may be shorter.
    ///
    /// # Panics
    /// When `data.len() != rows * cols` (a caller's bug, never input).
    pub fn quantize_grouped(data: &[f32], rows: usize, cols: usize, group: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "Q8Matrix::quantize: shape");
        Q8Matrix::from_row_fn(rows, cols, group.max(1), |r, out| {
            out.copy_from_slice(&data[r * cols..(r + 1) * cols])
        })
    }

    /// [`Q8Matrix::from_rows`] for a `fill` that cannot fail, one scale per `group` blocks.
    fn from_row_fn(
        rows: usize,
        cols: usize,
        group: usize,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        let filled: Result<Self, std::convert::Infallible> =
            Q8Matrix::from_rows_grouped(rows, cols, group, |r, out| {
                fill(r, out);
                Ok(())
            });
        match filled {
            Ok(m) => m,
            Err(never) => match never {},
        }
    }

    /// Builds a `[rows, cols]` matrix a row at a time: `fill(r, out)` writes row `r` as `f32`
    /// into `out` (`cols` values), which is quantized at once. Rows are filled in parallel, so
    /// at no point is more than one row per thread held as `f32` (how a checkpoint's tensors
    /// load without an `f32` copy of the tensor). The first error of `fill` is returned.
    pub fn from_rows<E: Send>(
        rows: usize,
        cols: usize,
        fill: impl Fn(usize, &mut [f32]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        Q8Matrix::from_rows_grouped(rows, cols, 1, fill)
    }

    /// [`Q8Matrix::from_rows`], one scale per `group` blocks ([`Q8Matrix::quantize_grouped`]).
    fn from_rows_grouped<E: Send>(
        rows: usize,
        cols: usize,
        group: usize,
        fill: impl Fn(usize, &mut [f32]) -> Result<(), E> + Sync,
    ) -> Result<Self, E> {
        let blocks = cols.div_ceil(QK);
        let mut scales = vec![0f32; rows * blocks];
        let mut quants = vec![0i8; rows * blocks * QK];
        if blocks > 0 {
            scales
                .par_chunks_mut(blocks)
                .zip(quants.par_chunks_mut(blocks * QK))
                .enumerate()
                .try_for_each_init(
                    || vec![0f32; blocks * QK],
                    |row, (r, (s, q))| {
                        fill(r, &mut row[..cols])?;
                        // The padding past `cols` stays zero: `fill` never sees it.
                        for ((s, q), v) in s
                            .chunks_mut(group)
                            .zip(q.chunks_mut(group * QK))
                            .zip(row.chunks(group * QK))
                        {
                            // One block's values or a group's: one scale for all of them.
                            s.fill(quantize_block(v, q));
                        }
                        Ok(())
                    },
                )?;
        }
        Ok(Q8Matrix {
            rows,
            cols,
            blocks,
            scales: scales.into(),
            quants: quants.into(),
        })
    }

    /// The matrices one under the other (a fused projection: q, k and v; gate and up).
    ///
    /// # Panics
    /// When the parts' column counts differ (a caller's bug: shapes are checked at load).
    pub fn stack(mut parts: Vec<Q8Matrix>) -> Q8Matrix {
        if parts.len() == 1 {
            return parts.remove(0);
        }
        let cols = parts.first().map_or(0, |p| p.cols);
        assert!(
            parts.iter().all(|p| p.cols == cols),
            "Q8Matrix::stack: cols"
        );
        let mut out = Q8Matrix {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            blocks: cols.div_ceil(QK),
            scales: Buf::default(),
            quants: Buf::default(),
        };
        let (scales, quants) = (out.scales.vec_mut(), out.quants.vec_mut());
        scales.reserve_exact(out.rows * out.blocks);
        quants.reserve_exact(out.rows * out.blocks * QK);
        for p in parts {
            scales.extend_from_slice(&p.scales);
            quants.extend_from_slice(&p.quants);
        }
        out
    }

    /// Rows (outputs, for a linear weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs, for a linear weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Moves the matrix's buffers into `arena` (see the `arena` module).
    pub fn place_in(&mut self, arena: &WeightArena) {
        arena.place(&mut self.scales);
        arena.place(&mut self.quants);
    }

    /// Whether both buffers are in an arena ([`Q8Matrix::place_in`] done).
    pub fn placed(&self) -> bool {
        self.scales.placed() && self.quants.placed()
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
}

/// A quantized matrix in one of the block formats.
#[derive(Debug, Clone)]
pub enum QuantWeight {
    /// 8-bit blocks.
    Q8(Q8Matrix),
    /// A GGUF file's 4- or 5-bit blocks, kept as they are.
    Q4(Q4Matrix),
    /// A GGUF file's `Q6_K` super-blocks, kept as they are.
    Q6(Q6Matrix),
    /// Blocks laid out at load in panels for the AVX-512 VNNI kernels
    /// ([`QuantWeight::laid_out_for_machine`], the `resident` module).
    Resident(Resident),
    /// Parts of different formats one under the other, each kept in its own: a fused
    /// projection whose parts the file stores in different types (a `Q4_K_M` file's q and k
    /// are `Q4_K`, its v `Q6_K` or `Q8_0`). Each part is multiplied by its own kernel and the
    /// outputs are set side by side.
    Stacked(Vec<QuantWeight>),
}

impl QuantWeight {
    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        match self {
            QuantWeight::Q8(q) => q.rows(),
            QuantWeight::Q4(q) => q.rows(),
            QuantWeight::Q6(q) => q.rows(),
            QuantWeight::Resident(q) => q.rows(),
            QuantWeight::Stacked(parts) => parts.iter().map(QuantWeight::rows).sum(),
        }
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        match self {
            QuantWeight::Q8(q) => q.cols(),
            QuantWeight::Q4(q) => q.cols(),
            QuantWeight::Q6(q) => q.cols(),
            QuantWeight::Resident(q) => q.cols(),
            QuantWeight::Stacked(parts) => parts.first().map_or(0, QuantWeight::cols),
        }
    }

    /// Row `r` as `f32` (`out.len() == cols`).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        match self {
            QuantWeight::Q8(q) => q.dequantize_row(r, out),
            QuantWeight::Q4(q) => q.dequantize_row(r, out),
            QuantWeight::Q6(q) => q.dequantize_row(r, out),
            QuantWeight::Resident(q) => q.dequantize_row(r, out),
            QuantWeight::Stacked(parts) => {
                let mut r = r;
                for p in parts {
                    if r < p.rows() {
                        return p.dequantize_row(r, out);
                    }
                    r -= p.rows();
                }
                panic!("QuantWeight::dequantize_row: row out of range");
            }
        }
    }

    /// The whole matrix as `f32`, row-major, rows dequantized in parallel: what training over
    /// a frozen block-format base multiplies by (one projection at a time, never the model).
    pub fn dequantize(&self) -> Vec<f32> {
        self.dequantize_rows((0..self.rows()).into_par_iter())
    }

    /// The rows `ids` as `f32`, one after the other (`ids.len() × cols`), dequantized in
    /// parallel: the whole matrix, a chunk of it, or an embedding's looked-up rows.
    pub fn dequantize_rows(&self, ids: impl IndexedParallelIterator<Item = usize>) -> Vec<f32> {
        let cols = self.cols();
        let mut out = vec![0f32; ids.len() * cols];
        if cols > 0 {
            out.par_chunks_mut(cols)
                .zip(ids)
                .for_each(|(o, r)| self.dequantize_row(r, o));
        }
        out
    }

    /// Moves the blocks' buffers into `arena` (see the `arena` module): what a model does
    /// with each weight once it is laid out.
    pub fn place_in(&mut self, arena: &WeightArena) {
        match self {
            QuantWeight::Q8(q) => q.place_in(arena),
            // The file's own 4-, 5- and 6-bit blocks stay on the heap: they are kept as they
            // are only where the machine has no panels for them (no AVX2).
            QuantWeight::Q4(_) | QuantWeight::Q6(_) => {}
            QuantWeight::Resident(q) => q.place_in(arena),
            QuantWeight::Stacked(parts) => parts.iter_mut().for_each(|p| p.place_in(arena)),
        }
    }

    /// Bytes of the blocks (quantized values, scales, offsets, fifth bits).
    pub fn bytes(&self) -> usize {
        match self {
            QuantWeight::Q8(q) => q.bytes(),
            QuantWeight::Q4(q) => q.bytes(),
            QuantWeight::Q6(q) => q.bytes(),
            QuantWeight::Resident(q) => q.bytes(),
            QuantWeight::Stacked(parts) => parts.iter().map(QuantWeight::bytes).sum(),
        }
    }

    /// `x · selfᵀ` for `x` `[m, cols]` ([`product`] with the machine's kernel).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        match self {
            QuantWeight::Q8(q) => product(q, Kernel::machine(), x, m),
            QuantWeight::Q4(q) => product(q, Kernel::machine(), x, m),
            QuantWeight::Q6(q) => product(q, Kernel::machine(), x, m),
            QuantWeight::Resident(q) => q.matmul_t(x, m),
            QuantWeight::Stacked(parts) => {
                let n = self.rows();
                let mut y = vec![0f32; m * n];
                let mut at = 0;
                for p in parts.iter().filter(|p| p.rows() > 0) {
                    let np = p.rows();
                    let part = p.matmul_t(x, m);
                    for (row, part_row) in y.chunks_exact_mut(n).zip(part.chunks_exact(np)) {
                        row[at..at + np].copy_from_slice(part_row);
                    }
                    at += np;
                }
                y
            }
        }
    }

    /// As 8-bit blocks (4- and 6-bit rows dequantized and requantized one at a time).
    pub fn into_q8(self) -> Q8Matrix {
        match self {
            QuantWeight::Q8(q) => q,
            QuantWeight::Q4(q) => {
                Q8Matrix::from_row_fn(q.rows(), q.cols(), 1, |r, out| q.dequantize_row(r, out))
            }
            QuantWeight::Q6(q) => {
                Q8Matrix::from_row_fn(q.rows(), q.cols(), 1, |r, out| q.dequantize_row(r, out))
            }
            QuantWeight::Resident(q) => {
                Q8Matrix::from_row_fn(q.rows(), q.cols(), 1, |r, out| q.dequantize_row(r, out))
            }
            QuantWeight::Stacked(parts) => {
                Q8Matrix::stack(parts.into_iter().map(QuantWeight::into_q8).collect())
            }
        }
    }

    /// The matrices one under the other (a fused projection), each in the format it has:
    /// neighbouring parts of one format are stacked into one matrix of it, parts of different
    /// formats are kept [`QuantWeight::Stacked`] (a `Q4_K_M` file's q and k are `Q4_K`, its v
    /// `Q6_K`; as 8-bit blocks they would take 9 bits a weight where the file has 4.5-6.6).
    ///
    /// # Panics
    /// When the parts' column counts differ (shapes are checked at load).
    pub fn stack(parts: Vec<QuantWeight>) -> QuantWeight {
        let cols = parts.first().map_or(0, QuantWeight::cols);
        assert!(
            parts.iter().all(|p| p.cols() == cols),
            "QuantWeight::stack: column counts differ"
        );
        // Runs of neighbouring parts of one format, in order, each stacked at once into one
        // matrix of its format.
        let mut runs = Vec::new();
        for p in parts {
            Run::push(&mut runs, p);
        }
        let mut runs: Vec<QuantWeight> = runs.into_iter().map(Run::stack).collect();
        match runs.len() {
            0 => QuantWeight::Q8(Q8Matrix::stack(Vec::new())),
            1 => runs.remove(0),
            _ => QuantWeight::Stacked(runs),
        }
    }

    /// Whether the blocks are in an arena, on its huge pages: every format but the file's own
    /// 4-, 5- and 6-bit blocks, which stay on the heap ([`QuantWeight::place_in`]).
    pub fn placed(&self) -> bool {
        match self {
            QuantWeight::Q8(q) => q.placed(),
            QuantWeight::Q4(_) | QuantWeight::Q6(_) => false,
            QuantWeight::Resident(q) => q.placed(),
            QuantWeight::Stacked(parts) => parts.iter().all(QuantWeight::placed),
        }
    }

    /// [`QuantWeight::laid_out_for_machine`], its buffers then moved into `arena`: how a model
    /// keeps its weights (see the `arena` module).
    pub fn laid_out_in(self, arena: &WeightArena) -> QuantWeight {
        let mut q = self.laid_out_for_machine();
        q.place_in(arena);
        q
    }

    /// The matrix in the layout this machine's kernels read fastest: on AVX-512 VNNI
    /// ([`resident::simd`]) 4-, 5-, 6- and 8-bit parts of whole panels laid out in panels
    /// ([`Resident`]: [`Q4Panels`], [`Q4kPanels`], [`Q6kPanels`], [`Q8Panels`], the same values
    /// and scales), on AVX2 the formats that have an AVX2 panel kernel ([`Q4Panels`]),
    /// everything else as it is (rows that do not fill a panel).
    /// Called once at load, after [`QuantWeight::stack`].
    pub fn laid_out_for_machine(self) -> QuantWeight {
        if !resident::enabled() {
            return self;
        }
        match self {
            QuantWeight::Q4(q) => {
                Resident::from_q4(&q).map_or(QuantWeight::Q4(q), QuantWeight::Resident)
            }
            QuantWeight::Q6(q) => {
                Resident::from_q6(&q).map_or(QuantWeight::Q6(q), QuantWeight::Resident)
            }
            QuantWeight::Q8(q) => {
                Resident::from_q8(&q).map_or(QuantWeight::Q8(q), QuantWeight::Resident)
            }
            QuantWeight::Stacked(parts) => QuantWeight::Stacked(
                parts
                    .into_iter()
                    .map(QuantWeight::laid_out_for_machine)
                    .collect(),
            ),
            other => other,
        }
    }
}

/// Neighbouring parts of one format, for [`QuantWeight::stack`].
enum Run {
    Q8(Vec<Q8Matrix>),
    Q4(Vec<Q4Matrix>),
    Q6(Vec<Q6Matrix>),
    /// Panels are laid out after stacking ([`QuantWeight::laid_out_for_machine`]); one met
    /// here is kept as a part of its own.
    Resident(Resident),
}

impl Run {
    /// Appends `p` to the last run when it is of `p`'s format, else starts a run; a stacked
    /// part is opened into its own parts.
    fn push(runs: &mut Vec<Run>, p: QuantWeight) {
        match (runs.last_mut(), p) {
            (_, QuantWeight::Stacked(inner)) => inner.into_iter().for_each(|p| Run::push(runs, p)),
            (Some(Run::Q8(v)), QuantWeight::Q8(q)) => v.push(q),
            (Some(Run::Q4(v)), QuantWeight::Q4(q)) => v.push(q),
            (Some(Run::Q6(v)), QuantWeight::Q6(q)) => v.push(q),
            (_, QuantWeight::Q8(q)) => runs.push(Run::Q8(vec![q])),
            (_, QuantWeight::Q4(q)) => runs.push(Run::Q4(vec![q])),
            (_, QuantWeight::Q6(q)) => runs.push(Run::Q6(vec![q])),
            (_, QuantWeight::Resident(q)) => runs.push(Run::Resident(q)),
        }
    }

    /// The run as one matrix.
    fn stack(self) -> QuantWeight {
        match self {
            Run::Q8(v) => QuantWeight::Q8(Q8Matrix::stack(v)),
            Run::Q4(v) => QuantWeight::Q4(Q4Matrix::stack(v)),
            Run::Q6(v) => QuantWeight::Q6(Q6Matrix::stack(v)),
            Run::Resident(q) => QuantWeight::Resident(q),
        }
    }
}

/// Weights stored as rows of blocks, which [`product`] multiplies: [`Q8Matrix`], [`Q4Matrix`],
/// [`Q6Matrix`].
pub trait BlockWeights: Sync {
    /// Rows (outputs).
    fn rows(&self) -> usize;
    /// Columns (inputs).
    fn cols(&self) -> usize;
    /// Row `r` as `f32` (`out.len() == cols`).
    fn dequantize_row(&self, r: usize, out: &mut [f32]);
    /// Whether [`BlockWeights::dots`] reads the activation blocks' sums (a 4-bit offset
    /// multiplies them); they are computed only then.
    const USES_SUMS: bool = false;
    /// Blocks that share one activation scale in the products with these weights: 1, or 8
    /// for k-quant super-blocks, whose kernels then sum a super-block's blocks in integers
    /// and scale them once (see [`Q8Matrix::quantize_grouped`]).
    fn activation_group(&self) -> usize {
        1
    }
    /// `out[i] = row j · xs[i]` for up to [`ROWS`] quantized activation rows.
    fn dots(&self, kernel: Kernel, j: usize, xs: &[ActRow<'_>], out: &mut [f32]);
    /// `out[0][i] = row j · xs[i]` and `out[1][i] = row (j + 1) · xs[i]` (`j + 1 <
    /// rows()`), each the same value as [`BlockWeights::dots`] gives; a format whose kernel
    /// shares each activation block between two weight rows overrides it.
    fn dots_pair(&self, kernel: Kernel, j: usize, xs: &[ActRow<'_>], out: &mut [[f32; ROWS]; 2]) {
        let [a, b] = out;
        self.dots(kernel, j, xs, a);
        self.dots(kernel, j + 1, xs, b);
    }
    /// How [`BlockWeights::unpack_row`] writes a row for the packed panels.
    fn panel_format(&self) -> PanelFormat;
    /// Row `r` as the panels read it ([`PanelFormat`]): its values as unsigned bytes
    /// (`values.len()` = blocks × [`QK`]), a scale per step of `panel_format().step` values,
    /// and, when the format has them, an offset per block (else `offsets` is empty).
    fn unpack_row(&self, r: usize, values: &mut [u8], scales: &mut [f32], offsets: &mut [f32]);
}

impl BlockWeights for Q8Matrix {
    fn rows(&self) -> usize {
        self.rows
    }

    fn cols(&self) -> usize {
        self.cols
    }

    fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        Q8Matrix::dequantize_row(self, r, out);
    }

    fn dots(&self, kernel: Kernel, j: usize, xs: &[ActRow<'_>], out: &mut [f32]) {
        let w = self.row(j);
        let mut rows = [w; ROWS];
        for (slot, x) in rows.iter_mut().zip(xs) {
            *slot = x.row;
        }
        kernel.dot(w, &rows[..xs.len().min(ROWS)], out);
    }

    /// `q + 128`, the zero point taken back in the integer sums.
    fn panel_format(&self) -> PanelFormat {
        PanelFormat {
            step: QK,
            zero: 128,
            offsets: false,
        }
    }

    fn unpack_row(&self, r: usize, values: &mut [u8], scales: &mut [f32], _: &mut [f32]) {
        let row = self.row(r);
        for (v, &q) in values.iter_mut().zip(row.quants) {
            *v = (q as u8) ^ 0x80;
        }
        scales.copy_from_slice(row.scales);
    }

    fn dots_pair(&self, kernel: Kernel, j: usize, xs: &[ActRow<'_>], out: &mut [[f32; ROWS]; 2]) {
        let w = [self.row(j), self.row(j + 1)];
        let mut rows = [w[0]; ROWS];
        for (slot, x) in rows.iter_mut().zip(xs) {
            *slot = x.row;
        }
        kernel.dot_pair(w, &rows[..xs.len().min(ROWS)], out);
    }
}

/// Activations quantized to 8-bit blocks, one scale per `group` blocks, with each block's
/// sum `d·Σq` (what a 4-bit weight's offset multiplies) when the weights use it, else no sums.
struct Activations {
    q: Q8Matrix,
    sums: Vec<f32>,
    group: usize,
}

impl Activations {
    fn quantize(x: &[f32], m: usize, cols: usize, with_sums: bool, group: usize) -> Self {
        let q = Q8Matrix::quantize_grouped(x, m, cols, group);
        let sums = if with_sums {
            q.scales
                .iter()
                .zip(q.quants.chunks_exact(QK))
                .map(|(&d, blk)| d * blk.iter().map(|&v| v as i32).sum::<i32>() as f32)
                .collect()
        } else {
            Vec::new()
        };
        Activations { q, sums, group }
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let b = self.q.blocks;
        ActRow {
            row: self.q.row(r),
            sums: self.sums.get(r * b..(r + 1) * b).unwrap_or(&[]),
            super_scaled: self.group == crate::model::gguf::QK_K / QK,
        }
    }
}

/// Which loop computes a product ([`product`] chooses by the kernel and the row count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// The integer dot kernels, a few activation rows per weight row (decoding).
    Dots,
    /// f32 GEMM over dequantized tiles of weight rows (many rows, no VNNI panels).
    Gemm,
    /// The integer GEMM over packed panels ([`panels`]; AVX-512 VNNI only).
    Panels,
}

impl Path {
    /// The path for `m` activation rows on `kernel`.
    pub fn for_rows(kernel: Kernel, m: usize) -> Path {
        if panels::supported(kernel) && m >= panel_min_rows() {
            Path::Panels
        } else if m >= GEMM_MIN_ROWS {
            Path::Gemm
        } else {
            Path::Dots
        }
    }
}

/// [`PANEL_MIN_ROWS`], or `BACKFLOW_PANEL_MIN_ROWS` where set (tuning on another CPU).
fn panel_min_rows() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("BACKFLOW_PANEL_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(PANEL_MIN_ROWS)
    })
}

/// From this many activation rows on, a kernel that has panels ([`panels::supported`])
/// multiplies through them (`BACKFLOW_PANEL_MIN_ROWS` overrides it). Measured with
/// `benches/model_throughput.rs` on an AVX-512 EPYC, 2 threads, decode: the dot kernels win
/// at 1, 2 and 4 rows (the panel's packing is paid for few rows), the panels from 8 on, on
/// all three models (Qwen2.5-1.5B Q4_K_M at 8 rows 37 -> 47 tokens/s, SmolLM2-135M Q4_1
/// 333 -> 463).
pub const PANEL_MIN_ROWS: usize = 8;

/// `x · wᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major.
///
/// The activations are quantized to 8-bit blocks in every path (one scale per block, or per
/// 256-value super-block for k-quant weights: [`BlockWeights::activation_group`]), so the
/// product is the same numbers, up to rounding, whichever path computes it ([`Path`]): for a
/// few rows (decoding) the integer dot kernels; for many, the integer GEMM over packed panels
/// where the machine has AVX-512 VNNI, else f32 GEMM over dequantized tiles of weight rows,
/// whose dequantization is then paid once for all rows and whose register blocking wins.
///
/// # Panics
/// When `x.len() != m * cols` (a caller's bug).
pub fn product<W: BlockWeights>(w: &W, kernel: Kernel, x: &[f32], m: usize) -> Vec<f32> {
    product_by(w, kernel, x, m, Path::for_rows(kernel, m))
}

/// [`product`] by the given path (the panels only where the kernel has them, else GEMM).
///
/// # Panics
/// As [`product`].
pub fn product_by<W: BlockWeights>(
    w: &W,
    kernel: Kernel,
    x: &[f32],
    m: usize,
    path: Path,
) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "quant::product: shape");
    let mut y = vec![0f32; m * n];
    if n == 0 || m == 0 {
        return y;
    }
    let path = match path {
        Path::Panels if !panels::supported(kernel) => Path::Gemm,
        p => p,
    };
    let xq = Activations::quantize(x, m, k, W::USES_SUMS, w.activation_group());
    let xd = (path == Path::Gemm).then(|| xq.q.dequantize());
    let xp = (path == Path::Panels).then(|| panels::PanelActivations::new(&xq, w.panel_format()));
    // Each task owns a run of weight rows, that is a run of output columns. The dot
    // kernels: about 8 runs per thread so rayon can balance them, at least 16 rows. GEMM
    // packs all `m` activation rows once per call, so its runs are about GEMM_COLS wide (a
    // packed value then serves that many products), in a multiple of the thread count.
    // Panels: about 4 runs per thread, whole panels.
    let threads = rayon::current_num_threads().max(1);
    let per_task = match path {
        Path::Gemm => {
            let rounds = (n as f64 / (threads * GEMM_COLS) as f64).round().max(1.0) as usize;
            n.div_ceil(threads * rounds)
        }
        Path::Panels => n.div_ceil(threads * 4).next_multiple_of(panels::PANEL),
        Path::Dots => n.div_ceil(threads * 8).max(16),
    };
    let out = OutPtr(y.as_mut_ptr());
    (0..n.div_ceil(per_task)).into_par_iter().for_each(|task| {
        let cols = task * per_task..((task + 1) * per_task).min(n);
        // SAFETY: `y` (m × n values) outlives the loop, and the tasks' column runs are
        // disjoint; the panels only where the kernel has them (checked above).
        unsafe {
            let y = out.get();
            match (&xd, &xp) {
                (Some(xd), _) => columns_by_gemm(w, xd, m, cols, y),
                (_, Some(xp)) => panels::columns_by_panels(w, xp, cols, y),
                _ => columns_by_dots(w, kernel, &xq, cols, y),
            }
        }
    });
    y
}

/// Output columns `cols` of `y` `[m, n]` for many rows `m`: those weight rows dequantized,
/// then one f32 GEMM against the dequantized activations `xd` `[m, k]`.
///
/// # Safety
/// `y` points to `m × w.rows()` values, of which no other thread touches columns `cols`.
unsafe fn columns_by_gemm<W: BlockWeights>(
    w: &W,
    xd: &[f32],
    m: usize,
    cols: std::ops::Range<usize>,
    y: *mut f32,
) {
    thread_local! {
        /// The dequantized tile, reused by every product on this thread (a fresh
        /// allocation of this size comes zeroed from the OS every time).
        static TILE: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let (n, k, count) = (w.rows(), w.cols(), cols.len());
    TILE.with_borrow_mut(|tile| {
        tile.resize(count * k, 0.0);
        for (j, row) in tile.chunks_exact_mut(k).enumerate() {
            w.dequantize_row(cols.start + j, row);
        }
        // y[i·n + cols.start + j] = Σ_c xd[i·k + c] · tile[j·k + c]: dst [m, count] with row
        // stride n; lhs [m, k] row-major; rhs [k, count] = tileᵀ (row stride 1, column
        // stride k).
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
                tile.as_ptr(),
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
    });
}

/// Output columns `cols` of `y` `[m, n]` by the integer dot kernels. Activations are taken a
/// tile of rows at a time, so a tile stays in cache while the run's weight rows pass over it.
///
/// # Safety
/// As [`columns_by_gemm`].
unsafe fn columns_by_dots<W: BlockWeights>(
    w: &W,
    kernel: Kernel,
    xq: &Activations,
    cols: std::ops::Range<usize>,
    y: *mut f32,
) {
    const TILE: usize = 16;
    let (m, n) = (xq.q.rows, w.rows());
    let mut pair = [[0f32; ROWS]; 2];
    for t0 in (0..m).step_by(TILE) {
        let t1 = (t0 + TILE).min(m);
        let rows: Vec<ActRow<'_>> = (t0..t1).map(|r| xq.row(r)).collect();
        // Two weight rows at a time (kernels that have it load each activation block once for
        // both), the last one alone when the run is odd.
        let mut j = cols.start;
        while j < cols.end {
            let both = j + 1 < cols.end;
            for (g, group) in rows.chunks(ROWS).enumerate() {
                if both {
                    w.dots_pair(kernel, j, group, &mut pair);
                } else {
                    w.dots(kernel, j, group, &mut pair[0]);
                }
                for (c, dots) in pair.iter().take(1 + both as usize).enumerate() {
                    for (i, &v) in dots.iter().take(group.len()).enumerate() {
                        // SAFETY: the row is below m and j + c in the caller's columns.
                        unsafe { *y.add((t0 + g * ROWS + i) * n + j + c) = v };
                    }
                }
            }
            j += 1 + both as usize;
        }
    }
}

/// The output buffer of a product, shared by the tasks that write its disjoint column runs.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: only used by `product`, whose tasks write disjoint parts of the buffer.
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

/// Checks every kernel the machine has: `w`'s product with `m` random activation rows (seed
/// `m`) against the f64 product of those rows quantized to 8-bit blocks, as the product
/// quantizes them, and `values`, the weights computed independently of `w` (row-major
/// `[w.rows(), w.cols()]`). `label` names the case in a failure.
#[cfg(test)]
pub(crate) fn assert_every_kernel_matches(
    w: &impl BlockWeights,
    values: &[f32],
    m: usize,
    label: &str,
) {
    use rand::{Rng, SeedableRng};
    let (n, k) = (w.rows(), w.cols());
    let mut rng = rand::rngs::StdRng::seed_from_u64(m as u64);
    let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
    let xq = Q8Matrix::quantize_grouped(&x, m, k, w.activation_group()).dequantize();
    let paths = [Path::Dots, Path::Gemm, Path::Panels];
    for (kernel, path) in Kernel::available()
        .into_iter()
        .flat_map(|k| paths.map(|p| (k, p)))
    {
        let got = product_by(w, kernel, &x, m, path);
        for i in 0..m {
            for j in 0..n {
                let want: f64 = (0..k)
                    .map(|c| xq[i * k + c] as f64 * values[j * k + c] as f64)
                    .sum();
                let g = got[i * n + j] as f64;
                assert!(
                    (g - want).abs() < 1e-4 * (1.0 + want.abs()),
                    "{label} {kernel:?} {path:?} {m}x{n}x{k} [{i},{j}]: {g} vs {want}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;
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

    /// With a group of 8 blocks, each run of 256 values (and a row's shorter last run) gets
    /// one scale, its largest magnitude over 127, in each of its blocks; every value within
    /// half that step.
    #[test]
    fn grouped_blocks_share_their_groups_scale() {
        let (rows, cols) = (3, 256 + 96);
        let mut v = random(rows * cols, 4);
        // One large value per group, so a group's scale differs from most of its blocks'.
        v[5] = 3.0;
        v[cols + 300] = -2.0;
        let q = Q8Matrix::quantize_grouped(&v, rows, cols, 8);
        let back = q.dequantize();
        for r in 0..rows {
            let row = &v[r * cols..(r + 1) * cols];
            for (g, range) in [(0, 0..256), (1, 256..cols)] {
                let amax = row[range.clone()].iter().fold(0f32, |m, x| m.max(x.abs()));
                let want = amax / 127.0;
                let blocks = &q.scales[r * 11..(r + 1) * 11];
                let group = if g == 0 { &blocks[..8] } else { &blocks[8..] };
                assert!(group.iter().all(|&d| (d - want).abs() <= 1e-7 * want));
                for c in range {
                    let (x, y) = (row[c], back[r * cols + c]);
                    assert!((x - y).abs() <= want / 2.0 + 1e-6, "[{r},{c}]: {x} vs {y}");
                }
            }
        }
        assert!((q.scales[0] - 3.0 / 127.0).abs() < 1e-7);
        assert!((q.scales[11 + 9] - 2.0 / 127.0).abs() < 1e-7);
    }

    #[test]
    fn values_round_to_the_nearest_step() {
        let v = random(32 * 64, 9);
        let q = Q8Matrix::quantize(&v, 64, 32);
        for (r, block) in v.chunks(32).enumerate() {
            let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
            let d = amax / 127.0;
            assert_eq!(q.scales[r], d);
            for (i, &x) in block.iter().enumerate() {
                let want = (x / d).round();
                let got = q.quants[r * 32 + i] as f32;
                // Exact halves may round either way.
                let half = ((x / d).fract().abs() - 0.5).abs() < 1e-4;
                assert!(
                    got == want || half,
                    "block {r} [{i}]: {x} / {d} -> {got}, not {want}"
                );
            }
        }
    }

    /// `quantize_block` in its vector lanes against the rule written value by value: the
    /// scale the largest finite magnitude over 127, each value `x / scale` rounded half to
    /// even (`round_ties_even`), non-finite values zero; bit for bit, on blocks of one, three
    /// and eight 32-value blocks, with exact halves and NaN/±∞ among random values.
    #[test]
    fn quantize_block_matches_the_rule_value_by_value() {
        let mut next = {
            let mut state = 17u64;
            move || {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as f32 / (1u64 << 31) as f32
            }
        };
        for len in [32usize, 96, 256] {
            for case in 0..4 {
                let mut v: Vec<f32> = (0..len).map(|_| (next() - 0.5) * 6.0).collect();
                if case == 1 {
                    // Scale exactly 0.5 (amax 63.5): halves of a step are exact ties.
                    v.iter_mut().enumerate().for_each(|(i, x)| {
                        *x = ((i % 61) as f32 - 30.0 + 0.5) * 0.5;
                    });
                    v[len - 1] = -63.5;
                }
                if case >= 2 {
                    v[3] = f32::NAN;
                    v[len / 2] = f32::INFINITY;
                    v[len - 2] = f32::NEG_INFINITY;
                }
                if case == 3 {
                    v[7] = 1e30; // a huge finite value sets the scale
                }
                let amax = v
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(0f32, |m, x| m.max(x.abs()));
                let want_d = amax / 127.0;
                let want: Vec<i8> = v
                    .iter()
                    .map(|&x| {
                        let s = x * (1.0 / want_d);
                        if s.is_finite() {
                            s.round_ties_even().clamp(-128.0, 127.0) as i8
                        } else {
                            0
                        }
                    })
                    .collect();
                let mut got = vec![0i8; len];
                let d = quantize_block(&v, &mut got);
                assert_eq!(d.to_bits(), want_d.to_bits(), "len {len} case {case}");
                assert_eq!(got, want, "len {len} case {case}");
                if case == 1 {
                    // Steps -1.5, -0.5, 0.5 round to -2, 0, 0 (the last value is -63.5).
                    assert_eq!((got[28], got[29], got[30]), (-2, 0, 0));
                    if len > 33 {
                        // Steps 2.5 and 3.5 round to 2 and 4.
                        assert_eq!((got[32], got[33]), (2, 4));
                    }
                }
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
            let portable = product(&q, Kernel::Portable, &x, m);
            for kernel in Kernel::available() {
                let got = product(&q, kernel, &x, m);
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
            let got = product(&q, kernel, &x, m);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{kernel:?}: {g} vs {e}");
            }
        }
    }

    #[test]
    fn backflow_kernel_names_each_kernel() {
        let names = [
            ("portable", Kernel::Portable),
            ("AVX2", Kernel::Avx2),
            ("avx-vnni", Kernel::AvxVnni),
            ("avxvnni", Kernel::AvxVnni),
            ("avx512-vnni", Kernel::Avx512Vnni),
        ];
        for (name, kernel) in names {
            assert_eq!(Kernel::named(name), Some(kernel), "{name}");
        }
        assert_eq!(Kernel::named("avx512"), None);
        assert_eq!(Kernel::named(""), None);
    }

    #[test]
    fn rows_filled_one_by_one_and_stacked_equal_the_whole_matrix() {
        let w = random(7 * 40, 6);
        let whole = Q8Matrix::quantize(&w, 7, 40);
        let top = Q8Matrix::from_rows(3, 40, |r, out: &mut [f32]| {
            out.copy_from_slice(&w[r * 40..(r + 1) * 40]);
            Ok::<(), String>(())
        })
        .expect("fill");
        let bottom = Q8Matrix::quantize(&w[120..], 4, 40);
        let stacked = Q8Matrix::stack(vec![top, bottom]);
        assert_eq!(stacked.rows(), 7);
        assert_eq!(stacked.dequantize(), whole.dequantize());
        let failed = Q8Matrix::from_rows(3, 40, |r, _: &mut [f32]| {
            if r == 2 {
                Err(format!("row {r}"))
            } else {
                Ok(())
            }
        });
        assert_eq!(failed.err(), Some("row 2".to_string()));
    }

    /// GGUF `Q4_0` bytes of `rows × cols` random blocks (`f16` scale, 16 bytes of nibbles).
    fn q4_0_bytes(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend(half::f16::from_f32(rng.random_range(0.01f32..0.05)).to_le_bytes());
            bytes.extend((0..QK / 2).map(|_| rng.random::<u8>()));
        }
        bytes
    }

    /// Parts of different formats stacked stay in their formats (neighbours of one format
    /// merged), and the stack multiplies as its dequantized rows do, on the dot kernels
    /// (decode) and on the GEMM path (prefill).
    #[test]
    fn parts_of_different_formats_stack_in_their_own_formats() {
        let k = 64;
        let q4 = |rows, seed| {
            let bytes = q4_0_bytes(rows, k, seed);
            QuantWeight::Q4(
                Q4Matrix::from_gguf(GgmlType::Q4_0, &bytes, rows, k, |r| r).expect("q4"),
            )
        };
        let q8 = QuantWeight::Q8(Q8Matrix::quantize(&random(3 * k, 9), 3, k));
        let parts = vec![q4(5, 1), q4(2, 2), q8.clone()];
        let want_rows: Vec<f32> = parts.iter().flat_map(QuantWeight::dequantize).collect();
        let want_bytes: usize = parts.iter().map(QuantWeight::bytes).sum();
        let stacked = QuantWeight::stack(parts);
        let QuantWeight::Stacked(runs) = &stacked else {
            panic!("not kept in their formats: {stacked:?}");
        };
        assert_eq!(runs.len(), 2, "the two Q4_0 parts are one run");
        assert!(matches!(runs[0], QuantWeight::Q4(_)) && matches!(runs[1], QuantWeight::Q8(_)));
        assert_eq!((stacked.rows(), stacked.cols()), (10, k));
        assert_eq!(stacked.dequantize(), want_rows);
        assert_eq!(stacked.bytes(), want_bytes);
        // One format throughout is one matrix.
        assert!(matches!(
            QuantWeight::stack(vec![q4(1, 3), q4(2, 4)]),
            QuantWeight::Q4(_)
        ));
        for m in [3, GEMM_MIN_ROWS + 1] {
            let x = random(m * k, 10 + m as u64);
            let got = stacked.matmul_t(&x, m);
            // Activations are quantized to 8 bits per block: compare with the product of the
            // dequantized weights by the dequantized activations.
            let xq = Q8Matrix::quantize(&x, m, k).dequantize();
            let want = reference(&xq, &want_rows, m, 10, k);
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 2e-3 * (1.0 + e.abs()), "m={m}: {g} vs {e}");
            }
        }
        let as_q8 = stacked.into_q8();
        assert_eq!(as_q8.rows(), 10);
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
