//! `Q4_0`, `Q4_1`, `Q5_0` and `Q5_1` values in panels ([`super`]): a file's blocks of 32 values
//! `v = d·u + m` (`u` in 0..16, or 0..32 with a fifth bit; `m = −8·d` for `Q4_0`, `−16·d` for
//! `Q5_0`, an `f16` of its own for `Q4_1` and `Q5_1`), laid out per panel as
//! - the values' low 4 bits, `16·k` bytes (the module's group layout);
//! - for the 5-bit types, their fifth bits as AVX-512 byte masks: per group of 8 values four
//!   `u64`, one per half of the columns and per nibble (low, high), bit `(c % 16)·4 + t` set
//!   where that register's byte for column `c`'s value `t` takes 16 (one masked add each);
//! - `d`: per block, 32 `f16` (one per column), as the file has it;
//! - `m` (`Q4_1`, `Q5_1`): per block, 32 `f16`.
//!
//! The file's own sizes: 4.5, 5, 5.5 and 6 bits a weight. The [`Q4Matrix`] the loader makes
//! keeps `d` and `m` as `f32` (6 bits a weight for `Q4_1`); at one activation row every byte
//! read counts, and an `f16` scale is one conversion per 16 columns.
//!
//! The arithmetic is the dot kernels' with the activations' blocks (8 bits, a scale `d_x` per
//! block, as llama.cpp's `Q8_0`): per block and column the integer `Σu·q_x`, then for a
//! centered block `(Σu·q_x + o·Σq_x)·(d·d_x)` (`o` = −8 or −16, exact in integers) and for
//! a block with an offset `Σu·q_x·(d·d_x) + m·(d_x·Σq_x)`.

use super::{exact_f16, set_nibble, Activations, Panels, Tile, PANEL};
use crate::model::quant::arena::{Buf, WeightArena};
use crate::model::quant::panels::{self, PanelFormat};
use crate::model::quant::q4::{Q4Matrix, RowScales};
use crate::model::quant::QK;
use half::f16;
use rayon::prelude::*;
use std::ops::Range;

/// How a panel's blocks are offset.
#[derive(Clone, Debug, PartialEq)]
enum Offsets {
    /// `m = o·d` with the same integer `o` for every block (`Q4_0`: −8, `Q5_0`: −16).
    Centered(i32),
    /// Per panel, per block, [`PANEL`] offsets (`Q4_1`, `Q5_1`).
    Block(Buf<f16>),
}

/// A `[rows, cols]` matrix of `Q4_0`, `Q4_1`, `Q5_0` or `Q5_1` values in panels; `rows` a
/// multiple of [`PANEL`], `cols` of [`QK`].
#[derive(Clone)]
pub struct Q4Panels {
    rows: usize,
    cols: usize,
    /// `rows · cols / 2` bytes of low 4 bits, a panel after the other.
    values: Buf<u8>,
    /// Empty (4-bit values), or per panel, per group of 8 values,
    /// [`super::MASKS`] fifth-bit masks.
    fifth: Buf<u64>,
    /// Per panel, per block, [`PANEL`] scales.
    d: Buf<f16>,
    offsets: Offsets,
}

impl std::fmt::Debug for Q4Panels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Q4Panels[{}, {}]", self.rows, self.cols)
    }
}

/// One panel's parts.
struct Panel<'a> {
    values: &'a [u8],
    /// Empty for 4-bit values.
    fifth: &'a [u64],
    d: &'a [f16],
    /// `None` for centered blocks.
    m: Option<&'a [f16]>,
    /// The centered blocks' `o` (0 with offsets of their own).
    center: i32,
    blocks: usize,
}

impl Panel<'_> {
    /// Column `c`'s value `v`, 0..16 or 0..32.
    fn value(&self, v: usize, c: usize) -> u8 {
        super::value(self.values, self.fifth, v, c)
    }

    /// Block `b`'s scale and offset for column `c`.
    fn scale_offset(&self, b: usize, c: usize) -> (f32, f32) {
        let d = self.d[b * PANEL + c].to_f32();
        match self.m {
            Some(m) => (d, m[b * PANEL + c].to_f32()),
            None => (d, self.center as f32 * d),
        }
    }
}

impl Q4Panels {
    /// `q` in panels, when it holds per-block scales (`Q4_0`, `Q4_1`, `Q5_0`, `Q5_1`) that
    /// `f16` holds exactly (the file's always do) and its rows fill whole panels; else `None`
    /// (it stays as it is).
    pub fn from_q4(q: &Q4Matrix) -> Option<Q4Panels> {
        let (rows, cols) = (q.rows(), q.cols());
        if q.has_super_block_scales()
            || rows == 0
            || !rows.is_multiple_of(PANEL)
            || cols == 0
            || !cols.is_multiple_of(QK)
        {
            return None;
        }
        let blocks = cols / QK;
        let offsets = match q.row(0).scales {
            RowScales::Centered { offset, .. } if offset.fract() == 0.0 && offset.abs() <= 64.0 => {
                Offsets::Centered(offset as i32)
            }
            RowScales::Block { .. } => Offsets::Block(vec![f16::ZERO; rows * blocks].into()),
            _ => return None,
        };
        let exact = (0..rows).into_par_iter().all(|r| match q.row(r).scales {
            // One offset for the whole matrix (`Q4Matrix` keeps it once).
            RowScales::Centered { d, .. } => d.iter().all(|&d| exact_f16(d).is_some()),
            RowScales::Block { d, m } => d.iter().chain(m).all(|&v| exact_f16(v).is_some()),
            RowScales::Super { .. } => false,
        });
        if !exact {
            return None;
        }
        let mut out = Q4Panels {
            rows,
            cols,
            values: vec![0; rows * cols / 2].into(),
            fifth: super::fifth_masks(q).into(),
            d: vec![f16::ZERO; rows * blocks].into(),
            offsets,
        };
        let fill = |p: usize, values: &mut [u8], d: &mut [f16], mut m: Option<&mut [f16]>| {
            for c in 0..PANEL {
                let row = q.row(p * PANEL + c);
                for b in 0..blocks {
                    let (rd, rm) = match row.scales {
                        RowScales::Centered { d, .. } => (d[b], None),
                        RowScales::Block { d, m } => (d[b], Some(m[b])),
                        RowScales::Super { .. } => unreachable!("checked above: per-block scales"),
                    };
                    d[b * PANEL + c] = f16::from_f32(rd);
                    if let (Some(m), Some(rm)) = (m.as_deref_mut(), rm) {
                        m[b * PANEL + c] = f16::from_f32(rm);
                    }
                    for (j, &u) in row.block_values(b).iter().enumerate() {
                        set_nibble(values, b * QK + j, c, u);
                    }
                }
            }
        };
        let values = out.values.par_chunks_mut(PANEL * cols / 2);
        let d = out.d.par_chunks_mut(PANEL * blocks);
        match &mut out.offsets {
            Offsets::Block(m) => values
                .zip(d)
                .zip(m.par_chunks_mut(PANEL * blocks))
                .enumerate()
                .for_each(|(p, ((values, d), m))| fill(p, values, d, Some(m))),
            Offsets::Centered(_) => values
                .zip(d)
                .enumerate()
                .for_each(|(p, (values, d))| fill(p, values, d, None)),
        }
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
        arena.place(&mut self.d);
        if let Offsets::Block(m) = &mut self.offsets {
            arena.place(m);
        }
    }

    /// Whether every buffer is in an arena ([`Q4Panels::place_in`] done).
    pub fn placed(&self) -> bool {
        let m = match &self.offsets {
            Offsets::Block(m) => m.placed(),
            Offsets::Centered(_) => true,
        };
        self.values.placed() && self.fifth.placed() && self.d.placed() && m
    }

    /// Bytes the matrix holds in memory (the file's blocks' size).
    pub fn bytes(&self) -> usize {
        let m = match &self.offsets {
            Offsets::Block(m) => m.len(),
            Offsets::Centered(_) => 0,
        };
        self.values.len() + 8 * self.fifth.len() + 2 * (self.d.len() + m)
    }

    /// Row `r` as `f32` (`out.len() == cols`): `d·u + m`, as the file's blocks give it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (part, c) = (self.panel(r / PANEL), r % PANEL);
        for (b, o) in out.chunks_exact_mut(QK).enumerate() {
            let (d, m) = part.scale_offset(b, c);
            for (j, o) in o.iter_mut().enumerate() {
                *o = d * part.value(b * QK + j, c) as f32 + m;
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
        let masks = k / 8 * super::MASKS;
        let (m, center) = match &self.offsets {
            Offsets::Block(m) => (Some(&m[p * PANEL * blocks..(p + 1) * PANEL * blocks]), 0),
            Offsets::Centered(o) => (None, *o),
        };
        Panel {
            values: &self.values[p * PANEL * k / 2..(p + 1) * PANEL * k / 2],
            fifth: self.fifth.get(p * masks..(p + 1) * masks).unwrap_or(&[]),
            d: &self.d[p * PANEL * blocks..(p + 1) * PANEL * blocks],
            m,
            center,
            blocks,
        }
    }
}

impl Panels for Q4Panels {
    const GROUP: usize = 1;
    const SUM_STEP: usize = QK;

    /// Unsigned values, a scale `d` and an offset `m` per block.
    const UNPACKED: PanelFormat = PanelFormat {
        step: QK,
        zero: 0,
        offsets: true,
    };

    fn tile_portable(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        portable_tile(&self.panel(p), xs, rows, out);
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_vnni(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        let part = self.panel(p);
        // SAFETY: the caller's CPU has the features; the panel and the activations hold `cols`
        // values a row, a multiple of 32, with one scale per block.
        unsafe {
            match (part.fifth.is_empty(), part.m.is_some()) {
                (true, false) => x86::tile::<false, false>(&part, xs, rows, out),
                (true, true) => x86::tile::<false, true>(&part, xs, rows, out),
                (false, false) => x86::tile::<true, false>(&part, xs, rows, out),
                (false, true) => x86::tile::<true, true>(&part, xs, rows, out),
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn tile_avx2(&self, p: usize, xs: &Activations, rows: Range<usize>, out: &mut Tile) {
        let part = self.panel(p);
        // SAFETY: the caller's CPU has the features; as in `tile_vnni`.
        unsafe {
            match (part.fifth.is_empty(), part.m.is_some()) {
                (true, false) => x86::tile_avx2::<false, false>(&part, xs, rows, out),
                (true, true) => x86::tile_avx2::<false, true>(&part, xs, rows, out),
                (false, false) => x86::tile_avx2::<true, false>(&part, xs, rows, out),
                (false, true) => x86::tile_avx2::<true, true>(&part, xs, rows, out),
            }
        }
    }

    /// The nibbles split into the 8-bit layout ([`super::unpack_nibbles`]), 16 added where
    /// a fifth bit is set, a block's scale `d` and offset `m`.
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
                for c in 0..PANEL {
                    (scales[c], offsets[c]) = part.scale_offset(b, c);
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
            for (b, &x_sum) in sums.iter().enumerate().take(p.blocks) {
                let isum: i32 = (b * QK..(b + 1) * QK)
                    .map(|v| p.value(v, c) as i32 * x[v] as i32)
                    .sum();
                let (d, dx) = (p.d[b * PANEL + c].to_f32(), xs.scale(r, b));
                acc += match p.m {
                    None => (isum + p.center * x_sum) as f32 * (d * dx),
                    Some(m) => {
                        isum as f32 * (d * dx) + m[b * PANEL + c].to_f32() * (dx * x_sum as f32)
                    }
                };
            }
            *o = acc;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Activations, Panel, Tile, PANEL};
    use crate::model::quant::resident::{block_products, load_f16x16, store_tile};
    use std::arch::x86_64::*;
    use std::ops::Range;

    /// [`super::portable_tile`] on AVX-512 VNNI, for 5-bit values (`FIVE`) or 4-bit, blocks
    /// with offsets of their own (`OFFSETS`) or centered.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and VNNI; the panel and the activations hold the same
    /// number of values a row, a multiple of 32, the activations one scale per block.
    #[target_feature(enable = "avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn tile<const FIVE: bool, const OFFSETS: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        rows: Range<usize>,
        out: &mut Tile,
    ) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows::<R, FIVE, OFFSETS>(p, xs, rows.start, out)
        })
    }

    /// [`tile`] for `R` activation rows from `r0`. With one or two rows each block's sums are
    /// split between the low and high nibbles' products, so that enough independent
    /// `vpdpbusd` chains run at once; with more, the rows give them.
    #[inline(always)]
    unsafe fn tile_rows<const R: usize, const FIVE: bool, const OFFSETS: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let values = p.values.as_ptr();
        let fifth = p.fifth.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for b in 0..p.blocks {
            let (lo, hi) = block_products::<R, FIVE>(values, fifth, b, &x);
            for h in 0..2 {
                let d = load_f16x16(p.d.as_ptr().add(b * PANEL + 16 * h));
                let m = match p.m {
                    Some(m) if OFFSETS => load_f16x16(m.as_ptr().add(b * PANEL + 16 * h)),
                    _ => _mm512_setzero_ps(),
                };
                for i in 0..R {
                    let mut sum = if R <= 2 {
                        _mm512_add_epi32(lo[i][h], hi[i][h])
                    } else {
                        lo[i][h]
                    };
                    let x_sum = *x_sums[i].add(b);
                    let dx = xs.scale(r0 + i, b);
                    if !OFFSETS {
                        sum = _mm512_add_epi32(sum, _mm512_set1_epi32(p.center * x_sum));
                    }
                    let scale = _mm512_mul_ps(d, _mm512_set1_ps(dx));
                    acc[i][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, acc[i][h]);
                    if OFFSETS {
                        acc[i][h] =
                            _mm512_fmadd_ps(m, _mm512_set1_ps(dx * x_sum as f32), acc[i][h]);
                    }
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
    /// values a row, a multiple of 32, the activations one scale per block.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2<const FIVE: bool, const OFFSETS: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        rows: Range<usize>,
        out: &mut Tile,
    ) {
        with_row_count!(rows.len(), crate::model::quant::panels::TILE_ROWS, |R| {
            tile_rows_avx2::<R, FIVE, OFFSETS>(p, xs, rows.start, out)
        })
    }

    /// Blocks the AVX2 kernel takes at a time, every quarter of the panel over them before
    /// the next: 8 (a k-quant super-block's worth, 4-5 KiB of a panel) stay in L1.
    const CHUNK_BLOCKS: usize = 8;

    /// [`tile_avx2`] for `R` activation rows from `r0`.
    #[inline(always)]
    unsafe fn tile_rows_avx2<const R: usize, const FIVE: bool, const OFFSETS: bool>(
        p: &Panel<'_>,
        xs: &Activations,
        r0: usize,
        out: &mut Tile,
    ) {
        use crate::model::quant::resident::avx2;
        let (x, x_sums) = xs.row_pointers::<R>(r0);
        let (values, fifth) = (p.values.as_ptr(), p.fifth.as_ptr());
        // Eight blocks at a time, each quarter in turn, so that their bytes come from memory
        // once (see `q4k`'s AVX2 kernel).
        let ones = avx2::ones();
        let mut acc = [[_mm256_setzero_ps(); R]; PANEL / avx2::QUARTER];
        for chunk in (0..p.blocks).step_by(CHUNK_BLOCKS) {
            for (quarter, acc) in acc.iter_mut().enumerate() {
                let column = quarter * avx2::QUARTER;
                for b in chunk..(chunk + CHUNK_BLOCKS).min(p.blocks) {
                    let sums = avx2::block_products::<R, FIVE>(values, fifth, b, quarter, &x, ones);
                    let d = avx2::load_f16x8(p.d.as_ptr().add(b * PANEL + column));
                    let m = match p.m {
                        Some(m) if OFFSETS => avx2::load_f16x8(m.as_ptr().add(b * PANEL + column)),
                        _ => _mm256_setzero_ps(),
                    };
                    for i in 0..R {
                        let x_sum = *x_sums[i].add(b);
                        let dx = xs.scale(r0 + i, b);
                        let mut sum = sums[i];
                        if !OFFSETS {
                            sum = _mm256_add_epi32(sum, _mm256_set1_epi32(p.center * x_sum));
                        }
                        let scale = _mm256_mul_ps(d, _mm256_set1_ps(dx));
                        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, acc[i]);
                        if OFFSETS {
                            acc[i] = _mm256_fmadd_ps(m, _mm256_set1_ps(dx * x_sum as f32), acc[i]);
                        }
                    }
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
    use crate::model::quant::q4::tests::{random_blocks, random_k};

    /// A matrix of `ty`'s random blocks and its values computed from the format's definition
    /// (`quant::q4`'s independent reference).
    fn blocks(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> (Q4Matrix, Vec<f32>) {
        let (bytes, values) = random_blocks(ty, rows, cols, seed);
        let q = Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| r).expect("blocks");
        (q, values)
    }

    const TYPES: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];

    #[test]
    fn panels_hold_the_blocks_values_in_the_files_size() {
        for (ty, file_bytes) in TYPES.into_iter().zip([18, 20, 22, 24]) {
            let (q, values) = blocks(ty, 64, 96, 3);
            let p = Q4Panels::from_q4(&q).expect("whole panels");
            assert_eq!((p.rows(), p.cols()), (64, 96));
            assert_eq!(p.bytes(), 64 * 96 / QK * file_bytes, "{ty:?}");
            let mut got = vec![0f32; 96];
            for r in 0..64 {
                p.dequantize_row(r, &mut got);
                assert_eq!(got, values[r * 96..(r + 1) * 96].to_vec(), "{ty:?} row {r}");
            }
        }
    }

    #[test]
    fn only_whole_panels_of_per_block_scales_are_laid_out() {
        assert!(Q4Panels::from_q4(&blocks(GgmlType::Q4_1, 48, 64, 1).0).is_none());
        assert!(Q4Panels::from_q4(&blocks(GgmlType::Q4_1, 32, 64, 1).0).is_some());
        let bytes = random_k(GgmlType::Q4_K, 32, 256, 2);
        let q4k = Q4Matrix::from_gguf(GgmlType::Q4_K, &bytes, 32, 256, |r| r).expect("Q4_K");
        assert!(Q4Panels::from_q4(&q4k).is_none());
    }

    #[test]
    fn the_largest_values_times_the_largest_activations_are_exact() {
        // Every weight byte at its top value (15, or 31 with the fifth bit; d = 1, m = 0), on
        // every path (`assert_extremes_exact`).
        let (rows, cols) = (32, 256);
        for (ty, want_value) in TYPES.into_iter().zip([7.0f32, 15.0, 15.0, 31.0]) {
            let mut block = half::f16::ONE.to_le_bytes().to_vec();
            if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                block.extend(half::f16::ZERO.to_le_bytes());
            }
            let five = matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1);
            block.extend(vec![0xFFu8; if five { 4 + 16 } else { 16 }]);
            let bytes = block.repeat(rows * cols / QK);
            let q = Q4Matrix::from_gguf(ty, &bytes, rows, cols, |r| r).expect("blocks");
            let p = Q4Panels::from_q4(&q).expect("whole panels");
            super::super::tests::assert_extremes_exact(&p, want_value, &format!("{ty:?}"));
        }
    }

    #[test]
    fn the_product_matches_the_dequantized_weights() {
        // 576 columns: 18 blocks, SmolLM2-135M's hidden size, not a multiple of 256.
        for (i, ty) in TYPES.into_iter().enumerate() {
            let (q, values) = blocks(ty, 64, 576, 20 + i as u64);
            let p = Q4Panels::from_q4(&q).expect("whole panels");
            super::super::tests::assert_product_matches(&p, &values, &format!("{ty:?}"));
        }
    }
}
