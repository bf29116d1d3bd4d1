//! Block weights laid out at load as panels of [`PANEL`] rows, for the AVX-512 VNNI machines
//! (every format) and the AVX2 ones (the 4-, 5- and 6-bit formats, [`Simd`]):
//! every product, from one activation row (batch-1 decode) to thousands (prefill), reads the
//! weights straight from the panels, with no per-row call and no packing per product.
//!
//! Why: at one activation row the dot kernels ([`super::kernels`]) pay per weight row (a row
//! view, length checks, a horizontal sum), and on a 1536-wide row that is six super-blocks of
//! work per call; `perf` put that overhead at a tenth of Qwen2.5-1.5B's decode step, and the
//! kernels themselves below the memory bandwidth two cores have. The packed panels
//! ([`super::panels`]) have the right inner loop (one `vpdpbusd` adds 64 products into 16
//! output columns, scales applied per 16 columns) but pack 8-bit panels from the blocks at
//! every product, which pays only for many rows. Here the panel layout is the storage: the
//! values and scales a file's `Q4_K` or `Q5_K` ([`Q4kPanels`]), `Q6_K` ([`Q6kPanels`]) or
//! `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1` ([`Q4Panels`]) tensor holds, rearranged so that the kernel's
//! loads are whole registers of 16 columns × 4 values (the idea of llama.cpp's repacked `Q4_K`
//! 8x8 layout, with 16-lane registers and `vpdpbusd`).
//!
//! 8-bit blocks are kept as the 8-bit panels themselves ([`Q8Panels`]), read by their kernel.
//!
//! The 4-, 5- and 6-bit formats keep a group of 8 values' low 4 bits in one layout: per group
//! `g` 128 bytes, the first 64 for the panel's columns 0..16 and the next 64 for 16..32, column
//! `c` holding 4 bytes whose low nibbles are its values `8g..8g+4` and high nibbles
//! `8g+4..8g+8`. One load, a mask and a shift give two registers of 16 columns × 4 unsigned
//! values, each multiplied by four activation bytes broadcast to every lane; the 5-bit
//! formats' fifth bits are added under byte masks (`MASKS`), `Q6_K`'s high bits from a plane
//! of their own.
//!
//! From [`UNPACK_MIN_ROWS`] activation rows on (a prefill), each panel is unpacked once into the
//! 8-bit panels' layout and multiplied by their kernel: with thousands of rows the unpacking
//! is paid once for all of them, and the nibble kernel's shifts and masks per tile are not.
//!
//! On AVX2 the same panels are multiplied by `vpmaddubsw` a quarter panel at a time (the
//! `avx2` module), at every row count; 8-bit blocks stay blocks there.

pub mod q4;
pub mod q4k;
pub mod q6k;
pub mod q8;

pub use q4::Q4Panels;
pub use q4k::Q4kPanels;
pub use q6k::Q6kPanels;
pub use q8::Q8Panels;

use super::panels::{self, PanelActivations, PanelFormat};
use super::{Q8Matrix, QK};
use rayon::prelude::*;
use std::ops::Range;

/// Weight rows per panel: two 16-lane registers of output columns.
pub const PANEL: usize = 32;

/// Bytes of one group of 8 values' low nibbles in a panel.
const GROUP_BYTES: usize = PANEL * 4;

/// Activation rows one kernel call multiplies against a panel (the weights' loads and
/// unpacking shared by all of them): the 8-bit panels' tile.
const TILE_ROWS: usize = panels::TILE_ROWS;

/// One kernel call's outputs: `[activation row][panel column]`.
type Tile = [[f32; PANEL]; TILE_ROWS];

/// Activation rows of one chunk take about this many bytes (at least [`CHUNK_MIN_ROWS`]), so
/// that a chunk stays in cache while a task's panels pass over it.
const CHUNK_BYTES: usize = 512 << 10;

/// Rows of the smallest chunk.
const CHUNK_MIN_ROWS: usize = 256;

/// Unpacked 8-bit panels of one task kept at most this size, so they stay in cache while
/// every chunk of activation rows passes over them.
const UNPACKED_BYTES: usize = 2 << 20;

/// From this many activation rows on, the panels are unpacked to 8-bit panels once per
/// product (see the module's doc). Measured on Qwen2.5-1.5B Q4_K_M, 2 threads
/// (`benches/model_throughput.rs`, `BACKFLOW_Q4K_UNPACK_MIN_ROWS`): at batch-32 decode the
/// nibble kernel gave 113 and 153 tokens/s against 110 and 110 unpacked; at a 128-token
/// prefill unpacking gave 274 and 268 against 266 and 234.
pub const UNPACK_MIN_ROWS: usize = 64;

/// [`UNPACK_MIN_ROWS`], or `BACKFLOW_Q4K_UNPACK_MIN_ROWS` where set (tuning on another CPU).
fn unpack_min_rows() -> usize {
    static MIN: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *MIN.get_or_init(|| {
        std::env::var("BACKFLOW_Q4K_UNPACK_MIN_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(UNPACK_MIN_ROWS)
    })
}

/// The kernels that multiply panels on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Simd {
    /// AVX-512 F, BW, VL and VNNI: every format is laid out in panels.
    Vnni,
    /// AVX2, FMA and F16C: the 4-, 5- and 6-bit formats are laid out, multiplied a quarter
    /// panel at a time; 8-bit blocks keep the dot kernels.
    Avx2,
    /// Nothing is laid out.
    None,
}

/// The machine's [`Simd`]; [`Simd::None`] where `BACKFLOW_Q4K_PANELS=0` (comparing with the
/// dot kernels in one binary).
pub fn simd() -> Simd {
    static SIMD: std::sync::OnceLock<Simd> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| {
        if std::env::var("BACKFLOW_Q4K_PANELS").is_ok_and(|v| v == "0") {
            return Simd::None;
        }
        match super::Kernel::machine() {
            super::Kernel::Avx512Vnni => Simd::Vnni,
            #[cfg(target_arch = "x86_64")]
            super::Kernel::Avx2 | super::Kernel::AvxVnni if is_x86_feature_detected!("f16c") => {
                Simd::Avx2
            }
            _ => Simd::None,
        }
    })
}

/// Whether the machine lays any block weights out in panels ([`simd`]).
pub fn enabled() -> bool {
    simd() != Simd::None
}

/// Where a panel keeps column `c`'s value `v`'s low 4 bits: the byte and whether it is the
/// high nibble.
fn nibble_at(v: usize, c: usize) -> (usize, bool) {
    let (g, half, t) = (v / 8, (v % 8) / 4, v % 4);
    (
        g * GROUP_BYTES + (c / 16) * 64 + (c % 16) * 4 + t,
        half == 1,
    )
}

/// Column `c`'s value `v`'s low 4 bits in a panel's `nibbles`.
fn nibble(nibbles: &[u8], v: usize, c: usize) -> u8 {
    let (byte, high) = nibble_at(v, c);
    if high {
        nibbles[byte] >> 4
    } else {
        nibbles[byte] & 0x0F
    }
}

/// Sets column `c`'s value `v`'s low 4 bits (`u`'s) in zeroed `nibbles`.
fn set_nibble(nibbles: &mut [u8], v: usize, c: usize, u: u8) {
    let (byte, high) = nibble_at(v, c);
    nibbles[byte] |= if high { (u & 0x0F) << 4 } else { u & 0x0F };
}

/// `x` as an `f16`, when that is exact (a scale read from a file's `f16` always is).
fn exact_f16(x: f32) -> Option<half::f16> {
    let h = half::f16::from_f32(x);
    (h.to_f32() == x).then_some(h)
}

/// Sixteen `f16` from `v` as `f32` (one scale per column of a half panel).
///
/// # Safety
/// The CPU has AVX-512 F; `v` points to 16 readable `f16`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn load_f16x16(v: *const half::f16) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // SAFETY: the caller's.
    unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(v as *const __m256i)) }
}

/// `u64` masks of fifth bits per group of 8 values in a panel (5-bit formats): one per half of
/// the columns and per nibble (low, high), bit `(c % 16)·4 + t` set where that register's byte
/// for column `c`'s value `t` takes 16 (one masked add a register).
const MASKS: usize = 4;

/// Where a panel keeps column `c`'s value `v`'s fifth bit: the mask and the bit.
fn fifth_at(v: usize, c: usize) -> (usize, u32) {
    let (g, high, t) = (v / 8, (v % 8) / 4, v % 4);
    (g * MASKS + (c / 16) * 2 + high, ((c % 16) * 4 + t) as u32)
}

/// Column `c`'s value `v` in a panel: its nibble, plus 16 where `fifth` (empty for 4-bit
/// values) has its bit.
fn value(nibbles: &[u8], fifth: &[u64], v: usize, c: usize) -> u8 {
    let low = nibble(nibbles, v, c);
    if fifth.is_empty() {
        return low;
    }
    let (mask, bit) = fifth_at(v, c);
    low | ((((fifth[mask] >> bit) & 1) as u8) << 4)
}

/// The fifth-bit masks of a 5-bit matrix laid out in panels (empty for 4-bit values), from its
/// blocks' values.
fn fifth_masks(q: &super::Q4Matrix) -> Vec<u64> {
    if !q.is_five_bit() {
        return Vec::new();
    }
    let (cols, blocks) = (q.cols(), q.cols() / QK);
    let mut fifth = vec![0u64; q.rows() / PANEL * cols / 8 * MASKS];
    fifth
        .par_chunks_mut(cols / 8 * MASKS)
        .enumerate()
        .for_each(|(p, fifth)| {
            for c in 0..PANEL {
                let row = q.row(p * PANEL + c);
                for b in 0..blocks {
                    for (j, &u) in row.block_values(b).iter().enumerate() {
                        if u >= 16 {
                            let (mask, bit) = fifth_at(b * QK + j, c);
                            fifth[mask] |= 1 << bit;
                        }
                    }
                }
            }
        });
    fifth
}

/// Adds 16 to the bytes of an unpacked 8-bit panel ([`unpack_nibbles`]'s `values`) where a
/// fifth bit is set: group `g`'s low nibbles are the 8-bit layout's group `2g`, its high ones
/// `2g + 1`, each half of the columns 64 bytes.
fn unpack_fifth(fifth: &[u64], values: &mut [u8]) {
    for (masks, dst) in fifth
        .chunks_exact(MASKS)
        .zip(values.chunks_exact_mut(2 * GROUP_BYTES))
    {
        for (i, &mask) in masks.iter().enumerate() {
            let (h, high) = (i / 2, i % 2);
            let bytes = &mut dst[high * GROUP_BYTES + h * 64..][..64];
            for (j, byte) in bytes.iter_mut().enumerate() {
                *byte |= (((mask >> j) & 1) as u8) << 4;
            }
        }
    }
}

/// The nibble kernels' inner loop, shared by the 4- and 5-bit formats.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP_BYTES, MASKS};
    use std::arch::x86_64::*;

    /// Per activation row `i` and half of the panel `h`, the integer products of block `b`'s
    /// 32 values with the row's: in `lo[i][h]` (low nibbles) and `hi[i][h]` (high nibbles)
    /// with one or two rows, so that enough independent `vpdpbusd` chains run at once, all in
    /// `lo` with more (the rows give them). `FIVE`: 16 added where a fifth bit is set.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VNNI (the caller's `target_feature`); `values` holds the
    /// panel's groups of block `b`, `fifth` (with `FIVE`) their masks, and each `x[i]` the
    /// row's 32 values of the block at `32·b`.
    #[inline(always)]
    pub(super) unsafe fn block_products<const R: usize, const FIVE: bool>(
        values: *const u8,
        fifth: *const u64,
        b: usize,
        x: &[*const i8; R],
    ) -> ([[__m512i; 2]; R], [[__m512i; 2]; R]) {
        let nibble = _mm512_set1_epi8(0x0F);
        let sixteen = _mm512_set1_epi8(16);
        let mut lo = [[_mm512_setzero_si512(); 2]; R];
        let mut hi = [[_mm512_setzero_si512(); 2]; R];
        for g in b * 4..b * 4 + 4 {
            let at = values.add(g * GROUP_BYTES);
            let v = [
                _mm512_loadu_si512(at as *const __m512i),
                _mm512_loadu_si512(at.add(64) as *const __m512i),
            ];
            for h in 0..2 {
                let mut low = _mm512_and_si512(v[h], nibble);
                let mut high = _mm512_and_si512(_mm512_srli_epi16(v[h], 4), nibble);
                if FIVE {
                    let masks = fifth.add(g * MASKS + 2 * h);
                    low = _mm512_mask_add_epi8(low, *masks, low, sixteen);
                    high = _mm512_mask_add_epi8(high, *masks.add(1), high, sixteen);
                }
                for i in 0..R {
                    let four = |at: usize| {
                        _mm512_set1_epi32(std::ptr::read_unaligned(x[i].add(at) as *const i32))
                    };
                    let (xl, xh) = (four(8 * g), four(8 * g + 4));
                    lo[i][h] = _mm512_dpbusd_epi32(lo[i][h], low, xl);
                    if R <= 2 {
                        hi[i][h] = _mm512_dpbusd_epi32(hi[i][h], high, xh);
                    } else {
                        lo[i][h] = _mm512_dpbusd_epi32(lo[i][h], high, xh);
                    }
                }
            }
        }
        (lo, hi)
    }

    /// Writes `R` rows of accumulators (per row the panel's two halves) into `out`'s first
    /// rows.
    ///
    /// # Safety
    /// The CPU has AVX-512 F (the caller's `target_feature`).
    #[inline(always)]
    pub(super) unsafe fn store_tile<const R: usize>(acc: &[[__m512; 2]; R], out: &mut super::Tile) {
        for (row, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(row.as_mut_ptr(), acc[0]);
            _mm512_storeu_ps(row.as_mut_ptr().add(16), acc[1]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
use x86::{block_products, store_tile};

#[cfg(target_arch = "x86_64")]
mod avx2;

/// Splits a panel's groups of 8 values' nibbles (`GROUP_BYTES` each) into the 8-bit panels'
/// layout (`values`, twice the bytes): a group's low nibbles are the 8-bit layout's group of
/// its first 4 values, its high nibbles the next, each byte at the same place.
fn unpack_nibbles(nibbles: &[u8], values: &mut [u8]) {
    for (src, dst) in nibbles
        .chunks_exact(GROUP_BYTES)
        .zip(values.chunks_exact_mut(2 * GROUP_BYTES))
    {
        let (low, high) = dst.split_at_mut(GROUP_BYTES);
        for ((l, h), &v) in low.iter_mut().zip(high.iter_mut()).zip(src) {
            (*l, *h) = (v & 0x0F, v >> 4);
        }
    }
}

/// A matrix laid out in panels at load ([`super::QuantWeight::laid_out_for_machine`]), in the
/// layout of its blocks' format.
#[derive(Debug, Clone)]
pub enum Resident {
    /// `Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`.
    Q4(Q4Panels),
    /// `Q4_K`, `Q5_K`.
    Q4k(Q4kPanels),
    /// `Q6_K`.
    Q6k(Q6kPanels),
    /// 8-bit blocks.
    Q8(Q8Panels),
}

impl Resident {
    /// `q` in panels when its format and shape have them ([`Q4kPanels::from_q4`],
    /// [`Q4Panels::from_q4`]) and the machine's kernels ([`simd`]) multiply that format.
    pub fn from_q4(q: &super::Q4Matrix) -> Option<Resident> {
        match simd() {
            Simd::Vnni | Simd::Avx2 => Q4kPanels::from_q4(q)
                .map(Resident::Q4k)
                .or_else(|| Q4Panels::from_q4(q).map(Resident::Q4)),
            Simd::None => None,
        }
    }

    /// `q` in panels when its shape has them ([`Q6kPanels::from_q6`]) and the machine's
    /// kernels multiply them.
    pub fn from_q6(q: &super::Q6Matrix) -> Option<Resident> {
        enabled().then(|| Q6kPanels::from_q6(q).map(Resident::Q6k))?
    }

    /// `q` in panels when its shape has them ([`Q8Panels::from_q8`]), on AVX-512 VNNI. (On
    /// AVX2 an 8-bit panel kernel, llama.cpp's sign trick a quarter panel at a time, measured
    /// no faster than the dot kernels and the dequantized tiles: 8-bit blocks stay blocks.)
    pub fn from_q8(q: &Q8Matrix) -> Option<Resident> {
        (simd() == Simd::Vnni).then(|| Q8Panels::from_q8(q).map(Resident::Q8))?
    }

    /// The matrix behind the format.
    fn matrix(&self) -> &dyn Matrix {
        match self {
            Resident::Q4(q) => q,
            Resident::Q4k(q) => q,
            Resident::Q6k(q) => q,
            Resident::Q8(q) => q,
        }
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.matrix().rows()
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.matrix().cols()
    }

    /// Bytes the matrix holds in memory.
    pub fn bytes(&self) -> usize {
        self.matrix().bytes()
    }

    /// Whether every buffer is in an arena ([`Resident::place_in`] done).
    pub fn placed(&self) -> bool {
        match self {
            Resident::Q4(q) => q.placed(),
            Resident::Q4k(q) => q.placed(),
            Resident::Q6k(q) => q.placed(),
            Resident::Q8(q) => q.placed(),
        }
    }

    /// Moves the panels' buffers into `arena` (see the `arena` module).
    pub fn place_in(&mut self, arena: &super::arena::WeightArena) {
        match self {
            Resident::Q4(q) => q.place_in(arena),
            Resident::Q4k(q) => q.place_in(arena),
            Resident::Q6k(q) => q.place_in(arena),
            Resident::Q8(q) => q.place_in(arena),
        }
    }

    /// Row `r` as `f32` (`out.len() == cols`), the values the blocks give.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.matrix().dequantize_row(r, out)
    }

    /// `x · selfᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major.
    ///
    /// # Panics
    /// When `x.len() != m * cols` (a caller's bug).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matrix().matmul_t(x, m)
    }
}

/// What [`Resident`] asks of each format's matrix; [`Panels`] too: rows (outputs) a multiple of
/// [`PANEL`], columns (inputs) of [`QK`] · [`Panels::GROUP`].
trait Matrix {
    fn rows(&self) -> usize;
    fn cols(&self) -> usize;
    fn bytes(&self) -> usize;
    fn dequantize_row(&self, r: usize, out: &mut [f32]);
    fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32>;
}

/// Each format's inherent methods as [`Matrix`].
macro_rules! matrix {
    ($($t:ty),*) => {$(
        impl Matrix for $t {
            fn rows(&self) -> usize {
                <$t>::rows(self)
            }
            fn cols(&self) -> usize {
                <$t>::cols(self)
            }
            fn bytes(&self) -> usize {
                <$t>::bytes(self)
            }
            fn dequantize_row(&self, r: usize, out: &mut [f32]) {
                <$t>::dequantize_row(self, r, out)
            }
            fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
                <$t>::matmul_t(self, x, m)
            }
        }
    )*};
}

matrix!(Q4Panels, Q4kPanels, Q6kPanels, Q8Panels);

/// Weights laid out in panels, as [`matmul`] multiplies them.
trait Panels: Matrix + Sync {
    /// Blocks of [`QK`] activations that share one scale: a super-block's 8 (the k-quants,
    /// whose kernels sum a super-block in integers) or 1 (formats with a scale per block).
    const GROUP: usize;
    /// Values per integer sum of activations the nibble kernel reads: a block's 32 (what a
    /// `Q4_K` block's `mn` multiplies) or a part's 16 (`Q6_K`'s zero point times its `sc`).
    const SUM_STEP: usize;
    /// The 8-bit panels' format the panels unpack to.
    const UNPACKED: PanelFormat;
    /// `out[i][c]` = activation row `rows.start + i` times panel `p`'s row `c`, in plain Rust
    /// (machines without AVX2 never lay panels out, but a matrix built anyway, in a
    /// test, still multiplies correctly).
    fn tile_portable(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile);
    /// [`Panels::tile_portable`] on AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_vnni(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile);
    /// [`Panels::tile_portable`] on AVX2.
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile);
    /// Panel `p` as an 8-bit panel in [`Panels::UNPACKED`]'s format.
    fn unpack(&self, p: usize, into: &mut panels::Panel);
}

/// `out[i][c]` = activation row `rows.start + i` times panel `p`'s row `c`, by the kernels of
/// `simd` (the machine's, [`simd`], or [`Simd::None`] for plain Rust).
fn tile<W: Panels>(
    w: &W,
    p: usize,
    xs: &Activations,
    rows: Range<usize>,
    out: &mut Tile,
    simd: Simd,
) {
    match simd {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Vnni` only where the CPU has AVX-512 F/BW/VL and VNNI (`simd`).
        Simd::Vnni => unsafe { w.tile_vnni(p, xs, rows, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Simd::Avx2` only where the CPU has AVX2, FMA and F16C (`simd`).
        Simd::Avx2 => unsafe { w.tile_avx2(p, xs, rows, out) },
        _ => w.tile_portable(p, xs, rows, out),
    }
}

/// The activation rows of a product for the nibble kernels: 8-bit values with one scale per
/// super-block (as llama.cpp's `Q8_K`) or per block (its `Q8_0`), and each step's integer sum
/// `Σq_x`.
struct Activations {
    q: Q8Matrix,
    /// `m × cols / step` sums.
    sums: Vec<i32>,
    /// Sums per row.
    steps: usize,
    /// Blocks per scale.
    group: usize,
}

impl Activations {
    fn new(x: &[f32], m: usize, k: usize, group: usize, step: usize) -> Self {
        let q = Q8Matrix::quantize_grouped(x, m, k, group);
        let sums = q
            .quants
            .chunks_exact(step)
            .map(|s| s.iter().map(|&v| v as i32).sum())
            .collect();
        Activations {
            q,
            sums,
            steps: k / step,
            group,
        }
    }

    /// Row `r`'s values.
    fn row(&self, r: usize) -> &[i8] {
        let k = self.q.blocks * QK;
        &self.q.quants[r * k..(r + 1) * k]
    }

    /// Row `r`'s sums.
    fn row_sums(&self, r: usize) -> &[i32] {
        &self.sums[r * self.steps..(r + 1) * self.steps]
    }

    /// Where rows `r0..r0 + R` start, their values and their sums: what a kernel's tile of `R`
    /// rows reads through.
    fn row_pointers<const R: usize>(&self, r0: usize) -> ([*const i8; R], [*const i32; R]) {
        (
            std::array::from_fn(|i| self.row(r0 + i).as_ptr()),
            std::array::from_fn(|i| self.row_sums(r0 + i).as_ptr()),
        )
    }

    /// Row `r`'s scale for group `s` (a super-block of the k-quants, a block of the others).
    fn scale(&self, r: usize, s: usize) -> f32 {
        self.q.scales[r * self.q.blocks + s * self.group]
    }
}

/// `x · wᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major. The panels are split between
/// rayon's threads (about four runs each); each run takes the activation rows in chunks that
/// stay in cache, [`TILE_ROWS`] rows per kernel call, through the nibble kernel or, from
/// [`UNPACK_MIN_ROWS`] rows, through 8-bit panels unpacked a group at a time.
///
/// # Panics
/// When `x.len() != m * cols` (a caller's bug).
fn matmul<W: Panels>(w: &W, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "resident panels: shape");
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    let simd = simd();
    if simd == Simd::Vnni && m >= unpack_min_rows() {
        thread_local! {
            /// This thread's group of unpacked panels.
            static UNPACKED: std::cell::RefCell<Vec<panels::Panel>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let xq = super::Activations::quantize(x, m, k, W::UNPACKED.offsets, W::GROUP);
        let xs = PanelActivations::new(&xq, W::UNPACKED);
        let group = (UNPACKED_BYTES / (k * PANEL)).max(1);
        let unpack = |group: &[usize]| {
            UNPACKED.with_borrow_mut(|unpacked| {
                if unpacked.len() < group.len() {
                    unpacked.resize_with(group.len(), Default::default);
                }
                for (into, &p) in unpacked.iter_mut().zip(group) {
                    w.unpack(p, into);
                }
            })
        };
        for_each_tile(&mut y, m, k, group, unpack, |at, _, rows, tile| {
            // SAFETY: only on AVX-512 VNNI (`simd`); the panel was unpacked with `k` values
            // a row, as the activations have.
            UNPACKED.with_borrow(|unpacked| unsafe { unpacked[at].multiply(&xs, rows, tile) })
        });
    } else {
        let xs = Activations::new(x, m, k, W::GROUP, W::SUM_STEP);
        for_each_tile(
            &mut y,
            m,
            k,
            usize::MAX,
            |_| {},
            |_, p, rows, out| tile(w, p, &xs, rows, out, simd),
        );
    }
    y
}

/// The loop of every product over panels, `y` `[m, n]` (`n` = panels × [`PANEL`]) for `k`
/// values a row: the panels split between rayon's threads (about four runs each); each run taken
/// a group of at most `group` panels at a time, `prepare(group)` called first (the unpacking of
/// those panels), then the activation rows in chunks that stay in cache, and for each panel
/// of the group and each tile of at most [`TILE_ROWS`] rows of the chunk `tile(index in the
/// group, panel, rows, out)`, whose output is written into `y`.
fn for_each_tile(
    y: &mut [f32],
    m: usize,
    k: usize,
    group: usize,
    prepare: impl Fn(&[usize]) + Sync,
    tile: impl Fn(usize, usize, Range<usize>, &mut Tile) + Sync,
) {
    let n = y.len().checked_div(m).unwrap_or(0);
    let count = n / PANEL;
    let threads = rayon::current_num_threads().max(1);
    let per_task = count.div_ceil(threads * 4).max(1);
    let chunk = (CHUNK_BYTES / k.max(1))
        .max(CHUNK_MIN_ROWS)
        .next_multiple_of(TILE_ROWS);
    let out = OutPtr(y.as_mut_ptr());
    (0..count.div_ceil(per_task))
        .into_par_iter()
        .for_each(|task| {
            let run: Vec<usize> = (task * per_task..((task + 1) * per_task).min(count)).collect();
            let mut buf = [[0f32; PANEL]; TILE_ROWS];
            for panels in run.chunks(group.max(1)) {
                prepare(panels);
                for chunk0 in (0..m).step_by(chunk) {
                    let chunk1 = (chunk0 + chunk).min(m);
                    for (at, &p) in panels.iter().enumerate() {
                        for r0 in (chunk0..chunk1).step_by(TILE_ROWS) {
                            let rows = r0..(r0 + TILE_ROWS).min(chunk1);
                            tile(at, p, rows.clone(), &mut buf);
                            // SAFETY: `y` holds m × n values; the rows are below m, and panel p
                            // is this task's alone.
                            unsafe { out.write(&buf, rows, p, n) };
                        }
                    }
                }
            }
        });
}

/// The output buffer of a product, shared by the tasks that write its disjoint columns.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

// SAFETY: only used by `matmul`, whose tasks write disjoint columns.
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// Writes `tile`'s first `rows.len()` rows into rows `rows` and panel `p`'s columns of the
    /// `[m, n]` output.
    ///
    /// # Safety
    /// The buffer holds `m × n` values with `rows.end ≤ m` and `(p + 1)·PANEL ≤ n`, and no other
    /// thread writes panel `p`'s columns.
    unsafe fn write(self, tile: &Tile, rows: Range<usize>, p: usize, n: usize) {
        for (i, row) in tile.iter().enumerate().take(rows.len()) {
            // SAFETY: the caller's.
            let dst = unsafe { self.0.add((rows.start + i) * n + p * PANEL) };
            // SAFETY: as above; PANEL values from there are panel p's columns of that row.
            unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), dst, PANEL) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The product of `w` with `m` random rows against the f64 product of `values` (the
    /// weights' `f32` values, computed independently of the panels, `[rows, cols]`) with the
    /// rows quantized as the product quantizes them (8 bits, one scale per 256 values), on
    /// every path ([`products`]), for every tile size and a tile after full
    /// ones, and for the unpacked path's row counts.
    pub(super) fn assert_product_matches<W: Panels>(w: &W, values: &[f32], label: &str) {
        use rand::{Rng, SeedableRng};
        let (n, k) = (w.rows(), w.cols());
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for m in [1usize, 2, 3, 4, 5, 9, unpack_min_rows() + 3] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let xq = Q8Matrix::quantize_grouped(&x, m, k, W::GROUP).dequantize();
            let paths = products(w, &x, m);
            for i in 0..m {
                for j in 0..n {
                    let terms = (0..k).map(|c| xq[i * k + c] as f64 * values[j * k + c] as f64);
                    let want: f64 = terms.clone().sum();
                    let tol = 1e-5 * terms.map(f64::abs).sum::<f64>().max(1e-3);
                    for (path, v) in paths.iter().map(|(path, got)| (path, got[i * n + j])) {
                        assert!(
                            (v as f64 - want).abs() <= tol,
                            "{label} {path} m={m} [{i},{j}]: {v} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// `x · wᵀ` for `m` rows of `x` by every path this CPU has, named: the machine's product
    /// ([`matmul`]: on an AVX-512 machine the VNNI kernel, from [`UNPACK_MIN_ROWS`] rows the
    /// unpacked panels), and each tile kernel called directly, plain Rust and AVX2's where the
    /// CPU has it.
    pub(super) fn products<W: Panels>(w: &W, x: &[f32], m: usize) -> Vec<(&'static str, Vec<f32>)> {
        let (n, k) = (w.rows(), w.cols());
        let xs = Activations::new(x, m, k, W::GROUP, W::SUM_STEP);
        let by_tiles = |simd: Simd| {
            let mut out = vec![0f32; m * n];
            for p in 0..n / PANEL {
                let mut buf = [[0f32; PANEL]; TILE_ROWS];
                for r0 in (0..m).step_by(TILE_ROWS) {
                    let rows = r0..(r0 + TILE_ROWS).min(m);
                    tile(w, p, &xs, rows.clone(), &mut buf, simd);
                    for (i, row) in buf.iter().enumerate().take(rows.len()) {
                        out[(r0 + i) * n + p * PANEL..][..PANEL].copy_from_slice(row);
                    }
                }
            }
            out
        };
        let mut paths = vec![
            ("machine", matmul(w, x, m)),
            ("portable", by_tiles(Simd::None)),
        ];
        if cpu_has_avx2() {
            paths.push(("avx2", by_tiles(Simd::Avx2)));
        }
        paths
    }

    /// Every weight's value `value` (the format's extreme: its largest unsigned values under
    /// unit scales) times activations all `±1` (±127 once quantized): the most a kernel's
    /// 16-bit partial sums hold (AVX2's `vpmaddubsw` saturates), so a sum widened too late
    /// shows here, on every path ([`products`]).
    pub(super) fn assert_extremes_exact<W: Panels>(w: &W, value: f32, label: &str) {
        let k = w.cols();
        for sign in [1.0f32, -1.0] {
            let x = vec![sign; 4 * k];
            let want = sign * value * k as f32;
            for (path, got) in products(w, &x, 4) {
                for (i, &v) in got.iter().enumerate() {
                    assert!(
                        (v - want).abs() <= 1e-3 * want.abs(),
                        "{label} {path} [{i}]: {v} vs {want}"
                    );
                }
            }
        }
    }

    /// Whether this CPU runs [`Simd::Avx2`]'s kernels (whatever [`simd`] chose).
    fn cpu_has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    #[test]
    fn nibbles_sit_where_the_layout_says() {
        // Column 17's value 13: group 1, high nibble (13 % 8 = 5), second half of the columns.
        assert_eq!(nibble_at(13, 17), (GROUP_BYTES + 64 + 4 + 1, true));
        let mut bytes = vec![0u8; 2 * GROUP_BYTES];
        set_nibble(&mut bytes, 13, 17, 0xA);
        set_nibble(&mut bytes, 9, 17, 0x5);
        assert_eq!(bytes[GROUP_BYTES + 64 + 4 + 1], 0xA5);
        assert_eq!((nibble(&bytes, 13, 17), nibble(&bytes, 9, 17)), (0xA, 0x5));
    }
}
