//! `Q6_K` values in panels ([`super`]): a file's `Q6_K` super-blocks (256 values `v =
//! d·sc·(u − 32)`, `u` in 0..64, one signed 8-bit `sc` per 16 values and an `f16` `d`) laid out
//! per panel as
//! - the values' low 4 bits, `16·k` bytes (the module's group layout);
//! - their high 2 bits, per part of 16 values 128 bytes: per half of the columns 64, column
//!   `c` holding 4 bytes whose bits `2i, 2i + 1` are the high bits of its values
//!   `16j + 4i .. 16j + 4i + 4` (one load gives the four registers of a part their high bits
//!   with a shift and a mask each);
//! - `sc`: per part, 32 signed bytes (one per column);
//! - `d`: per super-block, 32 `f16` (one per column), as the file has it;
//!
//! 6.5625 bits a weight, the file's size.
//!
//! The arithmetic is the dot kernel's: per part and column the integer `Σu·q_x − 32·Σq_x`
//! (the zero point taken back exactly), times `sc` and summed over the super-block's sixteen
//! parts in integers (at most 16·128·(16·63·127 + 32·16·127) < 2³¹); per super-block one
//! conversion and one multiply-add by `d·d_x`.

use super::{nibble, set_nibble, Activations, Panels, Tile, GROUP_BYTES, PANEL};
use crate::model::gguf::QK_K;
use crate::model::quant::arena::{Buf, WeightArena};
use crate::model::quant::panels::{self, PanelFormat};
use crate::model::quant::q6::{self, Q6Matrix, BLOCK_BYTES};
use crate::model::quant::QK;
use rayon::prelude::*;
use std::ops::Range;

/// Values per part (one `sc`).
const PART: usize = 16;

/// Parts per super-block.
const PARTS: usize = QK_K / PART;

/// Bytes of one part's high bits in a panel.
const HIGH_BYTES: usize = PANEL * 4;

/// A `[rows, cols]` matrix of `Q6_K` values in panels; `rows` a multiple of [`PANEL`], `cols`
/// of 256.
#[derive(Clone)]
pub struct Q6kPanels {
    rows: usize,
    cols: usize,
    /// `rows · cols / 2` bytes of low 4 bits, a panel after the other.
    low: Buf<u8>,
    /// `rows · cols / 4` bytes of high 2 bits, a panel after the other.
    high: Buf<u8>,
    /// Per panel, per part, [`PANEL`] scale multipliers.
    sc: Buf<i8>,
    /// Per panel, per super-block, [`PANEL`] scales.
    d: Buf<half::f16>,
}

impl std::fmt::Debug for Q6kPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q6kPanels[{}, {}]", self.rows, self.cols)
    }
}

/// One panel's parts.
struct Panel<'a> {
    low: &'a [u8],
    high: &'a [u8],
    sc: &'a [i8],
    d: &'a [half::f16],
    supers: usize,
}

/// Where a panel keeps column `c`'s value `v`'s high 2 bits: the byte and the shift.
fn high_at(v: usize, c: usize) -> (usize, usize) {
    let (j, i, t) = (v / PART, (v % PART) / 4, v % 4);
    (j * HIGH_BYTES + (c / 16) * 64 + (c % 16) * 4 + t, 2 * i)
}

impl Panel<'_> {
    /// Column `c`'s value `v`, `u` in 0..64.
    fn value(&self, v: usize, c: usize) -> u8 {
        let (byte, shift) = high_at(v, c);
        nibble(self.low, v, c) | (((self.high[byte] >> shift) & 3) << 4)
    }
}

impl Q6kPanels {
    /// `q` in panels, when its rows fill whole panels; else `None` (it stays as it is).
    pub fn from_q6(q: &Q6Matrix) -> Option<Q6kPanels> {
        let (rows, cols) = (q.rows(), q.cols());
        if rows == 0 || !rows.is_multiple_of(PANEL) || cols == 0 || !cols.is_multiple_of(QK_K) {
            return None;
        }
        let (supers, parts) = (cols / QK_K, cols / PART);
        let mut out = Q6kPanels {
            rows,
            cols,
            low: vec![0; rows * cols / 2].into(),
            high: vec![0; rows * cols / 4].into(),
            sc: vec![0; rows * parts].into(),
            d: vec![half::f16::ZERO; rows * supers].into(),
        };
        out.low
            .par_chunks_mut(PANEL * cols / 2)
            .zip(out.high.par_chunks_mut(PANEL * cols / 4))
            .zip(out.sc.par_chunks_mut(PANEL * parts))
            .zip(out.d.par_chunks_mut(PANEL * supers))
            .enumerate()
            .for_each(|(p, (((low, high), sc), d))| {
                for c in 0..PANEL {
                    let row = q.row(p * PANEL + c);
                    for (s, sb) in row.chunks_exact(BLOCK_BYTES).enumerate() {
                        d[s * PANEL + c] = half::f16::from_le_bytes([sb[208], sb[209]]);
                        for i in 0..PARTS {
                            sc[(s * PARTS + i) * PANEL + c] = sb[192 + i] as i8;
                        }
                        for b in 0..QK_K / QK {
                            let (values, _) = q6::block_values(sb, b);
                            for (j, &v) in values.iter().enumerate() {
                                let at = s * QK_K + b * QK + j;
                                let u = (v as i16 + 32) as u8;
                                set_nibble(low, at, c, u);
                                let (byte, shift) = high_at(at, c);
                                high[byte] |= (u >> 4) << shift;
                            }
                        }
                    }
                }
            });
        Some(out)
    }

    /// Rows (outputs).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (inputs).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Moves the matrix's buffers into `arena` (see the `arena` module).
    pub fn place_in(&mut self, arena: &WeightArena) {
        arena.place(&mut self.low);
        arena.place(&mut self.high);
        arena.place(&mut self.sc);
        arena.place(&mut self.d);
    }

    /// Whether every buffer is in an arena ([`Q6kPanels::place_in`] done).
    pub fn placed(&self) -> bool {
        self.low.placed() && self.high.placed() && self.sc.placed() && self.d.placed()
    }

    /// Bytes the matrix holds in memory.
    pub fn bytes(&self) -> usize {
        self.low.len() + self.high.len() + self.sc.len() + 2 * self.d.len()
    }

    /// Row `r` as `f32` (`out.len() == cols`): `d·sc·(u − 32)`, as the file's blocks give it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (part, c) = (self.panel(r / PANEL), r % PANEL);
        for (j, o) in out.chunks_exact_mut(PART).enumerate() {
            let scale = part.d[j / PARTS * PANEL + c].to_f32() * part.sc[j * PANEL + c] as f32;
            for (t, o) in o.iter_mut().enumerate() {
                *o = scale * (part.value(j * PART + t, c) as i32 - 32) as f32;
            }
        }
    }

    /// `x · selfᵀ` for `x` row-major `[m, cols]`: `[m, rows]`, row-major ([`super`]'s product).
    ///
    /// # Panics
    /// When `x.len() != m * cols` (a caller's bug).
    pub fn matmul_t(&self, x: &[f32], m: usize) -> Vec<f32> {
        super::matmul(self, x, m)
    }

    /// Panel `p`'s parts.
    fn panel(&self, p: usize) -> Panel<'_> {
        let (k, parts, supers) = (self.cols, self.cols / PART, self.cols / QK_K);
        Panel {
            low: &self.low[p * PANEL * k / 2..(p + 1) * PANEL * k / 2],
            high: &self.high[p * PANEL * k / 4..(p + 1) * PANEL * k / 4],
            sc: &self.sc[p * PANEL * parts..(p + 1) * PANEL * parts],
            d: &self.d[p * PANEL * supers..(p + 1) * PANEL * supers],
            supers,
        }
    }
}

impl Panels for Q6kPanels {
    const GROUP: usize = QK_K / QK;
    const SUM_STEP: usize = PART;

    /// The raw 6-bit values, zero point 32, a scale `d·sc` per 16 values.
    const UNPACKED: PanelFormat = PanelFormat {
        step: PART,
        zero: 32,
        offsets: false,
    };

    fn tile_portable(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        portable_tile(&self.panel(p), xs, rows, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        // SAFETY: the caller's CPU has AVX2, FMA and F16C; the panel and the activations hold
        // `cols` values a row, a multiple of 256.
        unsafe { x86::tile_avx2(&self.panel(p), xs, rows, out) };
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_vnni(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        // SAFETY: the caller's CPU has the features; the panel and the activations hold `cols`
        // values a row, a multiple of 256.
        unsafe { x86::tile(&self.panel(p), xs, rows, out) };
    }

    /// A part's four groups of 4 values are the 8-bit layout's four groups: each byte's low 4
    /// bits from one nibble, its high 2 from two bits of the part's high byte.
    fn unpack(&self, p: usize, into: &mut panels::Panel) {
        let part = self.panel(p);
        into.fill(Self::UNPACKED, self.cols, |values, scales, _| {
            for (j, dst) in values.chunks_exact_mut(4 * GROUP_BYTES).enumerate() {
                let high = &part.high[j * HIGH_BYTES..(j + 1) * HIGH_BYTES];
                for (i, dst) in dst.chunks_exact_mut(GROUP_BYTES).enumerate() {
                    let low = &part.low[(2 * j + i / 2) * GROUP_BYTES..][..GROUP_BYTES];
                    let shift = if i % 2 == 0 { 0 } else { 4 };
                    for ((o, &l), &h) in dst.iter_mut().zip(low).zip(high) {
                        *o = ((l >> shift) & 0x0F) | (((h >> (2 * i)) & 3) << 4);
                    }
                }
            }
            for (j, scales) in scales.chunks_exact_mut(PANEL).enumerate() {
                for (c, s) in scales.iter_mut().enumerate() {
                    *s = part.d[j / PARTS * PANEL + c].to_f32() * part.sc[j * PANEL + c] as f32;
                }
            }
        });
    }
}

/// The kernel's arithmetic in plain Rust ([`Panels::tile_portable`]).
fn portable_tile(p: &Panel<'_>, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
    for (i, r) in rows.enumerate() {
        let (x, sums) = (xs.row(r), xs.row_sums(r));
        for (c, o) in out[i].iter_mut().enumerate() {
            let mut acc = 0f32;
            for s in 0..p.supers {
                let mut iacc = 0i32;
                let parts = s * PARTS..(s + 1) * PARTS;
                for (j, &x_sum) in parts.clone().zip(&sums[parts]) {
                    let isum: i32 = (j * PART..(j + 1) * PART)
                        .map(|v| p.value(v, c) as i32 * x[v] as i32)
                        .sum();
                    iacc += (isum - 32 * x_sum) * p.sc[j * PANEL + c] as i32;
                }
                acc += iacc as f32 * (p.d[s * PANEL + c].to_f32() * xs.scale(r, s));
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Activations, Panel, Tile, GROUP_BYTES, HIGH_BYTES, PANEL, PART, PARTS};
    use crate::model::quant::resident::{load_f16x16, store_tile};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// [`super::portable_tile`] on AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI; the panel and the activations hold the same
    /// number of values a row, a multiple of 256.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile(p: &Panel<'_>, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows::<R>(p, xs, rows.start, out)
        })
    }

    /// `(low & 0x0F) | high` where `high` holds only bits 4 and 5 of each byte.
    #[inline(always)]
    unsafe fn join(low: __m512i, high: __m512i) -> __m512i {
        // Bitwise (A & C) | B with C = 0x0F: 0xF0 & 0xAA | 0xCC.
        _mm512_ternarylogic_epi32(low, high, _mm512_set1_epi8(0x0F), 0xEC)
    }

    /// [`tile`] for `R` activation rows from `r0`. With one or two rows each part's sums are
    /// split between two `vpdpbusd` chains so that enough run at once; with more, the rows
    /// give them.
    // Rows and column halves index several arrays of registers at once.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    unsafe fn tile_rows<const R: usize>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let bits45 = _mm512_set1_epi8(0x30);
        let (low, high) = (p.low.as_ptr(), p.high.as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for s in 0..p.supers {
            let mut iacc = [[_mm512_setzero_si512(); 2]; R];
            for j in s * PARTS..(s + 1) * PARTS {
                for h in 0..2 {
                    let n0 = _mm512_loadu_si512(low.add(2 * j * GROUP_BYTES + 64 * h) as *const _);
                    let n1 =
                        _mm512_loadu_si512(low.add((2 * j + 1) * GROUP_BYTES + 64 * h) as *const _);
                    let hb = _mm512_loadu_si512(high.add(j * HIGH_BYTES + 64 * h) as *const _);
                    // The part's four groups of 4 values, each byte `u` in 0..64.
                    let v = [
                        join(n0, _mm512_and_si512(_mm512_slli_epi16(hb, 4), bits45)),
                        join(
                            _mm512_srli_epi16(n0, 4),
                            _mm512_and_si512(_mm512_slli_epi16(hb, 2), bits45),
                        ),
                        join(n1, _mm512_and_si512(hb, bits45)),
                        join(
                            _mm512_srli_epi16(n1, 4),
                            _mm512_and_si512(_mm512_srli_epi16(hb, 2), bits45),
                        ),
                    ];
                    let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(
                        p.sc.as_ptr().add(j * PANEL + 16 * h) as *const __m128i,
                    ));
                    for i in 0..R {
                        let four = |g: usize| {
                            _mm512_set1_epi32(std::ptr::read_unaligned(
                                x[i].add(j * PART + 4 * g) as *const i32
                            ))
                        };
                        // The zero point: −32·Σq_x starts the sum.
                        let mut a = _mm512_set1_epi32(-32 * *x_sums[i].add(j));
                        if R <= 2 {
                            let mut b = _mm512_setzero_si512();
                            a = _mm512_dpbusd_epi32(a, v[0], four(0));
                            b = _mm512_dpbusd_epi32(b, v[1], four(1));
                            a = _mm512_dpbusd_epi32(a, v[2], four(2));
                            b = _mm512_dpbusd_epi32(b, v[3], four(3));
                            a = _mm512_add_epi32(a, b);
                        } else {
                            for (g, &v) in v.iter().enumerate() {
                                a = _mm512_dpbusd_epi32(a, v, four(g));
                            }
                        }
                        iacc[i][h] = _mm512_add_epi32(iacc[i][h], _mm512_mullo_epi32(a, sc));
                    }
                }
            }
            for h in 0..2 {
                let d = load_f16x16(p.d.as_ptr().add(s * PANEL + 16 * h));
                for i in 0..R {
                    let dx = _mm512_set1_ps(xs.scale(r0 + i, s));
                    acc[i][h] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(iacc[i][h]),
                        _mm512_mul_ps(d, dx),
                        acc[i][h],
                    );
                }
            }
        }
        store_tile(&acc, out);
    }

    /// [`super::portable_tile`] on AVX2, a quarter of the panel at a time
    /// ([`crate::model::quant::resident::avx2`]).
    ///
    /// # Safety
    /// The CPU has AVX2, FMA and F16C; the panel and the activations hold the same number of
    /// values a row, a multiple of 256.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2(
        p: &Panel<'_>,
        xs: &Activations,
        rows: Range<usize>,
        out: &mut Tile,
    ) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows_avx2::<R>(p, xs, rows.start, out)
        })
    }

    /// [`tile_avx2`] for `R` activation rows from `r0`. A part's 16 products per column are
    /// summed by `vpmaddubsw` in 16 bits two groups at a time (4 products of at most 63·128, no
    /// saturation), widened, then the zero point and `sc` applied in `i32` as the VNNI kernel
    /// does.
    #[inline(always)]
    unsafe fn tile_rows_avx2<const R: usize>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        use crate::model::quant::resident::avx2;
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let (nibble, bits45, ones) = (
            _mm256_set1_epi8(0x0F),
            _mm256_set1_epi8(0x30),
            _mm256_set1_epi16(1),
        );
        let join =
            |low: __m256i, high: __m256i| _mm256_or_si256(_mm256_and_si256(low, nibble), high);
        let (low, high) = (p.low.as_ptr(), p.high.as_ptr());
        // Super-block by super-block, each quarter in turn, so that the super-block's bytes
        // come from memory once (see `q4k`'s AVX2 kernel).
        let mut acc = [[_mm256_setzero_ps(); R]; PANEL / avx2::QUARTER];
        for s in 0..p.supers {
            for (quarter, acc) in acc.iter_mut().enumerate() {
                let column = quarter * avx2::QUARTER;
                // A quarter's 32 bytes of a group (or of a part's high bits): the half's 64,
                // then which 32 of them.
                let offset = (quarter / 2) * 64 + (quarter % 2) * 32;
                let mut iacc = [_mm256_setzero_si256(); R];
                for j in s * PARTS..(s + 1) * PARTS {
                    let load = |at: *const u8| _mm256_loadu_si256(at as *const __m256i);
                    let n0 = load(low.add(2 * j * GROUP_BYTES + offset));
                    let n1 = load(low.add((2 * j + 1) * GROUP_BYTES + offset));
                    let hb = load(high.add(j * HIGH_BYTES + offset));
                    // The part's four groups of 4 values, each byte `u` in 0..64.
                    let v = [
                        join(n0, _mm256_and_si256(_mm256_slli_epi16(hb, 4), bits45)),
                        join(
                            _mm256_srli_epi16(n0, 4),
                            _mm256_and_si256(_mm256_slli_epi16(hb, 2), bits45),
                        ),
                        join(n1, _mm256_and_si256(hb, bits45)),
                        join(
                            _mm256_srli_epi16(n1, 4),
                            _mm256_and_si256(_mm256_srli_epi16(hb, 2), bits45),
                        ),
                    ];
                    let sc = avx2::load_i8x8(p.sc.as_ptr().add(j * PANEL + column));
                    for i in 0..R {
                        let four = |g: usize| {
                            _mm256_set1_epi32(std::ptr::read_unaligned(
                                x[i].add(j * PART + 4 * g) as *const i32
                            ))
                        };
                        let p01 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(v[0], four(0)),
                            _mm256_maddubs_epi16(v[1], four(1)),
                        );
                        let p23 = _mm256_add_epi16(
                            _mm256_maddubs_epi16(v[2], four(2)),
                            _mm256_maddubs_epi16(v[3], four(3)),
                        );
                        let sum = _mm256_add_epi32(
                            _mm256_madd_epi16(p01, ones),
                            _mm256_madd_epi16(p23, ones),
                        );
                        // The zero point: −32·Σq_x.
                        let a = _mm256_sub_epi32(sum, _mm256_set1_epi32(32 * *x_sums[i].add(j)));
                        iacc[i] = _mm256_add_epi32(iacc[i], _mm256_mullo_epi32(a, sc));
                    }
                }
                let d = avx2::load_f16x8(p.d.as_ptr().add(s * PANEL + column));
                for i in 0..R {
                    let dx = _mm256_set1_ps(xs.scale(r0 + i, s));
                    acc[i] =
                        _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[i]), _mm256_mul_ps(d, dx), acc[i]);
                }
            }
        }
        for (quarter, acc) in acc.iter().enumerate() {
            avx2::store_quarter(acc, quarter, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::gguf::GgmlType;
    use rand::{Rng, SeedableRng};

    /// A `Q6_K` matrix of random super-blocks (every byte random but the `f16` scale).
    fn random_q6k(rows: usize, cols: usize, seed: u64) -> (Q6Matrix, Vec<u8>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK_K {
            bytes.extend((0..BLOCK_BYTES - 2).map(|_| rng.random::<u8>()));
            bytes.extend(half::f16::from_f32(rng.random_range(0.0005f32..0.004)).to_le_bytes());
        }
        let q = Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, rows, cols, |r| r).expect("Q6_K");
        (q, bytes)
    }

    /// Every value comes back as the GGUF reader's `Q6_K` dequantization gives it (that one
    /// checked against the `gguf` Python package), bit for bit.
    #[test]
    fn panels_hold_the_files_values() {
        let (q, bytes) = random_q6k(64, 512, 3);
        let want = crate::model::gguf::dequantize(GgmlType::Q6_K, &bytes, 64 * 512).expect("q6");
        let p = Q6kPanels::from_q6(&q).expect("whole panels");
        assert_eq!((p.rows(), p.cols()), (64, 512));
        // The file's 210 bytes per 256 values: 128 + 64 of values, 16 of `sc`, 2 of `d`.
        assert_eq!(p.bytes(), 64 * 512 / 256 * 210);
        let mut got = vec![0f32; 512];
        for r in 0..64 {
            p.dequantize_row(r, &mut got);
            assert_eq!(got, want[r * 512..(r + 1) * 512].to_vec(), "row {r}");
        }
        assert!(Q6kPanels::from_q6(&random_q6k(48, 256, 1).0).is_none());
    }

    #[test]
    fn the_largest_values_times_the_largest_activations_are_exact() {
        // Every byte 0xFF but `d` = 1: values `u` = 63 (the most `vpmaddubsw` sums), `sc` = −1,
        // a weight of −(63 − 32).
        let mut block = vec![0xFFu8; BLOCK_BYTES - 2];
        block.extend(half::f16::ONE.to_le_bytes());
        let (rows, cols) = (32, 512);
        let bytes = block.repeat(rows * cols / QK_K);
        let q = Q6Matrix::from_gguf(GgmlType::Q6_K, &bytes, rows, cols, |r| r).expect("Q6_K");
        let p = Q6kPanels::from_q6(&q).expect("whole panels");
        super::super::tests::assert_extremes_exact(&p, -31.0, "Q6_K");
    }

    #[test]
    fn the_product_matches_the_dequantized_weights() {
        let (q, _) = random_q6k(96, 768, 11);
        let p = Q6kPanels::from_q6(&q).expect("whole panels");
        super::super::tests::assert_product_matches(&p, &q.dequantize(), "Q6_K");
    }
}
