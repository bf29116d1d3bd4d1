//! `Q4_K` and `Q5_K` values in panels ([`super`]): the values and scales a [`Q4Matrix`] of
//! `Q4_K` or `Q5_K` holds (4- or 5-bit values, per block a 6-bit `sc` and `mn` byte, per
//! super-block a `d` and a `dmin`), laid out per panel as
//! - the values' nibbles, `16·k` bytes (the module's group layout);
//! - `Q5_K`'s fifth bits as byte masks (`MASKS` per group of 8 values, as
//!   [`super::Q4Panels`] keeps `Q5_0`'s);
//! - `sc` and `mn`: per block of 32 values, 32 bytes (one per column);
//! - `d` and `dmin`: per super-block of 256 values, 32 `f16` (one per column), as the file has
//!   them.
//!
//! 4.625 bits a weight for `Q4_K`, 5.625 for `Q5_K` (the file: 4.5 and 5.5, its 6-bit `sc` and
//! `mn` packed in 12 bytes).
//!
//! The arithmetic is the dot kernels' (`v = (d·sc)·q − dmin·mn`): per block and column the
//! integer `Σq·q_x`, times `sc` and summed over the super-block's eight blocks in integers (at
//! most 8·63·32·31·127 < 2³¹), as is `Σ mn·Σq_x`; per super-block one conversion and two
//! multiply-adds by `d·d_x` and `−dmin·d_x`.

use super::{exact_f16, set_nibble, Activations, Panels, Tile, PANEL};
use crate::model::quant::arena::{Buf, WeightArena};
use crate::model::quant::panels::{self, PanelFormat};
use crate::model::quant::q4::{Q4Matrix, RowScales, SUB_BLOCKS};
use crate::model::quant::QK;
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

/// A `[rows, cols]` matrix of `Q4_K` or `Q5_K` values in panels; `rows` a multiple of
/// [`PANEL`], `cols` of 256.
#[derive(Clone)]
pub struct Q4kPanels {
    rows: usize,
    cols: usize,
    /// `rows · cols / 2` bytes, a panel after the other.
    values: Buf<u8>,
    /// Per panel, per block, [`PANEL`] scale multipliers.
    sc: Buf<u8>,
    /// Per panel, per block, [`PANEL`] min multipliers.
    mn: Buf<u8>,
    /// Empty (`Q4_K`), or `Q5_K`'s fifth bits: per panel, per group of 8 values,
    /// [`super::MASKS`] masks.
    fifth: Buf<u64>,
    /// Per panel, per super-block, [`PANEL`] scales.
    d: Buf<f16>,
    /// Per panel, per super-block, [`PANEL`] mins.
    dmin: Buf<f16>,
}

impl std::fmt::Debug for Q4kPanels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4kPanels[{}, {}]", self.rows, self.cols)
    }
}

/// One panel's parts.
struct Panel<'a> {
    values: &'a [u8],
    /// Empty for 4-bit values.
    fifth: &'a [u64],
    sc: &'a [u8],
    mn: &'a [u8],
    d: &'a [f16],
    dmin: &'a [f16],
    supers: usize,
}

impl Q4kPanels {
    /// `q` in panels, when it holds `Q4_K` or `Q5_K` values (super-block scales) and its rows
    /// fill whole panels; else `None` (it stays as it is).
    pub fn from_q4(q: &Q4Matrix) -> Option<Q4kPanels> {
        let (rows, cols) = (q.rows(), q.cols());
        if !q.has_super_block_scales()
            || rows == 0
            || !rows.is_multiple_of(PANEL)
            || cols == 0
            || !cols.is_multiple_of(QK * SUB_BLOCKS)
        {
            return None;
        }
        let blocks = cols / QK;
        let supers = blocks / SUB_BLOCKS;
        let exact = (0..rows).into_par_iter().all(|r| match q.row(r).scales {
            RowScales::Super { d, dmin, .. } => {
                d.iter().chain(dmin).all(|&v| exact_f16(v).is_some())
            }
            _ => false,
        });
        if !exact {
            return None;
        }
        let mut out = Q4kPanels {
            rows,
            cols,
            values: vec![0; rows * cols / 2].into(),
            fifth: super::fifth_masks(q).into(),
            sc: vec![0; rows * blocks].into(),
            mn: vec![0; rows * blocks].into(),
            d: vec![f16::ZERO; rows * supers].into(),
            dmin: vec![f16::ZERO; rows * supers].into(),
        };
        out.values
            .par_chunks_mut(PANEL * cols / 2)
            .zip(out.sc.par_chunks_mut(PANEL * blocks))
            .zip(out.mn.par_chunks_mut(PANEL * blocks))
            .zip(out.d.par_chunks_mut(PANEL * supers))
            .zip(out.dmin.par_chunks_mut(PANEL * supers))
            .enumerate()
            .for_each(|(p, ((((values, sc), mn), d), dmin))| {
                for c in 0..PANEL {
                    let row = q.row(p * PANEL + c);
                    let RowScales::Super {
                        d: rd,
                        dmin: rdmin,
                        sc: rsc,
                        mn: rmn,
                    } = row.scales
                    else {
                        unreachable!("checked above: super-block scales");
                    };
                    for s in 0..supers {
                        d[s * PANEL + c] = f16::from_f32(rd[s]);
                        dmin[s * PANEL + c] = f16::from_f32(rdmin[s]);
                    }
                    for b in 0..blocks {
                        sc[b * PANEL + c] = rsc[b];
                        mn[b * PANEL + c] = rmn[b];
                        for (j, &u) in row.block_values(b).iter().enumerate() {
                            set_nibble(values, b * QK + j, c, u);
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
        arena.place(&mut self.values);
        arena.place(&mut self.fifth);
        arena.place(&mut self.sc);
        arena.place(&mut self.mn);
        arena.place(&mut self.d);
        arena.place(&mut self.dmin);
    }

    /// Whether every buffer is in an arena ([`Q4kPanels::place_in`] done).
    pub fn placed(&self) -> bool {
        [self.values.placed(), self.fifth.placed(), self.sc.placed()]
            .into_iter()
            .chain([self.mn.placed(), self.d.placed(), self.dmin.placed()])
            .all(|p| p)
    }

    /// Bytes the matrix holds in memory.
    pub fn bytes(&self) -> usize {
        self.values.len()
            + 8 * self.fifth.len()
            + self.sc.len()
            + self.mn.len()
            + 2 * (self.d.len() + self.dmin.len())
    }

    /// Row `r` as `f32` (`out.len() == cols`): `(d·sc)·q − dmin·mn`, as [`Q4Matrix`] gives it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (part, c) = (self.panel(r / PANEL), r % PANEL);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let s = b / SUB_BLOCKS;
            let d = part.d[s * PANEL + c].to_f32() * part.sc[b * PANEL + c] as f32;
            let m = -(part.dmin[s * PANEL + c].to_f32() * part.mn[b * PANEL + c] as f32);
            for (j, o) in o.iter_mut().enumerate() {
                *o = d * super::value(part.values, part.fifth, b * QK + j, c) as f32 + m;
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
        let (k, blocks) = (self.cols, self.cols / QK);
        let supers = blocks / SUB_BLOCKS;
        Panel {
            values: &self.values[p * PANEL * k / 2..(p + 1) * PANEL * k / 2],
            fifth: (self
                .fifth
                .get(p * k / 8 * super::MASKS..(p + 1) * k / 8 * super::MASKS))
            .unwrap_or(&[]),
            sc: &self.sc[p * PANEL * blocks..(p + 1) * PANEL * blocks],
            mn: &self.mn[p * PANEL * blocks..(p + 1) * PANEL * blocks],
            d: &self.d[p * PANEL * supers..(p + 1) * PANEL * supers],
            dmin: &self.dmin[p * PANEL * supers..(p + 1) * PANEL * supers],
            supers,
        }
    }
}

impl Panels for Q4kPanels {
    const GROUP: usize = SUB_BLOCKS;
    const SUM_STEP: usize = QK;

    /// Unsigned values, a scale `d·sc` and an offset `−dmin·mn` per block.
    const UNPACKED: PanelFormat = PanelFormat {
        step: QK,
        zero: 0,
        offsets: true,
    };

    fn tile_portable(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        portable_tile(&self.panel(p), xs, rows, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        // SAFETY: the caller's CPU has AVX2, FMA and F16C; the panel and the activations hold
        // `cols` values a row, a multiple of 256.
        unsafe {
            let part = self.panel(p);
            match part.fifth.is_empty() {
                true => x86::tile_avx2::<false>(&part, xs, rows, out),
                false => x86::tile_avx2::<true>(&part, xs, rows, out),
            }
        };
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_vnni(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        // SAFETY: the caller's CPU has the features; the panel and the activations hold `cols`
        // values a row, a multiple of 256.
        unsafe {
            let part = self.panel(p);
            match part.fifth.is_empty() {
                true => x86::tile::<false>(&part, xs, rows, out),
                false => x86::tile::<true>(&part, xs, rows, out),
            }
        };
    }

    /// The nibbles split into the 8-bit layout ([`super::unpack_nibbles`]), a block's scale
    /// `d·sc` and offset `−dmin·mn`.
    fn unpack(&self, p: usize, into: &mut panels::Panel) {
        let part = self.panel(p);
        into.fill(Self::UNPACKED, self.cols, |values, scales, offsets| {
            super::unpack_nibbles(part.values, values);
            super::unpack_fifth(part.fifth, values);
            for (b, (scales, offsets)) in scales
                .chunks_exact_mut(PANEL)
                .zip(offsets.chunks_exact_mut(PANEL))
                .enumerate()
            {
                let s = b / SUB_BLOCKS;
                for c in 0..PANEL {
                    scales[c] = part.d[s * PANEL + c].to_f32() * part.sc[b * PANEL + c] as f32;
                    offsets[c] =
                        -(part.dmin[s * PANEL + c].to_f32() * part.mn[b * PANEL + c] as f32);
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
                let (mut iacc, mut macc) = (0i32, 0i32);
                let blocks = s * SUB_BLOCKS..(s + 1) * SUB_BLOCKS;
                for (b, &x_sum) in blocks.clone().zip(&sums[blocks]) {
                    let isum: i32 = (b * QK..(b + 1) * QK)
                        .map(|v| super::value(p.values, p.fifth, v, c) as i32 * x[v] as i32)
                        .sum();
                    iacc += isum * p.sc[b * PANEL + c] as i32;
                    macc += x_sum * p.mn[b * PANEL + c] as i32;
                }
                let dx = xs.scale(r, s);
                acc += iacc as f32 * (p.d[s * PANEL + c].to_f32() * dx);
                acc -= macc as f32 * (p.dmin[s * PANEL + c].to_f32() * dx);
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Activations, Panel, Tile, PANEL, SUB_BLOCKS};
    use crate::model::quant::resident::{block_products, load_f16x16, store_tile};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// [`super::portable_tile`] on AVX-512 VNNI.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI; the panel and the activations hold the same
    /// number of values a row, a multiple of 256.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const FIVE: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        rows: Range<usize>,
        out: &mut Tile,
    ) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows::<R, FIVE>(p, xs, rows.start, out)
        })
    }

    /// [`tile`] for `R` activation rows from `r0`. With one or two rows each block's sums are
    /// split between the low and high nibbles' products, so that enough independent
    /// `vpdpbusd` chains run at once; with more, the rows give them.
    #[inline(always)]
    unsafe fn tile_rows<const R: usize, const FIVE: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let values = p.values.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for s in 0..p.supers {
            let mut iacc = [[_mm512_setzero_si512(); 2]; R];
            let mut macc = [[_mm512_setzero_si512(); 2]; R];
            for b in s * SUB_BLOCKS..(s + 1) * SUB_BLOCKS {
                let (lo, hi) = block_products::<R, FIVE>(values, p.fifth.as_ptr(), b, &x);
                let bytes16 = |v: &[u8], at: usize| {
                    _mm512_cvtepu8_epi32(_mm_loadu_si128(v.as_ptr().add(at) as *const __m128i))
                };
                for h in 0..2 {
                    let sc = bytes16(p.sc, b * PANEL + 16 * h);
                    let mn = bytes16(p.mn, b * PANEL + 16 * h);
                    for i in 0..R {
                        let sum = if R <= 2 {
                            _mm512_add_epi32(lo[i][h], hi[i][h])
                        } else {
                            lo[i][h]
                        };
                        iacc[i][h] = _mm512_add_epi32(iacc[i][h], _mm512_mullo_epi32(sum, sc));
                        let bs = _mm512_set1_epi32(*x_sums[i].add(b));
                        macc[i][h] = _mm512_add_epi32(macc[i][h], _mm512_mullo_epi32(mn, bs));
                    }
                }
            }
            for h in 0..2 {
                let d = load_f16x16(p.d.as_ptr().add(s * PANEL + 16 * h));
                let dmin = load_f16x16(p.dmin.as_ptr().add(s * PANEL + 16 * h));
                for i in 0..R {
                    let dx = _mm512_set1_ps(xs.scale(r0 + i, s));
                    acc[i][h] = _mm512_fmadd_ps(
                        _mm512_cvtepi32_ps(iacc[i][h]),
                        _mm512_mul_ps(d, dx),
                        acc[i][h],
                    );
                    acc[i][h] = _mm512_fnmadd_ps(
                        _mm512_cvtepi32_ps(macc[i][h]),
                        _mm512_mul_ps(dmin, dx),
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
    pub(super) unsafe fn tile_avx2<const FIVE: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        rows: Range<usize>,
        out: &mut Tile,
    ) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows_avx2::<R, FIVE>(p, xs, rows.start, out)
        })
    }

    /// [`tile_avx2`] for `R` activation rows from `r0`: per block the integer products
    /// ([`avx2::block_products`]) times `sc`, and `mn` times the activations' block sum, summed
    /// over the super-block in `i32` as the VNNI kernel does.
    #[inline(always)]
    unsafe fn tile_rows_avx2<const R: usize, const FIVE: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        use crate::model::quant::resident::avx2;
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let (values, fifth) = (p.values.as_ptr(), p.fifth.as_ptr());
        // Super-block by super-block, each quarter in turn: the super-block's values (4 KiB,
        // 128 bytes a group of which a quarter reads 32) are read from memory once, by the
        // first quarters, and from L1 by the others; quarters outermost read each line from
        // memory twice, at a stride the prefetcher follows badly (`perf`: batch-1 decode
        // waiting on these loads).
        let mut acc = [[_mm256_setzero_ps(); R]; PANEL / avx2::QUARTER];
        for s in 0..p.supers {
            for (quarter, acc) in acc.iter_mut().enumerate() {
                let column = quarter * avx2::QUARTER;
                let mut iacc = [_mm256_setzero_si256(); R];
                let mut macc = [_mm256_setzero_si256(); R];
                let blocks = s * SUB_BLOCKS..(s + 1) * SUB_BLOCKS;
                for b in blocks.clone() {
                    // `sc` applied by the `vpmaddwd` that widens the 16-bit sums.
                    let sc = avx2::sixteen_bit_pairs(p.sc.as_ptr().add(b * PANEL + column));
                    let sums = avx2::block_products::<R, FIVE>(values, fifth, b, quarter, &x, sc);
                    for i in 0..R {
                        iacc[i] = _mm256_add_epi32(iacc[i], sums[i]);
                    }
                }
                // `Σ mn·Σq_x`, two blocks per `vpmaddwd` (`mn` ≤ 63, a block's `Σq_x` within
                // ±32·128: both fit 16 bits).
                for b in blocks.step_by(2) {
                    let mn = p.mn.as_ptr().add(b * PANEL + column);
                    let mn = avx2::interleaved_pairs(mn, mn.add(PANEL));
                    for i in 0..R {
                        let (s0, s1) = (*x_sums[i].add(b), *x_sums[i].add(b + 1));
                        let pair = (s1 << 16) | (s0 & 0xFFFF);
                        let m = _mm256_madd_epi16(mn, _mm256_set1_epi32(pair));
                        macc[i] = _mm256_add_epi32(macc[i], m);
                    }
                }
                let d = avx2::load_f16x8(p.d.as_ptr().add(s * PANEL + column));
                let dmin = avx2::load_f16x8(p.dmin.as_ptr().add(s * PANEL + column));
                for i in 0..R {
                    let dx = _mm256_set1_ps(xs.scale(r0 + i, s));
                    let (id, im) = (_mm256_cvtepi32_ps(iacc[i]), _mm256_cvtepi32_ps(macc[i]));
                    acc[i] = _mm256_fmadd_ps(id, _mm256_mul_ps(d, dx), acc[i]);
                    acc[i] = _mm256_fnmadd_ps(im, _mm256_mul_ps(dmin, dx), acc[i]);
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

    /// A `Q4_K` or `Q5_K` matrix of random super-blocks (`quant::q4`'s generator).
    fn random_k(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Q4Matrix {
        let bytes = crate::model::quant::q4::tests::random_k(ty, rows, cols, seed);
        Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| r).expect("k-quant")
    }

    #[test]
    fn panels_hold_the_blocks_values() {
        // Per super-block: 128 bytes of nibbles, 8 + 8 of `sc` and `mn`, 2 + 2 of `d` and
        // `dmin`; `Q5_K` 32 bytes of fifth bits more.
        for (ty, per_super) in [(GgmlType::Q4_K, 148), (GgmlType::Q5_K, 180)] {
            let q = random_k(ty, 64, 512, 3);
            let p = Q4kPanels::from_q4(&q).expect("whole panels");
            assert_eq!((p.rows(), p.cols()), (64, 512));
            assert_eq!(p.bytes(), 64 * 512 / 256 * per_super, "{ty:?}");
            let (mut want, mut got) = (vec![0f32; 512], vec![0f32; 512]);
            for r in 0..64 {
                q.dequantize_row(r, &mut want);
                p.dequantize_row(r, &mut got);
                assert_eq!(got, want, "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn only_whole_panels_of_super_blocks_are_laid_out() {
        assert!(Q4kPanels::from_q4(&random_k(GgmlType::Q4_K, 48, 256, 1)).is_none());
        assert!(Q4kPanels::from_q4(&random_k(GgmlType::Q4_K, 32, 256, 1)).is_some());
        let mut rng = rand::rngs::StdRng::seed_from_u64(2);
        let bytes: Vec<u8> = (0..32 * 8 * 20).map(|_| rng.random::<u8>()).collect();
        let q4_1 = Q4Matrix::from_gguf(GgmlType::Q4_1, &bytes, 32, 256, |r| r).expect("Q4_1");
        assert!(Q4kPanels::from_q4(&q4_1).is_none());
    }

    #[test]
    fn the_largest_values_times_the_largest_activations_are_exact() {
        // Every 6-bit `sc` and `mn` at 63 (the 12 scale bytes all 0xFF), every value at 15
        // (31 with the fifth bits), `d` = 1 and `dmin` = 0: a value of 63·15 (63·31).
        for (ty, top) in [(GgmlType::Q4_K, 15.0f32), (GgmlType::Q5_K, 31.0)] {
            let mut block = half::f16::ONE.to_le_bytes().to_vec();
            block.extend(half::f16::ZERO.to_le_bytes());
            let rest = if ty == GgmlType::Q5_K {
                12 + 32 + 128
            } else {
                12 + 128
            };
            block.extend(vec![0xFFu8; rest]);
            let (rows, cols) = (32, 512);
            let bytes = block.repeat(rows * cols / 256);
            let q = Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| r).expect("k-quant");
            let p = Q4kPanels::from_q4(&q).expect("whole panels");
            super::super::tests::assert_extremes_exact(&p, 63.0 * top, &format!("{ty:?}"));
        }
    }

    #[test]
    fn the_product_matches_the_dequantized_weights() {
        for ty in [GgmlType::Q4_K, GgmlType::Q5_K] {
            let q = random_k(ty, 96, 768, 11);
            let p = Q4kPanels::from_q4(&q).expect("whole panels");
            super::super::tests::assert_product_matches(&p, &q.dequantize(), &format!("{ty:?}"));
        }
    }
}
